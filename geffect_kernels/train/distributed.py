"""The unlearning loop on several processes (torchrun): FSDP2, each rank a slice of every global batch.

    torchrun --nproc-per-node N -m geffect_kernels train ...      (or ``geffect train --nproc N ...``)

The same stages as `loop.train`, with these differences:
- the model is loaded straight into shards (`hf_shards.load_sharded`: built on the meta device, sharded per
  decoder block then the root, each rank reading only its slices of the safetensors weights; bf16 compute on
  CUDA), so no rank ever holds an unsharded model;
- ``batch_size`` stays the *global* batch: rank r takes its `rank_rows` slice of every micro-batch, and the
  losses are the global batch's (`data_parallel`: gathered log-probabilities, exact coefficients), so the
  logged losses equal one process's to float32 round-off;
- reference log-probabilities (NPO, TNPO, WTNPO) are computed once, before the first update, by the sharded
  starting model itself (every rank then holds those of the whole forget set: B·T numbers); a KL retain term
  runs a frozen reference loaded into shards the same way;
- checkpoints go through ``torch.distributed.checkpoint`` (each rank writes its shards) into
  ``checkpoint/step-N``; ``checkpoint/latest.json``, replaced atomically by rank 0 once every rank has
  written, names the complete one, so a checkpoint is complete or absent; a killed run resumes
  bit-identically at the same world size, another world size needs ``allow_reshard``;
- metrics and G-effects are written once, by rank 0; the final model as a Hugging Face sharded checkpoint
  gathered one FSDP unit at a time (`hf_shards.save_sharded`; a peft model's adapter alone).
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from .. import hf
from ..data_parallel import mean_part, objective_part, rank_rows
from ..geffect.sharded import reshard
from ..objectives import OBJECTIVES
from . import loop
from .checkpoint import atomic_write_json, atomic_write_text
from .hf_shards import load_sharded, save_sharded
from .presets import resolve as resolve_preset
from .resume import differences, should_resume
from .run_lock import run_lock
from .schedule import batch_indices

CHECKPOINTS = "checkpoint"
LATEST = "latest.json"


class WorldSizeChanged(ValueError):
    """A checkpoint written at another world size, loaded without ``allow_reshard``."""


def init(device_type: str | None = None) -> torch.device:
    """Join the torchrun group (NCCL on CUDA, gloo on CPU); this rank's device."""
    cuda = torch.cuda.is_available() if device_type is None else str(device_type).startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def check_world(world: int, config, forget, retain=None):
    """ValueError when some rank would get no sample of a global batch."""
    sizes = [min(config.batch_size, len(forget))] + ([min(config.batch_size, len(retain))] if retain else [])
    if world > min(sizes):
        raise ValueError(f"{world} processes but a global batch holds {min(sizes)} samples: each process needs "
                         f"at least one (lower --nproc or raise --batch-size)")


def saved_world_size(out_dir) -> int | None:
    """The number of processes that wrote the checkpoint in ``out_dir`` (1: `loop`'s), or None when none."""
    latest = Path(out_dir) / CHECKPOINTS / LATEST
    if latest.is_file():
        return json.loads(latest.read_text())["world_size"]
    return 1 if (Path(out_dir) / loop.CHECKPOINT).is_file() else None


def check_resume(out_dir, world: int, allow_reshard: bool):
    """ValueError when ``out_dir``'s checkpoint was written by another number of processes (and may not be
    resharded: not without ``allow_reshard``, never between `loop`'s single file and sharded ones)."""
    saved = saved_world_size(out_dir)
    if saved is None or saved == world:
        return
    if not allow_reshard:
        raise WorldSizeChanged(f"{out_dir} holds a checkpoint written by {saved} process(es), not {world}: rerun "
                               f"with --nproc {saved}, or pass --allow-reshard to continue at {world} "
                               f"(not bit-identical)")
    if 1 in (saved, world):
        raise WorldSizeChanged(f"{out_dir}: a checkpoint cannot move between one process and several "
                               f"({saved} -> {world}); use another --out")


def finish():
    """Leave the torchrun group (after every rank got here)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class _ShardedRun(loop._Run):
    """`loop._Run` whose batches are this rank's slices and whose losses are the global batch's."""

    def forget_batch(self, micro):
        idx = self._mine(batch_indices(len(self.forget), self.config.batch_size, self.config.seed, micro))
        batch = loop._to(self.forget.batch(idx), self.device)
        ref = self.ref_cache.batch(idx, batch["input_ids"].shape[1], self.device) if self.ref_cache else None
        return batch, ref

    def retain_batch(self, micro):
        idx = self._mine(batch_indices(len(self.retain), self.config.batch_size, self.config.seed + 1, micro))
        return loop._to(self.retain.batch(idx), self.device)

    @staticmethod
    def _mine(indices):
        return indices[rank_rows(len(indices), dist.get_rank(), dist.get_world_size())]

    def objective_loss(self, name, batch, ref_logprobs=None, hparams=None):
        part, value = objective_part(name, self.model, batch, ref_logprobs=ref_logprobs,
                                     backend=self.config.backend, **(hparams or {}))
        return _valued(part, value)

    def kl_retain_loss(self, batch):
        local = loop._kl_retain_loss(self.model, self.reference, batch, self.config)
        part, value = mean_part(local, int((hf.batch_labels(batch)[:, 1:] != -100).sum()))
        return _valued(part, value)


def _valued(part, value):
    """``part``'s gradient with the value ``value`` (the global loss, the same on every rank)."""
    return part + (torch.as_tensor(value, dtype=part.dtype, device=part.device) - part.detach())


class _Precomputed:
    """Reference log-probabilities of every sample of ``data`` from ``model`` (sharded), in lockstep on all
    ranks: each runs its slice of every chunk, then they exchange the results."""

    def __init__(self, model, data, chunk, backend):
        rank, world = dist.get_rank(), dist.get_world_size()
        n, chunk = len(data), max(chunk, world)
        self.rows: dict[int, torch.Tensor] = {}
        device = next(model.parameters()).device
        with torch.no_grad():
            for start in range(0, n, chunk):
                idx = [(start + k) % n for k in range(chunk)]  # wrap: every rank gets samples
                mine = idx[rank_rows(chunk, rank, world)]
                batch = loop._to(data.batch(mine), device)
                logprobs = hf.token_logprobs(model, batch, backend=backend).float().cpu()
                shared = [None] * world
                dist.all_gather_object(shared, (mine, [logprobs[row, : len(data.examples[i]["input_ids"]) - 1]
                                                       for row, i in enumerate(mine)]))
                for ids, rows in shared:
                    self.rows.update(zip(ids, rows))
        reshard(model)  # the root keeps its gathered parameters after a forward without backward

    def batch(self, indices, width, device):
        out = torch.zeros(len(indices), width - 1)
        for row, i in enumerate(indices):
            out[row, : len(self.rows[i])] = self.rows[i]
        return out.to(device)


def train_sharded(model_dir, forget, retain, config, *, device, wrap=None, resume=None, allow_reshard=False
                  ) -> loop.TrainResult:
    """`loop.train` on the torchrun group, the starting model read from ``model_dir`` (a Hugging Face folder with
    safetensors weights) straight into shards on ``device``, ``wrap`` (e.g. LoRA) applied before sharding;
    returns the metrics (identical) and the trained sharded model on every rank. ``resume`` as for `loop.train`."""
    model = load_sharded(model_dir, device, wrap=wrap)
    loop.check_inputs(model, forget, retain, config)
    config = resolve_preset(config, model, len(forget))
    world = dist.get_world_size()
    check_world(world, config, forget, retain if config.uses_retain else None)
    if config.out_dir and resume is not False:
        check_resume(config.out_dir, world, allow_reshard)
    with run_lock(config.out_dir) if dist.get_rank() == 0 else nullcontext():  # rank 0 writes the folder
        run = _setup(model, model_dir, forget, retain, config)
        _resume(run, resume)
        run.model.train()
        for step in range(run.start, config.steps):
            number = step + 1
            record = {"step": number, "lr": loop._set_lr(run, step)}
            if run.profiler is not None and step % config.geffect_every == 0:
                record.update(loop._profile(run, step, number))
            record.update(loop._optimizer_step(run, step, number))
            if dist.get_rank() == 0:
                loop._log(run, record)
            else:
                run.metrics.append(record)
            if run.out is not None and (number % config.checkpoint_every == 0 or number == config.steps):
                _checkpoint(run, number)
        return _finish(run)


def _setup(model, model_dir, forget, retain, config) -> _ShardedRun:
    """A KL reference loaded into shards, the reference log-probabilities of the (sharded) starting model,
    then what every run sets up (`loop.new_run`)."""
    torch.manual_seed(config.seed)
    device = next(model.parameters()).device
    reference = None
    if config.uses_retain and config.retain_objective == "kl":
        reference = load_sharded(model_dir, device, trainable=False)
    ref_cache = (_Precomputed(model, forget, config.batch_size, config.backend)
                 if OBJECTIVES[config.objective].needs_ref else None)  # the starting model is the reference
    return loop.new_run(_ShardedRun, model, forget, retain, config, reference=reference, ref_cache=ref_cache,
                        autocast=torch.autocast(device.type, enabled=False))  # FSDP2's policy sets the dtype


def _state(run):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(run.model, run.optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def _checkpoint(run, number):
    import torch.distributed.checkpoint as dcp

    rank, root = dist.get_rank(), run.out / CHECKPOINTS
    step_dir = root / f"step-{number}"
    if rank == 0:
        shutil.rmtree(step_dir, ignore_errors=True)  # a torn write of this step by an earlier, killed run
    dist.barrier()
    dcp.save(_state(run), checkpoint_id=str(step_dir))
    torch.save({"rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if run.device.type == "cuda" else None},
               step_dir / f"rng-{rank}.pt")
    if rank == 0:
        torch.save({"step": number, "settings": run.settings, "setting_changes": run.setting_changes,
                    "geffects": run.history.to_dict() if run.history is not None else None}, step_dir / "loop.pt")
    dist.barrier()  # every rank's files are on disk: now the step becomes the latest
    if rank == 0:
        previous = json.loads((root / LATEST).read_text())["step"] if (root / LATEST).is_file() else None
        atomic_write_json(root / LATEST, {"step": number, "world_size": dist.get_world_size()})
        if previous is not None and previous != number:
            shutil.rmtree(root / f"step-{previous}", ignore_errors=True)
    run.last_good = number


def _resume(run, resume):
    """Continue the latest complete checkpoint (as `loop._resume` decides: same settings, or ``resume=True``)
    or start over (``resume=False``); rank 0 trims the metrics log to its step."""
    if run.out is None:
        return
    rank, root = dist.get_rank(), run.out / CHECKPOINTS
    if rank == 0:
        run.out.mkdir(parents=True, exist_ok=True)
        if resume is False:
            shutil.rmtree(root, ignore_errors=True)
            for name in (loop.METRICS, loop.GEFFECTS):
                (run.out / name).unlink(missing_ok=True)
            shutil.rmtree(run.out / "model", ignore_errors=True)
    dist.barrier()
    info = json.loads((root / LATEST).read_text()) if (root / LATEST).is_file() else None
    step_dir = info and root / f"step-{info['step']}"
    extra = torch.load(step_dir / "loop.pt", weights_only=False) if info else None
    if should_resume(run.out, extra, run.settings, resume):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = _state(run)
        dcp.load(state, checkpoint_id=str(step_dir))
        set_state_dict(run.model, run.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        run.setting_changes = list(extra.get("setting_changes", []))
        changed = differences(extra["settings"], run.settings)
        if changed:
            run.setting_changes.append({"step": info["step"], "before": {k: old for k, (old, _) in changed.items()}})
        if run.history is not None and extra.get("geffects") is not None:
            run.history = type(run.history).from_dict(extra["geffects"])
        rng_file = step_dir / f"rng-{rank}.pt"
        if info["world_size"] == dist.get_world_size() and rng_file.is_file():
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["rng"])
            if rng["cuda_rng"] is not None:
                torch.cuda.set_rng_state(rng["cuda_rng"])
        run.start = run.last_good = info["step"]
    run.metrics = loop._read_metrics(run.out / loop.METRICS, run.start)
    if rank == 0:
        config = run.config.to_dict()
        if run.setting_changes:
            config["setting_changes"] = run.setting_changes
        atomic_write_json(run.out / "config.json", config)
        atomic_write_text(run.out / loop.METRICS, "".join(json.dumps(m) + "\n" for m in run.metrics))
    dist.barrier()


def _finish(run) -> loop.TrainResult:
    """The final model saved without gathering it whole (`save_sharded`; adapters only for a peft model)."""
    run.model.eval()
    if run.out is not None:
        tmp, final = run.out / ".model.tmp", run.out / "model"
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        save_sharded(run.model, tmp)
        if dist.get_rank() == 0:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            if run.history is not None:
                atomic_write_json(run.out / loop.GEFFECTS, run.history.to_dict())
        dist.barrier()
    return loop.TrainResult(steps=run.config.steps, metrics=run.metrics, geffects=run.history,
                            resumed_from=run.start, model=run.model)
