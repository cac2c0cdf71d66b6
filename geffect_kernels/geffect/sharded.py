"""G-effects of a model sharded with FSDP2 (``fully_shard``), every rank holding its slice of the batches.

Identity (DESIGN §7(a)). With data parallelism over R ranks the objective's global gradient is
g_a = Σ_r g_a,r (each rank's part of the global objective) and FSDP2's reduce-scatter leaves rank r
holding the shard s_r of every parameter's global gradient. The inner product splits over disjoint shards:

    e_group = Σ_{p ∈ group} ⟨g_a(p), g_b(p)⟩ = Σ_r Σ_{p ∈ group} ⟨g_a(p)[s_r], g_b(p)[s_r]⟩

so every rank takes the dot products of its shards (float64 sums) and one all-reduce of a
[groups × pairs] vector gives every rank the exact global values. The objectives are those of the
*global* batch: the per-token log-probabilities of all ranks are gathered (B·T numbers), the objective's
coefficients ∂L/∂ℓ_t are taken on the concatenation (so means over all valid tokens or all sequences,
and every weight, are exactly one process's), and each rank backpropagates R·Σ_{t local} c_t ℓ_t
(R undoes FSDP2's gradient averaging).

Communication per measurement: the B·T log-probabilities (and labels, reference log-probabilities),
one all-reduce of groups × pairs float64 numbers, plus the gradients' usual reduce-scatter.

Memory per rank (`memory_per_rank`; P parameters of which P_t trainable, P_blk in the largest block, P_root
in the root's own modules (embedding, final norm, head), R ranks, k gradients held: 2 for the forget risk
only, 3 with a retain batch; float32 shards and gradients, compute dtype of c bytes, 2 for bf16):

    4·P/R                            the parameter shards
    + 4·k·P_t/R                      the k sharded gradients, kept until the dot products
    + c·(2·P_blk + P_root)           FSDP2's unsharded parameters: the running block, the prefetched next one,
                                     the root's (kept unsharded between its forward and backward)
    + (c + 4)·max(P_blk, P_root)     one unsharded gradient before its float32 reduce-scatter
    + activations of the rank's slice

No rank ever holds a full gradient: each block's unsharded gradient lives only until its reduce-scatter.
Per-instance values need the per-sample factors (the Gram form, §7(b)) and are not offered here.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist

from ..data_parallel import objective_part
from .result import GEffectResult

def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are DTensors (FSDP2 ``fully_shard``)."""
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


def reshard(model: torch.nn.Module):
    """Free every FSDP2 module's unsharded parameters; ``named_parameters`` then gives the DTensor shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def measure(profiler, objective: Callable, risks: Mapping[str, Callable]) -> GEffectResult:
    """`GEffectProfiler.measure` on a sharded model: each callable returns the rank's part of a loss whose
    global value is the mean of the ranks' parts (the data-parallel convention FSDP2's averaging assumes)."""
    world = dist.get_world_size()

    def local(fn, what):
        def run():
            loss = fn(profiler.model)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise ValueError(f"the {what} must return a scalar tensor that depends on the model's parameters")
            value = loss.detach().double().reshape(1).clone()
            dist.all_reduce(value)
            return loss.reshape(()), float(value) / world
        return run

    fns = {"objective": local(objective, "objective")}
    fns.update({name: local(fn, f"risk {name!r}") for name, fn in risks.items()})
    return _geffects(profiler, fns, [("objective", name) for name in risks], None)


def measure_unlearning(profiler, objective: str, forget_batch, retain_batch=None, *, ref_logprobs=None,
                       retain_objective="nll", backend="auto", **hparams) -> GEffectResult:
    """`GEffectProfiler.measure_unlearning` on a sharded model (``objective`` resolved by it), each rank passing
    its slice of the batches (and of ``ref_logprobs``); returns on every rank the G-effects of the global batches."""
    fns = {"objective": _global_loss(profiler.model, objective, forget_batch, ref_logprobs, backend, {}),
           "forget": _global_loss(profiler.model, "nll", forget_batch, None, backend, {})}
    pairs = [("objective", "forget")]
    if retain_batch is not None:
        fns["retain"] = _global_loss(profiler.model, "nll", retain_batch, None, backend, {})
        pairs.append(("objective", "retain"))
    term = retain_objective == "nll" and retain_batch is not None
    if term:
        pairs += [("retain", "forget"), ("retain", "retain")]
    return _geffects(profiler, fns, pairs, "retain" if term else None)


def _global_loss(model, name, batch, ref_logprobs, backend, hparams):
    return lambda: objective_part(name, model, batch, ref_logprobs=ref_logprobs, backend=backend, **hparams)


def _geffects(profiler, fns: dict, pairs: list, retain_term_of: str | None) -> GEffectResult:
    """Run each of ``fns`` (forward + backward, FSDP2 reduce-scatters), keep the local gradient shards,
    dot them per group for ``pairs`` (a, b) and all-reduce; the model's ``.grad`` is left as found."""
    from torch.distributed.tensor import DTensor

    reshard(profiler.model)  # a forward without backward leaves the root's parameters unsharded
    params = profiler._params()
    unsharded = [name for name, p in params.items() if not isinstance(p, DTensor)]
    if unsharded:  # their gradients would be per-rank, not shards of the global one
        raise ValueError(f"{unsharded[0]} is not sharded: apply fully_shard to the root module too")
    saved = {name: p.grad for name, p in params.items()}
    grads, losses = {}, {}
    try:
        for key, fn in fns.items():
            for p in params.values():
                p.grad = None
            loss, losses[key] = fn()
            loss.backward()
            grads[key] = {name: _local(p.grad) for name, p in params.items() if p.grad is not None}
    finally:
        for name, p in params.items():
            p.grad = saved[name]
    groups = list(dict.fromkeys(profiler.groups[name] for name in params))
    index = {group: i for i, group in enumerate(groups)}
    device = next(iter(params.values())).device
    dots = torch.zeros(len(groups), len(pairs), dtype=torch.float64, device=device)
    with torch.no_grad():
        for j, (a, b) in enumerate(pairs):
            for name in [n for n in grads[a] if n in grads[b]]:  # one summation order on every run
                dots[index[profiler.groups[name]], j] += torch.sum(grads[a][name] * grads[b][name],
                                                                   dtype=torch.float64)
    del grads
    dist.all_reduce(dots)
    dots = dots.cpu()

    def result(a, risks, loss_keys):
        by_group = {g: {risk: float(dots[index[g], pairs.index((a, risk))]) for risk in risks} for g in groups}
        total = {risk: float(dots[:, pairs.index((a, risk))].sum()) for risk in risks}
        return GEffectResult(total, by_group, None, {k: losses[k] for k in loss_keys})

    risks = [b for a, b in pairs if a == "objective"]
    out = result("objective", risks, ["objective", *risks])
    if retain_term_of is not None:
        out.retain_term = result(retain_term_of, risks, [retain_term_of])
        out.retain_term.losses = {"objective": losses[retain_term_of]}
    return out


def _local(grad):
    """The rank's shard of a (DTensor) gradient as a plain tensor."""
    return grad.to_local() if hasattr(grad, "to_local") else grad


def memory_per_rank(params, block_params, root_params, world, *, trainable=None, gradients=3, compute_bytes=2):
    """Bytes per rank of `measure_unlearning` on a sharded model, activations aside (the formula above)."""
    trainable = params if trainable is None else trainable
    return (4 * params / world + 4 * gradients * trainable / world
            + compute_bytes * (2 * block_params + root_params)
            + (compute_bytes + 4) * max(block_params, root_params))
