"""Inner products taken inside the decoder's last backward, one layer call at a time.

A parameter that one layer call holds alone has every use the measurement needs the moment that call's
output gradient arrives in the last backward (`capture.Capture.gradient(on_use=...)`): the uses of the
gradients taken by earlier backwards are held, and the objective's gradient, when it is the forget risk's
scaled sample by sample, is a view of that. Its inner products are taken then, in the form its cost model
picks (`products`), and the output gradient, the call's input and the held uses are dropped at once: with one
forward and one backward (GA, NPO, SimNPO on stacked batches) the backward's memory rises and falls as a
training step's does, instead of every layer's output gradient being held until the end.
"""
from __future__ import annotations

from . import products
from .inner import SampleScaled, sample_rows


class StreamedProducts:
    """An ``on_use`` for `Capture.gradient`: every pair's inner products of each parameter handed over.

    ``arriving``: {gradient key: (first, stop) samples of the backward's stacked batch of ``n_batch``};
    ``scaled``: {gradient key: (arriving key it is a per-sample multiple of, the factors)}; ``held``:
    {gradient key: `FactoredGradient` of an earlier backward}, whose uses of each handed-over parameter are
    taken out; ``pairs`` and ``per_sample`` as for `products.parameter_products`; ``groups``: name -> group.
    """

    def __init__(self, arriving: dict, n_batch: int, scaled: dict, held: dict, pairs, per_sample: dict, groups,
                 device_types):
        self.arriving, self.n_batch, self.scaled, self.held = arriving, n_batch, scaled, held
        self.pairs, self.per_sample, self.groups, self.device_types = pairs, per_sample, groups, device_types
        self.entries, self.values = {}, {}  # name -> PlanEntry, name -> {pair: (value, per-sample values)}

    def __call__(self, name, param, use):
        parts = {key: [] for pair in self.pairs for key in pair}
        for key, grad in self.held.items():
            parts[key] = grad.uses.pop(name, [])
            grad.rows_shapes.pop(name, None)
        uses = {key: sample_rows(use, *batch, self.n_batch) for key, batch in self.arriving.items()}
        uses.update({key: SampleScaled(uses[of], scale) for key, (of, scale) in self.scaled.items()})
        parts.update({key: [u] for key, u in uses.items()})
        with products.exact_arithmetic(self.device_types):
            entry = products.plan_parameter(name, self.groups[name], parts, self.pairs, param.numel(),
                                            self.per_sample)
            self.values[name] = products.parameter_products(entry, parts, self.pairs, param.shape, self.per_sample)
        self.entries[name] = entry
