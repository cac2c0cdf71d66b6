"""token_stats: (ℓ_t, entropy, Var_p[log p]) on every CPU-runnable backend against the materialized softmax."""
import math

import pytest
import torch

import geffect_kernels as gk
from formulas import IGNORE, token_stats
from geffect_kernels.backends import autograd
from rounding import logprob_bound, stats_bounds
from test_objectives import assert_close, make_inputs

BACKENDS = ["oracle", "torch"]
FIELDS = ("logprob", "entropy", "logprob_var")


def assert_stats(got, expected, valid, rtol):
    assert isinstance(got, gk.TokenStats)
    for name, g, e in zip(FIELDS, got, expected):
        assert g.shape == e.shape, name
        assert torch.all(g[~valid] == 0), name
        assert_close(g, e, rtol)


def test_formula_on_a_two_point_distribution():
    """p = (a, 1 − a): H = −a log a − (1 − a) log(1 − a), Var[log p] = a (1 − a) (log a − log(1 − a))²; uniform:
    H = log V, Var 0 (the test's own formula, checked by hand-derived closed forms)."""
    a = torch.tensor([0.3, 0.9, 1e-6], dtype=torch.float64)
    h = torch.stack([torch.log(a), torch.log1p(-a)], -1)  # logits = h · I
    (lp, entropy, var), _ = token_stats(h, torch.eye(2, dtype=torch.float64), torch.zeros(3, dtype=torch.long))
    assert_close(lp, torch.log(a), 1e-15)
    assert_close(entropy, -a * torch.log(a) - (1 - a) * torch.log1p(-a), 1e-14)
    assert_close(var, a * (1 - a) * (torch.log(a) - torch.log1p(-a)) ** 2, 1e-13)
    h = torch.full((2, 5), 0.7, dtype=torch.float64)
    (_, entropy, var), _ = token_stats(h, torch.eye(5, dtype=torch.float64), torch.tensor([1, 4]))
    assert_close(entropy, torch.full((2,), math.log(5), dtype=torch.float64), 1e-15)
    assert var.abs().max() < 1e-15


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift,softcap,bias", [(False, None, False), (True, None, True), (True, 4.0, True)])
def test_matches_formula(backend, shift, softcap, bias):
    h, w, b, y = make_inputs(11, bias=bias, scale=3.0)
    expected, valid = token_stats(h, w, y, b, softcap, shift)
    got = gk.token_stats(h, w, y, bias=b, softcap=softcap, shift=shift, backend=backend)
    assert got.logprob.shape == (y.shape[0], y.shape[1] - shift)
    assert_stats(got, expected, valid, 1e-12)
    assert_close(got.logprob, gk.token_logprobs(h, w, y, bias=b, softcap=softcap, shift=shift), 1e-12)
    assert not any(t.requires_grad for t in got)  # forward only, even for inputs that want gradients


@pytest.mark.parametrize("backend", BACKENDS)
def test_peaky_rows(backend):
    """Logits spread over hundreds (p of the top token ≈ 1, the rest far below float32's range): entropy and variance
    near 0 must come out to float64's absolute precision and the variance to its relative precision too, not as a
    difference of nearly equal moments."""
    h, w, b, y = make_inputs(12, scale=60.0, V=257)
    expected, valid = token_stats(h, w, y, b)
    assert expected[1][valid].min() < 1e-6  # some rows are peaky indeed
    got = gk.token_stats(h, w, y, bias=b, backend=backend)
    for name, g, e, absolute in zip(FIELDS, got, expected, (0, 1e-15, 0)):  # per token
        assert ((g - e).abs() <= 1e-12 * e.abs() + absolute)[valid].all(), name
    got32 = gk.token_stats(h.detach().float(), w.detach().float(), y, bias=b.detach().float(), backend=backend)
    assert got32.entropy.dtype == torch.float32
    exact, _ = token_stats(h.float(), w.float(), y, b.float())
    b_entropy, b_var = stats_bounds(h.float(), w.float(), y, torch.float32)
    assert ((got32.entropy.double() - exact[1]).abs() <= b_entropy)[valid].all()
    assert ((got32.logprob_var.double() - exact[2]).abs() <= b_var)[valid].all()


def test_chunk_boundaries_and_flat_input(monkeypatch):
    """[N, H] input cut into chunks of 5 rows (N = 37 is not a multiple)."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(37, 48, generator=g, dtype=torch.float64)
    w = torch.randn(1000, 48, generator=g, dtype=torch.float64)
    y = torch.randint(0, 1000, (37,), generator=g)
    y[::4] = IGNORE
    monkeypatch.setattr(autograd, "CHUNK_BYTES", 5 * 4 * 1000)
    expected, valid = token_stats(h, w, y)
    assert_stats(gk.token_stats(h, w, y, backend="torch"), expected, valid, 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_within_their_rounding_bounds(dtype):
    h64, w64, _, y = make_inputs(13, bias=False)
    h, w = h64.detach().to(dtype), w64.detach().to(dtype)
    (lp, entropy, var), valid = token_stats(h.double(), w.double(), y)  # exact math on the rounded inputs
    b_lp, b_entropy, b_var = logprob_bound(h, w, y, dtype), *stats_bounds(h, w, y, dtype)
    for backend in BACKENDS:
        got = gk.token_stats(h, w, y, backend=backend)
        assert all(t.dtype == torch.float32 for t in got)
        for name, g, e, bound in zip(FIELDS, got, (lp, entropy, var), (b_lp, b_entropy, b_var)):
            ratio = ((g.double() - e).abs() / bound)[valid].max().item()
            assert ratio <= 1, f"{backend} {name}: error {ratio:.2f}x the {dtype} rounding bound"


def test_float32_bounds_reject_half_precision_results():
    """The float32 bounds are tight enough to catch an entropy or a variance rounded to bfloat16 or float16."""
    h64, w64, _, y = make_inputs(13, bias=False)
    h, w = h64.detach().float(), w64.detach().float()
    (_, entropy, var), valid = token_stats(h.double(), w.double(), y)
    b_entropy, b_var = stats_bounds(h, w, y, torch.float32)
    got = gk.token_stats(h, w, y, backend="torch")
    for half in (torch.bfloat16, torch.float16):
        for g, e, bound in ((got.entropy, entropy, b_entropy), (got.logprob_var, var, b_var)):
            assert ((g.to(half).double() - e).abs() / bound)[valid].max() > 1.5


def test_bad_inputs_are_refused():
    h, w, _, y = make_inputs(14, bias=False)
    with pytest.raises(ValueError, match="labels shape"):
        gk.token_stats(h, w, y[:, 1:])
    with pytest.raises(ValueError, match="softcap"):
        gk.token_stats(h, w, y, softcap=-1.0)
