"""pytest-benchmark: chunked `torch` backend vs naive log_softmax, forward+backward, in one run.

    python -m pytest benchmarks/test_cpu_token_loss.py --benchmark-group-by=group

Peak memory in fresh processes: python benchmarks/cpu_token_loss.py
"""
import pytest
import torch

from cpu_token_loss import inputs, step


@pytest.fixture(scope="module")
def data():
    hidden, weight, labels = inputs()
    with torch.no_grad():  # the GA loss in float64, 512 rows of logits at a time
        logp = torch.cat([torch.log_softmax(h.double() @ weight.double().T, -1).gather(1, y.clamp_min(0)[:, None])
                          for h, y in zip(hidden.split(512), labels.split(512))]).squeeze(1)
    return hidden, weight, labels, logp[labels != -100].mean()


@pytest.mark.parametrize("variant", ["naive", "chunked-fused", "chunked-generic"])
def test_token_loss_fwd_bwd(benchmark, data, variant):
    hidden, weight, labels, expected = data
    benchmark.group = "token_loss N4096 H512 V32000 fp32"

    def run():
        hidden.grad = weight.grad = None
        return step(variant, hidden, weight, labels)

    loss = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    assert torch.isclose(loss.double(), expected, rtol=1e-5)  # every variant computes the same GA loss
