"""The factored inner products (DESIGN §4) against dense gradients, each form forced by the shapes."""
import pytest
import torch

from geffect_kernels.backends.cpp import ghost
from geffect_kernels.geffect import inner
from geffect_kernels.geffect.inner import Factored, Gathered, HeadRows, Summed, row_dots


def dense(use, shape):
    if isinstance(use, Factored):
        return use.left.t() @ use.right
    if isinstance(use, Gathered):
        return torch.zeros(shape, dtype=use.rows.dtype).index_add_(0, use.ids, use.rows)
    return use.rows.sum(0)


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def check_rows(a, b, shape):
    rows = row_dots(a, b)
    assert rows.dtype == torch.float64 and rows.shape == (a.n_rows,)
    # Row i of a alone against all of b.
    for i in (0, a.n_rows - 1):
        one = type(a)(*(f[i:i + 1] for f in vars(a).values()))
        assert float(rows[i]) == pytest.approx(float((dense(one, shape) * dense(b, shape)).sum()), rel=1e-10)
    assert float(rows.sum()) == pytest.approx(float((dense(a, shape) * dense(b, shape)).sum()), rel=1e-10)


@pytest.mark.parametrize("torch_tiles", [False, True])
def test_factored_gram_rows_csrc_or_torch_tiles(torch_tiles, monkeypatch):
    """Gram rows of two linear-layer uses, through the C++ kernel when built and the torch tiles (its fallback
    where the extension is absent) forced."""
    monkeypatch.setattr(ghost, "TORCH_TILE_ELEMENTS", 16)  # several Gram tiles
    if torch_tiles:
        monkeypatch.setattr(inner, "_ghost_kernel", lambda device: None)
    check_rows(Factored(rand(5, 40), rand(5, 30)), Factored(rand(7, 40), rand(7, 30)), (40, 30))


def test_torch_gram_keeps_the_kernels_contract(monkeypatch):
    """The torch tiles (cuBLAS among `ghost.fastest_gram`'s candidates on a GPU) in several row blocks: total
    and per-segment sums in float64, bad segment ids refused; `fastest_gram` keeps one candidate per size
    class, with the same answer."""
    monkeypatch.setattr(ghost, "TORCH_TILE_ELEMENTS", 40)  # 3 rows of b's 11 per block
    la, ra, lb, rb = rand(9, 10), rand(9, 7), rand(11, 10), rand(11, 7)
    rows = ((la @ lb.t()) * (ra @ rb.t())).sum(1)
    torch.testing.assert_close(ghost.torch_gram(la, ra, lb, rb), rows.sum(), rtol=1e-12, atol=0)
    seg = torch.tensor([0, 2, 2, 1, 0, 2, 1, 1, 0])
    torch.testing.assert_close(ghost.torch_gram(la, ra, lb, rb, seg, 4),
                               torch.zeros(4, dtype=torch.float64).index_add_(0, seg, rows), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
        ghost.torch_gram(la, ra, lb, rb, seg, 2)
    args = [t.float() for t in (la, ra, lb, rb)]
    assert "torch" in ghost.gram_implementations("cpu", torch.float32)
    name, gram = ghost.fastest_gram(*args)
    assert ghost.fastest_gram(*args)[0] == name in ghost.gram_implementations("cpu", torch.float32)
    torch.testing.assert_close(gram(*args), rows.sum(), rtol=1e-5, atol=0)


def test_sample_dense_every_kind():
    """Per-sample dense gradients (the projection form's factor) against the definition sample by sample."""
    n_samples, per, vocab, h = 3, 4, 11, 6
    uses = [Factored(rand(12, 5), rand(12, h)), Gathered(torch.randint(0, vocab, (12,)), rand(12, h)),
            Summed(rand(12, h))]
    for use, shape in zip(uses, [(5, h), (vocab, h), (h,)]):
        got = inner.sample_dense(use, n_samples, shape)
        for s in range(n_samples):
            one = type(use)(*(f[s * per:(s + 1) * per] for f in vars(use).values()))
            torch.testing.assert_close(got[s], dense(one, shape), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(inner.sample_dense(use, 1, shape)[0], dense(use, shape), rtol=1e-12, atol=1e-12)
        scale = rand(n_samples)
        scaled = inner.sample_dense(inner.SampleScaled(use, scale), n_samples, shape)
        torch.testing.assert_close(scaled, got * scale.reshape(-1, *([1] * len(shape))), rtol=1e-12, atol=1e-12)
        explicit = inner.sample_dense(inner.SampleScaled(use, scale).explicit(), n_samples, shape)
        torch.testing.assert_close(explicit, scaled, rtol=1e-12, atol=1e-12)
        b = Factored(rand(7, 5), rand(7, h)) if isinstance(use, Factored) else Summed(rand(3, h)) \
            if isinstance(use, Summed) else Gathered(torch.randint(0, vocab, (5,)), rand(5, h))
        rows = row_dots(inner.SampleScaled(use, scale), b)
        torch.testing.assert_close(rows, row_dots(use, b) * scale.repeat_interleave(per), rtol=1e-12, atol=1e-12)


def test_embedding_rows_against_every_kind():
    vocab, h = 11, 6
    ids_a, ids_b = torch.tensor([3, 5, 3, 0, 10]), torch.tensor([5, 7, 3, 3])
    a = Gathered(ids_a, rand(5, h))
    check_rows(a, Gathered(ids_b, rand(4, h)), (vocab, h))
    check_rows(a, Factored(rand(9, vocab), rand(9, h)), (vocab, h))  # tied input/output embedding
    check_rows(Factored(rand(9, vocab), rand(9, h)), Gathered(ids_b, rand(4, h)), (vocab, h))
    d = rand(vocab, h)
    assert float(row_dots(a, d).sum()) == pytest.approx(float((dense(a, (vocab, h)) * d).sum()), rel=1e-12)


def test_vectors_and_dense():
    a, b = Summed(rand(8, 5)), Summed(rand(3, 5))
    check_rows(a, b, (5,))
    d = rand(4, 6)
    f = Factored(rand(7, 4), rand(7, 6))
    assert float(row_dots(f, d).sum()) == pytest.approx(float((dense(f, None) * d).sum()), rel=1e-12)
    assert float(inner.dense_dot(d, f)) == pytest.approx(float((dense(f, None) * d).sum()), rel=1e-12)
    with pytest.raises(TypeError):
        row_dots(a, f)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_head_rows_against_a_dense_gradient(softcap, monkeypatch):
    from geffect_kernels.geffect import head
    monkeypatch.setattr(head, "ROW_CHUNK_ELEMENTS", 40)  # several chunks of rows
    n, h, v = 9, 5, 13
    hidden, weight, bias = rand(n, h), rand(v, h), rand(v)
    labels, coef = torch.randint(0, v, (n,)), rand(n)
    z = hidden @ weight.t() + bias
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    dz = coef[:, None] * (torch.nn.functional.one_hot(labels, v) - torch.softmax(z, -1))
    if softcap:
        dz = dz * (1 - torch.tanh((hidden @ weight.t() + bias) / softcap) ** 2)
    d_w, d_b = rand(v, h), rand(v)
    g = head.head_pass(weight, bias, softcap, {"x": (hidden, labels, torch.ones(n, dtype=torch.bool))})
    for part, expected, d in (("weight", ((dz @ d_w) * hidden).sum(1), d_w), ("bias", dz @ d_b, d_b)):
        use = HeadRows(g, "x", coef, part)
        torch.testing.assert_close(row_dots(use, d), expected, rtol=1e-12, atol=1e-12)
        full = dz.t() @ hidden if part == "weight" else dz.sum(0)
        torch.testing.assert_close(inner.sample_dense(use, 1, full.shape)[0], full, rtol=1e-12, atol=1e-12)


def test_csrc_kernel_when_built():
    kernel = inner._ghost_kernel(torch.device("cpu"))
    if kernel is None:
        pytest.skip("the C++ ghost kernel not built here")
    la, ra, lb, rb = rand(6, 10), rand(6, 7), rand(8, 10), rand(8, 7)
    expected = ((la @ lb.t()) * (ra @ rb.t())).sum(1)
    torch.testing.assert_close(inner.gram_rows(la, ra, lb, rb), expected, rtol=1e-10, atol=1e-12)
