"""Shared inputs and checks for the csrc (C++ extension) tests."""
import pytest
import torch

from geffect_kernels.backends.cpp import build

IGNORE = -100
B, T, H = 3, 15, 24
V = 2501  # odd, and more than two of the CPU kernel's 1024-element LSE blocks
N = B * T


def require_extension(kind="cpu"):
    """Skip when this machine cannot compile at all; fail (not skip) when it can but the build breaks."""
    reason = build._why_not_buildable(kind)
    if reason:
        pytest.skip(f"cannot build the {kind} extension here: {reason}")
    return build.load(kind)


def generator(seed):
    return torch.Generator().manual_seed(seed)


def head_inputs(seed, *, scale=3.0, device="cpu"):
    """float64 hidden [N, H], head [V, H], bias [V], labels [N] with ignored positions, ref logprobs [N]; drawn on
    the CPU (the same values for every device), then moved to ``device``."""
    g = generator(seed)
    hidden = torch.randn(N, H, dtype=torch.float64, generator=g) * scale
    weight = torch.randn(V, H, dtype=torch.float64, generator=g) / H**0.5
    bias = torch.randn(V, dtype=torch.float64, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.25] = IGNORE
    labels[0] = IGNORE
    ref = torch.where(labels != IGNORE, torch.randn(N, dtype=torch.float64, generator=g) - 6.0, 0)
    return tuple(t.to(device) for t in (hidden, weight, bias, labels, ref))


def leaves(*tensors, dtype):
    return [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]


def grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


def assert_close(got, expected, rtol, what):
    """Max abs error relative to the largest expected magnitude (floating-point sums: no elementwise rtol)."""
    assert got.shape == expected.shape, what
    err = (got.double() - expected.double()).abs().max().item()
    size = max(expected.double().abs().max().item(), 1e-30)
    assert err <= rtol * size, f"{what}: max error {err:.3g} vs magnitude {size:.3g}"
