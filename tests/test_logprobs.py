"""The token primitive: every backend against the independent formula, gradcheck, chunk boundaries, dtypes."""
import pytest
import torch

import geffect_kernels as gk
from formulas import IGNORE, logprobs
from geffect_kernels.backends import autograd
from rounding import logprob_bound
from test_objectives import assert_close, make_inputs

BACKENDS = ["oracle", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift,softcap,bias", [(False, None, False), (True, None, True), (True, 4.0, True)])
def test_matches_formula(backend, shift, softcap, bias):
    h, w, b, y = make_inputs(7, bias=bias, scale=3.0)
    expected, valid = logprobs(h, w, y, b, softcap, shift)
    got = gk.token_logprobs(h, w, y, bias=b, softcap=softcap, shift=shift, backend=backend)
    assert got.shape == expected.shape == (y.shape[0], y.shape[1] - shift)
    assert torch.all(got[~valid] == 0)
    assert_close(got, expected, 1e-12)
    upstream = torch.randn(got.shape, dtype=torch.float64)  # a generic per-token cotangent
    params = [t for t in (h, w, b) if t is not None]
    for g_got, g_exp in zip(torch.autograd.grad((got * upstream).sum(), params),
                            torch.autograd.grad((expected * upstream).sum(), params)):
        assert_close(g_got, g_exp, 1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    h, w, b, y = make_inputs(3, B=2, T=5, H=6, V=17)
    fn = lambda h_, w_, b_: gk.token_logprobs(h_, w_, y, bias=b_, softcap=3.0, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h, w, b))


def test_flat_input_and_chunk_boundaries(monkeypatch):
    """[N, H] input; chunks of 5 rows (N = 37 is not a multiple) give the reference result."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 48, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1000, 48, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 1000, (37,), generator=g)
    y[::4] = IGNORE
    monkeypatch.setattr(autograd, "CHUNK_BYTES", 5 * 4 * 1000)
    got = gk.token_logprobs(h, w, y, backend="torch")
    expected = gk.token_logprobs(h, w, y, backend="oracle")
    assert_close(got, expected, 1e-13)
    for name in ("ga", "wga", "satimp"):
        loss_c = gk.unlearning_loss(name, h, w, y, backend="torch")
        loss_r = gk.unlearning_loss(name, h, w, y, backend="oracle")
        assert_close(loss_c, loss_r, 1e-13)
        for a, b in zip(torch.autograd.grad(loss_c, [h, w]), torch.autograd.grad(loss_r, [h, w])):
            assert_close(a, b, 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_logprobs_are_float32_within_the_rounding_bound_of_their_logits(dtype):
    h64, w64, _, y = make_inputs(9, bias=False)
    h, w = h64.detach().to(dtype), w64.detach().to(dtype)
    expected, valid = logprobs(h.double(), w.double(), y)  # exact math on the rounded inputs
    bound = logprob_bound(h, w, y, dtype)
    for backend in BACKENDS:
        got = gk.token_logprobs(h, w, y, backend=backend)
        assert got.dtype == torch.float32 and torch.all(got[~valid] == 0)
        ratio = ((got.double() - expected).abs() / bound)[valid].max().item()
        assert ratio <= 1, f"{backend}: error {ratio:.2f}x the {dtype} rounding bound"


def test_rounding_bound_rejects_a_log_sum_exp_in_bfloat16():
    """The bound above is tight enough to catch a half-precision log-sum-exp (here float32 logits, then the LSE
    rounded to bfloat16: that rounding alone, up to 2⁻⁸ |lse|, exceeds the bound for some tokens)."""
    h64, w64, _, y = make_inputs(9, bias=False)
    h, w = h64.detach().to(torch.bfloat16), w64.detach().to(torch.bfloat16)
    expected, valid = logprobs(h.double(), w.double(), y)
    z = h.float() @ w.float().T
    broken = z.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, -1).bfloat16().float()
    ratio = ((broken.double() - expected).abs() / logprob_bound(h, w, y, torch.bfloat16))[valid].max().item()
    assert ratio > 1.5


def test_only_inputs_that_require_grad_get_gradients():
    h, w, b, y = make_inputs(2)
    expected = torch.autograd.grad(gk.unlearning_loss("wga", h, w, y, bias=b, backend="oracle"), [h])[0]
    h, w, b = h.detach().requires_grad_(), w.detach(), b.detach()
    for backend in BACKENDS:
        loss = gk.unlearning_loss("wga", h, w, y, bias=b, backend=backend)
        loss.backward()
        assert w.grad is None and b.grad is None
        assert_close(h.grad, expected, 1e-12)
        h.grad = None


def test_from_logits_matches_formula():
    h, w, b, y = make_inputs(13)
    z = (h @ w.T + b).detach()
    expected, _ = logprobs(h, w, y, b, 6.0, True)
    for backend in BACKENDS:
        assert_close(gk.token_logprobs_from_logits(z, y, softcap=6.0, shift=True, backend=backend), expected, 1e-12)


def test_backend_selection():
    assert "torch" in gk.available_backends("cpu") and "oracle" in gk.available_backends("cpu")
    h, w, _, y = make_inputs(1, bias=False)
    auto = gk.token_logprobs(h, w, y)  # auto picks something that works on CPU
    assert_close(auto, gk.token_logprobs(h, w, y, backend="oracle"), 1e-12)


@pytest.mark.parametrize("inplace", [False, True])
def test_from_logits_weighted_loss_gradient_and_inplace(inplace):
    h, w, b, y = make_inputs(17)
    logits = (h @ w.T + b).detach().reshape(-1, w.shape[0])
    labels = y.reshape(-1)
    expected_z = logits.clone().requires_grad_()
    expected = gk.unlearning_loss_from_logits("wga", expected_z, labels, softcap=9.0, backend="oracle")
    (3 * expected).backward()
    z = logits.clone().requires_grad_()
    loss = gk.unlearning_loss_from_logits("wga", z, labels, softcap=9.0, backend="torch", inplace=inplace)
    assert_close(loss, expected, 1e-12)
    (3 * loss).backward()  # an upstream gradient other than 1
    assert_close(z.grad, expected_z.grad, 1e-11)
    if inplace:  # the gradient lives in the logits' own storage: no second N×V buffer
        assert z.grad.data_ptr() == z.data_ptr()
    else:
        assert torch.equal(z.detach(), logits)
