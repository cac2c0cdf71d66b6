"""Forward hooks that record what each layer's weight gradient is made of, and the backward that fills it in.

Inside ``with Capture(model, params):`` every call of an ``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Embedding`` or
elementwise-affine norm that owns a profiled parameter is recorded (its input and its output). `gradient`
then asks autograd for the gradients of those outputs only, so the weight-gradient matmuls never run, and
returns each parameter's gradient as a list of uses (`inner`). A parameter used anywhere the hooks did not
see (counted on the autograd graph) has its gradient taken densely instead, so the result is always exact.

``Capture(..., stream=True)`` also routes each recorded output through an identity (`_Tap`) whose backward
hands the output's gradient over as it arrives: `gradient(on_use=...)` then gives away the uses of every
parameter that one call holds alone and releases that call, so output gradients and inputs are freed
layer by layer as in a training step's backward instead of living until the end.
"""
from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.func import functional_call

from .inner import Factored, Gathered, Summed


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _is_affine_norm(module: nn.Module) -> bool:
    """A norm whose output is elementwise affine in its 1-D ``weight`` (and ``bias``)."""
    own = dict(module.named_parameters(recurse=False))
    weight = own.get("weight")
    return ("norm" in type(module).__name__.lower() and weight is not None and weight.dim() == 1
            and set(own) <= {"weight", "bias"} and all(p.shape == weight.shape for p in own.values()))


def module_kind(module: nn.Module) -> str | None:
    """The kind of layer whose weight gradient `Capture` can rebuild from its call, or None.

    A subclass that overrides ``forward`` is only trusted for embeddings, whose output is checked per call
    against a scalar multiple of the lookup (Gemma's scaled embedding); other overrides are left to the
    dense fallback.
    """
    conv1d = _conv1d_type()
    if isinstance(module, nn.Linear):
        return "linear" if type(module).forward is nn.Linear.forward else None
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d" if type(module).forward is conv1d.forward else None
    if isinstance(module, nn.Embedding) and module.max_norm is None and not module.scale_grad_by_freq \
            and not module.sparse:
        return "embedding"
    if _is_affine_norm(module):
        return "norm"
    return None


@dataclass
class _Call:
    module: nn.Module
    kind: str
    args: tuple | None  # None once released (its uses given away during a backward)
    kwargs: dict | None
    output: torch.Tensor | None
    rows_shape: tuple
    scale: torch.Tensor | None = None  # an embedding whose output is scale × the lookup
    version: int = field(init=False)  # the output's version counter when recorded

    def __post_init__(self):
        self.version = self.output._version

    def intact(self) -> bool:
        """Whether the output is still the layer's own: one modified in place later (``out.mul_(2)``) is not
        the tensor whose gradient the weight's is made of, and its parameters go to the dense fallback."""
        return self.output is not None and self.output._version == self.version

    def release(self):
        self.args = self.kwargs = self.output = self.scale = None


class _Tap(torch.autograd.Function):
    """Identity on a recorded output; its backward hands the output's gradient to ``capture`` (by call
    index). ``token`` is a leaf that every tap uses, so a backward asked for ``token`` runs every tap.
    The capture is held weakly: the graph must not keep the capture (and its calls' tensors) alive."""

    @staticmethod
    def forward(ctx, output, token, capture, index):
        ctx.capture, ctx.index = weakref.ref(capture), index
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        capture = ctx.capture()
        if capture is not None:
            capture._arrived(ctx.index, grad)
        return grad, None, None, None


@dataclass
class FactoredGradient:
    """One loss's gradient: per parameter name, a list of uses or (``dense``) a full tensor."""
    uses: dict[str, list] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    rows_shapes: dict[str, list] = field(default_factory=dict)  # per use: the [B, T, ...] shape of its rows


def graph_uses(root: torch.Tensor, params: dict[int, str]) -> Counter:
    """How many times each parameter (by id) enters the autograd graph of ``root``."""
    counts: Counter = Counter()
    seen, stack = set(), [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)  # AccumulateGrad: a leaf
            if variable is not None:
                if id(variable) in params:
                    counts[id(variable)] += 1
            else:
                stack.append(child)
    return counts


class Capture:
    """Record the layer calls of ``model`` that involve ``params`` (``{name: parameter}``)."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], stream: bool = False):
        self.params = params
        self.stream = stream
        self._token = torch.zeros((), requires_grad=True) if stream else None
        self._streaming = {}  # call index -> on_use, during a `gradient(on_use=...)`
        self._names = {id(p): n for n, p in params.items()}
        self._modules = [(m, kind) for m in model.modules() if (kind := module_kind(m)) is not None
                         and any(id(p) in self._names for p in m.parameters(recurse=False))]
        self.calls: list[_Call] = []
        self._handles = []
        self._batch = None  # batch size of the first embedding lookup

    def __enter__(self):
        for module, kind in self._modules:
            self._handles.append(module.register_forward_hook(self._hook(kind), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, kind):
        def record(module, args, kwargs, output):
            if not args and kwargs:  # called with keyword input: keep a positional view of it
                args, kwargs = (next(iter(kwargs.values())),), dict(list(kwargs.items())[1:])
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
                return None
            x = args[0]
            scale = None
            if kind == "embedding" and type(module).forward is not nn.Embedding.forward:
                scale = _embedding_scale(module, x, output)
                if scale is None:  # not a scaled lookup: leave this use to the dense fallback
                    return None
            if kind == "embedding" and x.dim() >= 2:
                if self._batch is None:
                    self._batch = x.shape[0]
                elif x.shape[0] == 1 < self._batch:
                    # Broadcast over the batch (position embeddings): expand so that its gradient keeps
                    # one row per sample (per-instance values) instead of arriving summed.
                    args = (x.expand(self._batch, *x.shape[1:]), *args[1:])
                    output = output.expand(self._batch, *output.shape[1:])
            x = args[0]
            rows_shape = tuple(x.shape if kind == "embedding" else x.shape[:-1])
            if self.stream:
                output = _Tap.apply(output, self._token, self, len(self.calls))
            self.calls.append(_Call(module, kind, tuple(args), kwargs, output, rows_shape, scale))
            return output
        return record

    def _call_params(self, call):
        """(name, parameter, role) of the profiled parameters this call uses."""
        for role in ("weight", "bias"):
            p = getattr(call.module, role, None)
            if isinstance(p, nn.Parameter) and id(p) in self._names:
                yield self._names[id(p)], p, role

    def fully_captured(self, root) -> bool:
        """Whether every profiled parameter in ``root``'s graph is used there through recorded calls only."""
        captured = Counter(id(p) for call in self.calls if call.intact() for _, p, _ in self._call_params(call))
        in_graph = graph_uses(root, self._names)
        return all(captured[key] == count for key, count in in_graph.items())

    def gradient(self, root, grad_output=None, *, graph_root=None, dense=(), retain_graph=False, on_use=None,
                 hold=()) -> FactoredGradient:
        """Backpropagate ``grad_output`` from ``root`` and return the profiled parameters' gradient.

        Coverage is checked on the graph of ``graph_root`` (default ``root``): a parameter whose uses there
        were all recorded is returned as uses, one with unrecorded uses (or named in ``dense``) densely,
        with its uses anywhere between ``graph_root`` and ``root`` included. Uses that lie only between
        the two (the fused head) are left to the caller.

        ``on_use(name, parameter, use)`` (with ``stream=True``): a factored parameter that one
        recorded call holds alone (and is not in ``hold``) is given to it during the backward, as that
        call's output gradient arrives, and is left out of the result; the call is then released.
        """
        if any(call.output is None for call in self.calls):
            raise RuntimeError("this capture's calls were released by a streamed backward")
        captured = Counter(id(p) for call in self.calls if call.intact() for _, p, _ in self._call_params(call))
        in_graph = graph_uses(graph_root if graph_root is not None else root, self._names)
        factored = {n for n, p in self.params.items() if captured[id(p)] == in_graph[id(p)] > 0
                    and n not in dense}
        dense_names = [n for n, p in self.params.items()
                       if n in dense or (n not in factored and in_graph[id(p)] > 0)]
        indices = [i for i, c in enumerate(self.calls)
                   if c.intact() and any(n in factored for n, _, _ in self._call_params(c))]
        if on_use is not None:
            if not self.stream:
                raise ValueError("on_use needs a Capture(..., stream=True)")
            alone = lambda call: all(n in factored and n not in hold and captured[id(p)] == 1
                                     for n, p, _ in self._call_params(call))
            self._streaming = {i: on_use for i in indices if alone(self.calls[i])}
        calls = [self.calls[i] for i in indices if i not in self._streaming]
        try:
            grads = torch.autograd.grad(
                root, [c.output for c in calls] + [self.params[n] for n in dense_names]
                + ([self._token] if self._streaming else []), grad_output, retain_graph=retain_graph,
                allow_unused=True)
        finally:
            self._streaming = {}
        result = FactoredGradient()
        for name, g in zip(dense_names, grads[len(calls):]):
            if g is not None:
                result.dense[name] = g
        for call, g in zip(calls, grads[:len(calls)]):
            if g is None:
                continue
            for name, param, role in self._call_params(call):
                if name in factored:
                    result.uses.setdefault(name, []).append(self._use(call, g, param, role))
                    result.rows_shapes.setdefault(name, []).append(tuple(call.rows_shape))
        return result

    def _arrived(self, index, grad):
        """A tap's backward: give the uses of a streamed call to its ``on_use`` and release the call."""
        on_use = self._streaming.pop(index, None)
        if on_use is None:
            return
        call = self.calls[index]
        for name, param, role in self._call_params(call):
            on_use(name, param, self._use(call, grad, param, role))
        call.release()

    @staticmethod
    def _use(call, g, param, role):
        x = call.args[0]
        g_rows = g.reshape(-1, g.shape[-1])
        if call.kind == "embedding":
            ids = x.reshape(-1)
            if call.scale is not None:
                g_rows = g_rows * call.scale.to(g_rows.dtype)
            if call.module.padding_idx is not None:  # that row gets no gradient
                g_rows = torch.where((ids == call.module.padding_idx).unsqueeze(1), 0, g_rows)
            return Gathered(ids, g_rows)
        if role == "bias" and call.kind != "norm":
            return Summed(g_rows)
        if call.kind == "linear":
            return Factored(g_rows, x.reshape(-1, x.shape[-1]))
        if call.kind == "conv1d":
            return Factored(x.reshape(-1, x.shape[-1]), g_rows)
        return Summed(g_rows * _norm_slope(call, param, role).reshape(g_rows.shape))


@torch.no_grad()
def _embedding_scale(module, ids, output):
    """s with output = s · weight[ids] (a scalar, as a 0-d tensor), or None when the output is not that."""
    if not isinstance(output, torch.Tensor):
        return None
    base = torch.nn.functional.embedding(ids, module.weight)
    out = output.detach()
    if out.shape != base.shape or base.numel() == 0:
        return None
    k = base.abs().argmax()
    if base.reshape(-1)[k] == 0:
        return None
    scale = out.reshape(-1)[k] / base.reshape(-1)[k]
    eps = torch.finfo(out.dtype).eps if out.is_floating_point() else 0
    return scale if torch.allclose(out, base * scale, rtol=8 * eps, atol=0) else None


@torch.no_grad()
def _norm_slope(call, param, role):
    """∂output/∂param elementwise for an affine norm: output(param=1) − output(param=0), others at 0."""
    own = dict(call.module.named_parameters(recurse=False))

    def run(value):
        values = {k: torch.zeros_like(v) for k, v in own.items()}
        values[role] = torch.full_like(param, value)
        return functional_call(call.module, values, call.args, call.kwargs)

    return run(1.0) - run(0.0)
