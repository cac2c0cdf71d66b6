"""pytest-benchmark: chunked `torch` backend vs naive log_softmax, forward+backward, in one run.

    python -m pytest benchmarks/test_cpu_token_loss.py --benchmark-group-by=group

Peak memory in fresh processes: python benchmarks/cpu_token_loss.py
"""
import pytest

from cpu_token_loss import inputs, step


@pytest.fixture(scope="module")
def data():
    return inputs()


@pytest.mark.parametrize("variant", ["naive", "chunked-fused", "chunked-generic"])
def test_token_loss_fwd_bwd(benchmark, data, variant):
    hidden, weight, labels = data
    benchmark.group = "token_loss N4096 H512 V32000 fp32"

    def run():
        hidden.grad = weight.grad = None
        return step(variant, hidden, weight, labels)

    loss = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    assert loss.isfinite()
