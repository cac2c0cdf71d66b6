"""ghost_inner_product (tiled Gram form) against the explicit weight-gradient inner product in float64; the
numeric test also runs for the CUDA kernel on a machine with a GPU (`pytest tests/test_csrc_ghost.py -k cuda`)."""
import pytest
import torch

from geffect_kernels.backends.cpp import ghost
from geffect_kernels.backends.cpp.ghost import ghost_available, ghost_inner_product
from csrc_cases import assert_close, generator, require_extension

NA, NB, D_OUT, D_IN, SEGMENTS = 37, 53, 19, 23, 4


@pytest.fixture(scope="module", autouse=True)
def ext():
    return require_extension("cpu")


def sides(seed, dtype=torch.float64, device="cpu"):
    g = generator(seed)
    return [torch.randn(*shape, dtype=torch.float64, generator=g).to(device, dtype)
            for shape in ((NA, D_OUT), (NA, D_IN), (NB, D_OUT), (NB, D_IN))]


def segments(seed, device="cpu"):
    return torch.randint(0, SEGMENTS, (NA,), generator=generator(seed)).to(device)


@pytest.fixture(params=["cpu", "cuda"])
def dev(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU here: the CUDA Gram kernel is checked in the GPU suite")
    require_extension(request.param)
    return torch.device(request.param)


def weight_gradient_products(ga, xa, gb, xb, segment_ids):
    """Per segment s: ⟨G_a,sᵀ X_a,s, G_bᵀ X_b⟩_F from the materialized d_out × d_in gradients."""
    ga, xa, gb, xb = (t.double() for t in (ga, xa, gb, xb))
    grad_b = gb.T @ xb
    return torch.stack([((ga[segment_ids == s].T @ xa[segment_ids == s]) * grad_b).sum() for s in range(SEGMENTS)])


@pytest.mark.parametrize("tile", [2048, 16])  # one tile; several, with partial tiles on both sides
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_matches_materialized_gradients(monkeypatch, dev, tile, dtype):
    monkeypatch.setattr(ghost, "TILE_ROWS", tile)  # the CPU path's tiles
    ga, xa, gb, xb = sides(1, dtype, dev)
    seg = segments(2, dev)
    expected = weight_gradient_products(ga, xa, gb, xb, seg)
    per_segment = ghost_inner_product(ga, xa, gb, xb, segment_ids=seg, num_segments=SEGMENTS)
    total = ghost_inner_product(ga, xa, gb, xb)
    assert per_segment.dtype == total.dtype == torch.float64
    assert per_segment.shape == (SEGMENTS,) and total.shape == ()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close(per_segment, expected, tol, "per segment")
    assert_close(total, expected.sum(), tol, "total")


def test_empty_segments_are_zero():
    ga, xa, gb, xb = sides(3)
    out = ghost_inner_product(ga, xa, gb, xb, segment_ids=torch.zeros(NA, dtype=torch.int64), num_segments=3)
    assert out[1] == 0 and out[2] == 0 and out[0] != 0


def test_available_on_cpu():
    assert ghost_available("cpu")


@pytest.mark.parametrize("change,match", [
    (lambda a: (a[0][:-1], *a[1:]), "same number of rows"),
    (lambda a: (a[0], a[1], a[2][:, :-1], a[3]), "feature sizes differ"),
    (lambda a: (a[0].float(), *a[1:]), "grad_a is"),
])
def test_rejects_mismatched_inputs(change, match):
    with pytest.raises(ValueError, match=match):
        ghost_inner_product(*change(sides(4)))


def test_rejects_bad_segments():
    args = sides(5)
    with pytest.raises(ValueError, match=r"lie in \[0, 2\)"):
        ghost_inner_product(*args, segment_ids=segments(6), num_segments=2)
    with pytest.raises(ValueError, match="needs num_segments"):
        ghost_inner_product(*args, segment_ids=segments(6))
    with pytest.raises(ValueError, match="int64"):
        ghost_inner_product(*args, segment_ids=segments(6).int(), num_segments=SEGMENTS)
