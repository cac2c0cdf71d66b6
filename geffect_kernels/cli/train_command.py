"""``geffect train``: check every input, then train (one process, or a rank of several), evaluate and
report."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .defaults import MAX_NEW_TOKENS, OBJECTIVE_NAMES
from .errors import CLIError
from .inputs import (check_lengths, check_model_dir, check_shardable, checked_out_dir, hparams_per_objective,
                     load_model, load_tokenizer, read_model_config, parse_hparams, quiet_transformers,
                     usable_device)


def _train_settings(args):
    """Files, objectives and TrainConfig fields from the YAML config, overridden by the flags given."""
    from ..train.train_config import read_yaml

    values = read_yaml(args.config) if args.config else {}
    flags = {"model": args.model, "forget": args.forget, "retain": args.retain, "objective": args.objective,
             "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
             "warmup_steps": args.warmup_steps, "seed": args.seed, "geffect_every": args.geffect_every,
             "retain_objective": args.retain_objective, "hparams": parse_hparams(args.hparam) or None,
             "preset": args.preset, "guidance": args.guidance, "guidance_temperature": args.guidance_temperature,
             "stop_when": args.stop_when, "reference_device": args.reference_device,
             "alternate": args.alternate, "primal_dual": args.primal_dual,
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
    from ..eval.plan import EvalPlan

    if not args.eval:
        given = [f"--{flag.replace('_', '-')}" for flag in EVAL_ONLY_FLAGS if getattr(args, flag) is not None]
        if given:
            raise CLIError(f"{given[0]} is for the evaluation: add --eval")
        return None
    if args.retain_model and args.retain_eval:
        raise CLIError("give the retain model either as --retain-model DIR or as --retain-eval FILE, not both")
    if args.retain_model:
        path = Path(args.retain_model)
        from ..train.lora import is_adapter_dir
        if not is_adapter_dir(path):
            check_model_dir(path)
    return EvalPlan.from_files(forget_pairs, retain_pairs, retain_eval_set=args.retain_eval_set,
                               real_authors=args.real_authors, world=args.world, holdout=args.holdout,
                               size=args.eval_size, max_new_tokens=args.max_new_tokens,
                               retain_model=args.retain_model, retain_eval=args.retain_eval, muse=args.muse)


RESULT_FILES = ("summary.json", "per_sample.json", "retain_model_eval.json")  # what `_write_result` writes


def _write_result(out: Path, name: str, value) -> None:
    """``OUT/results/name``, written beside it and renamed (a link planted since the start is replaced)."""
    from ..atomic_files import atomic_write_json

    atomic_write_json(out / "results" / name, value)


def cmd_train(args):
    """Check every input, then train each objective, then write the results and the report. Nothing is written (no
    run folder, no result, no rank started) before every check has passed."""
    from ..train.launch import launch

    quiet_transformers()
    job = _plan(args)  # check: flags, config, objectives
    if args.plan:  # a memory plan for the device asked for: trains nothing, writes nothing
        print(_memory_plans(args, job.files, job.configs))
        return
    _check_before_launch(job)  # check: data, evaluation, processes, run folders
    if args.nproc and args.nproc > 1:
        raise SystemExit(launch(args.argv, args.nproc))
    inputs = _load_and_check(job)  # check: the model, the encoded data, the checkpoints to resume
    summaries, per_sample = _run(job, inputs)
    _report(job, summaries, per_sample)


@dataclass
class TrainJob:
    """What ``geffect train`` will do, from its flags and config: one TrainConfig per objective and where it goes."""

    args: object
    files: dict
    configs: dict
    out: Path
    device: object
    resume: bool | None
    world: int = 1
    forget_pairs: object = None
    retain_pairs: object = None
    eval_plan: object = None


@dataclass
class TrainInputs:
    """The model to start from (None for a sharded run: each rank reads its shards), the tokenizer and the data."""

    start: object
    tokenizer: object
    forget: object
    retain: object
    model_config: object


def _plan(args) -> TrainJob:
    """Flags, config and objectives checked and made into one TrainConfig per objective; nothing is loaded."""
    from ..train import TrainConfig

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
    out, device = checked_out_dir(args.out), None if args.plan else usable_device(args.device)
    args.device = args.device or device.type  # the ranks of a sharded run take the same device
    resume = True if args.resume else False if args.overwrite else None
    hparams = hparams_per_objective(objectives, settings.pop("hparams", None) or {})
    configs = {name: TrainConfig.from_dict({**settings, "objective": name, "hparams": hparams[name],
                                            "progress": not args.no_progress,
                                            "out_dir": str(out / "runs" / name)}) for name in objectives}
    if any(c.uses_retain for c in configs.values()) and not files["retain"]:
        raise CLIError("--retain FILE is required unless --retain-objective none")
    return TrainJob(args, files, configs, out, device, resume)


def _check_before_launch(job: TrainJob) -> None:
    """The data, the evaluation plan, the number of processes and every run folder (whose it is, whether it
    resumes), before any rank starts or anything is written; sets the job's world, pairs and eval_plan."""
    from ..backends.registry import check_backend
    from ..data import load_qa
    from ..data.alternates import alternate_answers
    from ..train.checkpoint import check_own_folder
    from ..train.distributed import check_resume, check_world
    from ..train.launch import world_size
    from ..train.run_paths import refuse_links

    args, files, configs = job.args, job.files, job.configs
    if args.dtype not in (None, "float32") and (args.nproc or world_size()) > 1:
        raise CLIError(f"--dtype {args.dtype} is for one process: a sharded run keeps float32 shards (computing in "
                       f"bf16 on CUDA)")
    check_backend("auto", job.device)
    job.forget_pairs = load_qa(files["forget"])
    job.retain_pairs = load_qa(files["retain"]) if files["retain"] else None
    for config in configs.values():  # substitute answers for PO and DPO: readable, one for every question
        if config.resolved_objective.objective.reads_alternate:
            if config.alternate is None:
                raise CLIError(f"objective {config.objective!r} reads substitute answers: pass --alternate FILE "
                               f"(e.g. TOFU's idontknow.jsonl)")
            alternate_answers(config.alternate, [p.question for p in job.forget_pairs], seed=config.seed)
    job.eval_plan = _eval_plan(args, job.forget_pairs, job.retain_pairs)
    job.world = world = args.nproc or world_size()
    # no link below --out: what the run writes or deletes (runs, results, the report) stays in the folder
    refuse_links(job.out, *(Path("runs") / name for name in configs), *(Path("results") / n for n in RESULT_FILES),
                 "plots", "report.md")
    for config in configs.values():
        check_world(world, config, job.forget_pairs, job.retain_pairs if config.uses_retain else None)
        check_own_folder(config.out_dir)  # also before torchrun starts: nothing of anyone else's is removed
        if job.resume is not False:  # --overwrite: the checkpoint is replaced, whoever wrote it
            check_resume(config.out_dir, world, args.allow_reshard)
    if world > 1 and args.lora_r and "lm_head" in (args.lora_targets or ()):
        raise CLIError("--lora-targets lm_head runs in one process only: a sharded run adapts the decoder's layers")
    if world > 1 and any(c.guidance == "instance" for c in configs.values()):
        raise CLIError("--guidance instance runs in one process only; --guidance rectify runs sharded")
    if world > 1:
        check_shardable(Path(files["model"]))


def _load_and_check(job: TrainJob) -> TrainInputs:
    """The model (one process), the tokenizer and the encoded data, checked against the model (lengths) and
    against the checkpoints a run resumes from; still nothing written."""
    from ..data import encode_pairs
    from ..train import check_resumable, distributed
    from ..train.launch import is_rank_zero
    from ..train.loop import check_entries

    args, files, world = job.args, job.files, job.world
    job.device = distributed.init(args.device) if world > 1 else job.device
    # several processes: each rank reads its shards
    start = load_model(files["model"], job.device, args.dtype) if world == 1 else None
    tokenizer = load_tokenizer(args.tokenizer or files["model"])
    forget = encode_pairs(tokenizer, job.forget_pairs, max_length=args.max_length)
    retain = encode_pairs(tokenizer, job.retain_pairs, max_length=args.max_length) if job.retain_pairs else None
    model_config = start.config if start is not None else read_model_config(files["model"])
    for path, data in ((files["forget"], forget), (files["retain"], retain)):
        check_lengths(data, model_config, path)
    for config in job.configs.values() if world == 1 else ():  # sharded runs check their checkpoints themselves
        check_entries(start, forget, config)  # RMU's layer and parameters, before any run writes
        check_resumable(start, forget, retain, config, job.resume)
    if args.eval and is_rank_zero():
        _note_generation_limit(model_config, args.max_new_tokens or MAX_NEW_TOKENS)
    return TrainInputs(start, tokenizer, forget, retain, model_config)


def _run(job: TrainJob, inputs: TrainInputs) -> tuple[dict, dict]:
    """Trains (and with --eval evaluates) each objective from the same start; returns the evaluation's summaries
    and per-sample scores by objective (empty without --eval)."""
    import copy
    from functools import partial

    from ..train import distributed, train
    from ..train.launch import is_rank_zero
    from ..train.lora import add_lora

    args, files, plan, tokenizer = job.args, job.files, job.eval_plan, inputs.tokenizer
    if plan and plan.retain_model:  # whole on every rank: evaluated once, before any unlearning
        plan, retain_scores = plan.with_retain_model(load_model(plan.retain_model, job.device), tokenizer,
                                                     plan.retain_model)
        if is_rank_zero():
            _write_result(job.out, "retain_model_eval.json", retain_scores)
    summaries, per_sample = {}, {}
    for name, config in job.configs.items():
        lora = partial(add_lora, r=args.lora_r, alpha=args.lora_alpha, targets=args.lora_targets,
                       base_path=files["model"], seed=config.seed) if args.lora_r else None
        if job.world > 1:
            result = distributed.train_sharded(files["model"], inputs.forget, inputs.retain, config,
                                               device=job.device, wrap=lora, resume=job.resume,
                                               allow_reshard=args.allow_reshard)
        else:
            model = copy.deepcopy(inputs.start)
            result = train(lora(model) if lora else model, inputs.forget, inputs.retain, config, resume=job.resume)
        if plan:  # on every rank: a sharded model's forward passes take all of them
            summaries[name], per_sample[name] = plan.evaluate(result.model, tokenizer)
        if is_rank_zero():
            tokenizer.save_pretrained(Path(config.out_dir) / "model")
            _print_outcome(name, config, result)
    return summaries, per_sample


def _print_outcome(name, config, result) -> None:
    resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from else ""
    if result.stopped_at is not None:
        print(f"{name}: stopped by {result.metrics[-1]['stopped']} at step {result.stopped_at + 1}, after "
              f"{result.stopped_at} updates{resumed}; model in {config.out_dir}/model")
    else:
        print(f"{name}: {config.steps} steps{resumed}, final loss "
              f"{result.metrics[-1]['loss']:.4f}; model in {config.out_dir}/model")


def _report(job: TrainJob, summaries: dict, per_sample: dict) -> None:
    """The evaluation's results (or, without --eval, the summary rows that no longer describe a model dropped),
    then the report; a sharded run's ranks end together."""
    from ..eval.report import make_report
    from ..train import distributed
    from ..train.launch import is_rank_zero

    if is_rank_zero():
        if summaries:
            _write_result(job.out, "summary.json", summaries)
            _write_result(job.out, "per_sample.json", per_sample)
            for name, summary in summaries.items():
                for metric, why in summary.get("missing", {}).items():
                    print(f"{name}: {metric.replace('_', ' ')} not computed: {why}")
        else:
            _drop_stale_summaries(job.out, job.configs)
        print(f"report: {make_report(job.args.out)}")
    if job.world > 1:
        distributed.finish()


def _drop_stale_summaries(out: Path, trained):
    """Without --eval, the rows of ``results/summary.json`` that describe no model of this folder any more: those
    of the runs just trained (their models changed) and of names that are no run of ``OUT/runs`` (not ours)."""
    from ..structured_files import read_json

    path = out / "results" / "summary.json"
    try:
        rows = read_json(path) if path.is_file() else None
    except ValueError:
        return  # the report names the file
    if not isinstance(rows, dict):
        return
    kept = {name: row for name, row in rows.items()
            if name not in trained and "/" not in str(name) and (out / "runs" / str(name) / "metrics.jsonl").is_file()}
    if kept != rows:
        from ..train.checkpoint import atomic_write_json

        atomic_write_json(path, kept) if kept else path.unlink()


def _note_generation_limit(config, max_new_tokens):
    """Say when --eval's answers will be shorter than asked: generation stops at the model's last position
    (`eval.likelihood.greedy_answers`)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and max_new_tokens >= limit:
        print(f"note: --eval generates up to {max_new_tokens} new tokens, but the model has {limit} positions: "
              f"each answer stops where the prompt and the answer fill them")


def _memory_plans(args, files, configs) -> str:
    """`memory_plan` tables of the runs ``configs`` would make: per objective, one GPU and --nproc (else 8) ranks."""
    from ..data import encode_pairs, load_qa
    from ..train.memory_plan import LORA_DEFAULT_TARGETS, ModelShape, PlanSettings, format_plan, plan

    shape = ModelShape.from_config(Path(files["model"]))
    forget_pairs = load_qa(files["forget"])
    seq_len = args.max_length
    if seq_len is None:  # the longest encoded example
        tokenizer = load_tokenizer(args.tokenizer or files["model"])
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
