"""Half precision keeps its gradients.

The logit gradient c_t (onehot − softmax) carries c_t = w_t / n_valid, so in float16 its entries c_t · p
(p ~ 1/V) fall below float16's smallest subnormal: multiplied in float16, they flush to zero. At a shape where they
would (flat logits, N·V = 3.4e7), d hidden and dW of the torch and C++ CPU backends stay within a half-precision
tolerance of float64's gradients on the same rounded inputs.
"""
import functools

import pytest
import torch

import geffect_kernels as gk
from geffect_kernels.backends.registry import available_backends

N, H, V = 2048, 16, 16384
CASES = [(torch.float16, "ga", 3e-3), (torch.float16, "tnpo", 3e-3),
         (torch.bfloat16, "ga", 5e-3), (torch.bfloat16, "wga", 5e-3)]


@functools.lru_cache(maxsize=None)
def rounded_inputs(dtype):
    """Flat logits (median max-probability 5e-4) from inputs rounded to ``dtype``; a few positions ignored."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * (0.6 / H**0.5)).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::17] = -100
    with torch.no_grad():
        ref = gk.token_logprobs(hidden.double(), weight.double(), labels, backend="torch") + 0.5
    return hidden, weight, labels, ref


def gradients(objective, hidden, weight, labels, ref, backend):
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    kwargs = {"ref_logprobs": ref.to(torch.float64 if h.dtype == torch.float64 else torch.float32)} \
        if objective == "tnpo" else {}
    gk.unlearning_loss(objective, h, w, labels, backend=backend, **kwargs).backward()
    return h.grad.double(), w.grad.double()


@functools.lru_cache(maxsize=None)
def exact(dtype, objective):
    hidden, weight, labels, ref = rounded_inputs(dtype)
    return gradients(objective, hidden.double(), weight.double(), labels, ref, "torch")


@pytest.mark.parametrize("backend", ["torch", "cpp_cpu"])
@pytest.mark.parametrize("dtype,objective,tol", CASES)
def test_half_precision_gradients_match_float64(backend, dtype, objective, tol):
    if backend not in available_backends("cpu"):
        pytest.skip(f"{backend} is not available here")
    hidden, weight, labels, ref = rounded_inputs(dtype)
    dh, dw = gradients(objective, hidden, weight, labels, ref, backend)
    dh_exact, dw_exact = exact(dtype, objective)
    assert dh_exact.abs().amax() > 0 and dw_exact.abs().amax() > 0
    for name, got, want in (("d hidden", dh, dh_exact), ("dW", dw, dw_exact)):
        err = ((got - want).norm() / want.norm()).item()
        assert err <= tol, f"{backend} {dtype} {objective}: {name} relative error {err:.2e} > {tol:g}"


@functools.lru_cache(maxsize=None)
def kl_inputs(dtype, scale):
    """The rounded inputs above (hidden ``scale`` times larger: 1 flat, 8 peaky) and a reference head near them,
    as the KL retain term meets it: p_θ − p_ref is then a difference of nearly equal numbers."""
    hidden, weight, labels, _ = rounded_inputs(dtype)
    g = torch.Generator().manual_seed(1)
    hidden = (hidden.float() * scale).to(dtype)
    ref_hidden = (hidden.float() + 0.1 * scale * torch.randn(hidden.shape, generator=g)).to(dtype)
    ref_weight = (weight.float() + 0.01 / H**0.5 * torch.randn(weight.shape, generator=g)).to(dtype)
    return hidden, weight, ref_hidden, ref_weight, labels


def kl_gradients(hidden, weight, ref_hidden, ref_weight, labels, backend):
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    gk.kl_loss(h, w, ref_hidden, ref_weight, labels, backend=backend).backward()
    return h.grad.double(), w.grad.double()


def assert_representable_close(got, want, dtype, tol, what):
    """Relative error ≤ ``tol``, or no worse than the exact gradient rounded to ``dtype`` (float16 cannot hold
    entries below its normal range, 6e-5: the flat KL's d hidden, ~5e-6, and WGA's smallest weights)."""
    err = ((got - want).norm() / want.norm()).item()
    floor = ((want.to(dtype).double() - want).norm() / want.norm()).item()
    assert err <= max(tol, 1.01 * floor), f"{what}: relative error {err:.2e} > {tol:g} (rounding floor {floor:.2e})"


@pytest.mark.parametrize("scale", [1.0, 8.0])
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 5e-3)])
def test_torch_backend_half_precision_kl_gradients_match_float64(dtype, tol, scale):
    """The chunked torch backend's logits are float32 products of the 16-bit inputs. Rounded to bfloat16 before
    the softmax, as they were, the KL gradients came out 2.4e-2 (flat) and 7.7e-2 (peaky) off float64 here;
    now 2.5e-3 to 2.8e-3."""
    inputs = kl_inputs(dtype, scale)
    dh, dw = kl_gradients(*inputs, "torch")
    dh_exact, dw_exact = kl_gradients(*(t.double() if t.is_floating_point() else t for t in inputs), "torch")
    for name, got, want in (("d hidden", dh, dh_exact), ("dW", dw, dw_exact)):
        assert_representable_close(got, want, dtype, tol, f"torch {dtype} KL (scale {scale}): {name}")


@pytest.mark.parametrize("objective", ["ga", "wga"])
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 5e-3)])
def test_torch_backend_half_precision_peaky_gradients_match_float64(dtype, tol, objective):
    """Peaky logits (hidden 8× larger, |z| up to ~20): bfloat16-rounded logits put GA's and WGA's gradients 6.4e-3
    to 1.7e-2 off float64; float32 logits 1.8e-3 to 2.8e-3."""
    hidden, weight, labels, ref = rounded_inputs(dtype)
    hidden = (hidden.float() * 8).to(dtype)
    got = gradients(objective, hidden, weight, labels, ref, "torch")
    want = gradients(objective, hidden.double(), weight.double(), labels, ref, "torch")
    for name, g, w in zip(("d hidden", "dW"), got, want):
        assert_representable_close(g, w, dtype, tol, f"torch {dtype} {objective} peaky: {name}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test; the GPU suite checks the compiled kernels")
def test_triton_float16_gradient_tiles_keep_small_entries():
    """The Triton kernels store the logit gradient in the input dtype between passes; normalized (largest entry
    2^14, undone in the matmuls' float32 epilogue) its small entries survive float16. TNPO weights ~2e-3 make
    c_t · p ~ 1e-8: stored as they were, d hidden came out 3.8e-2 off float64 here, now 4.7e-4. dW itself is
    mostly below float16's normal range at this shape, so it is held to what float16 can represent."""
    from geffect_kernels.backends.interface import LossOptions
    from geffect_kernels.backends.triton.fused_weighted import weighted_head_loss
    from geffect_kernels.catalog import resolve

    n, h, v = 128, 16, 2048
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(n, h, generator=g) * 0.15).half()
    weight = torch.randn(v, h, generator=g).half()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::9] = -100
    ref = gk.token_logprobs(hidden.double(), weight.double(), labels, backend="torch") + 1.5
    h16, w16 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    opts = LossOptions(-100, None, resolve("tnpo", {"beta": 4.0}).weighting,
                       torch.tensor(1.0 / int((labels != -100).sum()), dtype=torch.float64))
    weighted_head_loss(h16, w16, None, labels, ref.float(), opts).backward()
    dh_exact, dw_exact = gradients("tnpo", hidden.double(), weight.double(), labels, ref, "torch")
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(h16.grad, dh_exact) <= 3e-3
    assert rel(w16.grad, dw_exact) <= rel(dw_exact.half(), dw_exact) + 3e-3
