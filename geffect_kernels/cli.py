"""The ``geffect`` command: demo, train, profile, report, build (``geffect COMMAND --help``).

Bad input ends with one line ``geffect: error: ...`` on stderr and exit status 1 (a bad flag too); ``--debug``
(or ``GEFFECT_DEBUG=1``) prints the full traceback before it. torch and transformers are imported inside the
commands, so ``--help`` and a bad flag answer at once.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import traceback
from pathlib import Path

EXIT_ERROR = 1
# The catalog's objective names for --objective, here so that parsing needs no torch (tests/test_cli_usage.py
# checks them against catalog.OBJECTIVES)
OBJECTIVE_NAMES = ("ga", "wga", "satimp", "tnpo", "wtnpo", "npo", "simnpo", "nll")
# TrainConfig's defaults, shown by `geffect train --help` (the same test checks them against TrainConfig)
TRAIN_DEFAULTS = {"objective": "ga", "retain_objective": "nll", "steps": 30, "lr": 1e-5, "batch_size": 8,
                  "grad_accum": 1, "warmup_steps": 0, "seed": 0, "geffect_every": 0}
MAX_NEW_TOKENS = 200  # --eval's default generation length: eval.tofu.MAX_NEW_TOKENS (checked by the same test)


class CLIError(Exception):
    """A user-facing error: printed as one line."""


class _Parser(argparse.ArgumentParser):
    """A bad flag is bad input like any other: one line and exit 1 (argparse would print the usage, exit 2)."""

    def error(self, message):
        raise CLIError(f"{message} (see: {self.prog} --help)")


def _first_line(err) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _hparams(pairs):
    """``["beta=0.5", "alpha=2"]`` -> ``{"beta": 0.5, "alpha": 2.0}`` (ranges are checked by the objectives)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key:
            raise CLIError(f"--hparam takes NAME=NUMBER, got {pair!r}")
    return out


def _hparams_per_objective(objectives, hparams) -> dict:
    """Each hyper-parameter goes to the objectives that take it; one that none of them takes is an error
    (the same rule for train and profile)."""
    from .catalog import OBJECTIVES

    unknown = [name for name in objectives if name not in OBJECTIVES]
    if unknown:
        raise CLIError(f"unknown objective {unknown[0]!r}; choose from {', '.join(OBJECTIVES)}")
    if not isinstance(hparams, dict):
        raise CLIError(f"hparams must be a mapping NAME: NUMBER (e.g. beta: 0.5), got {hparams!r}")
    unused = [k for k in hparams if not any(k in OBJECTIVES[name].defaults for name in objectives)]
    if unused:
        takes = "; ".join(f"{name}: {', '.join(OBJECTIVES[name].defaults) or 'none'}" for name in objectives)
        raise CLIError(f"hyper-parameter {unused[0]!r} is taken by none of the objectives ({takes})")
    return {name: {k: v for k, v in hparams.items() if k in OBJECTIVES[name].defaults} for name in objectives}


def _device(name):
    """``--device`` as a torch device that works here (``cuda`` without a GPU does not); None: cuda when there is
    one, else cpu."""
    import torch

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except Exception as err:  # torch raises RuntimeError, AssertionError, ... by device type
        raise CLIError(f"--device {name}: not usable here ({_first_line(err)})") from err
    return device


def _out_dir(path) -> Path:
    """``--out`` checked before anything is computed: a folder (or a path that can become one) we may write."""
    if not str(path).strip():
        raise CLIError("--out must name a folder, got an empty path")
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise CLIError(f"--out {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"--out {path}: {existing} is not writable")
    return path


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _load_model(path, device="cpu", dtype=None, _adapters=()):
    """The causal LM (or LoRA adapter on its base) in ``path`` on ``device``, its weights in ``dtype`` (a torch
    dtype name; None: float32)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .train.lora import is_adapter_dir, load_adapter

    path = Path(path)
    if is_adapter_dir(path):  # a LoRA adapter written by `geffect train --lora-r`: its base model plus it
        chain = (*_adapters, path.resolve())
        if path.resolve() in _adapters:
            raise CLIError(f"{_adapters[0]}: LoRA adapters whose base models lead back to themselves "
                           f"({' -> '.join(map(str, chain))}); the chain must end in a full model folder")
        return load_adapter(path, lambda base: _load_model(base, device, dtype, chain)).to(device)
    _check_model_dir(path)
    try:
        AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype or "float32"))
    except Exception as err:  # a corrupt or truncated weights file, pickled weights, a foreign config...
        raise CLIError(f"{path} does not hold a loadable causal language model "
                       f"({type(err).__name__}: {_first_line(err)})") from err
    return model.to(device)


def _check_model_dir(path: Path):
    if not (path / "config.json").is_file():
        raise CLIError(f"{path} is not a Hugging Face model directory (no config.json)")


def _check_shardable(path: Path):
    """What several processes need to read ``path`` straight into shards (`hf_shards`): a full model folder with
    safetensors weights."""
    from .train.hf_shards import weight_files
    from .train.lora import is_adapter_dir

    if is_adapter_dir(path):
        raise CLIError(f"--model {path} is a LoRA adapter: several processes load a full model folder into shards "
                       f"(train the adapter further in one process)")
    _check_model_dir(path)
    weight_files(path)


def _load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (ValueError, OSError) as err:
        raise CLIError(f"no tokenizer in {path} ({str(err).splitlines()[0]}); pass --tokenizer DIR") from None


def cmd_demo(args):
    from .train.run_demo import run_demo

    _quiet_transformers()
    run_demo(_out_dir(args.out), quick=args.quick, seeds=args.seeds, progress=not args.no_progress)


def _train_settings(args):
    """Files, objectives and TrainConfig fields from the YAML config, overridden by the flags given."""
    from .train.train_config import read_yaml

    values = read_yaml(args.config) if args.config else {}
    flags = {"model": args.model, "forget": args.forget, "retain": args.retain, "objective": args.objective,
             "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
             "warmup_steps": args.warmup_steps, "seed": args.seed, "geffect_every": args.geffect_every,
             "retain_objective": args.retain_objective, "hparams": _hparams(args.hparam) or None,
             "preset": args.preset, "guidance": args.guidance, "guidance_temperature": args.guidance_temperature,
             "stop_when": args.stop_when, "reference_device": args.reference_device,
             "gradient_checkpointing": True if args.gradient_checkpointing else None}
    values.update({k: v for k, v in flags.items() if v is not None})
    files = {k: values.pop(k, None) for k in ("model", "forget", "retain")}
    for key, value in files.items():
        if value is not None and not isinstance(value, (str, Path)):
            raise CLIError(f"{key} must be a path, got {value!r:.60}")
    for key in ("model", "forget"):
        if not files[key]:
            raise CLIError(f"--{key} is required (on the command line or in --config)")
    objectives = values.pop("objective", None) or ["ga"]
    objectives = [objectives] if isinstance(objectives, str) else objectives
    if not isinstance(objectives, list) or not all(isinstance(o, str) for o in objectives):
        raise CLIError(f"objective must be a name or a list of names ({', '.join(OBJECTIVE_NAMES)}), got "
                       f"{objectives!r:.60}")
    return files, list(objectives), values


EVAL_ONLY_FLAGS = ("retain_eval_set", "holdout", "retain_model", "retain_eval", "eval_size", "real_authors", "world",
                   "muse")


def _eval_plan(args, forget_pairs, retain_pairs):
    """`EvalPlan` of ``--eval`` and the flags that go with it, checked before anything runs (None without it)."""
    from .eval.plan import EvalPlan

    if not args.eval:
        given = [f"--{flag.replace('_', '-')}" for flag in EVAL_ONLY_FLAGS if getattr(args, flag) is not None]
        if given:
            raise CLIError(f"{given[0]} is for the evaluation: add --eval")
        return None
    if args.retain_model and args.retain_eval:
        raise CLIError("give the retain model either as --retain-model DIR or as --retain-eval FILE, not both")
    if args.retain_model:
        path = Path(args.retain_model)
        from .train.lora import is_adapter_dir
        if not is_adapter_dir(path):
            _check_model_dir(path)
    return EvalPlan.from_files(forget_pairs, retain_pairs, retain_eval_set=args.retain_eval_set,
                               real_authors=args.real_authors, world=args.world, holdout=args.holdout,
                               size=args.eval_size, max_new_tokens=args.max_new_tokens,
                               retain_model=args.retain_model, retain_eval=args.retain_eval, muse=args.muse)


def _write_result(out: Path, name: str, value) -> None:
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / name).write_text(json.dumps(value, indent=1))


def cmd_train(args):
    import copy
    from functools import partial

    from .backends.registry import check_backend
    from .data import encode_pairs, load_qa
    from .eval.report import make_report
    from .train import TrainConfig, check_resumable, train
    from .train import distributed
    from .train.checkpoint import check_own_folder
    from .train.distributed import check_resume, check_world
    from .train.launch import is_rank_zero, launch, world_size
    from .train.lora import add_lora

    _quiet_transformers()
    # everything that can be checked is checked before the model loads and before any file is written
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    files, objectives, settings = _train_settings(args)
    if (args.lora_alpha is not None or args.lora_targets) and args.lora_r is None:
        raise CLIError("--lora-alpha and --lora-targets need --lora-r RANK")
    if args.lora_r is not None and args.lora_r < 1:
        raise CLIError(f"--lora-r must be a positive integer, got {args.lora_r}")
    if args.lora_alpha is not None and not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
        raise CLIError(f"--lora-alpha must be a finite number > 0, got {args.lora_alpha}")
    if args.plan:  # a plan for the device asked for, usable here or not
        args.device = args.device or "cuda"
    out, device = _out_dir(args.out), None if args.plan else _device(args.device)
    args.device = args.device or device.type  # the ranks of a sharded run take the same device
    resume = True if args.resume else False if args.overwrite else None
    hparams = _hparams_per_objective(objectives, settings.pop("hparams", None) or {})
    configs = {name: TrainConfig.from_dict({**settings, "objective": name, "hparams": hparams[name],
                                            "progress": not args.no_progress,
                                            "out_dir": str(out / "runs" / name)}) for name in objectives}
    if any(c.uses_retain for c in configs.values()) and not files["retain"]:
        raise CLIError("--retain FILE is required unless --retain-objective none")
    if args.plan:  # trains nothing, writes nothing
        print(_memory_plans(args, files, configs))
        return
    if args.dtype not in (None, "float32") and (args.nproc or world_size()) > 1:
        raise CLIError(f"--dtype {args.dtype} is for one process: a sharded run keeps float32 shards (computing in "
                       f"bf16 on CUDA)")
    check_backend("auto", device)
    forget_pairs = load_qa(files["forget"])
    retain_pairs = load_qa(files["retain"]) if files["retain"] else None
    plan = _eval_plan(args, forget_pairs, retain_pairs)
    world = args.nproc or world_size()
    for config in configs.values():  # before anything runs or is written
        check_world(world, config, forget_pairs, retain_pairs if config.uses_retain else None)
        check_own_folder(config.out_dir)  # also before torchrun starts: nothing of anyone else's is removed
        if resume is not False:  # --overwrite: the checkpoint is replaced, whoever wrote it
            check_resume(config.out_dir, world, args.allow_reshard)
    if world > 1 and any(c.guidance == "instance" for c in configs.values()):
        raise CLIError("--guidance instance runs in one process only; --guidance rectify runs sharded")
    if world > 1:
        _check_shardable(Path(files["model"]))
    if args.nproc and args.nproc > 1:
        raise SystemExit(launch(args.argv, args.nproc))
    device = distributed.init(args.device) if world > 1 else device
    # several processes: each rank reads its shards
    start = _load_model(files["model"], device, args.dtype) if world == 1 else None
    tokenizer = _load_tokenizer(args.tokenizer or files["model"])
    forget = encode_pairs(tokenizer, forget_pairs, max_length=args.max_length)
    retain = encode_pairs(tokenizer, retain_pairs, max_length=args.max_length) if retain_pairs else None
    model_config = start.config if start is not None else _model_config(files["model"])
    for path, data in ((files["forget"], forget), (files["retain"], retain)):
        _check_lengths(data, model_config, path)
    for config in configs.values() if world == 1 else ():  # sharded runs check their checkpoints themselves
        check_resumable(start, forget, retain, config, resume)
    if args.eval and is_rank_zero():
        _note_generation_limit(model_config, args.max_new_tokens or MAX_NEW_TOKENS)
    if plan and plan.retain_model:  # whole on every rank: evaluated once, before any unlearning
        plan, retain_scores = plan.with_retain_model(_load_model(plan.retain_model, device), tokenizer,
                                                     plan.retain_model)
        if is_rank_zero():
            _write_result(out, "retain_model_eval.json", retain_scores)
    summaries, per_sample = {}, {}
    for name, config in configs.items():
        lora = partial(add_lora, r=args.lora_r, alpha=args.lora_alpha, targets=args.lora_targets,
                       base_path=files["model"], seed=config.seed) if args.lora_r else None
        if world > 1:
            result = distributed.train_sharded(files["model"], forget, retain, config, device=device, wrap=lora,
                                               resume=resume, allow_reshard=args.allow_reshard)
        else:
            model = copy.deepcopy(start)
            result = train(lora(model) if lora else model, forget, retain, config, resume=resume)
        if plan:  # on every rank: a sharded model's forward passes take all of them
            summaries[name], per_sample[name] = plan.evaluate(result.model, tokenizer)
        if not is_rank_zero():
            continue
        tokenizer.save_pretrained(Path(config.out_dir) / "model")
        resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from else ""
        if result.stopped_at is not None:
            print(f"{name}: stopped by {result.metrics[-1]['stopped']} at step {result.stopped_at + 1}, after "
                  f"{result.stopped_at} updates{resumed}; model in {config.out_dir}/model")
        else:
            print(f"{name}: {config.steps} steps{resumed}, final loss "
                  f"{result.metrics[-1]['loss']:.4f}; model in {config.out_dir}/model")
    if summaries and is_rank_zero():
        _write_result(out, "summary.json", summaries)
        _write_result(out, "per_sample.json", per_sample)
        for name, summary in summaries.items():
            for metric, why in summary.get("missing", {}).items():
                print(f"{name}: {metric.replace('_', ' ')} not computed: {why}")
    if is_rank_zero() and not summaries:
        _drop_stale_summaries(out, configs)
    if is_rank_zero():
        print(f"report: {make_report(args.out)}")
    if world > 1:
        distributed.finish()


def _drop_stale_summaries(out: Path, trained):
    """Without --eval, the rows of ``results/summary.json`` that describe no model of this folder any more: those
    of the runs just trained (their models changed) and of names that are no run of ``OUT/runs`` (not ours)."""
    path = out / "results" / "summary.json"
    try:
        rows = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return  # the report names the file
    if not isinstance(rows, dict):
        return
    kept = {name: row for name, row in rows.items()
            if name not in trained and "/" not in str(name) and (out / "runs" / str(name) / "metrics.jsonl").is_file()}
    if kept != rows:
        from .train.checkpoint import atomic_write_json

        atomic_write_json(path, kept) if kept else path.unlink()


def _check_lengths(data, model_config, source, truncate=True):
    """CLIError when an encoded example is longer than the positions of a model with learned position embeddings
    (it would index past them at the first step); a rotary model runs past them (extrapolated), and a length
    too large for memory ends as `OutOfMemory`."""
    limit = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    longest = max((len(e["input_ids"]) for e in data.examples), default=0) if data is not None else 0
    if not limit or longest <= limit:
        return
    rotary = any(getattr(model_config, key, None) for key in ("rope_parameters", "rope_theta", "rope_scaling"))
    if rotary:
        return
    raise CLIError(f"{source}: an example (question and answer) has {longest} tokens, more than the model's "
                   f"{limit} positions; " + (f"pass --max-length {limit} to truncate them" if truncate else
                                             "shorten them"))


def _model_config(path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def _note_generation_limit(config, max_new_tokens):
    """Say when --eval's answers will be shorter than asked: generation stops at the model's last position
    (`eval.likelihood.greedy_answers`)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and max_new_tokens >= limit:
        print(f"note: --eval generates up to {max_new_tokens} new tokens, but the model has {limit} positions: "
              f"each answer stops where the prompt and the answer fill them")


def _memory_plans(args, files, configs) -> str:
    """`memory_plan` tables of the runs ``configs`` would make: per objective, one GPU and --nproc (else 8) ranks."""
    from .data import encode_pairs, load_qa
    from .train.memory_plan import LORA_DEFAULT_TARGETS, ModelShape, PlanSettings, format_plan, plan

    shape = ModelShape.from_config(Path(files["model"]))
    forget_pairs = load_qa(files["forget"])
    seq_len = args.max_length
    if seq_len is None:  # the longest encoded example
        tokenizer = _load_tokenizer(args.tokenizer or files["model"])
        sets = [forget_pairs] + ([load_qa(files["retain"])] if files["retain"] else [])
        seq_len = max(len(e["input_ids"]) for pairs in sets for e in encode_pairs(tokenizer, pairs).examples)
    ranks = args.nproc if args.nproc and args.nproc > 1 else 8
    device = "cpu" if str(args.device).startswith("cpu") else "cuda"
    lines = []
    for name, config in configs.items():
        settings = PlanSettings(
            objective=name, retain_objective=config.retain_objective if config.uses_retain else "none",
            batch_size=config.batch_size, seq_len=seq_len, n_forget=len(forget_pairs), dtype=args.dtype or "float32",
            lora_r=args.lora_r, lora_targets=tuple(args.lora_targets or LORA_DEFAULT_TARGETS),
            gradient_checkpointing=config.gradient_checkpointing, reference_device=config.reference_device,
            geffect=config.geffect_every > 0, device=device)
        what = f"LoRA r {args.lora_r} on {','.join(settings.lora_targets)}" if args.lora_r else "full fine-tuning"
        lines.append(f"memory plan of {name} ({what}, {settings.dtype} weights, {config.batch_size} × {seq_len} "
                     f"tokens per side, checkpointing {'on' if settings.gradient_checkpointing else 'off'}, "
                     f"{device}):")
        one = plan(shape, settings)
        sharded = plan(shape, PlanSettings(**{**settings.__dict__, "world": ranks, "dtype": "float32"}))
        lines.append(format_plan({"1 device": one, f"{ranks} ranks": sharded}))
    return "\n".join(lines)


def cmd_profile(args):
    import torch

    from . import hf
    from .backends.registry import check_backend
    from .data import encode_pairs, load_qa
    from .eval.report import write_profile
    from .catalog import OBJECTIVES, resolve
    from .geffect import GEffectProfiler

    _quiet_transformers()
    hparams = _hparams_per_objective(args.objective, _hparams(args.hparam))
    for name in args.objective:
        resolve(name, hparams[name])
    if args.samples < 1:
        raise CLIError(f"--samples must be a positive integer, got {args.samples}")
    needs_ref = [n for n in args.objective if OBJECTIVES[n].needs_ref]
    if needs_ref and not args.reference:
        raise CLIError(f"objective {needs_ref[0]!r} needs reference log-probabilities: pass --reference DIR "
                       f"(the model before unlearning; may be the --model directory itself)")
    out, device = _out_dir(args.out), _device(args.device)
    check_backend("auto", device)
    model = _load_model(args.model, device)
    tokenizer = _load_tokenizer(args.tokenizer or args.model)
    pairs = load_qa(args.forget)[: args.samples]
    encoded = encode_pairs(tokenizer, pairs)
    _check_lengths(encoded, model.config, args.forget, False)
    forget = {k: v.to(device) for k, v in encoded.batch(range(len(pairs))).items()}
    retain = None
    if args.retain:
        r_pairs = load_qa(args.retain)[: args.samples]
        encoded = encode_pairs(tokenizer, r_pairs)
        _check_lengths(encoded, model.config, args.retain, False)
        retain = {k: v.to(device) for k, v in encoded.batch(range(len(r_pairs))).items()}
    ref = None
    if needs_ref:
        with torch.no_grad():
            ref = hf.token_logprobs(_load_model(args.reference, device).eval(), forget)
    profiler = GEffectProfiler(model, groups=args.groups)
    results = {name: profiler.measure_unlearning(name, forget, retain, ref_logprobs=ref, **hparams[name])
               for name in args.objective}
    print(write_profile(results, out))


def cmd_report(args):
    from .eval.report import make_report

    print(f"wrote {make_report(args.run_dir)}")


def cmd_build(args):
    try:
        from .backends.cpp.build import build_extensions
    except ImportError as err:
        raise CLIError(f"the C++/CUDA extension is unavailable in this install ({err})") from None
    if not build_extensions(verbose=True):  # prints one line per extension
        raise CLIError("no extension could be built here (see the lines above)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="geffect", description="LLM unlearning with G-effect profiling.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="offline end-to-end demo on a tiny Llama (CPU, a few minutes)",
                       description="Fine-tune a tiny Llama on fictitious authors, unlearn 10%% of them with ga, "
                                   "npo, wga, tnpo and wtnpo while profiling G-effects, evaluate TOFU-style and "
                                   "write report.md, plots and CSV/JSON.")
    p.add_argument("--quick", action="store_true", help="smaller data and fewer steps (under a minute)")
    p.add_argument("--seeds", type=int, help="unlearning runs per objective from the same target, reported as mean "
                                             "and range (default: 3, --quick: 1)")
    p.add_argument("--out", default="geffect-demo", help="output folder (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    objective_help = f"unlearning objective(s): {', '.join(OBJECTIVE_NAMES)}"
    d = TRAIN_DEFAULTS
    p = sub.add_parser("train", help="unlearn on a local HF model and TOFU-format files",
                       description="One unlearning run per objective on a local Hugging Face causal LM. Settings "
                                   "come from flags or a YAML --config (flags win); writes OUT/runs/<objective>/ "
                                   "(metrics.jsonl, checkpoint, model/) and OUT/report.md. A rerun resumes. "
                                   "The defaults shown are this project's; --preset official replaces those not "
                                   "given.")
    p.add_argument("--model", help="Hugging Face model directory (the starting model)")
    p.add_argument("--forget", help="forget set (TOFU-format .json/.jsonl)")
    p.add_argument("--retain", help="retain set (TOFU-format .json/.jsonl)")
    p.add_argument("--objective", nargs="+", choices=OBJECTIVE_NAMES, metavar="NAME",
                   help=f"{objective_help} (default: {d['objective']})")
    p.add_argument("--retain-objective", choices=["nll", "kl", "none"],
                   help=f"retain term: nll, kl or none (default: {d['retain_objective']})")
    p.add_argument("--config", help="YAML file with any of these settings (model, forget, retain, objective, "
                                    "steps, lr, batch_size, ...)")
    p.add_argument("--out", default="geffect-run", help="output folder (default: %(default)s)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    p.add_argument("--steps", type=int, help=f"optimizer steps (default: {d['steps']})")
    p.add_argument("--lr", type=float, help=f"peak learning rate of AdamW (default: {d['lr']})")
    p.add_argument("--batch-size", type=int, help=f"samples per micro-batch, per side (default: {d['batch_size']})")
    p.add_argument("--grad-accum", type=int, help=f"micro-batches per optimizer step (default: {d['grad_accum']})")
    p.add_argument("--warmup-steps", type=int,
                   help=f"linear warm-up steps, then linear decay to 0 (default: {d['warmup_steps']})")
    p.add_argument("--seed", type=int, help=f"sets the batch order and the initial state (default: {d['seed']})")
    p.add_argument("--geffect-every", type=int,
                   help=f"record G-effects every k steps, 0: never (default: {d['geffect_every']})")
    p.add_argument("--hparam", nargs="*", metavar="NAME=VALUE",
                   help="objective hyper-parameters, e.g. beta=0.5 (default: each objective's, docs/DESIGN.md §3)")
    p.add_argument("--guidance", choices=["rectify", "instance"],
                   help="G-effect-guided steps (needs the nll retain term): 'rectify' removes, layer by layer, the "
                        "forget gradient's component along the retain gradient where they conflict; 'instance' "
                        "weights forget samples by their retaining G-effect (default: plain steps; docs/guidance.md)")
    p.add_argument("--guidance-temperature", type=float, help="instance weighting's temperature (default: 1)")
    p.add_argument("--stop-when", metavar="RULES",
                   help="stop on the recorded G-effects (needs --geffect-every), e.g. 'retain_ratio<-0.5' or "
                        "'forget_fraction<0.2'; several rules separated by commas (default: run all --steps; "
                        "docs/guidance.md)")
    p.add_argument("--max-length", type=int, help="truncate examples to this many tokens (default: no limit)")
    p.add_argument("--nproc", type=int, help="shard over N local processes (FSDP2; launches torchrun); "
                                             "--batch-size stays the global batch (default: one process, or "
                                             "torchrun's world size when started under torchrun)")
    p.add_argument("--allow-reshard", action="store_true",
                   help="resume a checkpoint written by another number of processes")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="the loaded weights' dtype (default float32); trained weights stay float32 (LoRA adapters, "
                        "or full fine-tuning's master weights) and the forward computes in it")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each decoder block in the backward (non-reentrant: LoRA adapters train)")
    p.add_argument("--reference-device", choices=["cpu"],
                   help="keep a full fine-tuning KL reference on the CPU (default: the model's device)")
    p.add_argument("--plan", action="store_true",
                   help="print the expected peak memory per device (one device and --nproc or 8 FSDP2 ranks) "
                        "and train nothing")
    p.add_argument("--lora-r", type=int, help="train rank-R LoRA adapters instead of all weights; saves the adapter "
                                              "(default: all weights)")
    p.add_argument("--lora-alpha", type=float, help="LoRA scaling numerator (default: 2 × rank)")
    p.add_argument("--lora-targets", type=lambda s: [t for t in s.split(",") if t], metavar="NAME,NAME",
                   help="modules that get adapters, e.g. q_proj,v_proj (default: peft's for the architecture)")
    p.add_argument("--eval", action="store_true",
                   help="TOFU metrics afterwards on the forget and retain sets (and --real-authors, --world); "
                        "model_utility needs all three utility sets, else the harmonic mean is named after the sets")
    p.add_argument("--real-authors", help="real-authors set for --eval (TOFU-format, with perturbed answers)")
    p.add_argument("--world", help="world-facts set for --eval (TOFU-format, with perturbed answers)")
    p.add_argument("--retain-eval-set", metavar="FILE",
                   help="utility set for --eval instead of the --retain training file (TOFU: retain_perturbed)")
    p.add_argument("--holdout", metavar="FILE", help="for --eval: questions the model never saw (TOFU: holdout10); "
                                                     "membership-inference AUC of forget against it, and privleak")
    p.add_argument("--retain-model", metavar="DIR", help="for --eval: the model trained without the forget set, "
                                                         "evaluated on the same sets (forget quality, privleak)")
    p.add_argument("--retain-eval", metavar="FILE",
                   help="for --eval: the retain model's saved evaluation instead of --retain-model (this project's "
                        "results/retain_model_eval.json, or TOFU's eval_log_forget.json)")
    p.add_argument("--eval-size", type=int, metavar="N",
                   help="for --eval: score the first N items of each set (TOFU scores 300; default: all)")
    p.add_argument("--muse", metavar="DIR", help="for --eval: MUSE's verbmem, knowmem and privleak on a corpus folder "
                                                 "in MUSE's layout (verbmem/, knowmem/, privleak/)")
    p.add_argument("--max-new-tokens", type=int,
                   help=f"greedy generation length for --eval's ROUGE-L, at most the model's positions after the "
                        f"prompt (default: {MAX_NEW_TOKENS}, as TOFU)")
    p.add_argument("--preset", help="'official': every setting not given (flag or --config) as the official "
                                    "G-effect scripts run it (default: none, this project's settings; "
                                    "docs/conventions.md)")
    p.add_argument("--device", help="torch device (default: cuda when there is one, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    choice = p.add_mutually_exclusive_group()
    choice.add_argument("--resume", action="store_true",
                        help="continue a run's checkpoint even under other settings (the learning rate follows "
                             "the new schedule from the next step; a larger --steps extends the run)")
    choice.add_argument("--overwrite", action="store_true", help="start over, replacing the runs' checkpoints, "
                                                                 "logs and models")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("profile", help="G-effect table and plots for a model, objectives and data (no training)",
                       description="Measure each objective's G-effects on the forget NLL (and the retain NLL with "
                                   "--retain), per layer, at the model's current parameters.")
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--forget", required=True, help="forget set (TOFU-format)")
    p.add_argument("--retain", help="retain set (TOFU-format)")
    p.add_argument("--objective", nargs="+", default=["ga"], choices=OBJECTIVE_NAMES, metavar="NAME",
                   help=f"{objective_help} (default: ga)")
    p.add_argument("--reference", help="reference model directory (tnpo, wtnpo, npo)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    p.add_argument("--samples", type=int, default=16, help="samples per side (default: %(default)s)")
    p.add_argument("--groups", default="layer", choices=["layer", "component", "parameter"],
                   help="what each G-effect sums over: a layer, a component or a parameter (default: %(default)s)")
    p.add_argument("--hparam", nargs="*", metavar="NAME=VALUE",
                   help="objective hyper-parameters, e.g. beta=0.5 (default: each objective's)")
    p.add_argument("--out", default="geffect-profile", help="output folder (default: %(default)s)")
    p.add_argument("--device", help="torch device (default: cuda when there is one, else cpu)")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("report", help="re-make report.md and plots from a run folder's logs",
                       description="Rebuild report.md, plots/ and results/*.csv of a demo or train output folder.")
    p.add_argument("run_dir", help="a folder written by `geffect demo` or `geffect train`")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("build", help="build the C++/CUDA extension now (otherwise built on first use)",
                       description="Compile the csrc extension with ninja and print what was built.")
    p.set_defaults(func=cmd_build)
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true",
                       help="on an error, print the full traceback too (also: GEFFECT_DEBUG=1)")
    return parser


class OutOfMemory(RuntimeError):
    """torch ran out of memory (host or device): bad input for this machine, not a bug."""


def _out_of_memory(err) -> OutOfMemory | None:
    """``err`` as an OutOfMemory when it is one (torch raises RuntimeError subclasses or MemoryError)."""
    text = str(err)
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or \
            isinstance(err, RuntimeError) and ("not enough memory" in text or "out of memory" in text.lower()):
        return OutOfMemory(f"out of memory ({_first_line(err)}); lower --batch-size or --max-length, or use a "
                           f"machine with more memory")
    return None


def _user_errors() -> tuple:
    """The exceptions that are bad input, printed as one line. ValueError covers bad data (DataError), settings,
    checkpoints (CheckpointError, ResumeMismatch). The package's own are looked up only where their module was
    imported: an exception of a module never imported cannot have been raised."""
    errors = [CLIError, ValueError, OSError]
    if "geffect_kernels.train" in sys.modules:
        from .train import RunFolderBusy, TrainingDiverged
        errors += [RunFolderBusy, TrainingDiverged]
    if "geffect_kernels.backends.registry" in sys.modules:
        from .backends.registry import BackendUnavailable
        errors.append(BackendUnavailable)
    return tuple(errors)


class Stopped(KeyboardInterrupt):
    """SIGTERM (what ``timeout``, systemd and Slurm send) raised where the program is, like Ctrl-C: the run folder
    keeps its last complete checkpoint and the lock is released on the way out."""


_STOPPING = []  # the signal that is stopping this process: what fails after it is a consequence, not an error


def _stop_on_sigterm(signum, frame):
    _stop_once()
    raise Stopped()


def _stop_once():
    """From the first Ctrl-C or SIGTERM on, the others are ignored (torchrun forwards one more to each rank)."""
    _STOPPING.append(True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _says_errors() -> bool:
    """Whether this process prints errors: always, except the ranks of a torchrun group started by hand, where
    rank 0 alone speaks (`geffect train --nproc` collects each rank's stderr and prints one line)."""
    return os.environ.get("RANK", "0") == "0" or bool(os.environ.get("GEFFECT_LAUNCHED"))


def _stopped_line(err) -> str:
    what = "SIGTERM" if isinstance(err, Stopped) else "Ctrl-C (SIGINT)"
    return (f"geffect: stopped by {what}; a run folder keeps its last checkpoint: the same command resumes from "
            f"it")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("GEFFECT_DEBUG", "0") not in ("", "0")
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if _main_thread() else {}
    if previous:
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv  # `train --nproc` relaunches the same command under torchrun
        args.func(args)
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: one line, the conventional 128 + signal status
        if _main_thread():
            _stop_once()
        if debug:
            traceback.print_exc()
        if _says_errors():
            print(_stopped_line(err), file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(err, Stopped) else signal.SIGINT)
    except Exception as err:
        if _STOPPING:  # e.g. another rank stopped first and a collective broke: stopped, not failed
            if debug:
                traceback.print_exc()
            if _says_errors():
                print(_stopped_line(Stopped()), file=sys.stderr)
            return 128 + signal.SIGTERM
        err = _out_of_memory(err) or err
        if not isinstance(err, (*_user_errors(), OutOfMemory)):
            raise
        if debug:
            traceback.print_exc()
        if _says_errors():  # under torchrun every rank meets the same bad input: say it once
            print(f"geffect: error: {_first_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)
        _STOPPING.clear()
    return 0


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
