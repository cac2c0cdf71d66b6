"""The triton backend's fused KL, lean (six passes) and fast (four), against the float64 oracle
(interpreter, float32)."""
import pytest
import torch

import geffect_kernels as gk
from geffect_kernels.backends.triton import config, kl, kl_fast, set_logits_budget
from triton_cases import IGNORE, as_float32, assert_close, grads

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # masked interpreter lanes
N, H, V = 37, 45, 1001  # odd: no dimension a multiple of a tile or of the row kernel's block
FP32 = 1e-5  # relative error of the float32 kernels against float64 on these sizes


def kl_inputs(seed, *, bias, ref_bias, n=N, spread=0.3):
    """θ head (hidden, weight, bias) and a reference head ``spread`` away from it (float64, θ side requires grad),
    labels with ignored positions."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    h, w = randn(n, H), randn(V, H) * 0.3
    b = randn(V) if bias else None
    hr, wr = h + spread * randn(n, H), w + spread * 0.3 * randn(V, H)
    br = randn(V) if ref_bias else None
    y = torch.randint(0, V, (n,), generator=g)
    y[::5] = IGNORE
    theta = [t.requires_grad_() if t is not None else None for t in (h, w, b)]
    return (*theta, hr, wr, br, y)


@pytest.fixture
def fast_calls(monkeypatch):
    """Rows per chunk of every fast-mode call (none: the lean mode ran)."""
    monkeypatch.setattr(config, "FAST_MIN_ROWS", 1)
    calls = []
    original = kl.fast_kl_grads

    def spy(*args, **kwargs):
        calls.append(args[10])  # rows per chunk
        return original(*args, **kwargs)

    monkeypatch.setattr(kl, "fast_kl_grads", spy)
    yield calls
    set_logits_budget(None)


def budget_for(rows):
    return rows * 8 * kl_fast.padded_width(V)  # two float32 logit rows per token (float32 dW: no accumulator)


@pytest.mark.parametrize("mode,bias,ref_bias,softcap,reduction", [
    ("fast one chunk", True, False, None, "tokens"),
    ("fast one chunk", False, False, 7.0, "batchmean"),
    ("fast chunks of 10", False, True, 7.0, "tokens"),
    ("fast chunks of 10", True, True, None, "batchmean"),
    ("fast chunks of 10", True, True, 7.0, "tokens"),
    ("lean", True, True, 7.0, "batchmean"),
    ("lean", False, True, None, "tokens"),
])
def test_kl_against_float64(fast_calls, mode, bias, ref_bias, softcap, reduction):
    h, w, b, hr, wr, br, y = kl_inputs(11, bias=bias, ref_bias=ref_bias)
    rows = {"fast one chunk": N, "fast chunks of 10": 10, "lean": 0}[mode]
    set_logits_budget(budget_for(rows))
    args = dict(bias=b, ref_bias=br, softcap=softcap, reduction=reduction)
    expected = gk.kl_loss(h, w, hr, wr, y, backend="oracle", **args)
    h32, w32, b32, hr32, wr32, br32 = as_float32(h, w, b, hr, wr, br)
    got = gk.kl_loss(h32, w32, hr32, wr32, y, backend="triton", **{**args, "bias": b32, "ref_bias": br32})
    assert fast_calls == ([rows] if rows else [])
    assert got.item() > 0.01  # the heads differ: a relative check of the loss means something
    assert_close(got, expected, FP32, "kl")
    for label, g_got, g_exp in zip("hWb", grads(got, (h32, w32, b32)), grads(expected, (h, w, b))):
        assert_close(g_got, g_exp, FP32, f"d{label}")


def test_kl_fast_equals_lean_on_distant_heads(fast_calls):
    """Heads far apart (KL ~ several nats): fast and lean agree with each other and with float64."""
    h, w, b, hr, wr, br, y = kl_inputs(12, bias=True, ref_bias=True, spread=2.0)
    expected = gk.kl_loss(h, w, hr, wr, y, bias=b, ref_bias=br, softcap=7.0, backend="oracle")
    results = []
    for rows in (0, 16):
        set_logits_budget(budget_for(rows))
        h32, w32, b32, hr32, wr32, br32 = as_float32(h, w, b, hr, wr, br)
        got = gk.kl_loss(h32, w32, hr32, wr32, y, bias=b32, ref_bias=br32, softcap=7.0, backend="triton")
        assert_close(got, expected, FP32, f"kl rows={rows}")
        results.append(grads(got, (h32, w32, b32)))
    assert fast_calls == [16]
    for label, g_lean, g_fast, g_exp in zip("hWb", *results, grads(expected, (h, w, b))):
        assert_close(g_fast, g_exp, FP32, f"fast d{label}")
        assert_close(g_fast, g_lean, FP32, f"fast vs lean d{label}")


def test_kl_fast_without_gradients_runs_lean(fast_calls):
    """Under no_grad nothing is held: the lean forward alone (two matmul-sized passes)."""
    h, w, b, hr, wr, br, y = kl_inputs(13, bias=False, ref_bias=False)
    set_logits_budget(budget_for(N))
    h32, w32, hr32, wr32 = as_float32(h, w, hr, wr)
    with torch.no_grad():
        got = gk.kl_loss(h32, w32, hr32, wr32, y, backend="triton")
    assert fast_calls == []
    assert_close(got, gk.kl_loss(h, w, hr, wr, y, backend="oracle"), FP32, "kl")


def test_kl_fast_16bit_gradient_over_the_logits_rows():
    """16-bit inputs: G is written in the input dtype over the first half of each float32 θ-logit row, normalized
    (`normalized`), and read from there by the dh and dW products, its column sums giving db (a layout the CPU
    interpreter can check; its 16-bit arithmetic is not the GPU's, so the tolerance is float16's rounding of the
    inputs' products, not float32's)."""
    h, w, b, hr, wr, _, y = kl_inputs(14, bias=True, ref_bias=False)
    h16, w16, b16, hr16, wr16 = (t.detach().half() for t in (h, w, b, hr, wr))
    valid = (y != IGNORE).float()
    coef = valid / valid.sum()
    normal, unscale = kl.normalized(coef, torch.float16)
    assert unscale is not None
    got_kl, grads16 = kl_fast.fast_kl_grads(h16, w16, b16, hr16, wr16, None, normal, unscale, (True, True, True), None,
                                            16)
    exact = [t.double().requires_grad_(i < 3) for i, t in enumerate((h16, w16, b16, hr16, wr16))]
    expected = gk.kl_loss(exact[0], exact[1], exact[3], exact[4], y, bias=exact[2], backend="oracle")
    assert_close((got_kl * coef).sum(), expected, 3e-3, "kl")
    for label, g_got, g_exp in zip("hWb", grads16, grads(expected, exact[:3])):
        assert g_got.dtype == torch.float16
        assert_close(g_got, g_exp, 3e-3, f"d{label}")
