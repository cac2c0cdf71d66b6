"""The run that test_hf_trainer_distributed.py trains on two DDP ranks and in one process: a tiny float64 Llama,
eight forget examples of the demo data (two updates an epoch at 2 ranks × 2), NPO with a KL retain term and
G-effects, on the torch backend."""
import torch
from transformers import TrainingArguments

from geffect_kernels import hf
from geffect_kernels.train import tiny_llama
from demo_cases import tiny_demo

STEPS = 4


def trainer(out, *, accumulate):
    data, tokenizer = tiny_demo()
    model = tiny_llama(tokenizer, hidden_size=24, layers=2, heads=2, intermediate_size=40, seed=0).double()
    args = TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2,
                             gradient_accumulation_steps=accumulate, learning_rate=1e-2, seed=5, report_to=[],
                             use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, warmup_steps=0)
    return hf.UnlearningTrainer(model=model, args=args, processing_class=tokenizer,
                                forget_dataset=[p.to_record() for p in data.forget[:8]],
                                retain_dataset=[p.to_record() for p in data.retain], objective="npo",
                                retain_objective="kl", hparams={"beta": 0.5}, geffect_every=2,
                                backend="torch")  # DDP is what is tested: no C++ extension to build in each rank


def summary(trained) -> dict:
    """The logged losses and G-effects, and the trained parameters."""
    logs = trained.state.log_history
    return {"loss": [r["loss"] for r in logs if "loss" in r and "train_loss" not in r],
            "forget_loss": [r["forget_loss"] for r in logs if "forget_loss" in r],
            "retain_loss": [r["retain_loss"] for r in logs if "retain_loss" in r],
            "e_forget": [(r["step"], r["e_forget"]) for r in logs if "e_forget" in r],
            "e_retain": [(r["step"], r["e_retain"]) for r in logs if "e_retain" in r],
            "params": {n: p.detach().clone() for n, p in trained.model.named_parameters()}}


def equal_runs(a, b):
    """Assertions that ``a`` and ``b`` (`summary`) are the same run to rounding."""
    import pytest

    for key in ("loss", "forget_loss", "retain_loss"):  # the Trainer logs them through float32 sums
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
    for key in ("e_forget", "e_retain"):
        assert [s for s, _ in a[key]] == [s for s, _ in b[key]] == [0, 2]
        assert [v for _, v in a[key]] == pytest.approx([v for _, v in b[key]], rel=1e-9), key
    for name, p in a["params"].items():
        torch.testing.assert_close(b["params"][name], p, rtol=1e-9, atol=1e-12)
