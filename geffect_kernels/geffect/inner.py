"""Inner products between two gradients without materializing them (DESIGN §4), per row of the first.

A gradient is held per parameter as a list of *uses*, each one call of a layer in the forward pass:

- `Factored`: a linear layer; its weight gradient is ``leftᵀ @ right`` in the weight's own layout
  (``nn.Linear``: left = output gradients G, right = inputs X; GPT-2's ``Conv1D``: the other way round);
- `Gathered`: an embedding lookup; row ``rows[i]`` is added to the gradient's row ``ids[i]``;
- `Summed`: a vector parameter (bias, norm scale); the gradient is the sum of ``rows``;
- `HeadRows`: the LM head inside a fused loss; its logits gradient is recomputed a chunk at a time, or,
  when two uses share a `head.HeadGram` that holds their pair, read from its Gram matrices (no recompute).

`row_dots(a, b)` returns, for every row of the use ``a``, that row's share of ⟨∇_a, ∇_b⟩ (float64),
where ``b`` is another use of the same parameter or a dense gradient. Summing rows gives the inner
product; summing the rows of one sample gives its per-instance value.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends.autograd import compute_dtype, logits_grad_, soft_cap_

# Largest Gram tile (elements) and head-logits chunk held at once.
TILE_ELEMENTS = 1 << 22


@dataclass
class Factored:
    left: torch.Tensor  # [N, p]
    right: torch.Tensor  # [N, q]; gradient = leftᵀ @ right, shape [p, q]

    @property
    def n_rows(self):
        return self.left.shape[0]


@dataclass
class Gathered:
    ids: torch.Tensor  # [N] int64
    rows: torch.Tensor  # [N, q]

    @property
    def n_rows(self):
        return self.ids.shape[0]


@dataclass
class Summed:
    rows: torch.Tensor  # [N, *shape]

    @property
    def n_rows(self):
        return self.rows.shape[0]


@dataclass
class HeadRows:
    """The head ``z = W h + b`` (soft-capped) under a loss with ∂loss/∂ℓ_t = ``coef`` (0 where ignored)."""
    hidden: torch.Tensor  # [N, H]
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None
    labels: torch.Tensor  # [N], any valid id where coef is 0
    coef: torch.Tensor  # [N]
    softcap: float | None
    part: str  # "weight" or "bias": which parameter this use stands for
    gram: object = None  # a `head.HeadGram` holding this use's side (and M_x M_yᵀ for some pairs)
    side: str | None = None
    _dense: torch.Tensor | None = None  # this use's gradient, once materialized (projection fallback)

    @property
    def n_rows(self):
        return self.hidden.shape[0]


def _c(t):
    return t.to(compute_dtype(t.dtype))


def _row_sums(t):
    return t.reshape(t.shape[0], -1).sum(1, dtype=torch.float64)


def _ghost_kernel(device):
    """The csrc fused Gram kernel when it is built for ``device``, else None."""
    from ..backends.cpp import ghost

    return ghost.ghost_inner_product if ghost.ghost_available(device) else None


def _gram_rows(la, ra, lb, rb):
    """Σ_j (L_a L_bᵀ)_ij (R_a R_bᵀ)_ij for every row i, tiled over i so no N_a×N_b matrix is held."""
    kernel = _ghost_kernel(la.device)
    if kernel is not None:  # one dtype for all four (under autocast, inputs and output gradients differ)
        rows = torch.arange(la.shape[0], device=la.device)
        return kernel(_c(la), _c(ra), _c(lb), _c(rb), segment_ids=rows, num_segments=la.shape[0])
    out = torch.empty(la.shape[0], dtype=torch.float64, device=la.device)
    tile = max(1, TILE_ELEMENTS // max(1, lb.shape[0]))
    lb_t, rb_t = _c(lb).t(), _c(rb).t()
    for s in range(0, la.shape[0], tile):
        out[s:s + tile] = _row_sums((_c(la[s:s + tile]) @ lb_t) * (_c(ra[s:s + tile]) @ rb_t))
    return out


def _factored_rows_dense(a: Factored, dense):
    """Row i: left_iᵀ D right_i (projection form)."""
    return _row_sums((_c(a.left) @ _c(dense)) * _c(a.right))


def _factored_rows_factored(a: Factored, b: Factored):
    n_a, n_b = a.n_rows, b.n_rows
    p, q = a.left.shape[1], a.right.shape[1]
    gram_cost = n_a * n_b * (p + q)
    projection_cost = p * q * (n_a + n_b)
    if gram_cost <= projection_cost:
        return _gram_rows(a.left, a.right, b.left, b.right)
    return _factored_rows_dense(a, _c(b.left).t() @ _c(b.right))


def _unique_rows(use):
    """The gradient rows a use touches, as (sorted unique ids, summed rows [U, q]); uses are Gathered."""
    ids, inverse = torch.unique(use.ids, return_inverse=True)
    rows = torch.zeros(ids.shape[0], use.rows.shape[1], dtype=compute_dtype(use.rows.dtype),
                       device=use.rows.device)
    return ids, rows.index_add_(0, inverse, _c(use.rows))


def _rows_of(b, ids):
    """Rows ``ids`` (sorted, unique) of the gradient ``b`` (dense, Factored or Gathered), [len(ids), q]."""
    if isinstance(b, torch.Tensor):
        return _c(b[ids])
    if isinstance(b, Factored):
        return _c(b.left[:, ids]).t() @ _c(b.right)
    if isinstance(b, HeadRows) and b.gram is not None and b.part == "weight":
        return _head_weight_rows(b, ids)
    if isinstance(b, Gathered):
        b_ids, b_rows = _unique_rows(b)
        pos = torch.searchsorted(b_ids, ids).clamp_max(b_ids.shape[0] - 1)
        hit = (b_ids[pos] == ids).unsqueeze(1)
        return torch.where(hit, b_rows[pos], 0)
    raise TypeError(f"cannot take rows of a {type(b).__name__} gradient")


def _gathered_rows(a: Gathered, b):
    ids, inverse = torch.unique(a.ids, return_inverse=True)
    return _row_sums(_c(a.rows) * _rows_of(b, ids)[inverse])


def _factored_rows_gathered(a: Factored, b: Gathered):
    """Row i: Σ_k left_i[k] ⟨right_i, grad_b[k]⟩ over the rows k that b touches."""
    ids, rows = _unique_rows(b)
    return _row_sums(_c(a.left[:, ids]) * (_c(a.right) @ rows.t()))


def _head_rows(a: HeadRows, dense):
    """Row t: g_tᵀ D h_t (weight) or g_tᵀ D (bias), g_t = coef_t (onehot(y_t) − softmax(z_t)) · dz/du."""
    out = torch.empty(a.n_rows, dtype=torch.float64, device=a.hidden.device)
    step = max(1, TILE_ELEMENTS // a.weight.shape[0])
    weight, bias, d = _c(a.weight), None if a.bias is None else _c(a.bias), _c(dense)
    for s in range(0, a.n_rows, step):
        h = _c(a.hidden[s:s + step])
        g = _logits_cotangent(a, h, weight, bias, s, step)
        out[s:s + step] = _row_sums(g * (h @ d.t())) if a.part == "weight" else g.to(torch.float64) @ d.to(
            torch.float64)
    return out


def _valid(use, values):
    """Values on a `HeadGram` use's valid rows scattered into all of its rows (0 elsewhere), float64."""
    out = torch.zeros(use.n_rows, dtype=torch.float64, device=values.device)
    return out.index_copy_(0, use.gram.rows[use.side], values.to(torch.float64))


def _valid_coef(use):
    return use.coef.reshape(-1)[use.gram.rows[use.side]].to(use.gram.hidden[use.side].dtype)


def _head_weight_rows(b: HeadRows, ids):
    """Rows ``ids`` of the head use ``b``'s weight gradient: Σ_t c_t m_t[ids] h_t, ``[len(ids), H]``."""
    g = b.gram
    return (g.columns(b.side, ids) * _valid_coef(b).unsqueeze(1)).t() @ g.hidden[b.side]


def _head_rows_head(a: HeadRows, b: HeadRows):
    """Row t of a: c_t Σ_j c_j (m_t·m_j) [(h_t·h_j)] from the pass's M_a M_bᵀ; else by projection."""
    g = a.gram
    if g is not None and g is b.gram and a.part == b.part:
        mm = g.mm.get((a.side, b.side))
        if mm is None and (b.side, a.side) in g.mm:
            mm = g.mm[(b.side, a.side)].t()
        if mm is not None:
            if a.part == "weight":
                mm = mm * (g.hidden[a.side] @ g.hidden[b.side].t())
            return _valid(a, _valid_coef(a) * (mm @ _valid_coef(b)))
    if b._dense is None:  # projection form: b's gradient once, then a's rows against it
        b._dense = _head_dense(b)
    return _head_rows(a, b._dense)


def _head_rows_gathered(a: HeadRows, b: Gathered):
    """Row t of a (weight, tied to an embedding): c_t Σ_k m_t[k] ⟨h_t, grad_b[k]⟩ over the rows k b touches."""
    ids, rows = _unique_rows(b)
    g = a.gram
    cols = g.columns(a.side, ids)  # [n, U]
    return _valid(a, _valid_coef(a) * (cols * (g.hidden[a.side] @ rows.t())).sum(1))


def _head_dense(a: HeadRows):
    """The head use's own gradient (weight [V, H] or bias [V]), a chunk of rows at a time."""
    weight, bias = _c(a.weight), None if a.bias is None else _c(a.bias)
    out = torch.zeros(weight.shape if a.part == "weight" else weight.shape[:1], dtype=weight.dtype,
                      device=weight.device)
    step = max(1, TILE_ELEMENTS // weight.shape[0])
    for s in range(0, a.n_rows, step):
        h = _c(a.hidden[s:s + step])
        g = _logits_cotangent(a, h, weight, bias, s, step)
        if a.part == "weight":
            out.addmm_(g.t(), h)
        else:
            out += g.sum(0)
    return out


def _logits_cotangent(a: HeadRows, h, weight, bias, s, step):
    """coef_t (onehot(y_t) − softmax(z_t)) · dz/du for the rows s:s+step of ``a``."""
    z, slope = soft_cap_(torch.nn.functional.linear(h, weight, bias), a.softcap)
    coef = a.coef.reshape(-1)[s:s + step].to(z.dtype)
    return logits_grad_(torch.softmax(z, dim=-1), a.labels.reshape(-1)[s:s + step], coef, slope)


def row_dots(a, b) -> torch.Tensor:
    """Each row's share of ⟨∇_a, ∇_b⟩, float64 ``[a.n_rows]``; ``b`` is a dense gradient or a use."""
    if isinstance(b, Summed):
        b = b.rows.sum(0, dtype=compute_dtype(b.rows.dtype))
    if isinstance(a, Summed):
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"a vector parameter cannot pair with a {type(b).__name__} use")
        return _row_sums(_c(a.rows) * _c(b).unsqueeze(0))
    if isinstance(a, HeadRows):
        if isinstance(b, torch.Tensor):
            return _head_rows(a, b)
        if isinstance(b, HeadRows):
            return _head_rows_head(a, b)
        if isinstance(b, Gathered) and a.gram is not None and a.part == "weight":
            return _head_rows_gathered(a, b)
        raise TypeError(f"the head's uses pair with dense gradients and head uses, not {type(b).__name__}")
    if isinstance(a, Gathered):
        return _gathered_rows(a, b)
    if isinstance(a, Factored):
        if isinstance(b, torch.Tensor):
            return _factored_rows_dense(a, b)
        if isinstance(b, Factored):
            return _factored_rows_factored(a, b)
        if isinstance(b, Gathered):
            return _factored_rows_gathered(a, b)
    raise TypeError(f"no inner product between {type(a).__name__} and {type(b).__name__}")


def dense_dot(dense, b) -> torch.Tensor:
    """⟨D, ∇_b⟩ as a float64 scalar, for a gradient held densely on the first side."""
    if isinstance(b, torch.Tensor):
        return (_c(dense) * _c(b)).sum(dtype=torch.float64)
    return row_dots(b, dense).sum()
