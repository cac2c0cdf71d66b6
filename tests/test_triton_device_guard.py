"""Triton kernels launch on the inputs' GPU, not the current one. Needs two GPUs."""
import pytest
import torch

import geffect_kernels as gk

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


def test_inputs_on_the_second_gpu_with_the_first_current():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 32, generator=g)
    weight = torch.randn(300, 32, generator=g) / 6
    labels = torch.randint(0, 300, (64,), generator=g)
    expected = gk.unlearning_loss("wga", hidden.double(), weight.double(), labels, backend="oracle")
    h = hidden.to("cuda:1").requires_grad_()
    w = weight.to("cuda:1").requires_grad_()
    with torch.cuda.device(0):
        loss = gk.unlearning_loss("wga", h, w, labels.to("cuda:1"), backend="triton")
        loss.backward()
        logits = (h.detach() @ w.detach().T).requires_grad_()
        from_logits = gk.unlearning_loss_from_logits("wga", logits, labels.to("cuda:1"), backend="triton")
    torch.cuda.synchronize(1)
    assert loss.device == h.grad.device == torch.device("cuda:1")
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-4, atol=0)
    torch.testing.assert_close(from_logits.double().cpu(), expected, rtol=1e-4, atol=0)
