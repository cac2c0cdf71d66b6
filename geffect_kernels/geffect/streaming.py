"""Inner products taken inside the decoder's backward, one layer call at a time.

When one backward gives every gradient a measurement needs (one forward for all batches, and an objective
whose gradient is the forget risk's scaled sample by sample), a parameter that one layer call holds alone
has all its uses the moment that call's output gradient arrives (`capture.Capture.gradient(on_use=...)`).
Its inner products are taken then, in the form its cost model picks (`products`), and the output gradient
and the call's input are dropped at once: the backward's memory rises and falls as a training step's does,
instead of every layer's output gradient being held until the end.
"""
from __future__ import annotations

from . import products
from .inner import SampleScaled, sample_rows


class StreamedProducts:
    """An ``on_use`` for `Capture.gradient`: every pair's inner products of each parameter handed over.

    ``batches``: {gradient key: (first, stop) samples of the stacked batch}; ``scaled``: {gradient key:
    (key it is a per-sample multiple of, its factors)}; ``pairs`` and ``per_sample`` as for
    `products.parameter_products`; ``groups``: parameter name -> group.
    """

    def __init__(self, batches: dict, n_batch: int, scaled: dict, pairs, per_sample: dict, groups, device_types):
        self.batches, self.n_batch, self.scaled = batches, n_batch, scaled
        self.pairs, self.per_sample, self.groups, self.device_types = pairs, per_sample, groups, device_types
        self.entries, self.values = {}, {}  # name -> PlanEntry, name -> {pair: (value, per-sample values)}

    def __call__(self, name, param, use, rows_shape):
        uses = {key: sample_rows(use, *batch, self.n_batch) for key, batch in self.batches.items()}
        uses.update({key: SampleScaled(uses[of], scale) for key, (of, scale) in self.scaled.items()})
        parts = {key: [u] for key, u in uses.items()}
        with products.exact_arithmetic(self.device_types):
            entry = products.plan_parameter(name, self.groups[name], parts, self.pairs, param.numel(),
                                            self.per_sample)
            self.values[name] = products.parameter_products(entry, parts, self.pairs, param.shape, self.per_sample)
        self.entries[name] = entry
