"""token_stats: (ℓ_t, entropy, Var_p[log p]) on every CPU-runnable backend against the materialized softmax.

float64 inputs run the oracle, the chunked torch backend and the C++ CPU kernel in float64 (tight tolerances);
float32 inputs run every kernel, the Triton one under its interpreter, within float32 rounding bounds."""
import math

import pytest
import torch

import geffect_kernels as gk
from csrc_cases import require_extension
from formulas import IGNORE, token_stats
from geffect_kernels.backends import autograd, registry
from geffect_kernels.backends.triton import linear_forward
from rounding import logprob_bound, stats_bounds
from test_objectives import assert_close, make_inputs

FLOAT64_BACKENDS = ["oracle", "torch", "cpp_cpu"]
FLOAT32_BACKENDS = ["torch", "cpp_cpu", "triton"]
FIELDS = ("logprob", "entropy", "logprob_var")


def runs_itself(backend, hidden):
    """``backend``, after checking that it runs inputs like ``hidden`` itself (not the registry's fallback)."""
    if backend == "cpp_cpu":
        require_extension("cpu")
    rows = hidden.reshape(-1, hidden.shape[-1])
    assert registry.get_backend(backend, rows).name == backend
    return backend


def assert_stats(got, expected, valid, rtol):
    assert isinstance(got, gk.TokenStats)
    for name, g, e in zip(FIELDS, got, expected):
        assert g.shape == e.shape, name
        assert torch.all(g[~valid] == 0), name
        assert_close(g, e, rtol)


def assert_within_bounds(got, hidden, weight, labels, bias=None, softcap=None, shift=False, dtype=torch.float32):
    """Each field of ``got`` within its rounding bound (tests/rounding.py) of the exact statistics of the rounded
    inputs; 0 where ignored."""
    (lp, entropy, var), valid = token_stats(hidden.double(), weight.double(), labels,
                                            None if bias is None else bias.double(), softcap, shift)
    if shift:
        hidden, labels = hidden[..., :-1, :], labels[..., 1:]
    bounds = (logprob_bound(hidden, weight, labels, dtype, bias, softcap),
              *stats_bounds(hidden, weight, labels, dtype, bias, softcap))
    for name, g, e, bound in zip(FIELDS, got, (lp, entropy, var), bounds):
        assert g.dtype == torch.float32 and g.shape == e.shape, name
        assert torch.all(g[~valid] == 0), name
        ratio = ((g.double() - e).abs() / bound)[valid].max().item()
        assert ratio <= 1, f"{name}: error {ratio:.2f}x the {dtype} rounding bound"


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


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
@pytest.mark.parametrize("shift,softcap,bias", [(False, None, False), (True, None, True), (True, 4.0, True)])
def test_matches_formula(backend, shift, softcap, bias):
    h, w, b, y = make_inputs(11, bias=bias, scale=3.0, V=2501)  # V: more than two of the C++ kernel's blocks
    expected, valid = token_stats(h, w, y, b, softcap, shift)
    got = gk.token_stats(h, w, y, bias=b, softcap=softcap, shift=shift, backend=runs_itself(backend, h))
    assert got.logprob.shape == (y.shape[0], y.shape[1] - shift)
    assert_stats(got, expected, valid, 1e-12)
    assert_close(got.logprob, gk.token_logprobs(h, w, y, bias=b, softcap=softcap, shift=shift), 1e-12)
    assert not any(t.requires_grad for t in got)  # forward only, even for inputs that want gradients


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_peaky_rows(backend):
    """Logits spread over hundreds (p of the top token ≈ 1, the rest far below float32's range): entropy and variance
    near 0 must come out to float64's absolute precision and the variance to its relative precision too, not as a
    difference of nearly equal moments or of logit-sized numbers."""
    h, w, b, y = make_inputs(12, scale=60.0, V=2501)
    expected, valid = token_stats(h, w, y, b)
    assert expected[1][valid].min() < 1e-6  # some rows are peaky indeed
    got = gk.token_stats(h, w, y, bias=b, backend=runs_itself(backend, h))
    for name, g, e, absolute in zip(FIELDS, got, expected, (0, 4e-15, 0)):  # per token
        assert ((g - e).abs() <= 1e-12 * e.abs() + absolute)[valid].all(), name


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
@pytest.mark.parametrize("scale,shift,softcap,bias", [(1.0, False, None, False), (1.0, True, 4.0, True),
                                                      (60.0, True, None, True)], ids=["plain", "softcap", "peaky"])
def test_float32_within_rounding_bounds(backend, scale, shift, softcap, bias):
    h, w, b, y = (t if t is None or t.dtype == torch.long else t.detach().float()
                  for t in make_inputs(13, bias=bias, scale=scale, V=1001))  # V: not a multiple of any tile
    got = gk.token_stats(h, w, y, bias=b, softcap=softcap, shift=shift, backend=runs_itself(backend, h))
    assert_within_bounds(got, h, w, y, b, softcap, shift)


def test_triton_vocabulary_splits(monkeypatch):
    """Several tiles per program and empty tiles past V at the end of the last split (tiles of 64 columns in the
    interpreter, 5 per split: V 1001 has 16 tiles, the last split holds one of them and four empty ones)."""
    monkeypatch.setattr(linear_forward, "_TARGET_PROGRAMS", 1)
    monkeypatch.setattr(linear_forward, "_MAX_TILES_PER_SPLIT", 5)
    h, w, b, y = (t if t.dtype == torch.long else t.detach().float() for t in make_inputs(14, scale=3.0, V=1001))
    assert linear_forward.vocab_splits(1, 16) == (5, 4)
    got = gk.token_stats(h, w, y, bias=b, softcap=2.5, backend=runs_itself("triton", h))
    assert_within_bounds(got, h, w, y, b, 2.5)


def test_chunk_boundaries_and_flat_input(monkeypatch):
    """[N, H] input cut into chunks of 5 rows (N = 37 is not a multiple)."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(37, 48, generator=g, dtype=torch.float64)
    w = torch.randn(1000, 48, generator=g, dtype=torch.float64)
    y = torch.randint(0, 1000, (37,), generator=g)
    y[::4] = IGNORE
    monkeypatch.setattr(autograd, "CHUNK_BYTES", 5 * 4 * 1000)
    expected, valid = token_stats(h, w, y)
    for backend in ("torch", "cpp_cpu"):
        assert_stats(gk.token_stats(h, w, y, backend=runs_itself(backend, h)), expected, valid, 1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_within_their_rounding_bounds(dtype):
    h64, w64, _, y = make_inputs(13, bias=False)
    h, w = h64.detach().to(dtype), w64.detach().to(dtype)
    for backend in ("oracle", "torch", "cpp_cpu"):
        got = gk.token_stats(h, w, y, backend=runs_itself(backend, h))
        assert_within_bounds(got, h, w, y, dtype=dtype)


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


def test_empty_batch_and_bad_inputs():
    h, w, _, y = make_inputs(14, bias=False)
    empty = gk.token_stats(h[:, :0], w, y[:, :0])
    assert all(t.shape == (h.shape[0], 0) for t in empty)
    with pytest.raises(ValueError, match="labels shape"):
        gk.token_stats(h, w, y[:, 1:])
    with pytest.raises(ValueError, match="softcap"):
        gk.token_stats(h, w, y, softcap=-1.0)


def test_public_function_is_not_shadowed_by_a_module():
    """Importing a submodule binds its name on the package, so an export named like a module of the package (other
    than that module itself, as ``hf``) would turn into the module once anything imported it."""
    import pkgutil

    import geffect_kernels.hf  # noqa: F401 - imports the module that defines token_stats
    modules = {m.name for m in pkgutil.iter_modules(gk.__path__)}
    assert [name for name in gk.__all__ if name in modules and gk._EXPORTS[name] != f".{name}"] == []
    assert callable(gk.token_stats) and gk.token_stats.__name__ == "token_stats"
