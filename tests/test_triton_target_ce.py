"""The triton backend's UNDIAL and CE-U (the fused KL's passes with a label-shifted target, `kl.fused_target_ce`),
fast and lean modes, against the float64 oracle (interpreter, float32)."""
import pytest
import torch

import geffect_kernels as gk
from geffect_kernels.backends.triton import config, kl, set_logits_budget
from test_triton_kl import budget_for, kl_inputs
from triton_cases import IGNORE, V, as_float32, assert_close, grads

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # masked interpreter lanes
FP32 = 2e-5


@pytest.fixture
def fast_calls(monkeypatch):
    """Rows per chunk of every fast-mode call (none: the lean mode ran)."""
    monkeypatch.setattr(config, "FAST_MIN_ROWS", 1)
    calls = []
    original = kl.fast_kl_grads

    def spy(*args, **kwargs):
        calls.append(args[10])
        return original(*args, **kwargs)

    monkeypatch.setattr(kl, "fast_kl_grads", spy)
    yield calls
    set_logits_budget(None)


MODES = {"fast one chunk": 10**9, "fast chunks of 10": budget_for(10), "lean": 0}


@pytest.mark.parametrize("mode,bias,ref_bias,softcap,beta", [
    ("fast one chunk", True, False, None, 10.0),
    ("fast chunks of 10", False, True, 7.0, 3.0),
    ("lean", True, True, 7.0, 10.0),
    ("lean", False, False, None, 0.5),
])
def test_undial_against_float64(fast_calls, mode, bias, ref_bias, softcap, beta):
    h, w, b, hr, wr, br, y = kl_inputs(21, bias=bias, ref_bias=ref_bias)
    set_logits_budget(MODES[mode])
    h32, w32, b32, hr32, wr32, br32 = as_float32(h, w, b, hr, wr, br)
    got = gk.undial_loss(h32, w32, hr32, wr32, y, beta=beta, bias=b32, ref_bias=br32, softcap=softcap,
                         backend="triton")
    expected = gk.undial_loss(h, w, hr, wr, y, beta=beta, bias=b, ref_bias=br, softcap=softcap, backend="oracle")
    assert (fast_calls == []) == (mode == "lean")
    assert_close(got, expected, FP32, "undial")
    for label, g_got, g_exp in zip("hWb", grads(got, [h32, w32, b32]), grads(expected, [h, w, b])):
        assert_close(g_got, g_exp, 5 * FP32, f"d{label}")


@pytest.mark.parametrize("mode,bias,softcap", [("fast one chunk", True, None), ("fast chunks of 10", False, 7.0),
                                               ("lean", True, 7.0), ("lean", False, None)])
def test_ceu_against_float64(fast_calls, mode, bias, softcap):
    h, w, b, *_, y = kl_inputs(22, bias=bias, ref_bias=False)
    y[3] = V - 1  # the last column (edge of the last tile)
    set_logits_budget(MODES[mode])
    h32, w32, b32 = as_float32(h, w, b)
    got = gk.unlearning_loss("ceu", h32, w32, y, bias=b32, softcap=softcap, backend="triton")
    expected = gk.unlearning_loss("ceu", h, w, y, bias=b, softcap=softcap, backend="oracle")
    assert (fast_calls == []) == (mode == "lean")
    assert_close(got, expected, FP32, "ceu")
    for label, g_got, g_exp in zip("hWb", grads(got, [h32, w32, b32]), grads(expected, [h, w, b])):
        assert_close(g_got, g_exp, 5 * FP32, f"d{label}")


@pytest.mark.parametrize("mode", ["fast one chunk", "lean"])
def test_ceu_as_the_label_takes_all_the_mass(fast_calls, mode):
    """Logits where p_y rounds to 1 in float32 (z_y 30 above the rest): finite loss and gradient, each gradient entry
    to float32's relative precision (−q_v p_y off the label, not p_v − q_v)."""
    g = torch.Generator().manual_seed(23)
    z = torch.randn(9, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (9,), generator=g)
    y[2] = IGNORE
    rows = torch.arange(9)
    z[rows, y.clamp_min(0)] += torch.linspace(-2, 30, 9, dtype=torch.float64)
    set_logits_budget(MODES[mode])
    eye = torch.eye(V)
    z32 = z.float().requires_grad_()
    got = gk.unlearning_loss("ceu", z32, eye, y, ignore_first=0, backend="triton")
    z64 = z.clone().requires_grad_()
    expected = gk.unlearning_loss("ceu", z64, eye.double(), y, ignore_first=0, backend="oracle")
    assert_close(got, expected, FP32, "ceu")
    (g32,), (g64,) = grads(got, [z32]), grads(expected, [z64])
    assert torch.isfinite(g32).all()
    nonzero = g64 != 0
    assert ((g32.double() - g64).abs()[nonzero] / g64.abs()[nonzero]).max() < 1e-4


@pytest.mark.parametrize("own", [False, True])
def test_fast_16bit_gradient_over_the_logits_rows(own):
    """16-bit inputs, as `test_triton_kl`'s: G in the input dtype over each float32 θ-logit row, normalized, read by
    the dh and dW products (CE-U: one logits buffer, the target read from the θ row itself)."""
    from geffect_kernels.backends.triton import kl_fast

    h, w, b, hr, wr, _, y = kl_inputs(24, bias=True, ref_bias=False)
    h16, w16, b16, hr16, wr16 = (t.detach().half() for t in (h, w, b, hr, wr))
    valid = y != IGNORE
    coef = valid.float() / valid.sum()
    normal, unscale = kl.normalized(coef, torch.float16)
    safe = torch.where(valid, y, -1)
    target = dict(labels=safe, beta=0.0 if own else 3.0, target=2 if own else 1)
    ref = (h16, w16, None) if own else (hr16, wr16, None)
    got, grads16 = kl_fast.fast_kl_grads(h16, w16, b16, *ref, normal, unscale, (True, True, True), None, 16, **target)
    exact = [t.double().requires_grad_(i < 3) for i, t in enumerate((h16, w16, b16, hr16, wr16))]
    if own:
        expected = gk.unlearning_loss("ceu", exact[0], exact[1], y, bias=exact[2], ignore_first=0, backend="oracle")
    else:
        expected = gk.undial_loss(exact[0], exact[1], exact[3], exact[4], y, beta=3.0, bias=exact[2],
                                  backend="oracle")
    assert_close((got * coef).sum(), expected, 3e-3, "loss")
    # db sums G's float16 entries of both signs over the tokens, which cancel: a little more than their rounding
    for label, g_got, g_exp, tol in zip("hWb", grads16, grads(expected, exact[:3]), (3e-3, 3e-3, 5e-3)):
        assert g_got.dtype == torch.float16
        assert_close(g_got, g_exp, tol, f"d{label}")
