"""`UnlearningTrainer` under DDP (two gloo ranks, as torchrun starts them): the logged losses, the G-effects and the
trained parameters of 2 ranks × 2 examples equal one process's with 2 micro-batches of 2 (the same examples, the same
pairs)."""
import pytest
import torch

import hf_trainer_cases
from ranks import TESTS, run_ranks

pytestmark = pytest.mark.usefixtures("one_thread")
TIMEOUT = 600  # a hang, not a slow machine: CI shares its cores


def test_two_ranks_give_one_process_losses(tmp_path):
    run_ranks([TESTS / "distributed" / "hf_trainer.py", tmp_path], world=2, timeout=TIMEOUT)
    ranks = torch.load(tmp_path / "ranks.pt", weights_only=True)
    one = hf_trainer_cases.trainer(tmp_path / "one", accumulate=2)
    one.train()
    hf_trainer_cases.equal_runs(hf_trainer_cases.summary(one), ranks)
