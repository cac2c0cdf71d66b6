"""The Gram inner product on tensor cores (Triton; the interpreter on CPU) against float64, and the choice
between it and the csrc kernel by measured time."""
import pytest
import torch

from geffect_kernels.backends.cpp import ghost
from geffect_kernels.backends.triton.config import interpreting
from geffect_kernels.backends.triton.gram import gram_inner_product

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or interpreting()), reason="needs Triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sides(seed, na=37, nb=45, d_out=70, d_in=33):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=torch.float64) for n, d in ((na, d_out), (na, d_in), (nb, d_out),
                                                                           (nb, d_in))]


def exact(ga, xa, gb, xb):
    return ((ga @ gb.T) * (xa @ xb.T)).sum(1)  # per row i of side a


def test_total_and_per_segment_match_float64():
    ga, xa, gb, xb = sides(0)
    rows = exact(ga, xa, gb, xb)
    args = [t.float().to(DEVICE) for t in (ga, xa, gb, xb)]
    got = gram_inner_product(*args)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.cpu(), rows.sum(), rtol=1e-5, atol=1e-6 * rows.abs().sum().item())
    seg = torch.randint(0, 4, (ga.shape[0],), generator=torch.Generator().manual_seed(1))
    per = gram_inner_product(*args, segment_ids=seg.to(DEVICE), num_segments=5)
    expected = torch.zeros(5, dtype=torch.float64).index_add_(0, seg, rows)
    torch.testing.assert_close(per.cpu(), expected, rtol=1e-5, atol=1e-6 * rows.abs().sum().item())
    assert per[4] == 0


def test_fastest_gram_picks_a_measured_implementation_with_the_same_answer():
    ga, xa, gb, xb = sides(2, na=20, nb=28)
    args = [t.float().to(DEVICE) for t in (ga, xa, gb, xb)]
    found = ghost.gram_implementations(args[0].device, torch.float32)
    assert "triton" in found
    name, gram = ghost.fastest_gram(*args)
    assert name in found
    assert ghost.fastest_gram(*args)[0] == name  # measured once per size class
    torch.testing.assert_close(gram(*args).cpu(), exact(ga, xa, gb, xb).sum(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="same number of rows"):
        found["triton"](args[0][:-1], *args[1:])
