"""UNDIAL (`undial_loss`) and CE-U (`unlearning_loss("ceu")`), fused in the head, on every CPU backend against the
formulas of tests/formulas.py and against open-unlearning's functions (@d3d7cf9) re-implemented here, in float64
with ignored positions, odd sizes, biases and soft-caps, gradients included."""
import math

import pytest
import torch
import torch.nn.functional as F

import geffect_kernels as gk
from formulas import IGNORE, ceu, undial
from geffect_kernels.backends.registry import available_backends

B, T, H, V = 3, 7, 11, 37
BACKENDS = [b for b in ("oracle", "torch", "cpp_cpu") if b in available_backends("cpu")]
F64 = dict(rtol=1e-10, atol=1e-12)


def head(seed, *, bias=False, n_ignored=4, ref_spread=0.5, vocab=V):
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    h, w = randn(B, T, H), randn(vocab, H) * 0.7
    b = randn(V) if bias else None
    hr, wr = h + ref_spread * randn(B, T, H), w + ref_spread * 0.5 * randn(vocab, H)
    br = randn(vocab) if bias else None
    y = torch.randint(0, vocab, (B, T), generator=g)
    y.view(-1)[torch.randperm(B * T, generator=g)[:n_ignored]] = IGNORE
    y[0, :2] = IGNORE  # a prompt
    return h, w, b, hr, wr, br, y


def leaves(*tensors):
    return [None if t is None else t.clone().requires_grad_() for t in tensors]


def grads_of(loss, tensors):
    wanted = [t for t in tensors if t is not None]
    got = iter(torch.autograd.grad(loss, wanted))
    return [None if t is None else next(got) for t in tensors]


def assert_all_close(got, expected, **tol):
    for g, e in zip(got, expected):
        if e is None:
            assert g is None
        else:
            torch.testing.assert_close(g, e, **tol)


# -- open-unlearning's functions (src/trainer/utils.py compute_undial_loss; src/trainer/unlearn/ceu.py), on logits
def open_unlearning_undial(logits, teacher_logits, labels, beta, reduction="mean"):
    shift_labels = labels[..., 1:].contiguous()
    shift_logits = logits[..., :-1, :].contiguous()
    shift_teacher_logits = teacher_logits[..., :-1, :].contiguous()
    mask = torch.zeros_like(shift_teacher_logits)
    batch_idx = torch.arange(mask.shape[0]).view(-1, 1, 1)
    seq_idx = torch.arange(mask.shape[1]).view(1, -1, 1)
    mask[batch_idx, seq_idx, shift_labels.unsqueeze(-1)] = 1.0
    soft_label = F.softmax(shift_teacher_logits - mask * beta, dim=-1)
    loss = torch.nn.CrossEntropyLoss(reduction="none")(shift_logits.view(-1, shift_logits.size(-1)),
                                                       soft_label.view(-1, soft_label.size(-1)))
    return loss.mean() if reduction == "mean" else loss


def open_unlearning_ceu(logits, labels, ignore_first_n_answer_tokens=1):
    valid_mask = labels != -100
    update_mask = (valid_mask.cumsum(dim=-1) <= ignore_first_n_answer_tokens) & valid_mask
    labels = labels.masked_fill(update_mask, -100)
    shifted_labels = labels[..., 1:].contiguous()
    shifted_logits = logits[..., :-1, :].contiguous()
    valid = shifted_labels != -100
    valid_logits, valid_labels = shifted_logits[valid], shifted_labels[valid]
    target = valid_logits.detach().clone()
    target.scatter_(dim=-1, index=valid_labels.unsqueeze(-1), value=float("-inf"))
    return F.cross_entropy(input=valid_logits, target=F.softmax(target, dim=-1))


# -- UNDIAL
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias,softcap,shift,beta", [(False, None, False, 10.0), (True, 6.0, True, 3.0),
                                                     (True, None, True, 30.0), (False, 5.0, False, 0.7)])
def test_undial_matches_formula(backend, bias, softcap, shift, beta):
    h, w, b, hr, wr, br, y = head(1, bias=bias)
    theta = leaves(h, w, b)
    got = gk.undial_loss(*theta[:2], hr, wr, y, beta=beta, bias=theta[2], ref_bias=br, softcap=softcap,
                         shift=shift, backend=backend)
    ref = leaves(h, w, b)
    expected = undial(ref[0], ref[1], hr, wr, y, beta, ref[2], br, softcap, shift)
    torch.testing.assert_close(got, expected, **F64)
    assert got.dtype == torch.float64
    assert_all_close(grads_of(got, theta), grads_of(expected, ref), **F64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_undial_equals_open_unlearning_without_ignored_positions(backend):
    h, w, b, hr, wr, br, _ = head(2, bias=True)
    y = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    theta = leaves(h, w, b)
    got = gk.undial_loss(theta[0], theta[1], hr, wr, y, beta=10.0, bias=theta[2], ref_bias=br, shift=True,
                         backend=backend)
    ref = leaves(h, w, b)
    expected = open_unlearning_undial(F.linear(ref[0], ref[1], ref[2]), F.linear(hr, wr, br), y, 10.0)
    torch.testing.assert_close(got, expected, **F64)
    assert_all_close(grads_of(got, theta), grads_of(expected, ref), **F64)


def test_undial_differs_from_open_unlearning_where_positions_are_ignored():
    """The documented difference (docs/conventions.md): open-unlearning averages over every position and lowers an
    ignored position's entry V − 100 (a vocabulary past 100 entries, as real ones are); at the answer tokens the
    per-position losses agree."""
    h, w, _, hr, wr, _, y = head(4, n_ignored=6, vocab=131)
    ours = gk.undial_loss(h, w, hr, wr, y, beta=10.0, shift=True, backend="torch")
    theirs = open_unlearning_undial(h @ w.T, hr @ wr.T, y, 10.0, reduction="none")
    valid = (y[:, 1:] != IGNORE).reshape(-1)
    torch.testing.assert_close(ours, theirs[valid].mean(), **F64)
    assert not math.isclose(float(ours), float(theirs.mean()), rel_tol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_undial_gradient_is_p_minus_target(backend):
    """∂/∂z = (p − softmax(z_ref − β·onehot(y)))/n: with the identity as the head, the hidden gradient is it."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(9, V, generator=g, dtype=torch.float64).requires_grad_()
    zr = torch.randn(9, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (9,), generator=g)
    y[4] = IGNORE
    eye = torch.eye(V, dtype=torch.float64)
    gk.undial_loss(z, eye, zr, eye, y, beta=2.0, backend=backend).backward()
    valid = y != IGNORE
    target = torch.softmax(zr - 2.0 * F.one_hot(y.clamp_min(0), V) * valid[:, None], -1)
    torch.testing.assert_close(z.grad, (torch.softmax(z.detach(), -1) - target) * valid[:, None] / 8, **F64)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "oracle"])
def test_float32_against_float64(backend):
    """The float32 kernels (float32 logits, float32 sums) against the float64 formulas, both losses."""
    h, w, b, hr, wr, br, y = head(14, bias=True)
    theta32 = leaves(*(t.float() for t in (h, w, b)))
    theta64 = leaves(h, w, b)
    for got, expected in [
        (gk.undial_loss(theta32[0], theta32[1], hr.float(), wr.float(), y, beta=10.0, bias=theta32[2],
                        ref_bias=br.float(), shift=True, backend=backend),
         undial(theta64[0], theta64[1], hr, wr, y, 10.0, theta64[2], br, shift=True)),
        (gk.unlearning_loss("ceu", theta32[0], theta32[1], y, bias=theta32[2], shift=True, backend=backend),
         ceu(theta64[0], theta64[1], y, 1, theta64[2], shift=True)),
    ]:
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=1e-7)
        for g32, g64 in zip(grads_of(got, theta32), grads_of(expected, theta64)):
            torch.testing.assert_close(g32.double(), g64, rtol=1e-5, atol=1e-6)


def test_undial_refusals():
    h, w, _, hr, wr, _, y = head(6)
    with pytest.raises(ValueError, match="beta"):
        gk.undial_loss(h, w, hr, wr, y, beta=0.0)
    with pytest.raises(ValueError, match="vocabularies"):
        gk.undial_loss(h, w, hr, wr[:-1], y)
    with pytest.raises(ValueError, match="ref_hidden"):
        gk.undial_loss(h, w, hr.float(), wr.float(), y)


def test_undial_all_ignored_is_zero():
    h, w, _, hr, wr, _, y = head(7)
    h = h.requires_grad_()
    loss = gk.undial_loss(h, w, hr, wr, torch.full_like(y, IGNORE), backend="torch")
    loss.backward()
    assert float(loss.detach()) == 0 and not h.grad.any()


# -- CE-U
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias,softcap,shift,ignore_first", [(False, None, False, 1), (True, 6.0, True, 1),
                                                             (True, None, True, 0), (False, 5.0, False, 2)])
def test_ceu_matches_formula(backend, bias, softcap, shift, ignore_first):
    h, w, b, *_, y = head(8, bias=bias)
    theta = leaves(h, w, b)
    got = gk.unlearning_loss("ceu", theta[0], theta[1], y, bias=theta[2], softcap=softcap, shift=shift,
                             backend=backend, ignore_first=ignore_first)
    ref = leaves(h, w, b)
    expected = ceu(ref[0], ref[1], y, ignore_first, ref[2], softcap, shift)
    torch.testing.assert_close(got, expected, **F64)
    assert_all_close(grads_of(got, theta), grads_of(expected, ref), **F64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ceu_equals_open_unlearning(backend):
    h, w, b, *_, y = head(9, bias=True)
    theta = leaves(h, w, b)
    got = gk.unlearning_loss("ceu", theta[0], theta[1], y, bias=theta[2], shift=True, backend=backend)
    ref = leaves(h, w, b)
    expected = open_unlearning_ceu(F.linear(ref[0], ref[1], ref[2]), y)
    torch.testing.assert_close(got, expected, **F64)
    assert_all_close(grads_of(got, theta), grads_of(expected, ref), **F64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ceu_from_logits(backend):
    h, w, _, *_, y = head(10)
    z = (h @ w.T).requires_grad_()
    got = gk.unlearning_loss_from_logits("ceu", z, y, shift=True, backend=backend, ignore_first=2)
    z_ref = (h @ w.T).requires_grad_()
    expected = open_unlearning_ceu(z_ref, y, 2)
    torch.testing.assert_close(got, expected, **F64)
    torch.testing.assert_close(*torch.autograd.grad(got, z), *torch.autograd.grad(expected, z_ref), **F64)


def test_ceu_gradient_is_a_weighted_log_likelihood_gradient():
    """∂CE-U/∂z_t = w_t ∂ℓ_t/∂z_t with w_t = p_t/(1 − p_t): from log-probabilities, the same gradient."""
    h, w, _, *_, y = head(11)
    h = h.requires_grad_()
    fused = gk.unlearning_loss("ceu", h, w, y, backend="torch")
    lp = gk.token_logprobs(h, w, y, backend="oracle")
    from_lp = gk.unlearning_loss_from_logprobs("ceu", lp, y)
    torch.testing.assert_close(*torch.autograd.grad(fused, h), *torch.autograd.grad(from_lp, h), **F64)
    p = lp.detach().exp()
    weights = gk.token_weights("ceu", lp, mask=y != IGNORE)
    torch.testing.assert_close(weights, torch.where(y != IGNORE, p / (1 - p), 0), **F64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ceu_as_the_label_takes_all_the_mass(backend):
    """p_y → 1 (1 − p_y below float64's resolution): the loss is H(q) − log(1 − p_y), finite, and the gradient is
    p − q, each entry to its relative precision (p_v − q_v = −q_v p_y)."""
    g = torch.Generator().manual_seed(12)
    z = torch.randn(5, V, generator=g, dtype=torch.float64)
    y = torch.arange(5)
    z[torch.arange(5), y] = torch.tensor([40.0, 60.0, 5.0, -3.0, 80.0], dtype=torch.float64)
    z = z.requires_grad_()
    eye = torch.eye(V, dtype=torch.float64)
    loss = gk.unlearning_loss("ceu", z, eye, y, backend=backend, ignore_first=0)
    loss.backward()
    rest = z.detach().clone()
    rest[torch.arange(5), y] = -math.inf
    lse_rest, lse = torch.logsumexp(rest, -1), torch.logsumexp(z.detach(), -1)
    q = torch.softmax(rest, -1)
    per = -(q * torch.log_softmax(z.detach(), -1)).sum(-1)
    torch.testing.assert_close(loss, per.mean(), **F64)
    assert float(per[4]) > 70 and math.isfinite(float(loss.detach()))
    p_y = torch.exp(z.detach()[torch.arange(5), y] - lse)
    expected = -q * p_y[:, None]
    expected[torch.arange(5), y] = p_y
    torch.testing.assert_close(z.grad, expected / 5, rtol=1e-12, atol=0)
    assert (lse - lse_rest).isfinite().all()


def test_ceu_refusals():
    h, w, *_, y = head(13)
    with pytest.raises(ValueError, match="ignore_first"):
        gk.unlearning_loss("ceu", h, w, y, ignore_first=1.5)
    with pytest.raises(ValueError, match="ignore_first"):
        gk.unlearning_loss("ceu", h, w, y, ignore_first=-1)
    with pytest.raises(ValueError, match="at least 2"):
        gk.unlearning_loss("ceu", h, w[:1], torch.zeros_like(y))
