"""Inputs the README promises to check, checked: representation losses, token weights, soft-cap,
ignore_index, non-finite hyper-parameters, GEFFECT_BACKEND, and the profiler's batches."""
import pytest
import torch

import geffect_kernels as gk
from geffect_kernels.geffect import GEffectProfiler
from geffect_models import VOCAB, batch, tiny_model
from test_objectives import make_inputs

H = 8


@pytest.fixture
def acts():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 5, H, generator=g), torch.randn(2, 5, H, generator=g)


def test_rmu_loss_refuses_what_would_be_nan_or_silently_wrong(acts):
    h, _ = acts
    u = gk.rmu_direction(H)
    assert torch.isfinite(gk.rmu_loss(h, u))
    bad_h = h.clone()
    bad_h[1, 2, 3] = float("nan")
    for call, error, message in [
        (lambda: gk.rmu_loss(bad_h, u), ValueError, "hidden contains NaN or inf"),
        (lambda: gk.rmu_loss(h, torch.zeros(H)), ValueError, "direction must be non-zero"),
        (lambda: gk.rmu_loss(h, torch.full((H,), float("inf"))), ValueError, "direction contains NaN or inf"),
        (lambda: gk.rmu_loss(h.tolist(), u), TypeError, "hidden must be a torch.Tensor, got list"),
        (lambda: gk.rmu_loss(h.long(), u), ValueError, "hidden must be float16/bfloat16/float32/float64"),
        (lambda: gk.rmu_loss(h, u, coeff=float("inf")), ValueError, "coeff must be a finite number, got inf"),
        (lambda: gk.rmu_loss(h, u, mask=torch.ones(2, 5) * 0.5), ValueError, "mask must be a bool or integer"),
        (lambda: gk.rmu_loss(h, u, mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask shape"),
    ]:
        with pytest.raises(error, match=message):
            call()


def test_rr_loss_refuses_mixed_dtypes_and_non_finite_references(acts):
    h, ref = acts
    assert gk.rr_loss(h, ref).dtype == torch.float32
    bad = ref.clone()
    bad[0, 0, 0] = float("inf")
    for call, error, message in [
        (lambda: gk.rr_loss(h, ref.double()), ValueError, "ref_hidden has dtype torch.float64 but hidden has"),
        (lambda: gk.rr_loss(h, bad), ValueError, "ref_hidden contains NaN or inf"),
        (lambda: gk.rr_loss(h, ref[:, :4]), ValueError, "ref_hidden shape"),
        (lambda: gk.rr_loss(h, ref.tolist()), TypeError, "ref_hidden must be a torch.Tensor"),
        (lambda: gk.rr_loss(h.int(), ref.int()), ValueError, "hidden must be float16"),
    ]:
        with pytest.raises(error, match=message):
            call()


def test_token_weights_checks_its_inputs():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(2, 6, generator=g) * 3
    ref = (-torch.rand(2, 6, generator=g) * 3).double()
    w = gk.token_weights("tnpo", lp, ref)
    assert w.dtype == torch.float32 and torch.allclose(w, 2 * torch.sigmoid(4 * (lp - ref.float())))
    nan_lp = lp.clone()
    nan_lp[0, 1] = float("nan")
    for call, error, message in [
        (lambda: gk.token_weights("wga", nan_lp), ValueError, "logprobs contains NaN or inf"),
        (lambda: gk.token_weights("wga", lp.tolist()), TypeError, "logprobs must be a torch.Tensor"),
        (lambda: gk.token_weights("tnpo", lp, torch.full_like(lp, float("nan"))), ValueError,
         "ref_logprobs contains NaN"),
        (lambda: gk.token_weights("wga", lp, mask=torch.ones(2, 6)), ValueError, "mask must be a bool or integer"),
        (lambda: gk.token_weights("wga", lp, alpha=float("inf")), ValueError, "alpha must be a finite number"),
    ]:
        with pytest.raises(error, match=message):
            call()


@pytest.mark.parametrize("name, hparams, message", [
    ("wga", {"alpha": float("inf")}, "alpha must be a finite number ≥ 0, got inf"),
    ("wga", {"alpha": -1.0}, "alpha must be a finite number ≥ 0, got -1.0"),
    ("satimp", {"gamma": -1.0}, "gamma must be a finite number ≥ 0, got -1.0"),
    ("npo", {"beta": float("inf")}, "beta must be a finite number > 0, got inf"),
    ("simnpo", {"delta": float("inf")}, "delta must be a finite number, got inf"),
    ("simnpo", {"beta": float("nan")}, "beta must be a finite number > 0, got nan"),
])
def test_non_finite_or_out_of_range_hparams_are_refused(name, hparams, message):
    h, w, _, y = make_inputs(0)
    ref = torch.zeros(y.shape, dtype=h.dtype)
    with pytest.raises(ValueError, match=message):
        gk.unlearning_loss(name, h, w, y, ref_logprobs=ref, **hparams)


def test_softcap_and_ignore_index_types():
    h, w, _, y = make_inputs(0)
    for softcap, message in [("30", "softcap must be a finite number > 0, got '30'"),
                             (float("inf"), "softcap must be a finite number > 0, got inf"), (0.0, "got 0.0")]:
        with pytest.raises(ValueError, match=message):
            gk.token_logprobs(h, w, y, softcap=softcap)
    with pytest.raises(ValueError, match="ignore_index must be an integer, got -100.0"):
        gk.token_logprobs(h, w, y, ignore_index=-100.0)
    assert torch.isfinite(gk.token_logprobs(h, w, y, softcap=30)).all()


def test_geffect_backend_auto_means_the_default(monkeypatch):
    h, w, _, y = make_inputs(0)
    expected = gk.token_logprobs(h, w, y)
    monkeypatch.setenv("GEFFECT_BACKEND", "auto")
    assert torch.equal(gk.token_logprobs(h, w, y), expected)
    monkeypatch.setenv("GEFFECT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="GEFFECT_BACKEND=bogus: unknown backend"):
        gk.token_logprobs(h, w, y)


def test_profiler_batches_are_checked():
    model = tiny_model("llama")
    profiler = GEffectProfiler(model)
    good = batch()
    high = {**good, "labels": good["labels"].clone()}
    high["labels"][1, 3] = VOCAB
    cases = [
        (high, f"forget_batch: labels must be in \\[0, {VOCAB}\\) or ignore_index=-100; found {VOCAB}"),
        ({**good, "labels": good["labels"].float()}, "forget_batch: labels must be an integer tensor"),
        ({k: v[:0] for k, v in good.items()}, r"forget_batch: input_ids is \[B, T\] = \(0, 7\), no next token"),
        ({k: v[:, :1] for k, v in good.items()}, r"forget_batch: input_ids is \[B, T\] = \(3, 1\), no next token"),
        ({**good, "input_ids": good["input_ids"].float()}, "forget_batch: input_ids must be an integer tensor"),
        ({**good, "attention_mask": good["attention_mask"][:, :3]}, "attention_mask must be a tensor shaped like"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            profiler.measure_unlearning("ga", bad, good)
    with pytest.raises(ValueError, match="retain_batch: labels must be"):
        profiler.measure_unlearning("ga", good, high)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"nan.*at these parameters \(objective 'wga'\): no G-effect to measure"):
        profiler.measure_unlearning("wga", good, good)
