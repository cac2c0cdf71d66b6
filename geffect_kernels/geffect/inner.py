"""Gradients held as their uses, and inner products between them without materializing them (DESIGN §4).

A gradient is held per parameter as a list of *uses*, each one call of a layer in the forward pass:

- `Factored`: a linear layer; its weight gradient is ``leftᵀ @ right`` in the weight's own layout
  (``nn.Linear``: left = output gradients G, right = inputs X; GPT-2's ``Conv1D``: the other way round);
- `Gathered`: an embedding lookup; row ``rows[i]`` is added to the gradient's row ``ids[i]``;
- `Summed`: a vector parameter (bias, norm scale); the gradient is the sum of ``rows``;
- `HeadRows`: the LM head inside a fused loss (`head`): its rows are the side's positions, its inner
  products with another head use come from the head pass's Gram matrices, its dense form from
  `head.head_gradient`;
- `SampleGrads`: a gradient already dense, one ``[S, ...]`` slice per sample (the head pass's projection
  form); one row per sample;
- `SampleScaled`: another use with every sample's rows multiplied by that sample's factor (an objective
  whose coefficients are a per-sample multiple of the forget NLL's reuses that gradient's uses).

`row_dots(a, b)` returns, for every row of the use ``a``, that row's share of ⟨∇_a, ∇_b⟩ (float64),
where ``b`` is another use of the same parameter or a dense gradient: the Gram form, or the sparse rows
of embeddings. `sample_dense` gives a use's dense gradient per sample, the projection form's factor
(`products` picks the form per parameter).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends.autograd import compute_dtype
from ..backends.cpp import ghost

# Largest Gram tile (elements) held at once.
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
    """The head ``z = W h + b`` (soft-capped) under a loss with ∂loss/∂ℓ_t = ``coef`` (0 where ignored);
    ``gram`` (a `head.HeadGram`) holds the pass's results for ``side``."""
    gram: object
    side: str
    coef: torch.Tensor  # [N]: every position of the side
    part: str  # "weight" or "bias": which parameter this use stands for

    @property
    def n_rows(self):
        return self.coef.shape[0]


@dataclass
class SampleGrads:
    grads: torch.Tensor  # [S, *shape]: sample s's gradient (S = 1: the whole gradient)

    @property
    def n_rows(self):
        return self.grads.shape[0]


@dataclass
class SampleScaled:
    base: object  # a use whose rows are [n_samples, rows per sample] flattened
    scale: torch.Tensor  # [n_samples] float64

    @property
    def n_rows(self):
        return self.base.n_rows

    def row_scale(self, dtype):
        """The factor of each row of ``base``."""
        return self.scale.to(dtype).repeat_interleave(self.base.n_rows // self.scale.shape[0])

    def explicit(self):
        """The same gradient as a use of the base's kind, its rows scaled (one more buffer of rows)."""
        b = self.base
        if isinstance(b, Factored):
            return Factored(b.left * self.row_scale(b.left.dtype).unsqueeze(1), b.right)
        if isinstance(b, Gathered):
            return Gathered(b.ids, b.rows * self.row_scale(b.rows.dtype).unsqueeze(1))
        if isinstance(b, Summed):
            return Summed(b.rows * self.row_scale(b.rows.dtype).reshape(-1, *([1] * (b.rows.dim() - 1))))
        raise TypeError(f"cannot scale a {type(b).__name__} use by samples")


def _c(t):
    return t.to(compute_dtype(t.dtype))


def _row_sums(t):
    return t.reshape(t.shape[0], -1).sum(1, dtype=torch.float64)


def _ghost_kernel(device):
    """The csrc fused Gram kernel when it is built for ``device``, else None."""
    return ghost.ghost_inner_product if ghost.ghost_available(device) else None


def gram_rows(la, ra, lb, rb):
    """Σ_j (L_a L_bᵀ)_ij (R_a R_bᵀ)_ij for every row i (float64), no N_a×N_b matrix held whole: on a GPU by
    the fastest measured for the size class of the CUDA-core kernel, the tensor-core kernel and cuBLAS tiles
    (`ghost.fastest_gram`); on the CPU by the csrc kernel where it builds (BLAS tiles, rows reduced in
    float64 by C++), else torch tiles."""
    la, ra, lb, rb = _c(la), _c(ra), _c(lb), _c(rb)  # one dtype for all four (under autocast they differ)
    if la.is_cuda:
        gram = ghost.fastest_gram(la, ra, lb, rb)[1]
    else:
        gram = _ghost_kernel(la.device) or ghost.torch_gram
    return gram(la, ra, lb, rb, torch.arange(la.shape[0], device=la.device), la.shape[0])


def _unique_rows(use):
    """The gradient rows a use touches, as (sorted unique ids, summed rows [U, q]); uses are Gathered."""
    ids, inverse = torch.unique(use.ids, return_inverse=True)
    rows = torch.zeros(ids.shape[0], use.rows.shape[1], dtype=compute_dtype(use.rows.dtype), device=use.rows.device)
    return ids, rows.index_add_(0, inverse, _c(use.rows))


def _rows_of(b, ids):
    """Rows ``ids`` (sorted, unique) of the gradient ``b`` (dense, Factored, Gathered or head), [len(ids), q]."""
    if isinstance(b, torch.Tensor):
        return _c(b[ids])
    if isinstance(b, Factored):
        return _c(b.left[:, ids]).t() @ _c(b.right)
    if isinstance(b, HeadRows) and b.part == "weight":
        return b.gram.weight_rows(b.side, b.coef, ids)
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


def _head_rows_gathered(a: HeadRows, b: Gathered):
    """Row t of a (weight, tied to an embedding): c_t Σ_k m_t[k] ⟨h_t, grad_b[k]⟩ over the rows k b touches."""
    ids, rows = _unique_rows(b)
    g = a.gram
    cols = g.columns(a.side, ids)  # [n, U]
    return g.scatter_valid(a.side, g.valid_coef(a.side, a.coef) * (cols * (g.hidden[a.side] @ rows.t())).sum(1))


def _head_rows_head(a: HeadRows, b: HeadRows):
    """Row t of a: c_t Σ_j c_j (m_t·m_j) [(h_t·h_j)] from the pass's M_a M_bᵀ."""
    g = a.gram
    if g is not b.gram or a.part != b.part:
        raise TypeError("two head uses pair only within one head pass and for one parameter")
    mm = g.mm.get((a.side, b.side))
    if mm is None and (b.side, a.side) in g.mm:
        mm = g.mm[(b.side, a.side)].t()
    if mm is None:
        raise ValueError(f"the head pass holds no Gram matrix for the sides ({a.side}, {b.side})")
    if a.part == "weight":
        mm = mm * (g.hidden[a.side] @ g.hidden[b.side].t())
    return g.scatter_valid(a.side, g.valid_coef(a.side, a.coef) * (mm @ g.valid_coef(b.side, b.coef)))


def row_dots(a, b) -> torch.Tensor:
    """Each row's share of ⟨∇_a, ∇_b⟩, float64 ``[a.n_rows]``; ``b`` is a dense gradient or a use."""
    if isinstance(b, Summed):
        b = b.rows.sum(0, dtype=compute_dtype(b.rows.dtype))
    if isinstance(b, SampleGrads):
        b = b.grads.sum(0)
    if isinstance(a, SampleScaled):
        return row_dots(a.base, b) * a.row_scale(torch.float64)
    if isinstance(a, SampleGrads):
        if not isinstance(b, torch.Tensor):
            b = sample_dense(b, 1, a.grads.shape[1:])[0]
        return _row_sums(_c(a.grads) * _c(b).unsqueeze(0))
    if isinstance(a, Summed):
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"a vector parameter cannot pair with a {type(b).__name__} use")
        return _row_sums(_c(a.rows) * _c(b).unsqueeze(0))
    if isinstance(a, HeadRows):
        if isinstance(b, HeadRows):
            return _head_rows_head(a, b)
        if isinstance(b, Gathered) and a.part == "weight":
            return _head_rows_gathered(a, b)
        if isinstance(b, torch.Tensor):
            return a.gram.rows_against(a.side, a.coef, a.part, _c(b))
        raise TypeError(f"the head's uses pair with dense gradients and head uses, not {type(b).__name__}")
    if isinstance(a, Gathered):
        return _gathered_rows(a, b)
    if isinstance(a, Factored):
        if isinstance(b, torch.Tensor):
            return _row_sums((_c(a.left) @ _c(b)) * _c(a.right))
        if isinstance(b, Factored):
            return gram_rows(a.left, a.right, b.left, b.right)
        if isinstance(b, Gathered):
            return _factored_rows_gathered(a, b)
    raise TypeError(f"no inner product between {type(a).__name__} and {type(b).__name__}")


def sample_rows(use, start: int, stop: int, n_samples: int):
    """The part of ``use`` that samples ``start:stop`` of its ``n_samples`` contributed (a stacked batch's side)."""
    per = use.n_rows // n_samples
    rows = slice(start * per, stop * per)
    if isinstance(use, Factored):
        return Factored(use.left[rows], use.right[rows])
    if isinstance(use, Gathered):
        return Gathered(use.ids[rows], use.rows[rows])
    if isinstance(use, Summed):
        return Summed(use.rows[rows])
    raise TypeError(f"cannot split a {type(use).__name__} use by samples")


def dense_dot(dense, b) -> torch.Tensor:
    """⟨D, ∇_b⟩ as a float64 scalar, for a gradient held densely on the first side."""
    if isinstance(b, torch.Tensor):
        return (_c(dense) * _c(b)).sum(dtype=torch.float64)
    return row_dots(b, dense).sum()


def sample_dense(use, n_samples: int, shape) -> torch.Tensor:
    """The use's dense gradient per sample, ``[n_samples, *shape]`` (``n_samples=1``: the whole gradient);
    the use's rows are its samples' rows one after the other."""
    if isinstance(use, torch.Tensor):
        if n_samples != 1:
            raise ValueError("a dense gradient cannot be split by samples")
        return _c(use).unsqueeze(0)
    if isinstance(use, SampleGrads):
        if use.grads.shape[0] == n_samples:
            return _c(use.grads)
        if n_samples == 1:
            return _c(use.grads).sum(0, keepdim=True)
        raise ValueError(f"a gradient held for {use.grads.shape[0]} samples cannot be split into {n_samples}")
    if isinstance(use, SampleScaled):
        base = sample_dense(use.base, use.scale.shape[0], shape)
        scaled = base * use.scale.to(base.dtype).reshape(-1, *([1] * (base.dim() - 1)))
        return scaled if n_samples == use.scale.shape[0] else scaled.sum(0, keepdim=True)
    if isinstance(use, HeadRows):
        return use.gram.gradient(use.side, use.coef, use.part, n_samples)
    per = use.n_rows // n_samples
    if isinstance(use, Factored):
        left, right = _c(use.left), _c(use.right)
        return torch.bmm(left.reshape(n_samples, per, -1).transpose(1, 2), right.reshape(n_samples, per, -1))
    if isinstance(use, Gathered):
        vocab = shape[0]
        sample = torch.arange(use.n_rows, device=use.ids.device) // per
        out = torch.zeros(n_samples * vocab, use.rows.shape[1], dtype=compute_dtype(use.rows.dtype),
                          device=use.rows.device)
        return out.index_add_(0, sample * vocab + use.ids, _c(use.rows)).reshape(n_samples, vocab, -1)
    if isinstance(use, Summed):
        return _c(use.rows).reshape(n_samples, per, *shape).sum(1)
    raise TypeError(f"cannot materialize a {type(use).__name__} use")
