"""The kernels' token-weight codes: one enum (`catalog.KernelWeight`), mirrored by Triton and C++, and every kernel
refusing a code it has no formula for."""
import pathlib
import re
from dataclasses import dataclass

import pytest
import torch
import triton
import triton.language as tl

from geffect_kernels.backends.triton import config, weights
from geffect_kernels.backends.triton.linear_forward import merge_partials
from geffect_kernels.catalog import OBJECTIVES, KernelWeight

from csrc_cases import IGNORE, require_extension

MATH_H = (pathlib.Path(__file__).resolve().parents[1]
          / "csrc/include/geffect/math.h").read_text(encoding="utf-8")
UNKNOWN = (max(KernelWeight) + 1, -2, 99)


def cpp_name(member: KernelWeight) -> str:
    return "k" + member.name.capitalize()  # ONE -> kOne, WTNPO -> kWtnpo


def function_body(source: str, signature: str) -> str:
    start = source.index(signature)
    return source[start:source.index("\n}\n", start)]


def test_every_token_objective_has_a_code():
    codes = {o.name: o.kernel_code for o in OBJECTIVES.values() if o.level == "token"}
    assert all(isinstance(code, KernelWeight) for code in codes.values()), codes
    assert set(codes.values()) == set(KernelWeight)  # no code without an objective either


def test_cpp_enum_mirrors_the_catalog():
    enum = re.search(r"enum WeightKind : int \{([^}]*)\}", MATH_H).group(1)
    cpp = {name: int(value) for name, value in re.findall(r"(k\w+)\s*=\s*(-?\d+)", enum)}
    assert cpp == {cpp_name(m): int(m) for m in KernelWeight}
    for signature in ("bool is_weight_kind(", "T token_weight("):  # a case for every code in both switches
        cases = set(re.findall(r"case (k\w+):", function_body(MATH_H, signature)))
        assert cases == set(cpp), (signature, cases)


def test_triton_constants_are_the_catalog():
    assert weights.KINDS == tuple(int(m) for m in KernelWeight)
    for member in KernelWeight:
        assert getattr(weights, member.name).value == int(member)


@dataclass(frozen=True)
class FakeWeighting:  # a `catalog.TokenWeighting` whose code no kernel knows
    code: int
    objective: object = OBJECTIVES["ga"]
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    eps: float = 0.0
    needs_ref: bool = False


@pytest.mark.parametrize("code", UNKNOWN)
def test_triton_refuses_an_unknown_code_before_launch(code):
    with pytest.raises(ValueError, match=f"no token-weight formula for code {code}"):
        weights.weight_args(FakeWeighting(code))
    labels = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="no token-weight formula"):
        merge_partials(torch.zeros(1, 3), torch.ones(1, 3), -torch.rand(3), labels, None, ignore_index=IGNORE,
                       weighting=FakeWeighting(code))


@triton.jit
def _weights_kernel(lp_ptr, out_ptr, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    lp = tl.load(lp_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + offs, weights.token_weight(lp, lp, 0.5, 2.0, 1.0, 0.0, KIND), mask=offs < n)


@pytest.mark.skipif(not config.interpreting(), reason="CPU tensors run only under TRITON_INTERPRET=1")
def test_triton_kernel_refuses_an_unknown_code():
    lp = -torch.rand(5) - 0.1
    out = torch.empty(5)
    _weights_kernel[(1,)](lp, out, 5, KIND=int(KernelWeight.WGA), BLOCK=8)
    torch.testing.assert_close(out.double(), torch.exp(0.5 * lp.double()), rtol=1e-6, atol=0)
    with pytest.raises(Exception, match="unknown token-weight code"):
        _weights_kernel[(1,)](lp, out, 5, KIND=UNKNOWN[0], BLOCK=8)


@pytest.mark.parametrize("code", UNKNOWN)
def test_cpp_refuses_an_unknown_code(code):
    ext = require_extension("cpu")
    g = torch.Generator().manual_seed(code % 7)
    logits, labels = torch.randn(4, 11, dtype=torch.float64, generator=g), torch.tensor([1, 3, IGNORE, 10])
    one = torch.ones(1, dtype=torch.float64)
    args = (IGNORE, 0.0)
    lp, coef = ext.row_weighted_loss(logits, None, labels, None, *args, int(KernelWeight.ONE), 1.0, 1.0, 1.0, 0.0,
                                     one)
    assert torch.equal(coef, (labels != IGNORE).double())  # a known code runs: weight 1 where valid
    with pytest.raises(RuntimeError, match=f"unknown token-weight code {code}"):
        ext.row_weighted_loss(logits, None, labels, -lp.abs(), *args, code, 1.0, 1.0, 1.0, 0.0, one)


@pytest.mark.parametrize("backend", ["oracle", "torch", "cpp_cpu", "triton"])
@pytest.mark.parametrize("from_logits", [False, True])
def test_a_token_objective_without_a_code_runs_on_every_backend(backend, from_logits, monkeypatch):
    """An objective the kernels have no formula for: the backend's log-probabilities, its weights in torch."""
    import geffect_kernels as gk
    from geffect_kernels import catalog
    import formulas

    if backend == "cpp_cpu":
        require_extension("cpu")
    if backend == "triton" and not config.interpreting():
        pytest.skip("CPU tensors run only under TRITON_INTERPRET=1")
    monkeypatch.setitem(catalog.OBJECTIVES, "half_wga", catalog.Objective(
        "half_wga", "mean_t p_t^½ ℓ_t", "a test", token_weight=lambda lp, ref, hp: torch.exp(0.5 * lp)))
    dtype = torch.float32 if backend == "triton" else torch.float64
    g = torch.Generator().manual_seed(7)
    h = torch.randn(2, 7, 12, dtype=torch.float64, generator=g)
    w = torch.randn(37, 12, dtype=torch.float64, generator=g) / 12 ** 0.5
    y = torch.randint(0, 37, (2, 7), generator=g)
    y[0, :3] = IGNORE
    lp, valid = formulas.logprobs(h, w, y)
    expected = (torch.exp(0.5 * lp) * lp * valid).sum() / valid.sum()
    if from_logits:
        got = gk.unlearning_loss_from_logits("half_wga", (h @ w.T).to(dtype), y, backend=backend)
    else:
        got = gk.unlearning_loss("half_wga", h.to(dtype), w.to(dtype), y, backend=backend)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert abs(got.item() - expected.item()) <= tol * abs(expected.item())
