"""Shared inputs and comparisons for the triton tests: fresh random float64 data, the kernel run in float32."""
import torch

IGNORE = -100
N, H, V = 37, 48, 1000  # odd sizes: no dimension is a multiple of a tile


def head_inputs(seed, *, bias=True, scale=1.0, n=N):
    """hidden [n, H], weight [V, H], bias [V] (float64, require grad), labels with ignored positions."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, H, generator=g, dtype=torch.float64) * scale).requires_grad_()
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    b = torch.randn(V, generator=g, dtype=torch.float64).requires_grad_() if bias else None
    y = torch.randint(0, V, (n,), generator=g)
    y[::5] = IGNORE
    y[1] = V - 1  # the last vocabulary column (edge of the last tile)
    ref = torch.randn(n, generator=g, dtype=torch.float64) - 7.0
    return h, w, b, y, ref


def as_float32(*tensors):
    return [None if t is None else t.detach().float().requires_grad_(t.requires_grad) for t in tensors]


def rel_err(got, expected):
    return ((got.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def assert_close(got, expected, tol, what=""):
    err = rel_err(got, expected)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def grads(loss, params):
    return torch.autograd.grad(loss, [p for p in params if p is not None])
