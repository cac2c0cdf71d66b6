"""benchmarks/flops.py: the flop count the G-effect benchmark reports, exact on known ops (the ones torch's registry
lacks included)."""
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from flops import counted_flops  # noqa: E402


def test_counted_flops_of_known_ops():
    m, k, n = 5, 7, 3
    a, b, c = torch.randn(m, k), torch.randn(k, n), torch.randn(m, n)
    assert counted_flops(lambda: a @ b) == 2 * m * k * n
    assert counted_flops(lambda: c.addmm_(a, b)) == 2 * m * k * n  # in place: not in the registry
    q, key, v = (torch.randn(2, 3, 6, 4, requires_grad=True) for _ in range(3))
    forward = counted_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, key, v))
    assert forward == 2 * (2 * 2 * 3 * 6 * 6 * 4)  # Q Kᵀ and P V
    both = counted_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, key, v).sum().backward())
    assert both > 2 * forward  # the backward (CPU flash attention) is counted too
