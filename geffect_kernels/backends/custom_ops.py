"""The kernel backends as torch custom operators, which `torch.compile` calls without tracing into them.

Eager calls run the autograd Functions of `autograd` (gradients handed over in place, no dispatcher); while
``torch.compile`` traces, `traced` (called where the public functions pick their backend) hands out
`CompiledBackend`, which reaches the same kernels through the operators below. Each has a fake implementation
(output shapes and dtypes only: no data-dependent shape, ignored positions stay a mask) and registered autograd:

- ``geffect::token_logprobs`` keeps the LSE; ``geffect::token_logprobs_backward`` recomputes the logits from it.
- ``geffect::weighted_loss``, ``geffect::kl_divergence`` and ``geffect::target_cross_entropy`` (UNDIAL, CE-U) return
  the scalar loss and its gradients, produced in the forward as in eager; the backward scales them by the upstream
  scalar.
- ``geffect::token_stats``: forward only.
- ``..._from_logits`` versions of the first three over logits the caller holds.

Every operator takes the backend by name (a string is part of the schema, a Python object is not) and checks the
labels of CPU tensors against the vocabulary when it runs, as eager calls do before they start.
"""
import contextlib
from typing import Optional

import torch
from torch import Tensor

from ..catalog import OBJECTIVES, TokenWeighting
from ..ranges import check_label_range
from .autograd import compute_dtype
from .interface import Backend, LossOptions
from .registry import load_backend, own_or_fallback

def _backend(name: str) -> Backend:
    return load_backend(name)


def _rowmajor(t):
    return None if t is None else (t if t.stride(-1) == 1 else t.contiguous())


def _device_guard(t):
    """Triton launches on the current CUDA device: make it the inputs' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_labels(labels, vocab, ignore_index):
    if labels.device.type == "cpu":  # as `inputs.check_labels` does: no synchronization there
        check_label_range(labels, vocab, ignore_index)


def _absent(like):
    """Stands for "no gradient" in an operator's outputs, which cannot be None."""
    return like.new_empty(0)


def _present(grads, inputs, wanted):
    """A gradient per input, an empty tensor where none is wanted (or the input is None), row-major."""
    return tuple(g.to(t.dtype).contiguous() if w and t is not None and g is not None else _absent(t if t is not None
                 else inputs[0]) for g, t, w in zip(grads, inputs, wanted))


def _fake_grads(inputs, wanted):
    return tuple(t.new_empty(t.shape) if w and t is not None else _absent(inputs[0]) for t, w in zip(inputs, wanted))


def _with_grads(loss_of, inputs, wanted):
    """``loss_of(*inputs)`` and its gradient with respect to the inputs ``wanted`` marks (the backends' fused
    losses produce them in their forward: the backward called here only hands them over)."""
    wanted = [bool(w) and t is not None for t, w in zip(inputs, wanted)]
    leaves = [None if t is None else t.detach().requires_grad_(w) for t, w in zip(inputs, wanted)]
    with torch.enable_grad():
        loss = loss_of(*leaves)
    chosen = [t for t, w in zip(leaves, wanted) if w]
    grads = iter(torch.autograd.grad(loss, chosen) if chosen else ())
    return loss.detach(), [next(grads) if w else None for w in wanted]


def _scaled_grads(ctx, grad_loss, n_before, n_after):
    """Backward of a loss whose gradients its forward returned (saved in ``ctx``): each scaled by the upstream
    scalar, None for the ``n_before`` arguments before the three head tensors and the ``n_after`` after them."""
    grads = [g * grad_loss.to(g.dtype) if w else None for g, w in zip(ctx.saved_tensors, ctx.wanted)]
    return (None,) * n_before + tuple(grads) + (None,) * n_after


# -- ℓ_t ------------------------------------------------------------------------------------------------

@torch.library.custom_op("geffect::token_logprobs", mutates_args=())
def token_logprobs_op(backend: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                      ignore_index: int, softcap: Optional[float]) -> tuple[Tensor, Tensor]:
    _check_labels(labels, weight.shape[0], ignore_index)
    kernels = _backend(backend).logprobs_kernels(LossOptions(ignore_index, softcap))
    with _device_guard(hidden):
        logprobs, saved = kernels.forward(_rowmajor(hidden), _rowmajor(weight), _rowmajor(bias), labels.contiguous())
    return logprobs, saved[-1]  # the kernels save (inputs..., labels, lse)


@token_logprobs_op.register_fake
def _(backend, hidden, weight, bias, labels, ignore_index, softcap):
    out = hidden.new_empty(labels.shape, dtype=compute_dtype(hidden.dtype))
    return out, torch.empty_like(out)


@torch.library.custom_op("geffect::token_logprobs_backward", mutates_args=())
def token_logprobs_backward_op(backend: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                               lse: Tensor, grad: Tensor, ignore_index: int, softcap: Optional[float],
                               wanted: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    kernels = _backend(backend).logprobs_kernels(LossOptions(ignore_index, softcap))
    head = (_rowmajor(hidden), _rowmajor(weight), _rowmajor(bias))
    wanted = [w and t is not None for t, w in zip(head, wanted)]
    with _device_guard(hidden):
        grads = kernels.backward((*head, labels.contiguous(), lse), grad.contiguous(), (*wanted, False))
    return _present(grads[:3], (hidden, weight, bias), wanted)


@token_logprobs_backward_op.register_fake
def _(backend, hidden, weight, bias, labels, lse, grad, ignore_index, softcap, wanted):
    return _fake_grads((hidden, weight, bias), wanted)


def _setup_logprobs(ctx, inputs, output):
    backend, hidden, weight, bias, labels, ignore_index, softcap = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1])
    ctx.args = (backend, ignore_index, softcap)
    ctx.mark_non_differentiable(output[1])


def _logprobs_backward(ctx, grad_logprobs, _grad_lse):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    backend, ignore_index, softcap = ctx.args
    wanted = [ctx.needs_input_grad[i] and t is not None for i, t in ((1, hidden), (2, weight), (3, bias))]
    if not any(wanted):
        return (None,) * 7
    grads = token_logprobs_backward_op(backend, hidden, weight, bias, labels, lse, grad_logprobs, ignore_index,
                                       softcap, wanted)
    return None, *(g if w else None for g, w in zip(grads, wanted)), None, None, None


token_logprobs_op.register_autograd(_logprobs_backward, setup_context=_setup_logprobs)


# -- scale · Σ_t w_t ℓ_t -------------------------------------------------------------------------------------

@torch.library.custom_op("geffect::weighted_loss", mutates_args=())
def weighted_loss_op(backend: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                     ref_logprobs: Optional[Tensor], scale: Tensor, ignore_index: int, softcap: Optional[float],
                     objective: str, weight_hparams: list[float],
                     wanted: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_labels(labels, weight.shape[0], ignore_index)
    weighting = TokenWeighting(OBJECTIVES[objective], *weight_hparams)
    opts = LossOptions(ignore_index, softcap, weighting=weighting, scale=scale)
    impl = _backend(backend)
    loss, grads = _with_grads(lambda *head: impl.weighted_loss(*head, labels, ref_logprobs, opts),
                              (hidden, weight, bias), wanted)
    return (loss.to(compute_dtype(hidden.dtype)), *_present(grads, (hidden, weight, bias), wanted))


@weighted_loss_op.register_fake
def _(backend, hidden, weight, bias, labels, ref_logprobs, scale, ignore_index, softcap, objective, weight_hparams,
      wanted):
    return (hidden.new_empty((), dtype=compute_dtype(hidden.dtype)), *_fake_grads((hidden, weight, bias), wanted))


def _setup_fused(ctx, inputs, output):
    ctx.wanted = inputs[-1]
    ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])


weighted_loss_op.register_autograd(lambda ctx, grad, *_: _scaled_grads(ctx, grad, 1, 8), setup_context=_setup_fused)


# -- scale · Σ_valid KL(p_ref,t ‖ p_θ,t) ---------------------------------------------------------------------

@torch.library.custom_op("geffect::kl_divergence", mutates_args=())
def kl_divergence_op(backend: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ref_hidden: Tensor,
                     ref_weight: Tensor, ref_bias: Optional[Tensor], labels: Tensor, scale: Tensor, ignore_index: int,
                     softcap: Optional[float], wanted: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_labels(labels, weight.shape[0], ignore_index)
    opts = LossOptions(ignore_index, softcap, scale=scale)
    impl = _backend(backend)
    loss, grads = _with_grads(lambda *head: impl.kl_divergence(*head, ref_hidden, ref_weight, ref_bias, labels, opts),
                              (hidden, weight, bias), wanted)
    return (loss.to(compute_dtype(hidden.dtype)), *_present(grads, (hidden, weight, bias), wanted))


@kl_divergence_op.register_fake
def _(backend, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, scale, ignore_index, softcap, wanted):
    return (hidden.new_empty((), dtype=compute_dtype(hidden.dtype)), *_fake_grads((hidden, weight, bias), wanted))


kl_divergence_op.register_autograd(lambda ctx, grad, *_: _scaled_grads(ctx, grad, 1, 8), setup_context=_setup_fused)


# -- scale · Σ_valid CE(softmax(z_ref − β·onehot(y)), p_θ): UNDIAL, CE-U (no reference: the model's own logits) ----

@torch.library.custom_op("geffect::target_cross_entropy", mutates_args=())
def target_cross_entropy_op(backend: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                            ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor], ref_bias: Optional[Tensor],
                            labels: Tensor, scale: Tensor, ignore_index: int, softcap: Optional[float], beta: float,
                            wanted: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_labels(labels, weight.shape[0], ignore_index)
    opts = LossOptions(ignore_index, softcap, scale=scale)
    impl = own_or_fallback(_backend(backend), "target_cross_entropy")
    loss, grads = _with_grads(
        lambda *head: impl(*head, ref_hidden, ref_weight, ref_bias, labels, opts, beta),
        (hidden, weight, bias), wanted)
    return (loss.to(compute_dtype(hidden.dtype)), *_present(grads, (hidden, weight, bias), wanted))


@target_cross_entropy_op.register_fake
def _(backend, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, scale, ignore_index, softcap, beta,
      wanted):
    return (hidden.new_empty((), dtype=compute_dtype(hidden.dtype)), *_fake_grads((hidden, weight, bias), wanted))


target_cross_entropy_op.register_autograd(lambda ctx, grad, *_: _scaled_grads(ctx, grad, 1, 9),
                                          setup_context=_setup_fused)


# -- the same over logits the caller holds [N, V] (in place never: the operators return fresh gradients) ----------

@torch.library.custom_op("geffect::token_logprobs_from_logits", mutates_args=())
def logits_logprobs_op(backend: str, logits: Tensor, labels: Tensor, ignore_index: int,
                       softcap: Optional[float]) -> tuple[Tensor, Tensor]:
    _check_labels(labels, logits.shape[1], ignore_index)
    kernels = _backend(backend).logits_logprobs_kernels(LossOptions(ignore_index, softcap))
    with _device_guard(logits):
        logprobs, saved = kernels.forward(_rowmajor(logits), labels.contiguous())
    return logprobs, saved[-1]


@logits_logprobs_op.register_fake
def _(backend, logits, labels, ignore_index, softcap):
    out = logits.new_empty(labels.shape, dtype=compute_dtype(logits.dtype))
    return out, torch.empty_like(out)


@torch.library.custom_op("geffect::token_logprobs_from_logits_backward", mutates_args=())
def logits_logprobs_backward_op(backend: str, logits: Tensor, labels: Tensor, lse: Tensor, grad: Tensor,
                                ignore_index: int, softcap: Optional[float]) -> Tensor:
    kernels = _backend(backend).logits_logprobs_kernels(LossOptions(ignore_index, softcap))
    with _device_guard(logits):
        grad_logits, _ = kernels.backward((_rowmajor(logits), labels.contiguous(), lse), grad.contiguous(),
                                          (True, False))
    return grad_logits.to(logits.dtype).contiguous()


@logits_logprobs_backward_op.register_fake
def _(backend, logits, labels, lse, grad, ignore_index, softcap):
    return logits.new_empty(logits.shape)


def _setup_logits_logprobs(ctx, inputs, output):
    backend, logits, labels, ignore_index, softcap = inputs
    ctx.save_for_backward(logits, labels, output[1])
    ctx.args = (backend, ignore_index, softcap)
    ctx.mark_non_differentiable(output[1])


def _logits_logprobs_backward(ctx, grad_logprobs, _grad_lse):
    if not ctx.needs_input_grad[1]:
        return (None,) * 5
    logits, labels, lse = ctx.saved_tensors
    backend, ignore_index, softcap = ctx.args
    return None, logits_logprobs_backward_op(backend, logits, labels, lse, grad_logprobs, ignore_index,
                                             softcap), None, None, None


logits_logprobs_op.register_autograd(_logits_logprobs_backward, setup_context=_setup_logits_logprobs)


@torch.library.custom_op("geffect::weighted_loss_from_logits", mutates_args=())
def logits_weighted_loss_op(backend: str, logits: Tensor, labels: Tensor, ref_logprobs: Optional[Tensor],
                            scale: Tensor, ignore_index: int, softcap: Optional[float], objective: str,
                            weight_hparams: list[float], wanted: list[bool]) -> tuple[Tensor, Tensor]:
    _check_labels(labels, logits.shape[1], ignore_index)
    weighting = TokenWeighting(OBJECTIVES[objective], *weight_hparams)
    opts = LossOptions(ignore_index, softcap, weighting=weighting, scale=scale)
    impl = _backend(backend)
    loss, grads = _with_grads(lambda z: impl.weighted_loss_from_logits(z, labels, ref_logprobs, opts), (logits,),
                              wanted)
    return loss.to(compute_dtype(logits.dtype)), *_present(grads, (logits,), wanted)


@logits_weighted_loss_op.register_fake
def _(backend, logits, labels, ref_logprobs, scale, ignore_index, softcap, objective, weight_hparams, wanted):
    return logits.new_empty((), dtype=compute_dtype(logits.dtype)), *_fake_grads((logits,), wanted)


logits_weighted_loss_op.register_autograd(lambda ctx, grad, *_: _scaled_grads(ctx, grad, 1, 8),
                                          setup_context=_setup_fused)


@torch.library.custom_op("geffect::target_cross_entropy_from_logits", mutates_args=())
def logits_target_cross_entropy_op(backend: str, logits: Tensor, labels: Tensor, scale: Tensor, ignore_index: int,
                                   softcap: Optional[float], beta: float,
                                   wanted: list[bool]) -> tuple[Tensor, Tensor]:
    _check_labels(labels, logits.shape[1], ignore_index)
    opts = LossOptions(ignore_index, softcap, scale=scale)
    impl = own_or_fallback(_backend(backend), "target_cross_entropy_from_logits")
    loss, grads = _with_grads(lambda z: impl(z, labels, opts, beta), (logits,),
                              wanted)
    return loss.to(compute_dtype(logits.dtype)), *_present(grads, (logits,), wanted)


@logits_target_cross_entropy_op.register_fake
def _(backend, logits, labels, scale, ignore_index, softcap, beta, wanted):
    return logits.new_empty((), dtype=compute_dtype(logits.dtype)), *_fake_grads((logits,), wanted)


logits_target_cross_entropy_op.register_autograd(lambda ctx, grad, *_: _scaled_grads(ctx, grad, 1, 6),
                                                 setup_context=_setup_fused)


# -- (ℓ_t, entropy, Var_p[log p]) --------------------------------------------------------------------------

@torch.library.custom_op("geffect::token_stats", mutates_args=())
def token_stats_op(backend: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                   ignore_index: int, softcap: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    _check_labels(labels, weight.shape[0], ignore_index)
    impl = _backend(backend)
    if type(impl).token_stats is Backend.token_stats:  # no kernel of its own: the chunked torch backend's
        impl = _backend("torch")
    stats = impl.token_stats(hidden, weight, bias, labels, LossOptions(ignore_index, softcap))
    return tuple(t.clone() for t in stats)  # an operator's outputs may not share storage (the triton kernel's do)


@token_stats_op.register_fake
def _(backend, hidden, weight, bias, labels, ignore_index, softcap):
    return tuple(hidden.new_empty(labels.shape, dtype=compute_dtype(hidden.dtype)) for _ in range(3))


def _weight_hparams(weighting: TokenWeighting) -> list[float]:
    return [weighting.alpha, weighting.beta, weighting.gamma, weighting.eps]


def _scale(scale, like) -> Tensor:
    return scale if isinstance(scale, Tensor) else torch.full((), float(scale), dtype=torch.float64,
                                                                 device=like.device)


def _wanted(*tensors):
    return [torch.is_grad_enabled() and t is not None and t.requires_grad for t in tensors]


class CompiledBackend(Backend):
    """A kernel backend as `torch.compile` sees it: its operations through the custom operators above (``inplace``
    has no effect there: an operator returns a fresh gradient); anything else straight to the backend."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.name = backend.name

    def __getattr__(self, attribute):
        return getattr(self.backend, attribute)

    def is_available(self, device):
        return self.backend.is_available(device)

    def accepts(self, rows):
        return self.backend.accepts(rows)

    def token_logprobs(self, hidden, weight, bias, labels, opts):
        return token_logprobs_op(self.name, hidden, weight, bias, labels, opts.ignore_index, opts.softcap)[0]

    def weighted_loss(self, hidden, weight, bias, labels, ref_logprobs, opts):
        w = opts.weighting
        return weighted_loss_op(self.name, hidden, weight, bias, labels, ref_logprobs, _scale(opts.scale, hidden),
                                opts.ignore_index, opts.softcap, w.objective.name, _weight_hparams(w),
                                _wanted(hidden, weight, bias))[0]

    def kl_divergence(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, opts):
        ref_bias = None if ref_bias is None else ref_bias.detach()
        return kl_divergence_op(self.name, hidden, weight, bias, ref_hidden.detach(), ref_weight.detach(), ref_bias,
                                labels, _scale(opts.scale, hidden), opts.ignore_index, opts.softcap,
                                _wanted(hidden, weight, bias))[0]

    def target_cross_entropy(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, opts, beta):
        ref = [None if t is None else t.detach() for t in (ref_hidden, ref_weight, ref_bias)]
        return target_cross_entropy_op(self.name, hidden, weight, bias, *ref, labels, _scale(opts.scale, hidden),
                                       opts.ignore_index, opts.softcap, beta, _wanted(hidden, weight, bias))[0]

    def token_logprobs_from_logits(self, logits, labels, opts):
        return logits_logprobs_op(self.name, logits, labels, opts.ignore_index, opts.softcap)[0]

    def weighted_loss_from_logits(self, logits, labels, ref_logprobs, opts):
        w = opts.weighting
        return logits_weighted_loss_op(self.name, logits, labels, ref_logprobs, _scale(opts.scale, logits),
                                       opts.ignore_index, opts.softcap, w.objective.name, _weight_hparams(w),
                                       _wanted(logits))[0]

    def target_cross_entropy_from_logits(self, logits, labels, opts, beta):
        return logits_target_cross_entropy_op(self.name, logits, labels, _scale(opts.scale, logits), opts.ignore_index,
                                              opts.softcap, beta, _wanted(logits))[0]

    def token_stats(self, hidden, weight, bias, labels, opts):
        return token_stats_op(self.name, hidden, weight, bias, labels, opts.ignore_index, opts.softcap)


_compiled: dict[str, CompiledBackend] = {}


def traced(backend: Backend) -> Backend:
    """``backend`` as a call should reach it: while torch.compile traces, a kernel backend through its custom
    operators; in eager calls itself (its autograd Functions hand their gradients over in place)."""
    if backend.traceable or not torch.compiler.is_compiling():
        return backend
    if backend.name not in _compiled:
        _compiled[backend.name] = CompiledBackend(backend)
    return _compiled[backend.name]
