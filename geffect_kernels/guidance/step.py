"""A guided training step's gradients: what `TrainConfig(guidance=...)` puts in ``.grad`` before clipping and the
update, in place of ``backward(forget_weight · L_objective + retain_weight · L_retain)``.

Both guidances need the forget objective's gradient and the retain risk's apart, so the retain term is the NLL
(its gradient *is* the retain risk's, times ``retain_weight``). ``run`` is a `train.loop.Run` (its batches, losses,
autocast and parameters); a sharded run's ``.grad`` are the shards of the global batch's gradient.
"""
from __future__ import annotations

import torch

from ..geffect.buffers import BufferPool
from ..geffect.groups import layer_of, parameter_groups
from .instance import ForgetGEffects, sample_weights
from .rectify import rectify_sharded


def _local(t):
    """A DTensor's local shard (FSDP2), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _autocast(run):
    # a context manager, or (`train.loop.Run`) a method that returns one
    return run.autocast if hasattr(run.autocast, "__enter__") else run.autocast()


def _pool(run):
    """The run's pool of the head's large CPU buffers, kept between steps (`geffect.buffers`)."""
    if getattr(run, "guidance_buffers", None) is None:
        run.guidance_buffers = BufferPool()
    return run.guidance_buffers


def _named_params(run):
    return {n: p for n, p in run.model.named_parameters() if p.requires_grad}


def layer_grouping(model) -> dict:
    """{trainable parameter name: layer} as the profiler reports it (`groups.parameter_groups`), else from the
    names alone."""
    try:
        return parameter_groups(model, "layer")
    except (AttributeError, TypeError):
        return {n: layer_of(n) for n, _ in model.named_parameters()}


def _checked(loss, non_finite):
    if not torch.isfinite(loss):
        raise non_finite(f"the loss is {loss.item()}")
    return loss


def _forget_loss(run, micro):
    config = run.config
    batch, ref = run.forget_batch(micro)
    with _autocast(run):
        return run.objective_loss(config.objective, batch, ref, config.hparams)


def _retain_loss(run, micro):
    with _autocast(run):
        return run.objective_loss("nll", run.retain_batch(micro))


def _backward_over_micro_batches(run, step, loss_of, weight, non_finite) -> float:
    """backward(weight · loss / grad_accum) for each micro-batch of ``step``; the loss's mean over them."""
    accum = run.config.grad_accum
    total = 0.0
    for k in range(accum):
        loss = _checked(loss_of(run, step * accum + k), non_finite)
        (weight * loss / accum).backward()
        total += float(loss.detach()) / accum
    return total


def _grads_taken(params):
    """{name: local .grad} (zeros where none arrived), the parameters' .grad cleared (handed over, not copied)."""
    out = {}
    for name, p in params.items():
        out[name] = torch.zeros_like(_local(p.data)) if p.grad is None else _local(p.grad)
        p.grad = None
    return out


def rectified_gradients(run, step, non_finite=ArithmeticError, sharded=False, groups=None) -> dict:
    """``.grad`` = rectify(∇ forget term, ∇ retain term) + ∇ retain term over the step's micro-batches; the
    per-group products of a sharded run are summed over its ranks with one all-reduce. Returns the step's loss
    sums and the number of groups rectified."""
    config, params = run.config, _named_params(run)
    sums = {"loss": 0.0, "forget_loss": 0.0, "retain_loss": 0.0}  # the order of the step's log record
    sums["forget_loss"] = _backward_over_micro_batches(run, step, _forget_loss, config.forget_weight, non_finite)
    objective = _grads_taken(params)
    sums["retain_loss"] = _backward_over_micro_batches(run, step, _retain_loss, config.retain_weight, non_finite)
    retain = {n: torch.zeros_like(_local(p.data)) if p.grad is None else _local(p.grad) for n, p in params.items()}
    group = groups if groups is not None else layer_grouping(run.model)
    group = {n: group.get(n, layer_of(n)) for n in params}
    # one all-reduce of the per-group products on a sharded run; one process holds whole gradients already
    new, products = rectify_sharded(objective, retain, group, all_reduce=None if sharded else (lambda t: None))
    for name, p in params.items():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        _local(p.grad).add_(new[name].to(_local(p.grad).dtype))
    sums["loss"] = config.forget_weight * sums["forget_loss"] + config.retain_weight * sums["retain_loss"]
    conflicts = int(((products[:, 0] < 0) & (products[:, 1] > 0)).sum())
    return {**sums, "rectified_groups": conflicts}


def instance_gradients(run, step, temperature, non_finite=ArithmeticError) -> dict:
    """``.grad`` = ∇ retain term + forget_weight · Σ_s w_s g_s, the weights from each forget sample's retaining
    G-effect against this step's retain gradient (`instance`). Returns the loss sums and the weights' range."""
    config, params = run.config, _named_params(run)
    accum = config.grad_accum
    sums = {"loss": 0.0, "forget_loss": 0.0, "retain_loss": 0.0}
    sums["retain_loss"] = _backward_over_micro_batches(run, step, _retain_loss, config.retain_weight, non_finite)
    retain = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
    low, high = float("inf"), float("-inf")
    pool = _pool(run)
    for k in range(accum):
        batch, ref = run.forget_batch(step * accum + k)
        part = None
        try:
            with _autocast(run):
                part = ForgetGEffects(run.model, params, batch, config.objective, ref_logprobs=ref.logprobs,
                                      hparams=config.hparams, pool=pool)
            part_loss = _checked(part.loss, non_finite)
            weights = sample_weights(part.geffects(retain), temperature)
            low, high = min(low, float(weights.min())), max(high, float(weights.max()))
            for name, g in part.weighted_gradient(weights).items():
                p = params[name]
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(g, alpha=config.forget_weight / accum)
        finally:
            part = None  # its buffers go back to the pool
            pool.reclaim()  # nothing of this micro-batch is left to hold them
        sums["forget_loss"] += float(part_loss) / accum
    sums["loss"] = config.forget_weight * sums["forget_loss"] + config.retain_weight * sums["retain_loss"]
    return {**sums, "weight_min": low, "weight_max": high}
