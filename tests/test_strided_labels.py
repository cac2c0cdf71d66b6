"""Strided labels (a view taking every other column, ignored positions among them) are accepted by every backend
that runs on the CPU, with the value of the independent formula."""
import pytest
import torch

import geffect_kernels as gk

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("backend", ["torch", "cpp_cpu", "oracle"])
def test_strided_labels_give_the_formulas_loss(backend):
    B, T, H, V = 3, 7, 5, 11
    hidden = torch.randn(B, T, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64)
    wide = torch.randint(0, V, (B, 2 * T))
    wide[0, 2], wide[2, 6] = -100, -100
    labels = wide[:, ::2]  # flattens to a strided vector: stride 2
    assert not labels.reshape(-1).is_contiguous()
    valid = labels != -100
    logprobs = torch.log_softmax(hidden @ weight.T, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    expected = logprobs[valid].mean()  # gradient ascent minimizes the mean log-likelihood of the answer tokens
    got = gk.unlearning_loss("ga", hidden, weight, labels, backend=backend)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-12)
    assert torch.equal(got, gk.unlearning_loss("ga", hidden, weight, labels.contiguous(), backend=backend))
