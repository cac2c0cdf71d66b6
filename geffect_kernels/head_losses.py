"""The fused head losses of the catalog's distribution entries (`Objective.head_loss` names one), as functions of
the head inputs (`hf.HeadInputs`), the reference's (or None) and the hyper-parameters. Here, not in the catalog, so
that the catalog imports no loss module (each of them imports it)."""
from __future__ import annotations

from .objectives import unlearning_loss
from .retain import kl_loss
from .undial import undial_loss


def kl_head_loss(x, r, hp, *, backend, kl_normalization="tokens", **_):
    # batchmean: every position counts, prompt and padding too, so no shift drops the last one
    return kl_loss(x.hidden, x.weight, r.hidden, r.weight, x.labels, bias=x.bias, ref_bias=r.bias, softcap=x.softcap,
                   shift=kl_normalization == "tokens", backend=backend, reduction=kl_normalization)


def ceu_head_loss(x, r, hp, *, backend, **_):
    return unlearning_loss("ceu", x.hidden, x.weight, x.labels, **x.as_kwargs(), backend=backend, **hp)


def undial_head_loss(x, r, hp, *, backend, **_):
    return undial_loss(x.hidden, x.weight, r.hidden, r.weight, x.labels, beta=hp["beta"], bias=x.bias,
                       ref_bias=r.bias, softcap=x.softcap, shift=True, backend=backend)


HEAD_LOSSES = {"kl": kl_head_loss, "ceu": ceu_head_loss, "undial": undial_head_loss}
