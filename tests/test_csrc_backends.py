"""The C++ backends against the float64 ``oracle``: ``cpp_cpu`` (OpenMP row kernels + BLAS) here, and ``cpp_cuda``
(CUDA row kernels) on a machine with a GPU, where `pytest tests/test_csrc_backends.py -k cuda` is its numeric check
(the GPU suite runs it). Tests that take ``ext`` are about the CPU binding only."""
import pytest
import torch

import geffect_kernels as gk
from geffect_kernels.backends import autograd
from geffect_kernels.backends.registry import get_backend
from csrc_cases import B, IGNORE, N, T, V, assert_close, generator, grads, head_inputs, leaves, require_extension
from rounding import UNIT_ROUNDOFF

TOL = {torch.float64: 1e-11, torch.float32: 2e-5}  # float32 kernels vs the float64 truth
# A bfloat16 logits gradient is computed in float32 and rounded once when stored (≤ u of the largest entry);
# the weighted losses' is rounded again when the backward scales it by the upstream gradient in place.
BF16_GRAD_TOL = {"stored": UNIT_ROUNDOFF[torch.bfloat16], "stored and scaled": 2 * UNIT_ROUNDOFF[torch.bfloat16]}


@pytest.fixture(scope="module")
def ext():
    return require_extension("cpu")


@pytest.fixture(scope="module", params=["cpu", "cuda"])
def dev(request):
    """The device whose C++ backend is under test; ``BACKEND[dev.type]`` names it."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU here: the cpp_cuda backend is checked in the GPU suite")
    require_extension(request.param)
    return torch.device(request.param)


BACKEND = {"cpu": "cpp_cpu", "cuda": "cpp_cuda"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias,softcap", [(False, None), (True, 4.0)])
def test_token_logprobs_and_backward(dev, dtype, bias, softcap):
    h, w, b, y, _ = head_inputs(1, device=dev)
    h, w, b = leaves(h, w, b if bias else None, dtype=torch.float64)
    expected = gk.token_logprobs(h, w, y, bias=b, softcap=softcap, backend="oracle")
    hc, wc, bc = leaves(h, w, b, dtype=dtype)
    got = gk.token_logprobs(hc, wc, y, bias=bc, softcap=softcap, backend=BACKEND[dev.type])
    assert got.dtype == dtype and torch.all(got[y == IGNORE] == 0)
    assert_close(got, expected, TOL[dtype], "logprobs")
    upstream = torch.randn(N, dtype=torch.float64, generator=generator(2)).to(dev)
    for name, g_got, g_exp in zip("hWb", grads((got * upstream.to(dtype)).sum(), (hc, wc, bc)),
                                  grads((expected * upstream).sum(), (h, w, b))):
        assert_close(g_got, g_exp, TOL[dtype], f"d{name}")


@pytest.mark.parametrize("name,dtype,bias,softcap", [
    ("ga", torch.float64, False, None), ("wga", torch.float32, True, None), ("satimp", torch.float64, True, 4.0),
    ("satimp", torch.float32, False, None), ("tnpo", torch.float32, True, 4.0), ("wtnpo", torch.float64, False, None),
    ("wtnpo", torch.float32, True, 4.0), ("nll", torch.float32, False, 4.0), ("npo", torch.float64, True, None),
    ("simnpo", torch.float32, False, 4.0),
])
def test_objectives(dev, name, dtype, bias, softcap):
    h, w, b, y, ref = head_inputs(3, device=dev)
    h3, w, b = leaves(h.reshape(B, T, -1), w, b if bias else None, dtype=torch.float64)
    y2, ref2 = y.reshape(B, T), ref.reshape(B, T)
    kw = {"ref_logprobs": ref2} if gk.OBJECTIVES[name].needs_ref else {}
    expected = gk.unlearning_loss(name, h3, w, y2, bias=b, softcap=softcap, backend="oracle", **kw)
    hc, wc, bc = leaves(h3, w, b, dtype=dtype)
    kw = {k: v.to(dtype) for k, v in kw.items()}
    got = gk.unlearning_loss(name, hc, wc, y2, bias=bc, softcap=softcap, backend=BACKEND[dev.type], **kw)
    assert got.dtype == dtype
    assert_close(got, expected, TOL[dtype], "loss")
    for label, g_got, g_exp in zip("hWb", grads(got, (hc, wc, bc)), grads(expected, (h3, w, b))):
        assert_close(g_got, g_exp, TOL[dtype], f"d{label}")


def test_weights_vary_in_these_inputs():
    """The objective tests above mean something only if the per-token weights are far from constant."""
    h, w, _, y, _ = head_inputs(3)
    lp = gk.token_logprobs(h, w, y, backend="oracle")
    weights = gk.token_weights("wga", lp, mask=y != IGNORE)[y != IGNORE]
    assert weights.max() > 10 * weights.min() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_kl(dev, dtype, softcap):
    h, w, b, y, _ = head_inputs(5, device=dev)
    h_ref, w_ref, b_ref, _, _ = head_inputs(6, device=dev)
    h, w, b = leaves(h, w, b, dtype=torch.float64)
    expected = gk.kl_loss(h, w, h_ref, w_ref, y, bias=b, ref_bias=b_ref, softcap=softcap, backend="oracle")
    hc, wc, bc = leaves(h, w, b, dtype=dtype)
    got = gk.kl_loss(hc, wc, h_ref.to(dtype), w_ref.to(dtype), y, bias=bc, ref_bias=b_ref.to(dtype),
                     softcap=softcap, backend=BACKEND[dev.type])
    assert expected > 0.1
    assert_close(got, expected, TOL[dtype], "kl")
    for label, g_got, g_exp in zip("hWb", grads(got, (hc, wc, bc)), grads(expected, (h, w, b))):
        assert_close(g_got, g_exp, TOL[dtype], f"d{label}")


def logits_inputs(seed, device="cpu"):
    h, w, b, y, ref = head_inputs(seed, device=device)
    return (h @ w.T + b).detach(), y, ref


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_token_logprobs_from_logits(dev, dtype, softcap):
    z, y, _ = logits_inputs(7, device=dev)
    z = z.to(dtype).double()  # the reference sees exactly the values the kernel reads
    expected = gk.token_logprobs_from_logits(z.requires_grad_(), y, softcap=softcap, backend="oracle")
    zc = z.detach().to(dtype).requires_grad_()
    got = gk.token_logprobs_from_logits(zc, y, softcap=softcap, backend=BACKEND[dev.type])
    upstream = torch.randn(N, dtype=torch.float64, generator=generator(8)).to(dev)
    tol = TOL.get(dtype, 2e-5)
    assert_close(got, expected, tol, "logprobs")
    (g_got,), (g_exp,) = grads((got * upstream.to(got.dtype)).sum(), [zc]), grads((expected * upstream).sum(), [z])
    assert g_got.dtype == dtype
    assert_close(g_got, g_exp, BF16_GRAD_TOL["stored"] if dtype == torch.bfloat16 else tol, "dlogits")


@pytest.mark.parametrize("name", ["ga", "wga", "satimp", "tnpo", "wtnpo", "nll"])
@pytest.mark.parametrize("dtype,inplace,softcap", [
    (torch.float64, False, None), (torch.float32, True, None), (torch.float32, False, 4.0),
    (torch.float64, True, 4.0), (torch.bfloat16, True, None),
])
def test_weighted_loss_from_logits(dev, name, dtype, inplace, softcap):
    z, y, ref = logits_inputs(9, device=dev)
    z = z.to(dtype).double().requires_grad_()
    kw = {"ref_logprobs": ref} if gk.OBJECTIVES[name].needs_ref else {}
    expected = gk.unlearning_loss_from_logits(name, z, y, softcap=softcap, backend="oracle", **kw)
    (g_exp,) = grads(3.0 * expected, [z])
    leaf = z.detach().to(dtype).requires_grad_()
    logits = leaf * 1  # a non-leaf, as a model's output would be
    kw = {k: v.to(torch.float64 if dtype == torch.float64 else torch.float32) for k, v in kw.items()}
    got = gk.unlearning_loss_from_logits(name, logits, y, softcap=softcap, backend=BACKEND[dev.type], inplace=inplace,
                                         **kw)
    (g_got,) = grads(3.0 * got, [leaf])
    tol = TOL.get(dtype, 2e-5)
    assert_close(got, expected, tol, "loss")
    grad_tol = BF16_GRAD_TOL["stored and scaled"] if dtype == torch.bfloat16 else tol
    assert_close(g_got, g_exp, grad_tol, "dlogits")
    if inplace:  # the logits buffer now holds the gradient (scaled by the upstream 3 in the backward)
        assert_close(logits.detach(), g_exp, grad_tol, "buffer")


def test_inplace_on_a_leaf_hands_over_the_buffer(dev):
    z, y, _ = logits_inputs(10, device=dev)
    z.requires_grad_()
    (expected,) = grads(gk.unlearning_loss_from_logits("ga", z, y, backend="oracle"), [z])
    leaf = z.detach().float().requires_grad_()
    loss = gk.unlearning_loss_from_logits("ga", leaf, y, backend=BACKEND[dev.type], inplace=True)
    loss.backward()
    assert leaf.grad.data_ptr() == leaf.data_ptr()  # no second N×V buffer
    assert_close(leaf.grad, expected, 2e-5, "grad")
    with pytest.raises(RuntimeError, match="only once"):
        torch.autograd.backward(loss)


def test_many_chunks_and_no_grad(dev, monkeypatch):
    monkeypatch.setattr(autograd, "CHUNK_BYTES", 4 * V * 7)  # 7-row chunks, the last one partial
    h, w, b, y, _ = head_inputs(11, device=dev)
    h, w, b = leaves(h, w, b, dtype=torch.float64)
    expected = gk.unlearning_loss("wga", h, w, y, bias=b, backend="oracle")
    hc, wc, bc = leaves(h, w, b, dtype=torch.float64)
    got = gk.unlearning_loss("wga", hc, wc, y, bias=bc, backend=BACKEND[dev.type])
    assert_close(got, expected, 1e-11, "loss")
    for label, g_got, g_exp in zip("hWb", grads(got, (hc, wc, bc)), grads(expected, (h, w, b))):
        assert_close(g_got, g_exp, 1e-11, f"d{label}")
    with torch.no_grad():
        no_grad_loss = gk.unlearning_loss("wga", h, w, y, bias=b, backend=BACKEND[dev.type])
        assert_close(no_grad_loss, expected, 1e-11, "no-grad loss")


def test_nothing_valid_gives_zero_loss_and_zero_gradients(dev):
    h, w, _, y, _ = head_inputs(12, device=dev)
    hc, wc = leaves(h, w, dtype=torch.float32)
    loss = gk.unlearning_loss("wga", hc, wc, torch.full_like(y, IGNORE), backend=BACKEND[dev.type])
    assert loss.item() == 0
    assert all(torch.all(g == 0) for g in grads(loss, (hc, wc)))


def test_auto_prefers_cpp_cpu_for_cpu_tensors(ext):
    assert get_backend("auto", torch.zeros(1, 1)).name == "cpp_cpu"
    assert "cpp_cpu" in gk.available_backends("cpu")
    assert get_backend("cpu", torch.zeros(1, 1)) is get_backend("cpp_cpu", torch.zeros(1, 1))  # the former name


def test_binding_rejects_bad_tensors_clearly(ext):
    z, y, _ = logits_inputs(13)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ext.row_logprobs(z.half(), y, IGNORE, 0.0)
    with pytest.raises(RuntimeError, match="labels"):
        ext.row_logprobs(z, y[:-1], IGNORE, 0.0)
    with pytest.raises(RuntimeError, match="rows are contiguous"):
        ext.row_logprobs(z.t(), y, IGNORE, 0.0)
    one = torch.ones(1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="needs ref_logprobs"):
        ext.row_weighted_loss(z, None, y, None, IGNORE, 0.0, 3, 1.0, 1.0, 1.0, 0.0, one)
    with pytest.raises(RuntimeError, match="eps must be >= 0"):
        ext.row_weighted_loss(z, None, y, y.double(), IGNORE, 0.0, 3, 1.0, 1.0, 1.0, -1e-5, one)
    with pytest.raises(RuntimeError, match="scale must be a one-element float64 tensor"):
        ext.row_kl(z, z, None, y, IGNORE, 0.0, one.float())
