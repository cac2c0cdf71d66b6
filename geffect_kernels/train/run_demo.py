"""`geffect demo`: the whole experiment, offline, on a CPU, in a few minutes.

1. Generate the demo data (fictitious authors + world facts) and train a tokenizer on it.
2. Fine-tune a tiny Llama on every author and the world facts: the *target* model.
3. Train the same architecture on the retain authors and world facts only: the *retain-only* model,
   the reference for forget quality.
4. Unlearn the forget authors (10%) from the target with each objective plus an ``nll`` retain term,
   recording G-effects every few steps and forget/retain probabilities along the way.
5. Evaluate every model TOFU-style and write CSV/JSON, plots and ``report.md`` (see `eval.report`).
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..data import demo_data, encode_pairs, qa_texts, save_qa, train_tokenizer
from ..eval import evaluate_model, mean_answer_logprobs
from .train_config import TrainConfig
from .loop import train
from .tiny_model import tiny_llama

OBJECTIVE_NAMES = ("ga", "npo", "wga", "tnpo", "wtnpo")
MARKER = "demo_settings.json"  # marks a folder as a demo output (safe to overwrite)


@dataclass(frozen=True)
class DemoSettings:
    n_authors: int
    vocab_size: int
    hidden_size: int
    layers: int
    finetune_steps: int
    unlearn_steps: int
    finetune_lr: float = 3e-3
    unlearn_lr: float = 1e-3
    batch_size: int = 32
    unlearn_batch_size: int = 8
    geffect_every: int = 2
    probe_every: int = 2
    max_new_tokens: int = 24


FULL = DemoSettings(n_authors=20, vocab_size=1024, hidden_size=128, layers=4, finetune_steps=180, unlearn_steps=30)
QUICK = DemoSettings(n_authors=10, vocab_size=768, hidden_size=64, layers=3, finetune_steps=150, unlearn_steps=12,
                     batch_size=16)


def _prepare_out_dir(out_dir) -> Path:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise FileExistsError(f"{out} is not empty and holds no earlier demo output; choose another --out")
    for sub in ("data", "tokenizer", "models", "runs", "results", "plots"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _probe(tokenizer, forget, retain):
    """Teacher-forced mean answer probabilities on the forget set and the retain set (cheap, every few steps)."""
    def probe(model):
        return {f"probe_{name}_probability": float(mean_answer_logprobs(
                    model, tokenizer, [p.question for p in pairs], [p.answer for p in pairs]).exp().mean())
                for name, pairs in (("forget", forget), ("retain", retain))}
    return probe


def run_demo(out_dir, *, quick=False, progress=True, echo=print) -> Path:
    """Run the demo into ``out_dir`` and return the path of ``report.md``."""
    threads = torch.get_num_threads()
    # the tiny model's ops are too small to split across threads; on a busy machine extra threads only wait
    torch.set_num_threads(1)
    try:
        return _run(out_dir, QUICK if quick else FULL, quick, progress, echo)
    finally:
        torch.set_num_threads(threads)


def _run(out_dir, settings, quick, progress, echo):
    out = _prepare_out_dir(out_dir)
    started = time.perf_counter()
    (out / MARKER).write_text(json.dumps({"quick": quick, **asdict(settings)}, indent=1))

    data = demo_data(settings.n_authors, forget_fraction=0.1)
    for name, pairs in (("forget", data.forget), ("retain", data.retain), ("world", data.world)):
        save_qa(pairs, out / "data" / f"{name}.json")
    tokenizer = train_tokenizer(qa_texts(data.all_training), vocab_size=settings.vocab_size)
    tokenizer.save_pretrained(out / "tokenizer")
    echo(f"data: {len(data.forget)} forget, {len(data.retain)} retain, {len(data.world)} world-fact questions; "
         f"vocabulary {len(tokenizer)}")

    def finetune(name, pairs):
        model = tiny_llama(tokenizer, hidden_size=settings.hidden_size, layers=settings.layers,
                           heads=settings.hidden_size // 32, intermediate_size=3 * settings.hidden_size)
        config = TrainConfig(objective="nll", retain_objective="none", steps=settings.finetune_steps,
                             batch_size=settings.batch_size, lr=settings.finetune_lr,
                             warmup_steps=settings.finetune_steps // 10, out_dir=str(out / "models" / name),
                             checkpoint_every=settings.finetune_steps, progress=progress)
        result = train(model, encode_pairs(tokenizer, pairs), None, config)
        tokenizer.save_pretrained(Path(config.out_dir) / "model")  # a complete model folder for `geffect profile`
        echo(f"{name}: fine-tuned {settings.finetune_steps} steps, final loss {result.metrics[-1]['loss']:.4f}")
        return model

    target = finetune("target", data.all_training)
    retain_only = finetune("retain_only", data.retain + data.world)

    eval_kwargs = dict(max_new_tokens=settings.max_new_tokens)
    summaries, per_sample = {}, {}
    summaries["retain_only"], per_sample["retain_only"] = evaluate_model(
        retain_only, tokenizer, data.forget, data.retain, data.world, **eval_kwargs)
    reference_ratios = per_sample["retain_only"]["forget"]["truth_ratio"]
    summaries["retain_only"]["forget_quality"] = 1.0  # the KS test of a sample against itself
    summaries["target"], per_sample["target"] = evaluate_model(
        target, tokenizer, data.forget, data.retain, data.world, retain_model_forget_ratios=reference_ratios,
        **eval_kwargs)

    probe = _probe(tokenizer, data.forget, data.retain)
    start_point = probe(target)
    trajectories = []
    forget_set, retain_set = encode_pairs(tokenizer, data.forget), encode_pairs(tokenizer, data.retain)
    for name in OBJECTIVE_NAMES:
        model = copy.deepcopy(target)
        config = TrainConfig(objective=name, retain_objective="nll", steps=settings.unlearn_steps,
                             batch_size=settings.unlearn_batch_size, lr=settings.unlearn_lr,
                             geffect_every=settings.geffect_every, eval_every=settings.probe_every,
                             checkpoint_every=settings.unlearn_steps, out_dir=str(out / "runs" / name),
                             progress=progress)
        result = train(model, forget_set, retain_set, config, evaluate=probe)
        tokenizer.save_pretrained(Path(config.out_dir) / "model")
        trajectories += [{"objective": name, "step": 0, **start_point}] + [
            {"objective": name, "step": m["step"], **{k: v for k, v in m.items() if k.startswith("probe_")}}
            for m in result.metrics if "probe_forget_probability" in m]
        summaries[name], per_sample[name] = evaluate_model(
            model, tokenizer, data.forget, data.retain, data.world, retain_model_forget_ratios=reference_ratios,
            **eval_kwargs)
        s = summaries[name]
        echo(f"{name}: forget quality {s['forget_quality']:.3g}, model utility {s['model_utility']:.3f}, "
             f"forget probability {s['forget_probability']:.3f}, retain probability {s['retain_probability']:.3f}")

    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "summary.json").write_text(json.dumps(summaries, indent=1))
    (results / "per_sample.json").write_text(json.dumps(per_sample, indent=1))
    (results / "trajectories.json").write_text(json.dumps(trajectories, indent=1))
    (results / "timing.json").write_text(json.dumps({"seconds": time.perf_counter() - started,
                                                     "torch_threads": torch.get_num_threads()}))
    from ..eval.report import make_report
    report = make_report(out)
    echo(f"wrote {report} ({time.perf_counter() - started:.0f} s)")
    return report


__all__ = ["DemoSettings", "FULL", "OBJECTIVE_NAMES", "QUICK", "run_demo"]
