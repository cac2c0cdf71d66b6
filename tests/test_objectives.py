"""Every objective against its DESIGN §3 formula (tests/formulas.py), loss and gradients, per backend."""
import itertools
import zlib

import pytest
import torch

import geffect_kernels as gk
from geffect_kernels.catalog import resolve
from formulas import IGNORE, kl, logprobs, objective, token_weight

BACKENDS = ["oracle", "torch"]
NEEDS_REF = {"tnpo", "wtnpo", "npo"}
HPARAMS = {  # non-default values too, so a hyper-parameter that is silently dropped shows
    "ga": {}, "nll": {}, "wga": {"alpha": 0.7}, "satimp": {"alpha": 2.0, "gamma": 1.5}, "tnpo": {"beta": 3.0},
    "wtnpo": {"alpha": 1.3, "beta": 2.0}, "npo": {"beta": 0.5}, "simnpo": {"beta": 2.5, "delta": 0.3}, "po": {},
    "ceu": {"ignore_first": 0},
}


def make_inputs(seed, *, B=3, T=9, H=24, V=101, dtype=torch.float64, bias=True, scale=1.0, ignore_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(B, T, H, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.2).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, V, (B, T), generator=g)
    y[torch.rand(B, T, generator=g) < ignore_frac] = IGNORE
    y[0, :] = IGNORE  # a sequence with nothing valid must not count in sequence means
    y[1, 1] = 3  # and some valid tokens everywhere else
    return h, w, b, y


def fake_ref(lp, valid, seed):
    """Reference log-probs near the model's own, with garbage where ignored (must not matter)."""
    g = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(lp.shape, generator=g, dtype=torch.float64)
    return torch.where(valid, lp.detach().double() + 0.5 * noise, 1e3 * noise)


def grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


def assert_close(a, b, rtol):
    a, b = a.double(), b.double()
    scale = b.abs().max().clamp_min(1e-30)
    assert ((a - b).abs().max() / scale).item() <= rtol, f"max rel err {((a - b).abs().max() / scale).item():.3e}"


# the entries that read one batch's token log-probabilities (the others: tests/test_new_objectives.py), CE-U's
# over a head reading the distribution (tests/test_undial_ceu.py)
ONE_BATCH = [name for name, o in gk.OBJECTIVES.items() if o.inputs == "logprobs"]
# and CE-U, whose loss over a head needs its distribution (tests/test_undial_ceu.py) but whose gradient is a weighted
# one of ℓ_t: from log-probabilities, and its token weights, like the others
WEIGHTED = [*ONE_BATCH, *(name for name, o in gk.OBJECTIVES.items() if o.inputs == "own_distribution")]
CASES = list(itertools.product(ONE_BATCH, BACKENDS, [False, True], [None, 7.5]))


@pytest.mark.parametrize("name,backend,shift,softcap", CASES)
def test_objective_matches_formula_float64(name, backend, shift, softcap):
    seed = zlib.crc32(f"{name} {backend} {shift} {softcap}".encode()) % 1000  # stable across processes, unlike hash()
    h, w, b, y = make_inputs(seed, scale=2.0)
    lp_true, valid = logprobs(h, w, y, b, softcap, shift)
    ref = fake_ref(lp_true, valid, seed) if name in NEEDS_REF else None
    expected = objective(name, lp_true, valid, ref, **HPARAMS[name])
    got = gk.unlearning_loss(name, h, w, y, ref_logprobs=ref, bias=b, softcap=softcap, shift=shift, backend=backend,
                             **HPARAMS[name])
    assert got.dtype == torch.float64
    assert_close(got, expected, 1e-11)
    for g_got, g_exp in zip(grads(got, [h, w, b]), grads(expected, [h, w, b])):
        assert_close(g_got, g_exp, 1e-10)


@pytest.mark.parametrize("name,backend", itertools.product(ONE_BATCH, BACKENDS))
def test_objective_float32(name, backend):
    h64, w64, b64, y = make_inputs(5, B=4, T=13, H=40, V=333)
    h, w, b = (t.detach().float().requires_grad_() for t in (h64, w64, b64))
    lp_true, valid = logprobs(h64, w64, y, b64)
    ref = fake_ref(lp_true, valid, 5) if name in NEEDS_REF else None
    expected = objective(name, lp_true, valid, ref)
    got = gk.unlearning_loss(name, h, w, y, ref_logprobs=None if ref is None else ref.float(), bias=b, backend=backend)
    assert got.dtype == torch.float32
    assert_close(got, expected, 2e-5)
    for g_got, g_exp in zip(grads(got, [h, w, b]), grads(expected, [h64, w64, b64])):
        assert_close(g_got, g_exp, 5e-5)


@pytest.mark.parametrize("name,backend", itertools.product(WEIGHTED, BACKENDS))
def test_all_ignored_gives_zero_loss_and_zero_gradients(name, backend):
    h, w, b, y = make_inputs(11)
    y[:] = IGNORE
    ref = torch.randn(y.shape, dtype=torch.float64) if name in NEEDS_REF else None
    loss = gk.unlearning_loss(name, h, w, y, ref_logprobs=ref, bias=b, backend=backend)
    assert loss.item() == 0.0
    for g in grads(loss, [h, w, b]):
        assert torch.all(g == 0)


@pytest.mark.parametrize("name", ONE_BATCH)
def test_from_logits_equals_hidden_path(name):
    h, w, b, y = make_inputs(21, bias=True)
    z = (h @ w.T + b).detach().requires_grad_()
    lp_true, valid = logprobs(h, w, y, b, shift=True)
    ref = fake_ref(lp_true, valid, 21) if name in NEEDS_REF else None
    expected = objective(name, lp_true, valid, ref, **HPARAMS[name])
    (g_h,) = grads(expected, [h])
    for backend in BACKENDS:
        got = gk.unlearning_loss_from_logits(name, z, y, ref_logprobs=ref, shift=True, backend=backend,
                                             **HPARAMS[name])
        assert_close(got, expected, 1e-11)
        (g_z,) = grads(got, [z])
        assert_close(g_z @ w, g_h, 1e-10)  # dL/dh = dL/dz · W
        assert torch.all(g_z[:, -1] == 0)  # the shift drops the last position


@pytest.mark.parametrize("name,shift", itertools.product(WEIGHTED, [False, True]))
def test_from_logprobs_matches_formula(name, shift):
    """Loss and gradient in ℓ; values at ignored positions (log-probabilities and reference) must not matter."""
    seed = zlib.crc32(f"logprobs {name} {shift}".encode()) % 1000
    g = torch.Generator().manual_seed(seed)
    _, _, _, y = make_inputs(seed, B=4, T=11)
    labels = y[:, 1:] if shift else y
    valid = labels != IGNORE
    lp = (-3 * torch.rand(labels.shape, generator=g, dtype=torch.float64)).requires_grad_()
    ref = fake_ref(lp, valid, seed).clamp_max(-0.01) if name in NEEDS_REF else None
    got = gk.unlearning_loss_from_logprobs(name, lp, y, ref_logprobs=ref, shift=shift, **HPARAMS[name])
    expected = objective(name, torch.where(valid, lp, 0), valid, ref, **HPARAMS[name])
    assert got.dtype == torch.float64
    assert_close(got, expected, 1e-13)
    (g_got,), (g_exp,) = grads(got, [lp]), grads(expected, [lp])
    assert_close(g_got, g_exp, 1e-13)
    assert torch.all(g_got[~valid] == 0)
    resolved = resolve(name, HPARAMS[name])
    again = gk.unlearning_loss_from_logprobs(resolved, lp, y, ref_logprobs=ref, shift=shift)
    assert again.item() == got.item()


def test_from_logprobs_bad_input():
    lp, labels = torch.randn(2, 5, dtype=torch.float64) - 2, torch.randint(0, 9, (2, 5))
    with pytest.raises(ValueError, match="does not match logprobs"):
        gk.unlearning_loss_from_logprobs("ga", lp, labels[:, 1:])
    with pytest.raises(ValueError, match="after the shift"):
        gk.unlearning_loss_from_logprobs("ga", lp, labels, shift=True)
    with pytest.raises(ValueError, match="integer"):
        gk.unlearning_loss_from_logprobs("ga", lp, labels.double())
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        gk.unlearning_loss_from_logprobs("npo", lp, labels)
    with pytest.raises(ValueError, match="needs batched input"):
        gk.unlearning_loss_from_logprobs("simnpo", lp[0], labels[0])
    with pytest.raises(ValueError, match="already resolved"):
        gk.unlearning_loss_from_logprobs(resolve("wga", {}), lp, labels, alpha=2.0)
    with pytest.raises(ValueError, match="unknown objective"):
        gk.unlearning_loss_from_logprobs("foo", lp, labels)


@pytest.mark.parametrize("name", WEIGHTED)
def test_token_weights(name):
    h, w, b, y = make_inputs(31)
    lp, valid = logprobs(h, w, y, b)
    ref = fake_ref(lp, valid, 31) if name in NEEDS_REF else None
    got = gk.token_weights(name, lp, ref, mask=valid, **HPARAMS[name])
    assert not got.requires_grad
    assert torch.all(got[~valid] == 0)
    if name in ("npo", "simnpo"):  # per-sequence weight 2σ(·), broadcast over the sequence
        hp = HPARAMS[name]
        seq = lp.detach().sum(-1)
        if name == "npo":
            x = hp["beta"] * (seq - ref.masked_fill(~valid, 0).sum(-1))
        else:
            x = hp["beta"] * seq / valid.sum(-1).clamp_min(1) + hp["beta"] * hp["delta"]
        expected = (2 / (1 + torch.exp(-x))).unsqueeze(-1).expand_as(lp)
    else:
        expected = token_weight(name, lp, ref, HPARAMS[name])
    assert_close(got[valid], expected[valid], 1e-12)


@pytest.mark.parametrize("backend,softcap", itertools.product(BACKENDS, [None, 5.0]))
def test_kl_loss(backend, softcap):
    h, w, b, y = make_inputs(41)
    h_ref, w_ref, b_ref, _ = make_inputs(42)
    expected = kl(h, w, h_ref, w_ref, y, b, b_ref, softcap)
    got = gk.kl_loss(h, w, h_ref, w_ref, y, bias=b, ref_bias=b_ref, softcap=softcap, backend=backend)
    assert_close(got, expected, 1e-11)
    for g_got, g_exp in zip(grads(got, [h, w, b]), grads(expected, [h, w, b])):
        assert_close(g_got, g_exp, 1e-10)
    same = gk.kl_loss(h, w, h.detach(), w.detach(), y, bias=b, ref_bias=b.detach(), backend=backend)
    assert abs(same.item()) < 1e-12  # KL of a distribution to itself


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # the Triton interpreter's masked lanes
def test_kl_official_reduction_on_every_backend():
    """reduction="batchmean": the TOFU / official-code batch-mean, F.kl_div(log p_θ, log p_ref, "batchmean") over
    the [B·T, V] log-probabilities, every position counted (ignored labels too); the default counts valid ones."""
    for backend, dtype in _eps_backends():
        h64, w64, b64, y = make_inputs(43)
        hr, wr, br, _ = make_inputs(44)
        log_p = torch.log_softmax(h64 @ w64.T + b64, -1).reshape(-1, w64.shape[0])
        log_q = torch.log_softmax(hr @ wr.T + br, -1).reshape(-1, w64.shape[0]).detach()
        expected = torch.nn.functional.kl_div(log_p, log_q, reduction="batchmean", log_target=True)
        h, w, b = (t.detach().to(dtype).requires_grad_() for t in (h64, w64, b64))
        got = gk.kl_loss(h, w, hr.to(dtype), wr.to(dtype), y, bias=b, ref_bias=br.to(dtype), backend=backend,
                         reduction="batchmean")
        tol = 1e-11 if dtype == torch.float64 else 2e-5
        assert_close(got, expected, tol)
        for g_got, g_exp in zip(grads(got, [h, w, b]), grads(expected, [h64, w64, b64])):
            assert_close(g_got, g_exp, 10 * tol)
        default = gk.kl_loss(h, w, hr.to(dtype), wr.to(dtype), y, bias=b, ref_bias=br.to(dtype), backend=backend)
        assert_close(default, kl(h64, w64, hr, wr, y, b64, br), tol)
        assert abs(default.item() - got.item()) > 1e-3 * got.item()  # a third of the labels are ignored
    with pytest.raises(ValueError, match="unknown KL reduction"):
        gk.kl_loss(h64, w64, hr, wr, y, reduction="mean")


def test_rmu_and_rr_are_mean_squared_errors_over_positions_and_hidden_units():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 5, generator=g) > 0.3
    u = gk.rmu_direction(8, seed=1, dtype=torch.float64)
    assert abs(u.norm().item() - 1) < 1e-12
    expected = sum(((hidden[i, t] - 4.0 * u) ** 2).sum() for i in range(2) for t in range(5) if mask[i, t]) \
        / (mask.sum() * 8)
    assert_close(gk.rmu_loss(hidden, u * 3, coeff=4.0, mask=mask), expected, 1e-12)
    ref = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    expected = sum(((hidden[i, t] - ref[i, t]) ** 2).sum() for i in range(2) for t in range(5)) / (2 * 5 * 8)
    got = gk.rr_loss(hidden, ref)
    assert_close(got, expected, 1e-12)
    (g_h,) = grads(got, [hidden])
    assert_close(g_h, 2 * (hidden - ref).detach() / (2 * 5 * 8), 1e-12)


def _eps_backends():
    """Every backend that runs here, with the dtype its kernels take (Triton: float32)."""
    return [(b, torch.float32 if b == "triton" else torch.float64) for b in gk.available_backends("cpu")]


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # the Triton interpreter's masked lanes
@pytest.mark.parametrize("name", ["tnpo", "wtnpo"])
def test_official_eps_on_every_backend(name):
    """eps > 0 (the official code's 2p^β / (p^β + p_ref^β + ε)) against the float64 formula, on every backend;
    at these probabilities (p ≈ 1/V) ε dominates p^β, so the loss moves far from the exact σ form."""
    hp = {"beta": 4.0, "eps": 1e-5, **({"alpha": 0.5} if name == "wtnpo" else {})}
    for backend, dtype in _eps_backends():
        h64, w64, b64, y = make_inputs(41)
        h, w, b = (t.detach().to(dtype).requires_grad_() for t in (h64, w64, b64))
        lp_true, valid = logprobs(h64, w64, y, b64, shift=True)
        ref = fake_ref(lp_true, valid, 41)
        expected = objective(name, lp_true, valid, ref, **hp)
        exact = objective(name, lp_true, valid, ref, **{**hp, "eps": 0.0})
        assert (expected - exact).abs() > 0.5 * exact.abs()
        got = gk.unlearning_loss(name, h, w, y, ref_logprobs=ref.to(dtype), bias=b, shift=True, backend=backend, **hp)
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        assert_close(got, expected, tol)
        for g_got, g_exp in zip(grads(got, [h, w, b]), grads(expected, [h64, w64, b64])):
            assert_close(g_got, g_exp, 10 * tol)
        z = (h @ w.T + b).detach().requires_grad_()
        got = gk.unlearning_loss_from_logits(name, z, y, ref_logprobs=ref.to(dtype), shift=True, backend=backend, **hp)
        assert_close(got, expected, tol)
    weights = gk.token_weights(name, lp_true, ref, mask=valid, **hp)
    assert_close(weights[valid], token_weight(name, lp_true, ref, hp)[valid], 1e-12)


def test_negative_eps_is_refused():
    h, w, b, y = make_inputs(3)
    ref = torch.zeros(y.shape, dtype=torch.float64)
    with pytest.raises(ValueError, match="hyper-parameter eps must be a finite number ≥ 0"):
        gk.unlearning_loss("tnpo", h, w, y, ref_logprobs=ref, eps=-1e-5)
    with pytest.raises(ValueError, match="takes no hyper-parameter eps"):
        gk.unlearning_loss("wga", h, w, y, eps=1e-5)
