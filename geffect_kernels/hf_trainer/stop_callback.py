"""``--stop-when``'s rules (`guidance.stop`) as a TrainerCallback: after each logged G-effect (``e_forget``,
``e_retain`` in the Trainer's log) the rules are read off every G-effect logged so far (``state.log_history``, which
a resumed run restores), and the first that holds stops training before the update the G-effects were measured
for. ``reason`` and ``stopped_at`` (the updates made) say which and when; the log gets ``stopped_at``."""
from __future__ import annotations

from transformers import TrainerCallback

from ..guidance.stop import fired, parse_stop_when


class _LoggedGEffects:
    """The per-step totals of ``log_history``'s G-effect records, read as `guidance.stop.quantities` reads a
    `GEffectHistory`."""

    def __init__(self, log_history):
        by_step = {}
        for record in log_history:
            if "e_forget" in record:
                by_step[record["step"]] = record  # a step measured again (after a resume): the last record
        self.records = [by_step[step] for step in sorted(by_step)]
        self.risks = ["forget"] + (["retain"] if self.records and "e_retain" in self.records[0] else [])

    def __len__(self):
        return len(self.records)

    def per_step(self, risk):
        return [record[f"e_{risk}"] for record in self.records]


class StopWhenCallback(TrainerCallback):
    def __init__(self, stop_when: str):
        try:
            self.rules = parse_stop_when(stop_when)
        except ValueError as err:
            raise ValueError(f"stop_when: {err}") from None
        self.reason, self.stopped_at = None, None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "e_forget" not in logs or self.reason is not None:
            return
        # quantities count steps from 1 as the loop does: the update about to be made
        reason = fired(self.rules, _LoggedGEffects(state.log_history), state.global_step + 1)
        if reason is not None:
            self.reason, self.stopped_at = reason, state.global_step
            state.log_history.append({"stopped": reason, "stopped_at": state.global_step, "step": state.global_step})
            control.should_training_stop = True
