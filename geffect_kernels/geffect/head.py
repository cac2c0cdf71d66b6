"""The LM head of `GEffectProfiler.measure_unlearning` in one pass over the vocabulary.

For the rows ``h_t`` of one or more *sides* (the forget batch, the retain batch) and the head
``z = softcap(W h + b)``, every token objective's logits cotangent is ``c_t · m_t`` with
``m_t = (onehot(y_t) − softmax(z_t)) ⊙ dz/du`` (DESIGN §2) and a coefficient ``c_t`` known only once the
log-probabilities are. So one pass, before any coefficient is known, gives everything:

- ``lse_t`` and ``ℓ_t`` (the log-probabilities, hence the coefficients);
- ``d_t = m_t W``, the hidden-state cotangent per unit coefficient: an objective's ``dh_t = c_t d_t`` (the
  decoder's backward starts there; neither the logits' backward nor the dense head gradient runs);
- ``(M_x M_yᵀ)`` for the requested pairs of sides, so that two head gradients' inner product is the Gram
  form of DESIGN §4 without the V×H gradients: ⟨∇W_a, ∇W_b⟩ = Σ_ij c_a,i c_b,j (m_i·m_j)(h_i·h_j).

The pass walks the vocabulary in chunks with an online softmax (running max per row, accumulators rescaled
as it grows), so the logits are computed once and no buffer larger than one chunk of logits is held.
The onehot parts of ``m`` are added afterwards from the label logits (``h · W[y]``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..backends.autograd import compute_dtype, soft_cap_
from . import inner


# Logits per vocabulary chunk on the CPU: a cache-sized chunk, whose exp two matmuls then read (D and the Gram),
# runs ~20% faster than a 4M-element one (2 cores, H 256, V 32000, 2×126 rows).
CPU_CHUNK_ELEMENTS = 1 << 20


@dataclass
class HeadGram:
    """One head pass's results, shared by the `inner.HeadRows` uses that point at it (per side)."""
    weight: torch.Tensor  # [V, H], detached
    bias: torch.Tensor | None
    softcap: float | None
    hidden: dict = field(default_factory=dict)  # side -> [n, H] valid rows, compute dtype
    rows: dict = field(default_factory=dict)  # side -> [n] positions of those rows among the side's rows
    labels: dict = field(default_factory=dict)  # side -> [n]
    lse: dict = field(default_factory=dict)  # side -> [n]
    logprobs: dict = field(default_factory=dict)  # side -> [n]
    direction: dict = field(default_factory=dict)  # side -> [n, H]: d_t = m_t W
    mm: dict = field(default_factory=dict)  # (side, side) -> [n_x, n_y]: M_x M_yᵀ

    def logits(self, side, ids, per_row=False):
        """(z, dz/du or None) of ``side``'s rows at vocabulary entries ``ids``: ``[n, U]``, or ``[n]`` with
        ``per_row`` (entry ``ids[i]`` for row i)."""
        w = self.weight[ids].to(self.hidden[side].dtype)
        if per_row:
            z = (self.hidden[side] * w).sum(1)
        else:
            z = self.hidden[side] @ w.t()
        if self.bias is not None:
            z = z + self.bias[ids].to(z.dtype)
        return soft_cap_(z, self.softcap)

    def columns(self, side, ids):
        """M_side[:, ids] (``[n, U]``), ``ids`` a 1-D tensor of vocabulary entries."""
        z, slope = self.logits(side, ids)
        m = (self.labels[side].unsqueeze(1) == ids.unsqueeze(0)).to(z.dtype) - torch.exp(
            z - self.lse[side].unsqueeze(1))
        return m if slope is None else m * slope


def gram_pays(n_a: int, n_b: int, vocab: int, hidden: int) -> bool:
    """Whether the pair's head inner product is cheaper in the pass (Gram form) than by projection.

    Gram: the pass's ``e_x e_yᵀ`` and the hidden Gram, 2 n_a n_b (V + H) flops and an n_a×n_b accumulator.
    Projection (`inner.row_dots` falls back to it): the b side's dense V×H gradient (logits again, Mᵀh) and
    a's rows against it (logits again, h Dᵀ), about 4 (n_a + n_b) V H flops and a V×H buffer.
    """
    if n_a * n_b > 4 * inner.TILE_ELEMENTS:
        return False
    return n_a * n_b * (vocab + hidden) <= 2 * (n_a + n_b) * vocab * hidden


@torch.no_grad()
def head_pass(weight, bias, softcap, sides: dict, pairs=()) -> HeadGram:
    """Run the pass for ``sides`` ({name: (hidden rows [N, H], labels [N], valid [N] bool)}).

    Only valid rows enter; ``pairs`` lists the (side, side) pairs whose ``M_x M_yᵀ`` to accumulate.
    Matmuls run in the weight's dtype, the softmax and the accumulators in float32 (float64 for float64).
    """
    w = weight.detach()
    cd = compute_dtype(w.dtype)
    b = None if bias is None else bias.detach().to(cd)
    gram = HeadGram(w, None if bias is None else bias.detach(), softcap)
    names, blocks = list(sides), []
    for name in names:
        hidden, labels, valid = sides[name]
        rows = valid.reshape(-1).nonzero().squeeze(1)
        gram.rows[name] = rows
        gram.labels[name] = labels.reshape(-1)[rows]
        blocks.append(hidden.reshape(-1, hidden.shape[-1])[rows].to(w.dtype))
    h = torch.cat(blocks)
    offsets = dict(zip(names, torch.tensor([0] + [x.shape[0] for x in blocks]).cumsum(0).tolist()))
    span = {name: slice(offsets[name], offsets[name] + block.shape[0]) for name, block in zip(names, blocks)}
    n, vocab = h.shape[0], w.shape[0]

    m = torch.full((n,), -torch.inf, dtype=cd, device=w.device)
    s = torch.zeros(n, dtype=cd, device=w.device)
    acc = torch.zeros(n, w.shape[1], dtype=cd, device=w.device)
    # One accumulator per first side over a contiguous run of second sides (one larger matmul per chunk).
    blocks_of = {}
    for x, y in pairs:
        blocks_of.setdefault(x, []).append(y)
    accs = {}
    for x, ys in blocks_of.items():
        ys = sorted(set(ys), key=names.index)
        runs = [[ys[0]]]
        for y in ys[1:]:
            if names.index(y) == names.index(runs[-1][-1]) + 1:
                runs[-1].append(y)
            else:
                runs.append([y])
        for run in runs:
            cols = slice(span[run[0]].start, span[run[-1]].stop)
            accs[(x, tuple(run))] = (cols, torch.zeros(span[x].stop - span[x].start, cols.stop - cols.start,
                                                       dtype=cd, device=w.device))
    chunk_elements = min(inner.TILE_ELEMENTS, CPU_CHUNK_ELEMENTS if w.device.type == "cpu" else inner.TILE_ELEMENTS)
    chunk = max(1, min(vocab, chunk_elements // max(1, n)))
    for v0 in range(0, vocab, chunk):
        wc = w[v0:v0 + chunk]
        z = (h @ wc.t()).to(cd)
        if b is not None:
            z += b[v0:v0 + chunk]
        z, slope = soft_cap_(z, softcap)
        m_new = torch.maximum(m, z.amax(1))
        alpha = torch.exp(m - m_new)  # 0 on the first chunk (m = -inf)
        m = m_new
        e = z.sub_(m.unsqueeze(1)).exp_()  # exp(z - m): in place of z
        s.mul_(alpha).add_(e.sum(1))
        if slope is not None:
            e.mul_(slope)
        acc.mul_(alpha.unsqueeze(1))
        # Half-precision weights: the matmuls at their speed, into float32 accumulators.
        e_low = None if wc.dtype == cd else e.to(wc.dtype)
        if e_low is None:
            acc.addmm_(e, wc)
        else:
            acc += (e_low @ wc).to(cd)
        for (x, _), (cols, a) in accs.items():
            a.mul_(alpha[span[x]].unsqueeze(1) * alpha[cols].unsqueeze(0))
            if e_low is None:
                a.addmm_(e[span[x]], e[cols].t())
            else:
                a += (e_low[span[x]] @ e_low[cols].t()).to(cd)
        del z, e, e_low, slope

    lse = m + torch.log(s)
    inv_s = 1 / s
    for name in names:
        gram.hidden[name] = h[span[name]].to(cd)
        gram.lse[name] = lse[span[name]]
    label_slope = {}
    for name in names:
        y = gram.labels[name]
        z_y, slope_y = gram.logits(name, y, per_row=True)
        label_slope[name] = torch.ones_like(z_y) if slope_y is None else slope_y
        gram.logprobs[name] = z_y - gram.lse[name]
        # d = m W = slope_y W[y] − (P ⊙ slope) W
        gram.direction[name] = label_slope[name].unsqueeze(1) * w[y].to(cd) - acc[span[name]] * inv_s[span[name]
                                                                                                     ].unsqueeze(1)
    for (x, y) in pairs:
        (cols, block), = [(c, a) for (x2, run), (c, a) in accs.items() if x2 == x and y in run]
        a = block[:, span[y].start - cols.start:span[y].stop - cols.start]
        # M_x M_yᵀ = [y_i = y_j] σ_i σ_j − σ_i P_y[j, y_i] − P_x[i, y_j] σ_j + P_x P_yᵀ  (σ: slope at the label,
        # P: softmax ⊙ slope)
        sx, sy = label_slope[x], label_slope[y]
        p_x_at_y = _soft_at(gram, x, gram.labels[y])  # [n_x, n_y]
        p_y_at_x = p_x_at_y if x == y else _soft_at(gram, y, gram.labels[x])  # [n_y, n_x]
        same = (gram.labels[x].unsqueeze(1) == gram.labels[y].unsqueeze(0)).to(cd)
        a.mul_(inv_s[span[x]].unsqueeze(1) * inv_s[span[y]].unsqueeze(0))
        a += same * (sx.unsqueeze(1) * sy.unsqueeze(0))
        a -= sx.unsqueeze(1) * p_y_at_x.t()
        a -= p_x_at_y * sy.unsqueeze(0)
        gram.mm[(x, y)] = a
    return gram


def _soft_at(gram, side, ids):
    """(softmax ⊙ dz/du) of ``side``'s rows at vocabulary entries ``ids``: ``[n, len(ids)]``."""
    z, slope = gram.logits(side, ids)
    p = torch.exp(z - gram.lse[side].unsqueeze(1))
    return p if slope is None else p * slope
