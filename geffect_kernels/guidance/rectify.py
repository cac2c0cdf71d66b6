"""Rectify the forget objective's gradient where it conflicts with the retain risk's, group by group.

For each group of parameters (a layer by default), with g the objective's gradient and r the retain risk's
restricted to that group: where ⟨g, r⟩ < 0 a step along −g would raise the retain risk (a negative retaining
G-effect), so g loses its component along r,

    g ← g − (⟨g, r⟩ / ‖r‖²) r,

after which ⟨g, r⟩ = 0 in that group: to first order the objective's step no longer moves the retain risk
there. Groups where ⟨g, r⟩ ≥ 0 (or r = 0) are left as they are. The training step then adds the retain term.

`group_products` and `apply_products` are the two halves of `rectify`: a sharded run takes the products on
its shards, sums them over the ranks with one all-reduce, and applies them to its shards
(`rectify_sharded`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ..geffect.groups import layer_of


def group_of(names, groups=None) -> dict[str, str]:
    """``{name: group}``: ``groups`` a mapping name -> group, a callable name -> group, or None for the layer
    grouping read off the names (`groups.layer_of`)."""
    if groups is None:
        return {name: layer_of(name) for name in names}
    if isinstance(groups, Mapping):
        missing = [name for name in names if name not in groups]
        if missing:
            raise ValueError(f"groups names no group for {', '.join(missing[:3])}"
                             + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
        return {name: str(groups[name]) for name in names}
    if callable(groups):
        return {name: str(groups(name)) for name in names}
    raise ValueError(f"groups must be a mapping name -> group, a callable or None, got {type(groups).__name__}")


def _check(objective_grads, retain_grads):
    if set(objective_grads) != set(retain_grads):
        only = sorted(set(objective_grads) ^ set(retain_grads))
        raise ValueError(f"objective and retain gradients name different parameters: {', '.join(only[:3])}")
    for name, g in objective_grads.items():
        if g.shape != retain_grads[name].shape:
            raise ValueError(f"{name}: objective gradient {tuple(g.shape)} but retain gradient "
                             f"{tuple(retain_grads[name].shape)}")


def group_products(objective_grads: Mapping, retain_grads: Mapping, group: Mapping[str, str]
                   ) -> tuple[list[str], torch.Tensor]:
    """(group names, ``[G, 2]`` float64 of ⟨g, r⟩ and ‖r‖² per group), the sums over the tensors given (a
    shard's local parts, under FSDP2)."""
    names = list(dict.fromkeys(group[name] for name in objective_grads))
    index = {name: i for i, name in enumerate(names)}
    device = next(iter(retain_grads.values())).device if retain_grads else "cpu"
    out = torch.zeros(len(names), 2, dtype=torch.float64, device=device)
    for name, g in objective_grads.items():
        r = retain_grads[name]
        row = out[index[group[name]]]
        row[0] += dot(g, r)
        row[1] += dot(r, r)
    return names, out


DOT_CHUNK = 1 << 16  # elements per BLAS dot product below float64: its round-off stays that of a short sum


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """⟨a, b⟩ as a float64 scalar: one dot product in float64; in lower precision, BLAS dot products over chunks
    summed in float64 (a float64 copy of the gradients would cost more than the step's backward)."""
    a, b = a.reshape(-1), b.reshape(-1)
    if a.dtype == torch.float64 or a.numel() <= DOT_CHUNK:
        return torch.dot(a.double(), b.double()) if a.dtype != torch.float64 else torch.dot(a, b)
    return torch.stack([torch.dot(x, y) for x, y in zip(a.split(DOT_CHUNK), b.split(DOT_CHUNK))]).double().sum()


def coefficients(products: torch.Tensor) -> torch.Tensor:
    """Per group, the multiple of r that g loses: ⟨g, r⟩/‖r‖² where ⟨g, r⟩ < 0 and ‖r‖² > 0, else 0."""
    dot, norm = products[:, 0], products[:, 1]
    conflict = (dot < 0) & (norm > 0)
    return torch.where(conflict, dot / torch.where(conflict, norm, 1.0), 0.0)


def apply_products(objective_grads: Mapping, retain_grads: Mapping, group: Mapping[str, str], names: list[str],
                   products: torch.Tensor) -> dict:
    """The rectified gradients from the groups' (summed) products; untouched tensors are returned as given."""
    coef = coefficients(products).tolist()
    index = {name: i for i, name in enumerate(names)}
    out = {}
    for name, g in objective_grads.items():
        c = coef[index[group[name]]]
        out[name] = g if c == 0 else g.add(retain_grads[name], alpha=-c)
    return out


def rectify(objective_grads: Mapping[str, torch.Tensor], retain_grads: Mapping[str, torch.Tensor],
            groups: Mapping[str, str] | Callable[[str], str] | None = None) -> dict[str, torch.Tensor]:
    """The objective's gradients with, in every group where ⟨g, r⟩ < 0, the component along the retain risk's
    gradient r removed: g − (⟨g, r⟩/‖r‖²) r (products summed in float64, the update in g's dtype: float64 gradients
    give the float64 result).

    A pure function: ``objective_grads`` and ``retain_grads`` are dicts name -> tensor over the same names and
    shapes; ``groups`` maps a name to its group (a mapping or a callable; None: one group per layer, from the
    names). Nothing given is modified.
    """
    _check(objective_grads, retain_grads)
    group = group_of(list(objective_grads), groups)
    names, products = group_products(objective_grads, retain_grads, group)
    return apply_products(objective_grads, retain_grads, group, names, products)


def rectify_sharded(objective_grads, retain_grads, groups=None, *, all_reduce=None) -> tuple[dict, torch.Tensor]:
    """`rectify` for gradients split over ranks (each rank gives its local shards, under the same names on every
    rank): the per-group products of the shards are summed with one ``all_reduce`` (default
    ``torch.distributed.all_reduce``), so every rank applies the coefficients of the whole gradients. Returns
    (rectified local shards, the summed ``[G, 2]`` products)."""
    _check(objective_grads, retain_grads)
    group = group_of(list(objective_grads), groups)
    names, products = group_products(objective_grads, retain_grads, group)
    if all_reduce is None:
        import torch.distributed as dist
        all_reduce = dist.all_reduce
    all_reduce(products)
    return apply_products(objective_grads, retain_grads, group, names, products), products
