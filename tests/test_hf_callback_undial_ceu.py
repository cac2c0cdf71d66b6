"""`GEffectCallback` with CE-U and UNDIAL (UNDIAL reads the starting model through a `ReferenceState`) in a real
`transformers.Trainer` run: the G-effects it records are the profiler's at each recorded step's parameters."""
import pytest

from geffect_kernels.geffect import GEffectProfiler
from geffect_kernels.hf_callback import GEffectCallback
from geffect_kernels.objective_inputs import ReferenceState
from test_hf_callback import EVERY, STEPS, Snapshots, model_of, setup, trainer_for  # noqa: F401 (setup: fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("objective", ["ceu", "undial"])
def test_callback_records_the_profilers_geffects(setup, tmp_path, objective):  # noqa: F811
    tokenizer, forget, retain, forget_batch, retain_batch = setup
    reference = ReferenceState(model=model_of(tokenizer, dropout=0.0).eval())  # the starting model (same seed)
    snapshots = Snapshots()
    callback = GEffectCallback(forget_batch, retain_batch, objective=objective, every=EVERY, reference=reference)
    trainer_for(model_of(tokenizer, dropout=0.0), retain, tmp_path, [snapshots, callback]).train()
    assert callback.history.steps == list(range(0, STEPS, EVERY))
    for step, recorded in zip(callback.history.steps, callback.history.results):
        model = model_of(tokenizer, dropout=0.0)
        model.load_state_dict(snapshots.states[step])
        direct = GEffectProfiler(model.eval()).measure_unlearning(objective, forget_batch, retain_batch,
                                                                  reference=reference)
        for risk in ("forget", "retain"):
            assert recorded.total[risk] == pytest.approx(direct.total[risk], rel=1e-6)
