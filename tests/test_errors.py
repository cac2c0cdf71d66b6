"""Bad input gets a clear error, never a silent wrong number."""
import pytest
import torch

import geffect_kernels as gk
from test_objectives import make_inputs


@pytest.fixture
def inputs():
    h, w, b, y = make_inputs(0)
    return h.detach(), w.detach(), b.detach(), y


def test_unknown_objective_and_hparam(inputs):
    h, w, _, y = inputs
    with pytest.raises(ValueError, match="valid: ga, wga, satimp"):
        gk.unlearning_loss("gd", h, w, y)
    with pytest.raises(ValueError, match="takes no hyper-parameter gamma; valid: alpha"):
        gk.unlearning_loss("wga", h, w, y, gamma=2.0)
    with pytest.raises(ValueError, match="valid: none"):
        gk.unlearning_loss("ga", h, w, y, alpha=1.0)
    with pytest.raises(ValueError, match="unknown backend"):
        gk.token_logprobs(h, w, y, backend="tpu")


def test_shape_mismatches(inputs):
    h, w, b, y = inputs
    with pytest.raises(ValueError, match="labels shape"):
        gk.token_logprobs(h, w, y[:, :-1])
    with pytest.raises(ValueError, match="hidden has H"):
        gk.token_logprobs(h, w[:, :-1], y)
    with pytest.raises(ValueError, match="bias must be"):
        gk.token_logprobs(h, w, y, bias=b[:-1])
    with pytest.raises(ValueError, match="must be \\[B, T, H\\]"):
        gk.token_logprobs(h[0, 0], w, y[0, 0])
    with pytest.raises(ValueError, match="ref_logprobs has shape"):
        gk.unlearning_loss("tnpo", h, w, y, ref_logprobs=torch.zeros(3, 8, dtype=h.dtype))
    with pytest.raises(ValueError, match="needs batched input"):
        gk.unlearning_loss("simnpo", h.reshape(-1, h.shape[-1]), w, y.reshape(-1))


def test_labels_out_of_range(inputs):
    h, w, _, y = inputs
    for bad in (w.shape[0], -1, -99):
        y2 = y.clone()
        y2[1, 2] = bad
        with pytest.raises(ValueError, match=f"found {bad}"):
            gk.token_logprobs(h, w, y2)
    with pytest.raises(ValueError, match="integer"):
        gk.token_logprobs(h, w, y.float())


def test_dtype_and_device_mismatch(inputs):
    h, w, _, y = inputs
    with pytest.raises(ValueError, match="dtype"):
        gk.token_logprobs(h.float(), w, y)
    with pytest.raises(ValueError, match="is on meta"):
        gk.token_logprobs(h, w.to("meta"), y)
    with pytest.raises(ValueError, match="float16/bfloat16/float32/float64"):
        gk.token_logprobs(h.long(), w, y)


def test_missing_ref_logprobs(inputs):
    h, w, _, y = inputs
    for name in ("tnpo", "wtnpo", "npo"):
        with pytest.raises(ValueError, match="needs ref_logprobs"):
            gk.unlearning_loss(name, h, w, y)
        with pytest.raises(ValueError, match="needs ref_logprobs"):
            gk.token_weights(name, torch.zeros(y.shape, dtype=h.dtype) - 1)


@pytest.mark.parametrize("where", ["hidden", "weight", "bias", "ref", "logits"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_inputs_raise(inputs, where, value):
    h, w, b, y = (t.clone() for t in inputs)
    ref = torch.randn(y.shape, dtype=h.dtype)
    target = {"hidden": h, "weight": w, "bias": b, "ref": ref}.get(where)
    if where == "logits":
        z = h @ w.T
        z[1, 2, 3] = value
        with pytest.raises(ValueError, match="logits contains NaN or inf"):
            gk.unlearning_loss_from_logits("ga", z, y)
        return
    if where == "ref":
        target[1, 1] = value  # a valid position (make_inputs keeps [1, 1] valid)
    else:
        target.view(-1)[5] = value
    with pytest.raises(ValueError, match="NaN or inf"):
        gk.unlearning_loss("tnpo", h, w, y, bias=b, ref_logprobs=ref)


def test_non_finite_reference_at_ignored_positions_does_not_change_the_loss(inputs):
    h, w, _, y = inputs
    ref = torch.randn(y.shape, dtype=h.dtype)
    expected = gk.unlearning_loss("npo", h, w, y, ref_logprobs=ref)
    ref[0, 0] = float("nan")  # sequence 0 is all ignored in make_inputs
    assert gk.unlearning_loss("npo", h, w, y, ref_logprobs=ref).item() == expected.item()


def test_bad_hparam_values(inputs):
    h, w, _, y = inputs
    with pytest.raises(ValueError, match="beta must be a finite number > 0, got 0.0"):
        gk.unlearning_loss("npo", h, w, y, ref_logprobs=torch.zeros(y.shape, dtype=h.dtype), beta=0.0)
    with pytest.raises(ValueError, match="alpha must be a finite number ≥ 0, got '1'"):
        gk.unlearning_loss("wga", h, w, y, alpha="1")
    with pytest.raises(ValueError, match="softcap"):
        gk.token_logprobs(h, w, y, softcap=-1.0)


def test_kl_vocab_mismatch(inputs):
    h, w, _, y = inputs
    with pytest.raises(ValueError, match="labels must be in|vocabularies"):
        gk.kl_loss(h, w, h, w[:-5], y)
