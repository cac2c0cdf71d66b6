"""GEffectProfiler on a model sharded with FSDP2 over two gloo ranks, each passing its slice of the batches:
every rank returns the G-effects of one process on the concatenated batches (float64, 1e-7 relative)."""
import json

import pytest

from geffect_kernels import hf
from geffect_kernels.geffect import GEffectProfiler

import sharded_cases
from ranks import TESTS, run_ranks

pytestmark = pytest.mark.usefixtures("one_thread")


def close(got, want, scale, rel=1e-7):
    return abs(got - want) <= rel * abs(want) + 1e-12 * scale


# One process takes NPO's gradient as the forget NLL's scaled per sample (the sharded path takes it directly);
# HF's Llama RMSNorm computes in float32 even in a float64 model, so the two routes round differently there.
REL = {"npo": 1e-5, "callback": 1e-5}


@pytest.mark.parametrize("case", ["full", "lora"])
def test_sharded_profiler_equals_one_process(case, tmp_path):
    run_ranks([TESTS / "distributed" / "sharded_geffects.py", tmp_path, case], world=2, timeout=600)
    model = sharded_cases.model(case)
    forget, retain, ref = sharded_cases.batches()
    profiler = GEffectProfiler(model, groups="component")
    expected = {name: profiler.measure_unlearning(name, forget, retain, ref_logprobs=ref,
                                                  **sharded_cases.HPARAMS.get(name, {}))
                for name in sharded_cases.OBJECTIVES}
    expected["generic"] = profiler.measure(lambda m: hf.unlearning_loss("ga", m, forget, backend="torch"),
                                           {"forget": lambda m: hf.unlearning_loss("nll", m, forget, backend="torch")})
    expected["callback"] = expected["npo"]
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name, want in expected.items():
            res = got[name]
            scale = max(abs(v) for v in want.total.values())
            assert set(res["by_group"]) == set(want.by_group), (rank, name)
            for group, values in want.by_group.items():
                for risk, value in values.items():
                    assert close(res["by_group"][group][risk], value, scale, REL.get(name, 1e-7)), \
                        (rank, name, group, risk)
            for risk, value in want.total.items():
                assert close(res["total"][risk], value, scale, REL.get(name, 1e-7)), (rank, name, risk)
            for key, value in want.losses.items():
                assert res["losses"][key] == pytest.approx(value, rel=1e-12), (rank, name, key)
            if want.retain_term is not None:
                for risk, value in want.retain_term.total.items():
                    assert close(res["retain_term"]["total"][risk], value, scale, REL.get(name, 1e-7)), \
                        (rank, name, risk)
