"""The factored inner products (DESIGN §4) against dense gradients, each form forced by the shapes."""
import pytest
import torch

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


@pytest.mark.parametrize("n_a, n_b, p, q", [(5, 7, 40, 30), (90, 70, 3, 5)])  # Gram form; projection form
def test_factored_pairs_both_forms(n_a, n_b, p, q, monkeypatch):
    monkeypatch.setattr(inner, "TILE_ELEMENTS", 16)  # several Gram tiles
    calls = []
    monkeypatch.setattr(inner, "_gram_rows", lambda *args: calls.append(1) or _gram(*args))
    check_rows(Factored(rand(n_a, p), rand(n_a, q)), Factored(rand(n_b, p), rand(n_b, q)), (p, q))
    assert bool(calls) == (n_a * n_b * (p + q) <= p * q * (n_a + n_b))


_gram = inner._gram_rows


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
def test_head_rows_recompute_the_logits_gradient(softcap, monkeypatch):
    monkeypatch.setattr(inner, "TILE_ELEMENTS", 40)  # several chunks of rows
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
    for part, expected in (("weight", ((dz @ d_w) * hidden).sum(1)), ("bias", dz @ d_b)):
        use = HeadRows(hidden, weight, bias, labels, coef, softcap, part)
        torch.testing.assert_close(row_dots(use, d_w if part == "weight" else d_b), expected, rtol=1e-12, atol=1e-12)


def test_csrc_kernel_when_built():
    kernel = inner._ghost_kernel(torch.device("cpu"))
    if kernel is None:
        pytest.skip("the C++ ghost kernel not built here")
    la, ra, lb, rb = rand(6, 10), rand(6, 7), rand(8, 10), rand(8, 7)
    expected = ((la @ lb.t()) * (ra @ rb.t())).sum(1)
    torch.testing.assert_close(inner._gram_rows(la, ra, lb, rb), expected, rtol=1e-10, atol=1e-12)
