"""The unlearning loop on several processes (torchrun): FSDP2, each rank a slice of every global batch.

    torchrun --nproc-per-node N -m geffect_kernels train ...      (or ``geffect train --nproc N ...``)

The same loop as one process (`loop.run_steps`) on a `ShardedRun`, which differs from a `loop.Run` in:
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
- rank 0 is the run's writer: it alone writes the metrics, G-effects and progress bar; the final model is a
  Hugging Face sharded checkpoint gathered one FSDP unit at a time (`hf_shards.save_sharded`; a peft model's
  adapter alone).
"""
from __future__ import annotations

import os
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from .. import hf
from ..catalog import IGNORE_INDEX
from ..data_parallel import mean_part, objective_part, rank_rows
from ..geffect.sharded import reshard
from ..objective_inputs import ReferenceState
from .checkpoint import CHECKPOINT, SHARDED_CHECKPOINTS, CheckpointError, atomic_write_json, remove_orphans
from .frozen_model import AdaptersDisabled, is_lora
from .gradient_checkpointing import checkpointing
from .hf_shards import load_sharded, save_sharded
from .loop import Run, TrainResult, check_inputs, run_steps
from .presets import resolve as resolve_preset
from .run_lock import run_lock
from .sharded_checkpoint import (LATEST, load_shards, read_latest, read_loop_state, read_rng, write_loop_state,
                                 write_rng)

CHECKPOINTS = SHARDED_CHECKPOINTS


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
    """ValueError when some rank would get no sample of a global batch, or the run reads what the ranks do not
    share yet (substitute answers, a layer's activations)."""
    objective = config.resolved_objective.objective
    if world > 1 and (not objective.on_forget_logprobs or config.retain_term.level == "hidden"):
        what = objective.name if not objective.on_forget_logprobs else f"retain term {config.retain_term.name}"
        raise ValueError(f"{what} reads {objective.inputs if not objective.on_forget_logprobs else 'hidden'} inputs, "
                         f"which run in one process only (not with --nproc > 1)")
    sizes = [min(config.batch_size, len(forget))] + ([min(config.batch_size, len(retain))] if retain else [])
    if world > min(sizes):
        raise ValueError(f"{world} processes but a global batch holds {min(sizes)} samples: each process needs "
                         f"at least one (lower --nproc or raise --batch-size)")


def saved_world_size(out_dir) -> int | None:
    """The number of processes that wrote the checkpoint in ``out_dir`` (1: `loop`'s), or None when none."""
    info = read_latest(Path(out_dir) / CHECKPOINTS)
    if info is not None:
        return info["world_size"]
    return 1 if (Path(out_dir) / CHECKPOINT).is_file() else None


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


def train_sharded(model_dir, forget, retain, config, *, device, wrap=None, evaluate=None, resume=None,
                  allow_reshard=False) -> TrainResult:
    """`loop.train` on the torchrun group, the starting model read from ``model_dir`` (a Hugging Face folder with
    safetensors weights) straight into shards on ``device``, ``wrap`` (e.g. LoRA) applied before sharding;
    returns the metrics (identical) and the trained sharded model on every rank. ``evaluate`` and ``resume`` as
    for `loop.train` (``evaluate`` runs on every rank: the sharded model's forward passes take all of them)."""
    if config.guidance == "instance":  # before the model loads
        raise ValueError("guidance 'instance' runs in one process only (its per-sample G-effects are not sharded); "
                         "'rectify' runs sharded")
    model = load_sharded(model_dir, device, wrap=wrap)
    check_inputs(model, forget, retain, config)
    config = resolve_preset(config, model, len(forget))
    world = dist.get_world_size()
    check_world(world, config, forget, retain if config.uses_retain else None)
    if config.out_dir and resume is not False:
        check_resume(config.out_dir, world, allow_reshard)
    if config.reference_device is not None:
        raise ValueError("a sharded run keeps its KL reference in shards over the ranks (reference_device is for "
                         "one process)")
    with (run_lock(config.out_dir) if dist.get_rank() == 0 else nullcontext(),  # rank 0 writes the folder
          checkpointing(model, config.gradient_checkpointing)):
        run = ShardedRun(model, model_dir, forget, retain, config)
        run.resume(resume)
        run_steps(run, evaluate)
        return run.finish()


class ShardedRun(Run):
    """A `loop.Run` on one rank: its slice of every batch, the global batch's losses, checkpoints written by
    every rank through ``torch.distributed.checkpoint``, rank 0 the writer."""

    sharded = True

    def __init__(self, model, model_dir, forget, retain, config):
        self.model_dir = model_dir  # the KL reference is loaded from it into shards, as the model was
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.writer = self.rank == 0
        super().__init__(model, forget, retain, config)

    def load_reference(self):
        """A KL reference: the model with its adapters disabled (LoRA), else loaded into shards; reference
        log-probabilities of every forget sample computed now, by the (sharded) starting model itself."""
        reference = None
        if self.uses_reference_model:
            reference = (AdaptersDisabled(self.model) if is_lora(self.model)
                         else load_sharded(self.model_dir, self.device, trainable=False))
        ref_cache = (_Precomputed(self.model, self.forget, self.config.batch_size, self.config.backend)
                     if self.objective.objective.needs_ref else None)
        return reference, ref_cache

    def autocast(self):
        return torch.autocast(self.device.type, enabled=False)  # FSDP2's policy sets the dtype

    def rows(self, indices):
        return indices[rank_rows(len(indices), self.rank, self.world)]

    def objective_loss(self, name, batch, ref_logprobs=None, hparams=None):
        ref = ref_logprobs.logprobs if isinstance(ref_logprobs, ReferenceState) else ref_logprobs
        part, value = objective_part(name, self.model, batch, ref_logprobs=ref, backend=self.config.backend,
                                     **(hparams or {}))
        return _valued(part, value)

    def retain_loss(self, batch):
        """The retain term of the global batch: a token mean's part (NLL) or the local KL mean's share of it."""
        if self.config.retain_term.on_forget_logprobs:
            return self.objective_loss(self.config.retain_term.name, batch)
        local = super().retain_loss(batch)
        part, value = mean_part(local, int((hf.batch_labels(batch)[:, 1:] != IGNORE_INDEX).sum()))
        return _valued(part, value)

    def evaluate(self, evaluate):
        try:
            return super().evaluate(evaluate)
        finally:
            reshard(self.model)  # the root keeps its gathered parameters after a forward without backward

    def sync(self):
        dist.barrier()

    def resume(self, resume):
        """As `Run.resume`, after rank 0 cleared what a killed run left in ``checkpoint/``: a temporary
        ``latest.json`` and step folders ``latest.json`` does not name (torn, or not yet removed)."""
        root = self.out / CHECKPOINTS if self.out is not None else None
        if self.writer and root is not None and root.is_dir():
            remove_orphans(root, files=(LATEST,), folders=())
            try:
                keep = self.checkpoint_path((read_latest(root) or {}).get("step", 0))
            except CheckpointError:
                keep = None  # refused below, with its one line, unless starting over
            if keep is not None:
                for folder in root.glob("step-*"):
                    if folder.is_dir() and not folder.is_symlink() and folder != keep:
                        shutil.rmtree(folder)
        super().resume(resume)

    def checkpoint_path(self, number) -> Path:
        return self.out / CHECKPOINTS / f"step-{number}"

    def write_checkpoint(self, number):
        """Every rank writes its shards and RNG state into ``checkpoint/step-N``; once all have, rank 0 points
        ``latest.json`` at it and removes the previous step's folder."""
        import torch.distributed.checkpoint as dcp

        root, step_dir = self.out / CHECKPOINTS, self.checkpoint_path(number)
        if self.writer:
            shutil.rmtree(step_dir, ignore_errors=True)  # a torn write of this step by an earlier, killed run
        dist.barrier()
        dcp.save(self._sharded_state(), checkpoint_id=str(step_dir))
        write_rng(step_dir, self.rank, self.device)  # tensors and plain data only (`sharded_checkpoint`)
        if self.writer:
            write_loop_state(step_dir, self.loop_state(number))
        dist.barrier()  # every rank's files are on disk: now the step becomes the latest
        if self.writer:
            try:
                previous = (read_latest(root) or {}).get("step")
            except CheckpointError:
                previous = None  # replaced now
            atomic_write_json(root / LATEST, {"step": number, "world_size": self.world})
            if previous is not None and previous != number:
                shutil.rmtree(self.checkpoint_path(previous), ignore_errors=True)

    def read_checkpoint(self):
        """`loop_state` of the step ``latest.json`` names, with the world size that wrote it; None when none."""
        info = read_latest(self.out / CHECKPOINTS)
        if info is None:
            return None
        return {**read_loop_state(self.checkpoint_path(info["step"])), "step": info["step"],
                "world_size": info["world_size"]}

    def restore(self, state):
        """The shards of the model and optimizer (resharded when the world size changed) and, at the same world
        size, this rank's RNG state; a file that cannot be read stops every rank with the same one line."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        step_dir = self.checkpoint_path(state["step"])
        same_world = state["world_size"] == self.world
        rng = self._on_every_rank(lambda: read_rng(step_dir, self.rank) if same_world else None)
        sharded = self._sharded_state()
        load_shards(sharded, step_dir)
        set_state_dict(self.model, self.optimizer, model_state_dict=sharded["model"],
                       optim_state_dict=sharded["optimizer"])
        if rng is not None:
            torch.set_rng_state(rng["rng"])
            if rng.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(rng["cuda_rng"])

    def _on_every_rank(self, read):
        """``read()`` on this rank; when it fails on any rank, every rank raises that rank's error (none is left
        waiting in a collective for one that stopped)."""
        try:
            value, error = read(), None
        except CheckpointError as err:
            value, error = None, str(err)
        errors = [None] * self.world
        dist.all_gather_object(errors, error)
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise CheckpointError(first)
        return value

    def save_model(self, folder):
        save_sharded(self.model, folder)

    def _sharded_state(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optimizer_state}


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
                batch = {k: v.to(device) for k, v in data.batch(mine).items()}
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
