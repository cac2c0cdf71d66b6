"""The triton backend as a whole: dispatch, fallbacks, the in-kernel weights, budgets, the sm_90 compile check."""
import os
import subprocess
import sys

import pytest
import torch

import geffect_kernels as gk
from geffect_kernels.backends.triton import config, set_logits_budget
from geffect_kernels.backends.triton.linear_forward import merge_partials
from geffect_kernels.catalog import resolve

import formulas
from triton_cases import IGNORE, as_float32, assert_close, head_inputs

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
interpreted = pytest.mark.skipif(not config.interpreting(), reason="CPU tensors run only under TRITON_INTERPRET=1")


@interpreted
def test_available_for_cpu_under_the_interpreter():
    assert "triton" in gk.available_backends("cpu")


@pytest.mark.parametrize("name,hparams", [
    ("ga", {}), ("wga", {"alpha": 1.0}), ("wga", {"alpha": 0.3}), ("satimp", {"alpha": 5.0, "gamma": 1.0}),
    ("satimp", {"alpha": 1.0, "gamma": 0.0}), ("satimp", {"alpha": 2.0, "gamma": 2.5}), ("tnpo", {"beta": 4.0}),
    ("wtnpo", {"alpha": 1.0, "beta": 4.0}), ("tnpo", {"beta": 4.0, "eps": 1e-5}),
    ("wtnpo", {"alpha": 0.5, "beta": 2.0, "eps": 1e-3}),
])
def test_in_kernel_weights_match_formulas(name, hparams):
    """Weights at extreme ℓ (p → 1, p → 0) and ℓ − ℓ_ref of both signs, through the merge kernel, against the
    float64 formulas (with the official ε too: 2p^β / (p^β + p_ref^β + ε))."""
    lp = torch.tensor([-1e-7, -1e-4, -0.3, -0.69, -2.0, -30.0, -80.0, -1e-2, -5.0, -0.05], dtype=torch.float64)
    ref = torch.tensor([-2.0, -1e-4, -30.0, -0.1, -80.0, -1.0, -1.0, -40.0, -5.0, -0.5], dtype=torch.float64)
    n = lp.numel()
    labels = torch.zeros(n, dtype=torch.long)
    labels[3] = IGNORE
    weighting = resolve(name, hparams).weighting
    got_lp, lse, coef = merge_partials(torch.zeros(1, n), torch.ones(1, n), lp.float(), labels,
                                       ref.float() if weighting.needs_ref else None, ignore_index=IGNORE,
                                       weighting=weighting)
    expected = formulas.token_weight(name, lp.float().double(), ref.float().double(), hparams)
    expected[3] = 0
    assert torch.all(lse == 0)
    assert got_lp[3] == 0 and coef[3] == 0
    torch.testing.assert_close(coef.double(), expected, rtol=2e-6, atol=1e-30)


@interpreted
def test_other_dtypes_fall_back_to_the_chunked_backend():
    """float64 (and 16-bit types in the interpreter) take the torch path and still give the right numbers."""
    h, w, b, y, ref = head_inputs(8)
    expected = gk.unlearning_loss("tnpo", h, w, y, bias=b, ref_logprobs=ref, backend="oracle")
    got = gk.unlearning_loss("tnpo", h, w, y, bias=b, ref_logprobs=ref, backend="triton")
    assert got.dtype == torch.float64
    assert_close(got, expected, 1e-12)
    h16, w16 = h.detach().bfloat16(), w.detach().bfloat16()
    got16 = gk.token_logprobs(h16, w16, y, backend="triton")  # float32 logits of the bf16 inputs (torch backend)
    assert_close(got16, gk.token_logprobs(h16.float(), w16.float(), y, backend="oracle"), 1e-6)


def test_empty_batch_and_no_grad():
    h, w, _, y, _ = head_inputs(9, bias=False)
    h32, w32 = as_float32(h, w)
    assert gk.token_logprobs(h32[:0], w32, y[:0], backend="triton").shape == (0,)
    with torch.no_grad():
        loss = gk.unlearning_loss("wga", h32, w32, y, backend="triton")
    assert_close(loss, gk.unlearning_loss("wga", h, w, y, backend="oracle"), 2e-5)


def test_logits_budget_setting(monkeypatch):
    monkeypatch.setenv("GEFFECT_TRITON_LOGITS_BUDGET", "1.5G")
    set_logits_budget(None)
    assert config.logits_budget() == int(1.5 * 2**30)
    set_logits_budget(4096)
    assert config.logits_budget() == 4096
    set_logits_budget(None)
    monkeypatch.setenv("GEFFECT_TRITON_LOGITS_BUDGET", "lots")
    with pytest.raises(ValueError, match="GEFFECT_TRITON_LOGITS_BUDGET"):
        config.logits_budget()
    with pytest.raises(ValueError, match="non-negative"):
        set_logits_budget(-1)


def test_every_kernel_compiles_for_sm90():
    """Real compilation (not the interpreter) for an H100; also catches shared-memory overuse and unpipelined
    matmul loops. Runs in a subprocess: TRITON_INTERPRET changes what @triton.jit builds."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "geffect_kernels.backends.triton.compile_check", "--sample"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAILED" not in done.stdout and "kernels compiled for sm_90" in done.stdout
    assert "registers, spills" in done.stdout
