"""triton backend over a linear head (interpreter on CPU, float32) against the float64 `reference`."""
import pytest
import torch

import geffect_kernels as gk
from geffect_kernels.backends.triton import config, fast_path, fused_weighted, linear_backward, set_logits_budget
from triton_cases import H, IGNORE, N, V, as_float32, assert_close, grads, head_inputs

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # masked interpreter lanes
FP32 = 2e-5  # relative error of float32 kernels against float64 on these sizes (observed ≤ 7e-6)


@pytest.fixture(autouse=True)
def lean_mode():
    set_logits_budget(0)
    yield
    set_logits_budget(None)


@pytest.mark.parametrize("bias,softcap", [(False, None), (True, 7.0)])
def test_token_logprobs_and_generic_backward(bias, softcap):
    h, w, b, y, _ = head_inputs(1, bias=bias)
    expected = gk.token_logprobs(h, w, y, bias=b, softcap=softcap, backend="oracle")
    h32, w32, b32 = as_float32(h, w, b)
    got = gk.token_logprobs(h32, w32, y, bias=b32, softcap=softcap, backend="triton")
    assert got.dtype == torch.float32
    assert torch.all(got[y == IGNORE] == 0)
    assert_close(got, expected, FP32, "logprobs")
    upstream = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for name, g_got, g_exp in zip("hWb", grads((got * upstream.float()).sum(), (h32, w32, b32)),
                                  grads((expected * upstream).sum(), (h, w, b))):
        assert_close(g_got, g_exp, FP32, f"d{name}")


@pytest.mark.parametrize("name,bias,softcap", [
    ("ga", False, None), ("wga", True, None), ("satimp", False, 7.0), ("tnpo", True, 7.0),
    ("wtnpo", False, None), ("nll", True, 7.0), ("npo", True, None), ("simnpo", False, 7.0),
])
def test_objectives(name, bias, softcap):
    h, w, b, y, ref = head_inputs(3, bias=bias, scale=2.0)  # peaky enough that the weights vary
    batched = name in ("npo", "simnpo")
    shape = (1, N) if batched else (N,)
    hv = (lambda t: t.reshape(1, N, H)) if batched else (lambda t: t)
    kwargs = {"ref_logprobs": ref.reshape(shape)} if gk.OBJECTIVES[name].needs_ref else {}
    expected = gk.unlearning_loss(name, hv(h), w, y.reshape(shape), bias=b, softcap=softcap, backend="oracle",
                                  **kwargs)
    h32, w32, b32 = as_float32(h, w, b)
    kwargs = {k: v.float() for k, v in kwargs.items()}
    got = gk.unlearning_loss(name, hv(h32), w32, y.reshape(shape), bias=b32, softcap=softcap, backend="triton",
                             **kwargs)
    assert_close(got, expected, FP32, "loss")
    for label, g_got, g_exp in zip("hWb", grads(got, (h32, w32, b32)), grads(expected, (h, w, b))):
        assert_close(g_got, g_exp, FP32, f"d{label}")


def test_upstream_gradient_scales_fused_gradients():
    h, w, _, y, _ = head_inputs(4, bias=False, n=12)
    h32, w32 = as_float32(h, w)
    g_one = grads(gk.unlearning_loss("wga", h32, w32, y, backend="triton"), (h32, w32))
    g_three = grads(3.0 * gk.unlearning_loss("wga", h32, w32, y, backend="triton"), (h32, w32))
    for a, b in zip(g_one, g_three):
        assert_close(b, 3.0 * a, 1e-6)


@pytest.mark.parametrize("chunk_rows", [N, 10])
def test_fast_mode(monkeypatch, chunk_rows):
    """Budget for one chunk of all tokens, and for chunks of 10 (dW then summed over chunks)."""
    h, w, b, y, ref = head_inputs(5, scale=2.0)
    expected = gk.unlearning_loss("wtnpo", h, w, y, ref_logprobs=ref, bias=b, softcap=7.0, backend="oracle")
    h32, w32, b32 = as_float32(h, w, b)
    monkeypatch.setattr(config, "FAST_MIN_ROWS", 1)
    tiles = -(-V // config.matmul_tiles(torch.float32).block_n)
    set_logits_budget(chunk_rows * (fast_path.padded_width(V) * 4 + tiles * 4))
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[6])  # rows per chunk
        return fast_path.fast_head_grads(*args, **kwargs)

    monkeypatch.setattr(fused_weighted, "fast_head_grads", spy)
    got = gk.unlearning_loss("wtnpo", h32, w32, y, ref_logprobs=ref.float(), bias=b32, softcap=7.0, backend="triton")
    assert calls == [chunk_rows]
    assert_close(got, expected, FP32, "loss")
    for label, g_got, g_exp in zip("hWb", grads(got, (h32, w32, b32)), grads(expected, (h, w, b))):
        assert_close(g_got, g_exp, FP32, f"d{label}")


def test_lean_chunk_width_from_vocabulary_and_sms(monkeypatch):
    """H100 tiles (128×256): 4096 columns at N 8192 as before, and no longer fewer as N grows (a 64 MiB budget
    alone gave 1024 at N 32768 and 512 at N 65536); a narrow head widens the chunk until its dW product gives
    every SM two tiles; a small vocabulary is one chunk."""
    monkeypatch.setattr(config, "interpreting", lambda: False)
    width = lambda n, v=128256, h=4096: linear_backward.lean_chunk_width(n, v, h, torch.bfloat16, 132)  # noqa: E731
    assert width(8192) == width(32768) == width(65536) == 4096
    assert width(8192, h=1024) == 8192  # ≥ 8448 asked (66 × 4 tiles), 16 chunks of 8192 then cover V
    assert width(512, v=3000) == 3072
    assert width(8192, v=32000) == 4096  # 8 chunks, the last 3328 columns


def test_lean_mode_over_several_vocabulary_chunks(monkeypatch):
    """Chunks of 64 columns (16 over V): dh summed over chunks in float32, dW written chunk by chunk, db."""
    monkeypatch.setattr(config, "LEAN_CHUNK_BYTES", 1)
    monkeypatch.setattr(config, "LEAN_MIN_WIDTH", 1)
    monkeypatch.setattr(config, "DEFAULT_SMS", 1)
    widths = []
    original = linear_backward.lean_chunk_width
    monkeypatch.setattr(linear_backward, "lean_chunk_width", lambda *a: widths.append(original(*a)) or widths[-1])
    h, w, b, y, ref = head_inputs(8, scale=2.0)
    expected = gk.unlearning_loss("tnpo", h, w, y, ref_logprobs=ref, bias=b, softcap=7.0, backend="oracle")
    h32, w32, b32 = as_float32(h, w, b)
    got = gk.unlearning_loss("tnpo", h32, w32, y, ref_logprobs=ref.float(), bias=b32, softcap=7.0, backend="triton")
    assert widths and widths[0] < V
    assert_close(got, expected, FP32, "loss")
    for label, g_got, g_exp in zip("hWb", grads(got, (h32, w32, b32)), grads(expected, (h, w, b))):
        assert_close(g_got, g_exp, FP32, f"d{label}")
