"""The LM head of `GEffectProfiler.measure_unlearning`: one pass over the head for both batches.

For the rows ``h_t`` of one or more *sides* (the forget batch, the retain batch) and the head
``z = softcap(W h + b)``, every token objective's logits cotangent is ``c_t · m_t`` with
``m_t = (onehot(y_t) − softmax(z_t)) ⊙ dz/du`` (DESIGN §2) and a coefficient ``c_t`` known only once the
log-probabilities are. Either pass gives ``lse_t`` and ``ℓ_t`` (hence the coefficients) and
``d_t = m_t W``, the hidden-state cotangent per unit coefficient (an objective's ``dh_t = c_t d_t``: the
decoder's backward starts there). For the head's own inner products (DESIGN §4) the two passes differ:

- `head_pass` (Gram form): vocabulary chunks with an online softmax (running max per row, accumulators
  rescaled as it grows) accumulate ``M_x M_yᵀ`` for pairs of sides, so that
  ⟨∇W_a, ∇W_b⟩ = Σ_ij c_a,i c_b,j (m_i·m_j)(h_i·h_j) without any V×H gradient; the onehot parts of ``m`` are
  added afterwards from the label logits. Cost ∝ n_x n_y V per pair: cheap for short batches.
- `head_projection_pass` (projection form): row chunks over the whole vocabulary (exact softmax) also
  accumulate the risks' dense head gradients ``Σ_t c_t m_t h_tᵀ`` (coefficients known up front: the NLL's),
  per sample on the forget side, so that an objective whose coefficients are a per-sample multiple of the
  forget NLL's (GA, NPO, SimNPO) gets its head gradient by scaling. Cost ∝ N V H: a training step's.

`head_costs` is the cost model that picks one; `HeadGram.gradient` is the dense head gradient of any
coefficients (one more pass over that side's rows), for objectives with their own token weights.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .. import hf
from ..backends.autograd import CHUNK_BYTES, compute_dtype, logits_grad_, soft_cap_
from ..backends.cpp import build
from . import inner
from .buffers import BufferPool

# Logits per vocabulary chunk on the CPU: small enough to stay in cache while two matmuls read its exp (D and the
# Gram), large enough to keep those matmuls efficient (benchmarks/test_geffect.py; docs/DESIGN.md §4).
CPU_CHUNK_ELEMENTS = 1 << 20
# Logits per row chunk of the projection pass: the fused losses' budget (64 MiB of float32). Each chunk adds its
# rows into V×H per-sample gradients, a memory-bound update that larger chunks amortize, for a larger buffer
# (benchmarks/test_geffect.py; docs/DESIGN.md §4, "The rest is the allocator").
ROW_CHUNK_ELEMENTS = CHUNK_BYTES // 4
# Largest per-sample dense head gradient held (elements): beyond it the forget side's is held whole.
SAMPLE_GRAD_ELEMENTS = 1 << 29
# What one element of a dense head gradient held by the projection form costs, in flops: it is written by
# memory-bound updates (a chunk's rows of one sample, often few) and read back by the inner products. It sets
# where the cost model leaves the Gram form for the projection form: fitted on the CPU, with the buffers from the
# profiler's pool, between the shapes where each form was the faster (benchmarks/test_geffect.py;
# docs/DESIGN.md §4); unmeasured on a GPU.
HELD_ELEMENT_FLOPS = 150


class ProfiledHead(NamedTuple):
    """The head as the passes see it: ``weight`` the one the logits come from ([W, B] with a LoRA adapter on the
    head, `hf.LMHead.adapted`), ``columns`` its profiled columns, ``params`` {"weight"/"bias": (name, parameter)}
    of the profiled parameters (the adapter's B stands for "weight")."""
    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None
    columns: slice
    params: dict


def profiled_head(model, params: dict) -> ProfiledHead:
    """``model``'s LM head and which of its parameters are among ``params`` ({name: parameter})."""
    head = hf.lm_head(model)
    names = {id(p): n for n, p in params.items()}
    own = {role: (names[id(p)], p) for role, p in (("weight", head.weight), ("bias", head.bias))
           if p is not None and id(p) in names}
    if not head.adapters:
        return ProfiledHead(head.weight, head.bias, head.softcap, slice(None), own)
    adapted = [a.weight_b for a in head.adapters if id(a.weight_b) in names]
    if own or len(adapted) > 1:
        raise NotImplementedError("G-effects of a head with a LoRA adapter profile that adapter's B alone: "
                                  "freeze the head's own weight and bias, and keep one adapter active on it")
    columns = head.adapter_columns(adapted[0]) if adapted else slice(None)
    return ProfiledHead(head.adapted_weight(), head.bias, head.softcap, columns,
                        {"weight": (names[id(adapted[0])], adapted[0])} if adapted else {})


def head_rows(model, input_ids, attention_mask=None) -> torch.Tensor:
    """The rows the head multiplies: the decoder's final hidden states, with a LoRA adapter on the head the
    concatenation [h, s·A h] (`hf.LMHead.adapted`; A runs here, under a capture, as any hooked layer)."""
    return hf.lm_head(model).adapted(hf.final_hidden_states(model, input_ids, attention_mask))[0]


@dataclass
class HeadGram:
    """One head pass's results, shared by the `inner.HeadRows` uses that point at it (per side)."""
    weight: torch.Tensor  # [V, H], detached
    bias: torch.Tensor | None
    softcap: float | None
    hidden: dict = field(default_factory=dict)  # side -> [n, H] valid rows, compute dtype
    rows: dict = field(default_factory=dict)  # side -> [n] positions of those rows among the side's rows
    samples: dict = field(default_factory=dict)  # side -> (number of samples, positions per sample)
    labels: dict = field(default_factory=dict)  # side -> [n]
    lse: dict = field(default_factory=dict)  # side -> [n]
    logprobs: dict = field(default_factory=dict)  # side -> [n]
    direction: dict = field(default_factory=dict)  # side -> [n, H]: d_t = m_t W
    mm: dict = field(default_factory=dict)  # (side, side) -> [n_x, n_y]: M_x M_yᵀ (Gram form)
    risk_grads: dict = field(default_factory=dict)  # side -> (weight [S, V, H], bias [S, V] | None) (projection)
    pool: BufferPool | None = None  # where the large buffers come from (`buffers`), else fresh ones
    # the weight's columns whose gradient is profiled: all of them, or a LoRA adapter's B where the hidden rows
    # and the weight are the concatenations of `hf.LMHead.adapted` (the hidden rows' matching columns are s·A h)
    profiled_columns: slice = field(default_factory=lambda: slice(None))
    _grads: dict = field(default_factory=dict)  # gradient() cache: (side, id(coef), n_samples) -> (w, b)

    def empty(self, shape, dtype):
        """A buffer on the weight's device, the pool's where there is one."""
        if self.pool is None:
            return torch.empty(shape, dtype=dtype, device=self.weight.device)
        return self.pool.empty(shape, dtype, self.weight.device)

    def profiled(self, side):
        """The side's hidden rows in the profiled columns: the inputs of the profiled weight, ``[n, H]``."""
        return self.hidden[side][:, self.profiled_columns]

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

    def valid_coef(self, side, coef):
        """``coef`` (over all the side's positions) on its valid rows, in the compute dtype."""
        return coef.reshape(-1)[self.rows[side]].to(self.hidden[side].dtype)

    def scatter_valid(self, side, values):
        """Values on the side's valid rows scattered into all of its positions (0 elsewhere), float64."""
        out = torch.zeros(self.samples[side][0] * self.samples[side][1], dtype=torch.float64,
                          device=values.device)
        return out.index_copy_(0, self.rows[side], values.to(torch.float64))

    def weight_rows(self, side, coef, ids):
        """Rows ``ids`` of the weight gradient with coefficients ``coef``: Σ_t c_t m_t[ids] h_t, ``[len(ids), H]``."""
        return (self.columns(side, ids) * self.valid_coef(side, coef).unsqueeze(1)).t() @ self.profiled(side)

    def rows_against(self, side, coef, part, dense):
        """Row t: c_t m_tᵀ D h_t (weight) or c_t m_tᵀ D (bias), a chunk of rows at a time."""
        h, c = self.hidden[side], self.valid_coef(side, coef)
        out = torch.empty(h.shape[0], dtype=torch.float64, device=h.device)
        chunks = list(_row_chunks(h.shape[0], self.weight.shape[0]))
        scratch = logits_scratch(chunks, self)
        for rows in chunks:
            m, _, _ = unit_cotangent(h[rows], self.weight, self.bias, self.softcap, self.labels[side][rows],
                                     self.lse[side][rows], scratch)
            proj = h[rows][:, self.profiled_columns] @ dense.t() if part == "weight" else dense.unsqueeze(0)
            out[rows] = _row_sums_f64(m * proj) * c[rows].to(torch.float64)
        return self.scatter_valid(side, out)

    def gradient(self, side, coef, part, n_samples):
        """The head gradient with coefficients ``coef`` on ``side``, ``[n_samples, V, H]`` (weight) or
        ``[n_samples, V]`` (bias): one pass over the side's rows (cached for the other part)."""
        key = (side, id(coef), n_samples)
        if key not in self._grads:
            self._grads[key] = _accumulate(self, {side: (self.valid_coef(side, coef), n_samples)})[side]
        weight, bias = self._grads[key]
        return weight if part == "weight" else bias

    def sample_ids(self, side, n_samples):
        """The sample (of ``n_samples`` splitting the side's positions) of each valid row."""
        per = self.samples[side][0] * self.samples[side][1] // n_samples
        return self.rows[side] // per


def _row_sums_f64(t):
    return t.reshape(t.shape[0], -1).sum(1, dtype=torch.float64)


def _sample_runs(sample):
    """[(sample, first row, stop row)] of each run of rows of one sample (``sample``: each row's, sorted), read
    to the host once: the chunks of a pass are then cut without waiting for a GPU."""
    ids, counts = torch.unique_consecutive(sample, return_counts=True)
    counts = counts.tolist()
    return [(k, stop - n, stop) for k, n, stop in zip(ids.tolist(), counts, itertools.accumulate(counts))]


def _runs_in(runs, rows):
    """(sample, rows within the chunk) of each run that meets the chunk ``rows`` (a slice)."""
    return [(k, slice(max(first, rows.start) - rows.start, min(stop, rows.stop) - rows.start))
            for k, first, stop in runs if first < rows.stop and stop > rows.start]


def _row_chunks(n_rows, vocab, runs=None):
    """Slices of rows whose logits fit in `ROW_CHUNK_ELEMENTS`; with ``runs`` (`_sample_runs`) a chunk holds
    whole samples, as many as fit, or one part of a sample too long for one chunk (its rows split into
    equal parts): each sample's gradient then takes as few chunk products as it can."""
    step = max(1, ROW_CHUNK_ELEMENTS // max(1, vocab))
    bounds = [0, n_rows] if runs is None else [0, *(stop for _, _, stop in runs)]
    start = 0  # the open chunk: whole samples from `start` on
    for a, b in zip(bounds, bounds[1:]):
        if b - start <= step:
            continue
        if a > start:
            yield slice(start, a)
        pieces = -(-(b - a) // step)
        edges = [a + (b - a) * i // pieces for i in range(pieces + 1)]
        for lo, hi in zip(edges, edges[1:-1]):
            yield slice(lo, hi)
        start = edges[-2]  # the last part stays open: whole samples after it may join it
    if start < n_rows:
        yield slice(start, n_rows)


def _row_kernels(z):
    """The C++ row kernels (`backends.cpp`, built on first use like the ``cpp_cpu`` loss backend) for CPU
    logits in float32/float64 when the extension loads, else None (the torch ops below): two passes over a
    chunk's logits instead of about six."""
    if z.device.type != "cpu" or z.dtype not in (torch.float32, torch.float64) or not build.available("cpu"):
        return None
    return build.load("cpu")


def logits_scratch(chunks, gram):
    """A reusable buffer for `unit_cotangent`'s logits of the longest of ``chunks`` (row slices), or None where
    there are none or the logits come out of a 16-bit matmul (converted, a fresh buffer each time). Reusing
    one buffer matters on the CPU: a fresh 64 MiB buffer per chunk is fresh pages from the OS each time, whose
    faults cost the pass time (docs/DESIGN.md §4; the held gradients come from `buffers.BufferPool`)."""
    rows, weight = max((r.stop - r.start for r in chunks), default=0), gram.weight
    if rows == 0 or compute_dtype(weight.dtype) != weight.dtype:
        return None
    return gram.empty((rows, weight.shape[0]), weight.dtype)


def unit_cotangent(h, weight, bias, softcap, labels, lse=None, scratch=None):
    """m = (onehot(y) − softmax(z)) ⊙ dz/du for the rows ``h`` over the whole vocabulary, in place of one
    logits buffer (``scratch``'s first rows, else fresh; compute dtype); also the rows' LSE (computed when
    not given) and, with it, their log-probabilities (None when the LSE is given)."""
    cd = compute_dtype(weight.dtype)
    if scratch is not None:
        z = torch.mm(h, weight.t(), out=scratch[:h.shape[0]])
    else:
        z = (h.to(weight.dtype) @ weight.t()).to(cd)
    if bias is not None:
        z += bias.to(cd)
    ext = _row_kernels(z)
    if ext is not None:  # the kernels take the logits before the cap and apply it themselves
        cap = 0.0 if softcap is None else float(softcap)
        logprobs = None
        if lse is None:
            logprobs, lse = ext.row_logprobs(z, labels, -1, cap)
        ext.row_grad(z, z, labels, lse.contiguous(), torch.ones_like(lse), -1, cap)
        return z, lse, logprobs
    z, slope = soft_cap_(z, softcap)
    ones = torch.ones(z.shape[0], dtype=cd, device=z.device)
    if lse is None:
        z_y = z.gather(1, labels.unsqueeze(1)).squeeze(1)
        top = z.amax(1, keepdim=True)
        e = z.sub_(top).exp_()
        total = e.sum(1)
        lse = top.squeeze(1) + total.log()
        return logits_grad_(e, labels, ones, slope, row_sums=total), lse, z_y - lse
    return logits_grad_(z.sub_(lse.unsqueeze(1)).exp_(), labels, ones, slope), lse, None


def _accumulate(gram, targets, record=False):
    """Dense head gradients Σ_t c_t m_t h_tᵀ (and Σ_t c_t m_t for a bias) per sample, for ``targets``
    ``{side: (coefficients on its valid rows, n_samples)}``, in row chunks over the whole vocabulary.

    With ``record`` (the projection pass) the sides are all of ``gram``'s, whose LSE, log-probabilities and
    hidden-state directions d_t = m_t W are filled in on the way; otherwise the LSE is read."""
    w = gram.weight
    cd = compute_dtype(w.dtype)
    out = {}
    width = len(range(w.shape[1])[gram.profiled_columns])
    for side, (coef, n_samples) in targets.items():
        shape = (n_samples, w.shape[0], width)
        out[side] = (gram.empty(shape, cd), None if gram.bias is None else gram.empty(shape[:2], cd))
    written = {side: set() for side in targets}  # samples whose gradient holds a first chunk (else unset)
    runs = {side: _sample_runs(gram.sample_ids(side, targets[side][1])) if side in targets else None
            for side in (gram.hidden if record else targets)}
    chunks = {side: list(_row_chunks(gram.hidden[side].shape[0], w.shape[0], side_runs))
              for side, side_runs in runs.items()}
    scratch = logits_scratch([r for rows in chunks.values() for r in rows], gram)
    for side in runs:
        h, labels = gram.hidden[side], gram.labels[side]
        if record:
            gram.lse[side] = torch.empty(h.shape[0], dtype=cd, device=w.device)
            gram.logprobs[side] = torch.empty_like(gram.lse[side])
            gram.direction[side] = torch.empty(h.shape, dtype=cd, device=w.device)
        for rows in chunks[side]:
            m, lse, logprobs = unit_cotangent(h[rows], w, gram.bias, gram.softcap, labels[rows],
                                              None if record else gram.lse[side][rows], scratch)
            m_low = m if m.dtype == w.dtype else m.to(w.dtype)
            if record:
                gram.lse[side][rows], gram.logprobs[side][rows] = lse, logprobs
                if m_low.dtype == cd:
                    torch.mm(m_low, w, out=gram.direction[side][rows])
                else:
                    gram.direction[side][rows] = (m_low @ w).to(cd)
            if side not in targets:
                continue
            coef = targets[side][0][rows]
            weighted = (h[rows][:, gram.profiled_columns] * coef.unsqueeze(1)).to(w.dtype)
            grad_w, grad_b = out[side]
            for k, seg in _runs_in(runs[side], rows):  # the chunk's rows of each sample
                beta = 1 if k in written[side] else 0  # 0: the buffer's content is ignored (no zero fill)
                written[side].add(k)
                if m_low.dtype == cd:
                    grad_w[k].addmm_(m_low[seg].t(), weighted[seg], beta=beta)  # in place: no V×H temporary
                elif beta:
                    grad_w[k] += (m_low[seg].t() @ weighted[seg]).to(cd)
                else:
                    grad_w[k] = (m_low[seg].t() @ weighted[seg]).to(cd)
                if grad_b is not None:
                    grad_b[k].addmv_(m[seg].t(), coef[seg], beta=beta)
    for side, (grad_w, grad_b) in out.items():
        for k in set(range(grad_w.shape[0])) - written[side]:  # samples without a valid row
            grad_w[k].zero_()
            if grad_b is not None:
                grad_b[k].zero_()
    return out


def _valid_rows(gram, sides, dtype):
    """Fill ``gram``'s rows, samples, labels and hidden rows from ``sides``; returns the rows as blocks."""
    blocks = []
    for name, (hidden, labels, valid) in sides.items():
        rows = valid.reshape(-1).nonzero().squeeze(1)
        gram.rows[name] = rows
        gram.samples[name] = tuple(valid.shape) if valid.dim() == 2 else (1, valid.numel())
        gram.labels[name] = labels.reshape(-1)[rows]
        blocks.append(hidden.reshape(-1, hidden.shape[-1])[rows].to(dtype))
    return blocks


@torch.no_grad()
def head_projection_pass(weight, bias, softcap, sides: dict, risk_coefs: dict, per_sample=(),
                         pool: BufferPool | None = None, columns: slice = slice(None)) -> HeadGram:
    """The projection-form pass for ``sides`` ({name: (hidden rows [B, T, H], labels [B, T], valid [B, T])}):
    log-probabilities, directions, and the dense head gradients of ``risk_coefs`` ({name: coefficients
    [B, T], known before the pass}), per sample for the sides in ``per_sample``, whole for the others; the
    V-sized buffers from ``pool`` where given; ``columns``: the profiled columns of the weight (`HeadGram`)."""
    w = weight.detach()
    cd = compute_dtype(w.dtype)
    gram = HeadGram(w, None if bias is None else bias.detach().to(cd), softcap, pool=pool, profiled_columns=columns)
    for name, block in zip(sides, _valid_rows(gram, sides, cd)):
        gram.hidden[name] = block
    targets = {name: (gram.valid_coef(name, coef), gram.samples[name][0] if name in per_sample else 1)
               for name, coef in risk_coefs.items()}
    gram.risk_grads = _accumulate(gram, targets, record=True)
    return gram


def per_sample_fits(n_samples, vocab, hidden) -> bool:
    """Whether a side's head gradient can be held per sample (`SAMPLE_GRAD_ELEMENTS`)."""
    return n_samples * vocab * hidden <= SAMPLE_GRAD_ELEMENTS


def head_costs(counts: dict, pairs, vocab: int, hidden: int, objective_rows: int, held: int) -> dict:
    """Estimated flops of the head's share of a measurement in each form: ``{"gram": ..., "projection": ...}``.

    ``counts``: valid rows per side; ``pairs``: the (side, side) pairs whose inner products are wanted;
    ``objective_rows``: rows of a second pass over the forget side that the projection form needs for an
    objective whose coefficients are not a per-sample multiple of the forget NLL's (0 otherwise);
    ``held``: the V×H gradients the projection form holds (per sample where needed).
    Both passes compute the logits and d = M W (2 matmuls over all rows); the Gram form adds, per pair,
    the e_x e_yᵀ product and the hidden-state and label-column Gram matrices; the projection form adds the
    risks' gradients (one matmul over all rows), the objective's (logits again and its gradient) and the
    memory traffic of the gradients it holds (`HELD_ELEMENT_FLOPS`). A pair whose Gram matrix would exceed
    4 `inner.TILE_ELEMENTS` is not held: the Gram form is then ruled out.
    """
    unit = 2 * vocab * hidden  # flops of one row through one V×H matmul
    rows = sum(counts.values())
    gram = 2 * rows * unit + sum(2 * counts[x] * counts[y] * (vocab + 3 * hidden) for x, y in pairs)
    if any(counts[x] * counts[y] > 4 * inner.TILE_ELEMENTS for x, y in pairs):
        gram = float("inf")
    projection = 3 * rows * unit + 2 * objective_rows * unit + HELD_ELEMENT_FLOPS * held * vocab * hidden
    return {"gram": gram, "projection": projection}


@torch.no_grad()
def head_pass(weight, bias, softcap, sides: dict, pairs=(), columns: slice = slice(None)) -> HeadGram:
    """The Gram-form pass for ``sides`` ({name: (hidden rows [B, T, H], labels [B, T], valid [B, T] bool)};
    ``[N, H]``, ``[N]``, ``[N]`` for one sample).

    Only valid rows enter; ``pairs`` lists the (side, side) pairs whose ``M_x M_yᵀ`` to accumulate.
    Matmuls run in the weight's dtype, the softmax and the accumulators in float32 (float64 for float64);
    ``columns``: the profiled columns of the weight (`HeadGram`).
    """
    w = weight.detach()
    cd = compute_dtype(w.dtype)
    b = None if bias is None else bias.detach().to(cd)
    gram = HeadGram(w, None if bias is None else bias.detach(), softcap, profiled_columns=columns)
    names, blocks = list(sides), _valid_rows(gram, sides, w.dtype)
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
