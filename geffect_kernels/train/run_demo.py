"""`geffect demo`: the whole experiment, offline, on a CPU (its report says how long it took, and on what).

1. Generate the demo data (fictitious authors, real authors, world facts) and train a tokenizer on it.
2. Fine-tune a tiny Llama on every fictitious author plus the general knowledge (real authors, world facts):
   the *target* model.
3. Train the same architecture on the retain authors and the general knowledge only: the *retain-only* model,
   the reference for forget quality.
4. Unlearn the forget authors (10%) from the target with each objective plus an ``nll`` retain term, once per
   seed (same target; the seed sets the batch order), recording G-effects every few steps and forget/retain
   probabilities along the way (and, for NPO, its weights and each instance's retain damage); PO on the demo
   world's refusals (``data/idontknow.jsonl``); for the paper's case study (`CASE_STUDY`: GA, NPO, PO, RMU) also the
   G-effects of the NLL, KL and RR retain terms every few probes; GA and NPO also with each G-effect guidance
   (`GUIDED`, runs named ``ga+rectify`` and so on, on the first ``guided_seeds`` seeds), next to their unguided runs.
5. Evaluate every model TOFU-style, with membership inference of the forget authors against holdout authors no
   model saw (AUC per attack, privleak relative to the retain-only model) and memorization, and write CSV/JSON,
   plots and ``report.md`` (see `eval.report`), where each number of the unlearned models comes with its spread
   over the seeds.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..data import demo_data, encode_pairs, qa_texts, save_qa, train_tokenizer
from ..eval import evaluate_model
from ..objectives import OBJECTIVES
from ..atomic_files import atomic_write_text
from ..data.demo import REFUSALS
from .demo_probes import NPOProbe, RetainTermProbe, probability_probe
from .frozen_model import frozen_copy
from .loop import train
from .tiny_model import tiny_llama
from .train_config import TrainConfig

OBJECTIVE_NAMES = ("ga", "npo", "wga", "tnpo", "wtnpo", "po", "rmu")
# the paper's case study: these objectives' runs also record the G-effects of each retain term (CASE_TERMS)
CASE_STUDY = ("ga", "npo", "po", "rmu")
RETAIN_TERMS_FILE = "retain_terms.json"  # in each case-study run's folder: {term: GEffectHistory}
# (objective, guidance) runs beside the unguided objectives, from the same target and seeds (docs/guidance.md)
GUIDED = (("ga", "rectify"), ("npo", "rectify"), ("ga", "instance"), ("npo", "instance"))
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
    geffect_every: int = 3
    probe_every: int = 2
    probe_retain: int = 66  # retain questions the trajectory probe scores (the first authors'), to keep it cheap
    case_every: int = 5  # the case study's retain-term G-effects every this many probes
    guided_seeds: int = 2  # the guided variants run on the first seeds only (the full demo's CPU time)
    max_new_tokens: int = 24  # greedy answers for ROUGE-L: the demo's answers are short (TOFU generates 200)
    seeds: int = 3  # unlearning runs per objective, from the same target


FULL = DemoSettings(n_authors=20, vocab_size=1024, hidden_size=128, layers=4, finetune_steps=180, unlearn_steps=30)
QUICK = DemoSettings(n_authors=10, vocab_size=768, hidden_size=64, layers=3, finetune_steps=150, unlearn_steps=12,
                     batch_size=16, seeds=1)


def _prepare_out_dir(out_dir) -> Path:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise FileExistsError(f"{out} is not empty and holds no earlier demo output; choose another --out")
    for sub in ("data", "tokenizer", "models", "runs", "results", "plots"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _machine() -> str:
    """CPU model and core count, for the report's timing line (numbers vary by machine and version)."""
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}"


def run_demo(out_dir, *, quick=False, seeds=None, progress=True, echo=print) -> Path:
    """Run the demo into ``out_dir`` and return the path of ``report.md``; ``seeds``: unlearning runs per
    objective (default 3 for the full demo, 1 for ``quick``)."""
    settings = QUICK if quick else FULL
    if seeds is not None:
        if not isinstance(seeds, int) or seeds < 1:
            raise ValueError(f"seeds must be a positive integer, got {seeds!r}")
        settings = replace(settings, seeds=seeds)
    threads = torch.get_num_threads()
    # the tiny model's ops are too small to split across threads; on a busy machine extra threads only wait
    torch.set_num_threads(1)
    try:
        return _run(out_dir, settings, quick, progress, echo)
    finally:
        torch.set_num_threads(threads)


def _run(out_dir, settings, quick, progress, echo):
    out = _prepare_out_dir(out_dir)
    started, cpu_started, load_before = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    (out / MARKER).write_text(json.dumps({"quick": quick, **asdict(settings)}, indent=1))

    data = demo_data(settings.n_authors, forget_fraction=0.1)
    sets = {"forget": data.forget, "retain": data.retain, "real_authors": data.real_authors, "world": data.world,
            "holdout": data.holdout}
    for name, pairs in sets.items():
        save_qa(pairs, out / "data" / f"{name}.json")
    refusals = out / "data" / "idontknow.jsonl"  # PO's and DPO's substitute answers, in TOFU's format
    atomic_write_text(refusals, "\n".join(REFUSALS) + "\n")
    tokenizer = train_tokenizer(qa_texts(data.all_training) + REFUSALS, vocab_size=settings.vocab_size)
    tokenizer.save_pretrained(out / "tokenizer")
    echo(f"data: {len(data.forget)} forget, {len(data.retain)} retain, {len(data.real_authors)} real-author, "
         f"{len(data.world)} world-fact, {len(data.holdout)} holdout questions; vocabulary {len(tokenizer)}")

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
    retain_only = finetune("retain_only", data.retain + data.general_knowledge)

    def evaluate(model, **kwargs):
        return evaluate_model(model, tokenizer, data.forget, data.retain, data.world, real_authors=data.real_authors,
                              holdout=data.holdout, max_new_tokens=settings.max_new_tokens, **kwargs)

    summaries, per_sample = {}, {}
    summaries["retain_only"], per_sample["retain_only"] = evaluate(retain_only)
    reference = {"retain_model_forget_ratios": per_sample["retain_only"]["forget"]["truth_ratio"],
                 "retain_model_mia_auc": summaries["retain_only"]["mia_auc"]}
    # the retain-only model against itself: a KS test of a sample with itself, no leak relative to itself
    summaries["retain_only"].update(forget_quality=1.0, privleak=0.0)
    summaries["retain_only"].pop("missing", None)
    summaries["target"], per_sample["target"] = evaluate(target, **reference)

    forget_set, retain_set = encode_pairs(tokenizer, data.forget), encode_pairs(tokenizer, data.retain)
    probe = probability_probe(tokenizer, data.forget, data.retain[:settings.probe_retain])
    npo_probe = NPOProbe(target, forget_set, retain_set, beta=OBJECTIVES["npo"].defaults["beta"])
    start_point = probe(target)
    npo_start = npo_probe(target)
    starting = frozen_copy(target)  # KL's and RR's reference in the case study
    case_batches = (forget_set.batch(range(min(settings.unlearn_batch_size, len(forget_set)))),
                    retain_set.batch(range(settings.unlearn_batch_size)))
    trajectories = []
    for seed in range(settings.seeds):
        runs = [(name, None) for name in OBJECTIVE_NAMES] + list(GUIDED) * (seed < settings.guided_seeds)
        for objective, guidance in runs:
            name = objective if guidance is None else f"{objective}+{guidance}"
            run = f"{name}-seed{seed}"
            model = copy.deepcopy(target)
            config = TrainConfig(objective=objective, retain_objective="nll", steps=settings.unlearn_steps,
                                 batch_size=settings.unlearn_batch_size, lr=settings.unlearn_lr, seed=seed,
                                 geffect_every=settings.geffect_every, eval_every=settings.probe_every,
                                 checkpoint_every=settings.unlearn_steps, out_dir=str(out / "runs" / run),
                                 progress=progress, guidance=guidance, alternate=str(refusals))
            probes = [probe] + [npo_probe] * (name == "npo")
            terms = None
            if name in CASE_STUDY:
                terms = RetainTermProbe(starting, *case_batches, probe_every=settings.probe_every,
                                        every=settings.case_every, layer=config.hparams.get("layer"))
                probes.append(terms)
            hook = lambda m, probes=probes: {k: v for p in probes for k, v in p(m).items()}
            result = train(model, forget_set, retain_set, config, evaluate=hook)
            if terms is not None:
                atomic_write_text(Path(config.out_dir) / RETAIN_TERMS_FILE,
                                  json.dumps({t: h.to_dict() for t, h in terms.histories.items()}))
            tokenizer.save_pretrained(Path(config.out_dir) / "model")
            first = {**start_point, **(npo_start if name == "npo" else {})}
            trajectories += [{"objective": name, "seed": seed, "step": 0, **first}] + [
                {"objective": name, "seed": seed, "step": m["step"],
                 **{k: v for k, v in m.items() if k.startswith("probe_")}}
                for m in result.metrics if "probe_forget_probability" in m]
            summaries[run], per_sample[run] = evaluate(model, **reference)
            s = summaries[run]
            echo(f"{run}: forget quality {s['forget_quality']:.3g}, model utility {s['model_utility']:.3f}, "
                 f"forget probability {s['forget_probability']:.3f}, retain probability {s['retain_probability']:.3f}, "
                 + (f"privleak {s['privleak']:.1f}" if "privleak" in s else f"privleak: {s['missing']['privleak']}"))

    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "summary.json").write_text(json.dumps(summaries, indent=1))
    (results / "per_sample.json").write_text(json.dumps(per_sample, indent=1))
    (results / "trajectories.json").write_text(json.dumps(trajectories, indent=1))
    (results / "timing.json").write_text(json.dumps({
        "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started,
        "torch_threads": torch.get_num_threads(), "machine": _machine(),
        "load_before": load_before, "load_after": os.getloadavg()[0], "seeds": settings.seeds}))
    from ..eval.report import headline, make_report
    report = make_report(out)
    for line in headline(out):
        echo(line)
    echo(f"wrote {report} ({time.perf_counter() - started:.0f} s)")
    return report


__all__ = ["CASE_STUDY", "DemoSettings", "FULL", "GUIDED", "OBJECTIVE_NAMES", "QUICK", "run_demo"]
