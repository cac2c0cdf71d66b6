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

Each is a `Use` and carries its own operations: ``row_dots(other)``, each of its rows' share of
⟨∇_self, ∇_other⟩ (float64) against a dense gradient or another use of the same parameter (the Gram form, or
the sparse rows of embeddings); ``dense(n_samples, shape)``, its dense gradient per sample (the projection form's
factor); where its rows are samples' rows, ``split`` (a stacked batch's side) and ``scale_rows``; and the costs
`products` weighs the forms by (``gram_flops``, ``dense_flops``). A new kind of use is one class.
The module functions `row_dots`, `sample_dense` and `sample_rows` take dense gradients too (`products` picks the
form per parameter).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends.autograd import compute_dtype
from ..backends.cpp import ghost

# Largest Gram tile (elements) held at once.
TILE_ELEMENTS = 1 << 22


def _c(t):
    return t.to(compute_dtype(t.dtype))


def _row_sums(t):
    return t.reshape(t.shape[0], -1).sum(1, dtype=torch.float64)


class Use:
    """One call's part of a parameter's gradient, held in factored form; ``n_rows`` rows, its samples' rows one
    after the other."""

    n_rows: int

    def partner(self):
        """How this use enters another's ``row_dots``: itself, or its dense gradient where that is cheaper."""
        return self

    def row_dots(self, other) -> torch.Tensor:
        """Each row's share of ⟨∇_self, ∇_other⟩, float64 ``[n_rows]``; ``other`` is a dense gradient or a
        use's `partner`."""
        raise TypeError(f"no inner product between {type(self).__name__} and {type(other).__name__}")

    def rows_at(self, ids) -> torch.Tensor:
        """Rows ``ids`` (sorted, unique) of the gradient, ``[len(ids), q]`` (an embedding's partner)."""
        raise TypeError(f"cannot take rows of a {type(self).__name__} gradient")

    def dense(self, n_samples: int, shape) -> torch.Tensor:
        """The dense gradient per sample, ``[n_samples, *shape]`` (``n_samples=1``: the whole gradient)."""
        raise TypeError(f"cannot materialize a {type(self).__name__} use")

    def split(self, start: int, stop: int, n_samples: int) -> Use:
        """The part that samples ``start:stop`` of its ``n_samples`` contributed."""
        raise TypeError(f"cannot split a {type(self).__name__} use by samples")

    def scale_rows(self, factor: torch.Tensor) -> Use:
        """The same kind of use with row i times ``factor[i]`` (one more buffer of rows)."""
        raise TypeError(f"cannot scale a {type(self).__name__} use by samples")

    def gram_flops(self, other: Use) -> int:
        """Flops of `row_dots` against ``other`` (another use of the parameter) in the Gram or sparse form, for
        `products`' cost model."""
        raise TypeError(f"no Gram-form cost for {type(self).__name__} against {type(other).__name__}")

    def dense_flops(self, numel: int) -> int:
        """Flops of materializing the dense gradient (``numel`` elements), for `products`' cost model."""
        raise TypeError(f"no materialization cost for a {type(self).__name__} use")

    def _per_sample(self, n_samples: int) -> int:
        return self.n_rows // n_samples


@dataclass
class Factored(Use):
    left: torch.Tensor  # [N, p]
    right: torch.Tensor  # [N, q]; gradient = leftᵀ @ right, shape [p, q]

    @property
    def n_rows(self):
        return self.left.shape[0]

    def row_dots(self, other):
        if isinstance(other, torch.Tensor):
            return _row_sums((_c(self.left) @ _c(other)) * _c(self.right))
        if isinstance(other, Factored):
            return gram_rows(self.left, self.right, other.left, other.right)
        if isinstance(other, Gathered):
            # row i: Σ_k left_i[k] ⟨right_i, grad_other[k]⟩ over the rows k that other touches
            ids, rows = other.unique_rows()
            return _row_sums(_c(self.left[:, ids]) * (_c(self.right) @ rows.t()))
        return super().row_dots(other)

    def rows_at(self, ids):
        return _c(self.left[:, ids]).t() @ _c(self.right)

    def dense(self, n_samples, shape):
        per = self._per_sample(n_samples)
        left, right = _c(self.left), _c(self.right)
        return torch.bmm(left.reshape(n_samples, per, -1).transpose(1, 2), right.reshape(n_samples, per, -1))

    def split(self, start, stop, n_samples):
        per = self._per_sample(n_samples)
        return Factored(self.left[start * per:stop * per], self.right[start * per:stop * per])

    def scale_rows(self, factor):
        return Factored(self.left * factor.to(self.left.dtype).unsqueeze(1), self.right)

    def gram_flops(self, other):
        if isinstance(other, Factored):
            return 2 * self.n_rows * other.n_rows * (self.left.shape[1] + self.right.shape[1])
        return other.gram_flops(self)

    def dense_flops(self, numel):
        return 2 * self.n_rows * self.left.shape[1] * self.right.shape[1]


@dataclass
class Gathered(Use):
    ids: torch.Tensor  # [N] int64
    rows: torch.Tensor  # [N, q]

    @property
    def n_rows(self):
        return self.ids.shape[0]

    def unique_rows(self):
        """The gradient rows this use touches, as (sorted unique ids, summed rows [U, q])."""
        ids, inverse = torch.unique(self.ids, return_inverse=True)
        rows = torch.zeros(ids.shape[0], self.rows.shape[1], dtype=compute_dtype(self.rows.dtype),
                           device=self.rows.device)
        return ids, rows.index_add_(0, inverse, _c(self.rows))

    def row_dots(self, other):
        ids, inverse = torch.unique(self.ids, return_inverse=True)
        return _row_sums(_c(self.rows) * _rows_of(other, ids)[inverse])

    def rows_at(self, ids):
        own_ids, own_rows = self.unique_rows()
        pos = torch.searchsorted(own_ids, ids).clamp_max(own_ids.shape[0] - 1)
        hit = (own_ids[pos] == ids).unsqueeze(1)
        return torch.where(hit, own_rows[pos], 0)

    def dense(self, n_samples, shape):
        vocab = shape[0]
        sample = torch.arange(self.n_rows, device=self.ids.device) // self._per_sample(n_samples)
        out = torch.zeros(n_samples * vocab, self.rows.shape[1], dtype=compute_dtype(self.rows.dtype),
                          device=self.rows.device)
        return out.index_add_(0, sample * vocab + self.ids, _c(self.rows)).reshape(n_samples, vocab, -1)

    def split(self, start, stop, n_samples):
        per = self._per_sample(n_samples)
        return Gathered(self.ids[start * per:stop * per], self.rows[start * per:stop * per])

    def scale_rows(self, factor):
        return Gathered(self.ids, self.rows * factor.to(self.rows.dtype).unsqueeze(1))

    def gram_flops(self, other):  # the other's rows against this use's distinct rows
        return 2 * (self.n_rows + other.n_rows) * self.rows.shape[1]

    def dense_flops(self, numel):  # scatter the rows into a zeroed buffer
        return self.rows.numel() + numel


@dataclass
class Summed(Use):
    rows: torch.Tensor  # [N, *shape]

    @property
    def n_rows(self):
        return self.rows.shape[0]

    def partner(self):
        return self.rows.sum(0, dtype=compute_dtype(self.rows.dtype))

    def row_dots(self, other):
        if not isinstance(other, torch.Tensor):
            raise TypeError(f"a vector parameter cannot pair with a {type(other).__name__} use")
        return _row_sums(_c(self.rows) * _c(other).unsqueeze(0))

    def dense(self, n_samples, shape):
        return _c(self.rows).reshape(n_samples, self._per_sample(n_samples), *shape).sum(1)

    def split(self, start, stop, n_samples):
        per = self._per_sample(n_samples)
        return Summed(self.rows[start * per:stop * per])

    def scale_rows(self, factor):
        return Summed(self.rows * factor.to(self.rows.dtype).reshape(-1, *([1] * (self.rows.dim() - 1))))


@dataclass
class HeadRows(Use):
    """The head ``z = W h + b`` (soft-capped) under a loss with ∂loss/∂ℓ_t = ``coef`` (0 where ignored);
    ``gram`` (a `head.HeadGram`) holds the pass's results for ``side``."""
    gram: object
    side: str
    coef: torch.Tensor  # [N]: every position of the side
    part: str  # "weight" or "bias": which parameter this use stands for

    @property
    def n_rows(self):
        return self.coef.shape[0]

    def row_dots(self, other):
        g = self.gram
        if isinstance(other, HeadRows):  # row t: c_t Σ_j c_j (m_t·m_j) [(h_t·h_j)] from the pass's M_a M_bᵀ
            if g is not other.gram or self.part != other.part:
                raise TypeError("two head uses pair only within one head pass and for one parameter")
            mm = g.mm.get((self.side, other.side))
            if mm is None and (other.side, self.side) in g.mm:
                mm = g.mm[(other.side, self.side)].t()
            if mm is None:
                raise ValueError(f"the head pass holds no Gram matrix for the sides ({self.side}, {other.side})")
            if self.part == "weight":
                mm = mm * (g.profiled(self.side) @ g.profiled(other.side).t())
            return g.scatter_valid(self.side, g.valid_coef(self.side, self.coef)
                                   * (mm @ g.valid_coef(other.side, other.coef)))
        if isinstance(other, Gathered) and self.part == "weight":
            # the weight tied to an embedding: row t is c_t Σ_k m_t[k] ⟨h_t, grad_other[k]⟩ over the rows k
            ids, rows = other.unique_rows()
            cols = g.columns(self.side, ids)  # [n, U]
            return g.scatter_valid(self.side, g.valid_coef(self.side, self.coef)
                                   * (cols * (g.profiled(self.side) @ rows.t())).sum(1))
        if isinstance(other, torch.Tensor):
            return g.rows_against(self.side, self.coef, self.part, _c(other))
        raise TypeError(f"the head's uses pair with dense gradients and head uses, not {type(other).__name__}")

    def rows_at(self, ids):
        if self.part != "weight":
            return super().rows_at(ids)
        return self.gram.weight_rows(self.side, self.coef, ids)

    def dense(self, n_samples, shape):
        return self.gram.gradient(self.side, self.coef, self.part, n_samples)


@dataclass
class SampleGrads(Use):
    grads: torch.Tensor  # [S, *shape]: sample s's gradient (S = 1: the whole gradient)

    @property
    def n_rows(self):
        return self.grads.shape[0]

    def partner(self):
        return self.grads.sum(0)

    def row_dots(self, other):
        if not isinstance(other, torch.Tensor):
            other = other.dense(1, self.grads.shape[1:])[0]
        return _row_sums(_c(self.grads) * _c(other).unsqueeze(0))

    def dense(self, n_samples, shape):
        if self.grads.shape[0] == n_samples:
            return _c(self.grads)
        if n_samples == 1:
            return _c(self.grads).sum(0, keepdim=True)
        raise ValueError(f"a gradient held for {self.grads.shape[0]} samples cannot be split into {n_samples}")


@dataclass
class SampleScaled(Use):
    base: Use  # a use whose rows are [n_samples, rows per sample] flattened
    scale: torch.Tensor  # [n_samples] float64

    @property
    def n_rows(self):
        return self.base.n_rows

    def row_scale(self, dtype):
        """The factor of each row of ``base``."""
        return self.scale.to(dtype).repeat_interleave(self.base.n_rows // self.scale.shape[0])

    def explicit(self) -> Use:
        """The same gradient as a use of the base's kind, its rows scaled (one more buffer of rows)."""
        return self.base.scale_rows(self.row_scale(torch.float64))

    def row_dots(self, other):
        return self.base.row_dots(other) * self.row_scale(torch.float64)

    def dense(self, n_samples, shape):
        base = self.base.dense(self.scale.shape[0], shape)
        scaled = base * self.scale.to(base.dtype).reshape(-1, *([1] * (base.dim() - 1)))
        return scaled if n_samples == self.scale.shape[0] else scaled.sum(0, keepdim=True)


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


def _rows_of(b, ids):
    """Rows ``ids`` (sorted, unique) of the gradient ``b``, a dense tensor or a use, ``[len(ids), q]``."""
    if isinstance(b, torch.Tensor):
        return _c(b[ids])
    return b.rows_at(ids)


def row_dots(a: Use, b) -> torch.Tensor:
    """Each row's share of ⟨∇_a, ∇_b⟩, float64 ``[a.n_rows]``; ``b`` is a dense gradient or a use."""
    return a.row_dots(b.partner() if isinstance(b, Use) else b)


def sample_rows(use: Use, start: int, stop: int, n_samples: int) -> Use:
    """The part of ``use`` that samples ``start:stop`` of its ``n_samples`` contributed (a stacked batch's side)."""
    return use.split(start, stop, n_samples)


def dense_dot(dense, b) -> torch.Tensor:
    """⟨D, ∇_b⟩ as a float64 scalar, for a gradient held densely on the first side."""
    if isinstance(b, torch.Tensor):
        return (_c(dense) * _c(b)).sum(dtype=torch.float64)
    return row_dots(b, dense).sum()


def sample_dense(use, n_samples: int, shape) -> torch.Tensor:
    """The dense gradient per sample of a use or a dense gradient, ``[n_samples, *shape]`` (``n_samples=1``: the
    whole gradient); a use's rows are its samples' rows one after the other."""
    if isinstance(use, torch.Tensor):
        if n_samples != 1:
            raise ValueError("a dense gradient cannot be split by samples")
        return _c(use).unsqueeze(0)
    return use.dense(n_samples, shape)
