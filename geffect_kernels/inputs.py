"""Validation and flattening of user inputs, shared by every public function, and what runs the call.

Every check raises ValueError with a message that names the argument, so a bad call fails before
any kernel runs. Shapes, dtypes and devices are always checked (they cost nothing). Values (NaN/inf in the
inputs, labels outside ``[0, V)``) are read only when asked: ``check_values=True`` or the environment
variable GEFFECT_CHECK_VALUES=1, since reading a GPU tensor's values makes the host wait for the device (and
the NaN check reads the whole head). Labels on the CPU are range-checked always: that costs no
synchronization, and the C++ kernels index rows by label. `prepare_head` and `prepare_logits` also resolve,
once per call, the backend and the `LossOptions` it receives.
"""
from __future__ import annotations

import numbers
import os
from typing import NamedTuple

import torch

from .backends.autograd import compute_dtype
from .backends.custom_ops import traced
from .backends.interface import Backend, LossOptions
from .backends.registry import get_backend
from .ranges import POSITIVE, check_label_range, check_number

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Prepared(NamedTuple):
    hidden: torch.Tensor  # [N, H] (or logits [N, V])
    labels: torch.Tensor  # [N] int64
    out_shape: torch.Size  # shape of the per-token outputs (labels' shape after the shift)
    backend: Backend | None = None  # what runs the call (None: not asked for)
    opts: LossOptions | None = None
    check_values: bool = False  # values read too (`values_checked`)

    def reference(self, ref_logprobs, required_by=None):
        """``ref_logprobs`` checked against this call, flattened, in its compute dtype (`prepare_ref`)."""
        return prepare_ref(ref_logprobs, self.labels, self.out_shape, compute_dtype(self.hidden.dtype),
                           ignore_index=self.opts.ignore_index, required_by=required_by,
                           check_values=self.check_values)


def _require_float(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")


def _require_same(name, t, ref_name, ref):
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; cast one of them")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def values_checked(check_values: bool | None) -> bool:
    """The caller's ``check_values``, or GEFFECT_CHECK_VALUES=1 when it is None."""
    if check_values is None:
        return os.environ.get("GEFFECT_CHECK_VALUES", "0") == "1"
    return bool(check_values)


def require_finite(**tensors):
    """NaN/inf in inputs would turn into NaN at best and a finite wrong value at worst: refuse them.

    min/max propagate NaN and expose ±inf, and unlike ``isfinite(t).all()`` allocate no tensor the
    size of the input (the head weight can be gigabytes).
    """
    for name, t in tensors.items():
        if t is None or t.numel() == 0:
            continue
        lo, hi = torch.aminmax(t.detach())
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
            raise ValueError(f"{name} contains NaN or inf")


def check_tensor(name, t, *, like=None, like_name=None, where=None):
    """``t`` a floating-point tensor, finite (at the positions ``where`` marks, when given) and, when ``like``
    is given, of its dtype, device and shape."""
    _require_float(name, t)
    if like is not None:
        _require_same(name, t, like_name, like)
        if t.shape != like.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match {like_name} {tuple(like.shape)}")
    require_finite(**{name: t if where is None else torch.where(where, t.detach(), 0)})


def check_mask(mask, shape, what):
    """``mask`` (None: every position) as a bool tensor of ``shape``; a float mask is refused, not rounded."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype.is_floating_point or mask.is_complex():
        raise ValueError(f"mask must be a bool or integer tensor, got {mask.dtype}")
    if mask.shape != shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {what} {tuple(shape)}")
    return mask.to(torch.bool)


def check_labels(labels, vocab_size, ignore_index, *, values=True):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise ValueError(f"ignore_index must be an integer, got {ignore_index!r}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if vocab_size is None or not (values or labels.device.type == "cpu"):
        return
    if torch.compiler.is_compiling():  # a value read would break the graph: the custom operators check CPU labels
        return
    check_label_range(labels, vocab_size, ignore_index)


def drop_first_answer_tokens(labels, count, ignore_index):
    """``labels`` with the first ``count`` non-ignored labels of each row (the last dimension) set to
    ``ignore_index``: CE-U's ``ignore_first``, applied as open-unlearning's ``compute_batch_ceu`` does (to the labels
    as given, before any shift)."""
    if count == 0:
        return labels
    valid = labels != ignore_index
    return labels.masked_fill(valid & (valid.cumsum(-1) <= count), ignore_index)


def prepare_rows(rows, labels, *, feature_name, ignore_index, shift, vocab_size, check_values=False):
    """Check ``rows`` ([B, T, F] or [N, F]) against ``labels`` ([B, T] or [N]), apply the shift, flatten."""
    if rows.dim() not in (2, 3):
        dim = "V" if feature_name == "logits" else "H"
        raise ValueError(f"{feature_name} must be [B, T, {dim}] or [N, {dim}], got shape {tuple(rows.shape)}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.shape != rows.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match {feature_name} shape "
                         f"{tuple(rows.shape)} (expected {tuple(rows.shape[:-1])})")
    if labels.device != rows.device:
        raise ValueError(f"labels are on {labels.device} but {feature_name} is on {rows.device}")
    check_labels(labels, vocab_size, ignore_index, values=check_values)
    if shift:  # Hugging Face convention: position t predicts label t+1
        rows, labels = rows[..., :-1, :], labels[..., 1:]
    out_shape = labels.shape
    # contiguous: a strided view (every other label) flattens to a strided vector, which the kernels do not take
    return Prepared(rows.reshape(-1, rows.shape[-1]), labels.reshape(-1).long().contiguous(), out_shape,
                    check_values=check_values)


def _with_backend(prep, backend, ignore_index, softcap, inplace=False):
    if backend is None:
        return prep
    opts = LossOptions(ignore_index, check_softcap(softcap), inplace=inplace)
    return prep._replace(backend=traced(get_backend(backend, prep.hidden)), opts=opts)


def prepare_head(hidden, weight, labels, bias, *, ignore_index, shift, softcap=None, backend=None,
                 check_values=None):
    _require_float("hidden", hidden)
    _require_float("weight", weight)
    _require_same("weight", weight, "hidden", hidden)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight is [V, H] = {tuple(weight.shape)} but hidden has H = {hidden.shape[-1]}")
    if bias is not None:
        _require_float("bias", bias)
        _require_same("bias", bias, "hidden", hidden)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    check_values = values_checked(check_values)
    if check_values:
        require_finite(hidden=hidden, weight=weight, bias=bias)
    prep = prepare_rows(hidden, labels, feature_name="hidden", ignore_index=ignore_index, shift=shift,
                        vocab_size=weight.shape[0], check_values=check_values)
    return _with_backend(prep, backend, ignore_index, softcap)


def prepare_head_pair(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, *, ignore_index, shift,
                      softcap=None, backend=None, check_values=None):
    """`prepare_head` of a trained head and a reference head (KL, UNDIAL): both checked, the same vocabulary, dtype
    and device; the backend is picked for the trained side. Returns (trained, reference)."""
    prep = prepare_head(hidden, weight, labels, bias, ignore_index=ignore_index, shift=shift, softcap=softcap,
                        backend=backend, check_values=check_values)
    ref = prepare_head(ref_hidden, ref_weight, labels, ref_bias, ignore_index=ignore_index, shift=shift,
                       check_values=check_values)
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"the two heads have different vocabularies: {weight.shape[0]} vs {ref_weight.shape[0]}")
    if ref_hidden.dtype != hidden.dtype or ref_hidden.device != hidden.device:
        raise ValueError(f"ref_hidden ({ref_hidden.dtype}, {ref_hidden.device}) must match hidden "
                         f"({hidden.dtype}, {hidden.device})")
    return prep, ref


def prepare_logits(logits, labels, *, ignore_index, shift, softcap=None, backend=None, inplace=False,
                   check_values=None):
    _require_float("logits", logits)
    check_values = values_checked(check_values)
    if check_values:
        require_finite(logits=logits)
    prep = prepare_rows(logits, labels, feature_name="logits", ignore_index=ignore_index, shift=shift,
                        vocab_size=logits.shape[-1], check_values=check_values)
    return _with_backend(prep, backend, ignore_index, softcap, inplace)


def check_softcap(softcap):
    return None if softcap is None else check_number("softcap", softcap, POSITIVE)


def prepare_logprobs(logprobs, labels, *, ignore_index, shift, check_values=None) -> torch.Tensor:
    """The labels of per-token log-probabilities ``logprobs`` (HF-shifted when ``shift``), checked against them."""
    _require_float("logprobs", logprobs)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    check_labels(labels, None, ignore_index, values=False)
    if shift:
        if labels.dim() == 0 or labels.shape[-1] < 1:
            raise ValueError(f"shift=True drops the first label; labels shape {tuple(labels.shape)} has none")
        labels = labels[..., 1:]
    if labels.shape != logprobs.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)}{' after the shift' if shift else ''} does not match "
                         f"logprobs {tuple(logprobs.shape)}")
    if labels.device != logprobs.device:
        raise ValueError(f"labels are on {labels.device} but logprobs on {logprobs.device}")
    if values_checked(check_values):
        require_finite(logprobs=torch.where(labels != ignore_index, logprobs.detach(), 0))
    return labels


def prepare_ref(ref_logprobs, labels, out_shape, dtype, *, ignore_index, required_by=None, check_values=None):
    """Flatten ``ref_logprobs`` (shaped like the per-token output ``out_shape``) and zero it where the
    flattened ``labels`` are ``ignore_index``."""
    if ref_logprobs is None:
        if required_by:
            raise ValueError(f"objective {required_by!r} needs ref_logprobs (the reference model's "
                             f"token_logprobs on the same batch)")
        return None
    if not isinstance(ref_logprobs, torch.Tensor):
        raise TypeError(f"ref_logprobs must be a torch.Tensor, got {type(ref_logprobs).__name__}")
    if ref_logprobs.shape != out_shape:
        raise ValueError(f"ref_logprobs has shape {tuple(ref_logprobs.shape)}, expected "
                         f"{tuple(out_shape)} (the shape token_logprobs returns for these inputs)")
    if ref_logprobs.device != labels.device:
        raise ValueError(f"ref_logprobs are on {ref_logprobs.device} but the inputs are on {labels.device}")
    valid = labels != ignore_index
    ref = torch.where(valid, ref_logprobs.detach().reshape(-1).to(dtype), 0)
    if values_checked(check_values):
        require_finite(ref_logprobs=ref)
    return ref
