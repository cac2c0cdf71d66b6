"""triton backend on given logits (row-wise kernels), incl. the gradient written over the logits."""
import pytest
import torch

import geffect_kernels as gk
from triton_cases import IGNORE, N, V, assert_close, grads

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # masked interpreter lanes
FP32 = 2e-5


def logits_inputs(seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, N, V, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, V, (2, N), generator=g)
    y[:, ::4] = IGNORE
    y[0, 1] = V - 1
    ref = torch.randn(2, N, generator=g, dtype=torch.float64) - 7.0
    return z, y, ref


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_token_logprobs_from_logits(softcap):
    z, y, _ = logits_inputs(1)
    z64 = z.clone().requires_grad_()
    expected = gk.token_logprobs_from_logits(z64, y, softcap=softcap, backend="oracle")
    z32 = z.float().requires_grad_()
    got = gk.token_logprobs_from_logits(z32, y, softcap=softcap, backend="triton")
    assert torch.all(got[y == IGNORE] == 0)
    assert_close(got, expected, FP32, "logprobs")
    upstream = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (g_got,), (g_exp,) = grads((got * upstream.float()).sum(), [z32]), grads((expected * upstream).sum(), [z64])
    assert_close(g_got, g_exp, FP32, "dlogits")


@pytest.mark.parametrize("name,softcap,inplace", [
    ("ga", None, False), ("wga", 5.0, True), ("satimp", None, True), ("tnpo", 5.0, False),
    ("wtnpo", None, True), ("nll", 5.0, True), ("npo", None, True),
])
def test_weighted_from_logits(name, softcap, inplace):
    z, y, ref = logits_inputs(3)
    kwargs = {"ref_logprobs": ref} if gk.OBJECTIVES[name].needs_ref else {}
    z64 = z.clone().requires_grad_()
    expected = gk.unlearning_loss_from_logits(name, z64, y, softcap=softcap, backend="oracle", **kwargs)
    (g_exp,) = grads(expected, [z64])
    leaf = z.float().requires_grad_()
    logits = leaf * 1.0  # a non-leaf, like an LM head's output
    got = gk.unlearning_loss_from_logits(name, logits, y, softcap=softcap, backend="triton", inplace=inplace,
                                         **{k: v.float() for k, v in kwargs.items()})
    assert_close(got, expected, FP32, "loss")
    (g_got,) = grads(got, [leaf])
    assert_close(g_got, g_exp, FP32, "dlogits")
    fused = gk.OBJECTIVES[name].level == "token"
    if inplace and fused:  # the gradient now lives in the logits buffer
        assert_close(logits.detach(), g_exp, FP32, "gradient written over the logits")
    else:
        assert torch.equal(logits.detach(), z.float()), "logits must be left intact"


def test_inplace_scaled_by_upstream():
    z, y, _ = logits_inputs(4)
    leaf = z.float().requires_grad_()
    (g_one,) = grads(gk.unlearning_loss_from_logits("wga", leaf * 1.0, y, backend="triton", inplace=True), [leaf])
    (g_two,) = grads(2.0 * gk.unlearning_loss_from_logits("wga", leaf * 1.0, y, backend="triton", inplace=True),
                     [leaf])
    assert_close(g_two, 2.0 * g_one, 1e-6)
