"""PO, DPO, RMU and the RR retain term, in float64 on random inputs with ignored positions: against the formulas of
tests/formulas.py and against open-unlearning's functions (locuslab/open-unlearning @ d3d7cf9,
src/trainer/utils.py and src/trainer/unlearn/rmu.py), re-implemented below as faithfully as the test needs."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import geffect_kernels as gk
from geffect_kernels import objective_inputs
from geffect_kernels.catalog import RETAIN_TERMS, resolve
from geffect_kernels.layers import default_layer, layer_index, rmu_trained_parameters
from geffect_kernels.objective_inputs import ReferenceState, with_alternate
from geffect_kernels.objectives import pair_loss_from_logprobs
from geffect_kernels.retain import rmu_loss, rr_loss
import formulas
from geffect_models import tiny_model

IGNORE = -100


# ---- open-unlearning @ d3d7cf9, src/trainer/utils.py -----------------------------------------------------------

def ou_compute_batch_nll(model, inputs):
    outputs = model(**inputs)
    logits = outputs.logits
    labels = inputs["labels"]
    shifted_labels = labels[..., 1:].contiguous()
    logits = logits[..., :-1, :].contiguous()
    loss_function = nn.CrossEntropyLoss(ignore_index=-100, reduction="none")
    loss = loss_function(logits.transpose(-1, -2), shifted_labels).sum(dim=-1)
    return loss, outputs


def ou_compute_dpo_loss(model, ref_model, win_inputs=None, lose_inputs=None, beta=1.0):
    win_loss, _ = ou_compute_batch_nll(model, win_inputs)
    with torch.no_grad():
        win_ref_loss, _ = ou_compute_batch_nll(ref_model, win_inputs)
    win_log_ratio = -(win_loss - win_ref_loss)
    lose_loss, _ = ou_compute_batch_nll(model, lose_inputs)
    with torch.no_grad():
        lose_ref_loss, _ = ou_compute_batch_nll(ref_model, lose_inputs)
    lose_log_ratio = -(lose_loss - lose_ref_loss)
    return -2 / beta * F.logsigmoid(beta * (win_log_ratio - lose_log_ratio)).mean()


# ---- open-unlearning @ d3d7cf9, src/trainer/unlearn/rmu.py (RMU.compute_activation_loss, forward_with_cache) -----

def ou_compute_activation_loss(activation1, activation2, mask):
    squared_diff = torch.nn.functional.mse_loss(activation1, activation2, reduction="none")
    expanded_mask = mask.unsqueeze(-1).expand_as(squared_diff)
    squared_diff_sum = (squared_diff * expanded_mask).mean(dim=2).sum(dim=(1))
    num_tokens = mask.sum(dim=-1, keepdim=True)
    return (squared_diff_sum / num_tokens).mean()


def ou_forward_with_cache(model, inputs, module, no_grad=True):
    cache = []

    def hook(module, input, output):
        cache.append(output[0] if isinstance(output, tuple) else output)

    handle = module.register_forward_hook(hook)
    with torch.set_grad_enabled(not no_grad):
        outputs = model(**inputs)
    handle.remove()
    return cache[0], outputs


class _Head:
    """A model whose forward takes hidden states and returns their logits ``.logits = h W^T``."""

    def __init__(self, weight):
        self.weight = weight

    def __call__(self, hidden, labels):
        return type("Out", (), {"logits": hidden @ self.weight.T})()


def _labels(g, B, T, V, prompt):
    y = torch.randint(0, V, (B, T), generator=g)
    y[:, :prompt] = IGNORE
    y[torch.rand(B, T, generator=g) < 0.25] = IGNORE
    y[:, prompt] = torch.randint(0, V, (B,), generator=g)  # at least one answer token per row (after the shift too)
    y[0, -1] = IGNORE  # a padded end
    return y


def test_dpo_matches_its_formula_and_open_unlearning_float64():
    g = torch.Generator().manual_seed(11)
    B, Tw, Tl, H, V, beta = 3, 7, 10, 8, 23, 0.7
    hw = torch.randn(B, Tw, H, generator=g, dtype=torch.float64, requires_grad=True)
    hl = torch.randn(B, Tl, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5).requires_grad_()
    w_ref = w.detach() + 0.3 * torch.randn(V, H, generator=g, dtype=torch.float64)
    yw, yl = _labels(g, B, Tw, V, 2), _labels(g, B, Tl, V, 3)
    ref_w = gk.token_logprobs(hw.detach(), w_ref, yw, shift=True, backend="oracle")
    ref_l = gk.token_logprobs(hl.detach(), w_ref, yl, shift=True, backend="oracle")
    lw = gk.token_logprobs(hw, w, yw, shift=True, backend="torch")
    ll = gk.token_logprobs(hl, w, yl, shift=True, backend="torch")
    got = pair_loss_from_logprobs("dpo", lw, yw, ll, yl, win_ref=ref_w, lose_ref=ref_l, shift=True, beta=beta)

    fw, vw = formulas.logprobs(hw, w, yw, shift=True)
    fl, vl = formulas.logprobs(hl, w, yl, shift=True)
    expected = formulas.dpo(fw, vw, ref_w, fl, vl, ref_l, beta)
    assert torch.allclose(got, expected, rtol=1e-12, atol=0)

    # the model's forward turns an input's hidden states into logits through the model's (or the reference's) head
    model, reference = _Head(w), _Head(w_ref)
    open_unlearning = ou_compute_dpo_loss(model, reference, {"hidden": hw, "labels": yw}, {"hidden": hl, "labels": yl},
                                          beta)
    assert torch.allclose(got, open_unlearning, rtol=1e-12, atol=0)
    for a, b in zip(torch.autograd.grad(got, [hw, hl, w]), torch.autograd.grad(open_unlearning, [hw, hl, w])):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_dpo_without_its_reference_is_refused():
    lp, y = torch.randn(2, 5, dtype=torch.float64), torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        pair_loss_from_logprobs("dpo", lp, y, lp, y, win_ref=lp)
    with pytest.raises(ValueError, match="reads logprob_pair"):
        gk.unlearning_loss_from_logprobs("dpo", lp, y)


def _qa_batches(seed, B=3, T=9, alt_T=7, prompt=3):
    g = torch.Generator().manual_seed(seed)
    from geffect_models import VOCAB
    out = []
    for t in (T, alt_T):
        ids = torch.randint(2, VOCAB, (B, t), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        labels = torch.where(mask.bool(), ids, IGNORE)
        labels[:, :prompt] = IGNORE
        labels[1, prompt + 1] = IGNORE
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def test_dpo_and_po_on_a_model_equal_open_unlearning():
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    forget, alternate = _qa_batches(3)
    batch = with_alternate(forget, alternate)
    with torch.no_grad():
        state = ReferenceState(gk.hf.token_logprobs(reference, forget), gk.hf.token_logprobs(reference, alternate))
    dpo = objective_inputs.loss(resolve("dpo", {"beta": 0.3}), model, batch, state, backend="torch")
    expected = ou_compute_dpo_loss(model, reference, alternate, forget, beta=0.3)
    assert torch.allclose(dpo, expected, rtol=1e-11, atol=0)
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(dpo, params), torch.autograd.grad(expected, params)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-13)
    # PO: the NLL of the substitute answers, the mean over their tokens: open-unlearning's model(**inputs).loss, the
    # Hugging Face shifted cross-entropy (here in the model's float64; transformers upcasts the logits to float32)
    po = objective_inputs.loss("po", model, batch, backend="torch")
    logits = model(**alternate).logits
    hf_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), alternate["labels"][:, 1:].flatten(), ignore_index=-100)
    assert torch.allclose(po, hf_loss, rtol=1e-11, atol=0)
    lp, valid = formulas.logprobs(*_head(model, alternate), shift=True)
    assert torch.allclose(po, formulas.objective("po", lp, valid), rtol=1e-11, atol=0)
    for a, b in zip(torch.autograd.grad(po, params), torch.autograd.grad(hf_loss, params)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-13)


def _head(model, batch):
    x = gk.hf.head_inputs(model, batch)
    return x.hidden, x.weight, x.labels


def test_po_and_dpo_without_substitute_answers_say_so():
    model = tiny_model("llama")
    forget, _ = _qa_batches(4)
    for name in ("po", "dpo"):
        with pytest.raises(ValueError, match="substitute answers"):
            objective_inputs.loss(name, model, forget, ReferenceState(torch.zeros(3, 8)))


def _per_sample_mse(h, target, mask):
    """Each row's mean over its valid positions and the units, then the mean over the rows."""
    rows = [((h[b] - target.expand_as(h)[b])[mask[b]] ** 2).mean() for b in range(h.shape[0])]
    return torch.stack(rows).mean()


@pytest.mark.parametrize("equal_lengths", [False, True])
def test_rmu_and_rr_losses_match_the_formula_and_open_unlearning(equal_lengths):
    g = torch.Generator().manual_seed(5)
    B, T, H = 3, 8, 11
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    if equal_lengths:
        mask = torch.stack([torch.randperm(T, generator=g) < 5 for _ in range(B)])
    u = gk.rmu_direction(H, seed=2, dtype=torch.float64)
    coeff = 4.5
    for target, loss in ((coeff * u, lambda r: rmu_loss(h, u, coeff=coeff, mask=mask, reduction=r)),
                         (ref, lambda r: rr_loss(h, ref, mask=mask, reduction=r))):
        tokens, samples = loss("tokens"), loss("samples")
        open_unlearning = ou_compute_activation_loss(h, target.expand_as(h), mask)
        for got, expected in ((tokens, formulas.mse_to(h, target, mask)), (samples, _per_sample_mse(h, target, mask))):
            assert torch.allclose(got, expected, rtol=1e-12, atol=0)
            assert torch.allclose(torch.autograd.grad(got, h)[0], torch.autograd.grad(expected, h)[0], rtol=1e-11,
                                  atol=1e-15)
        if equal_lengths:  # then every reduction is the same number, open-unlearning's too
            assert torch.allclose(open_unlearning, tokens, rtol=1e-12, atol=0)
        else:
            # open-unlearning divides the [B] row sums by the [B, 1] counts: a [B, B] broadcast whose mean is
            # mean_b(row sum) · mean_b(1 / count), not the per-sample mean (docs/conventions.md)
            sums = (((h - target.expand_as(h)) ** 2).mean(-1) * mask).sum(-1)
            assert torch.allclose(open_unlearning, sums.mean() * (1 / mask.sum(-1).double()).mean(), rtol=1e-12, atol=0)
            assert not torch.allclose(open_unlearning, samples, rtol=1e-3)


def test_rmu_and_rr_on_a_model_read_the_chosen_layer():
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    forget, retain = _qa_batches(6)
    valid = forget["labels"] != IGNORE
    states = model(**forget, output_hidden_states=True).hidden_states
    u = gk.rmu_direction(states[0].shape[-1], seed=4, dtype=torch.float64)
    for layer in (0, 1):  # block ℓ's output: what the RMU code's hook reads
        block, _ = ou_forward_with_cache(model, forget, model.model.layers[layer], no_grad=False)
        rmu = objective_inputs.loss(resolve("rmu", {"layer": layer, "coeff": 3.0}), model, forget,
                                    ReferenceState(seed=4))
        assert torch.allclose(rmu, formulas.mse_to(block, 3.0 * u, valid), rtol=1e-12, atol=0)
    assert torch.equal(ou_forward_with_cache(model, forget, model.model.layers[0])[0], states[1])
    with torch.no_grad():
        ref_block, _ = ou_forward_with_cache(reference, forget, reference.model.layers[1])
    rr = objective_inputs.loss("rr", model, forget, ReferenceState(model=reference), layer=1)
    assert torch.allclose(rr, formulas.mse_to(block, ref_block, valid), rtol=1e-12, atol=0)
    # open-unlearning's EMBED_DIFF retain loss on the same module, rows of equal answer lengths (its per-sample mean
    # is then the token mean)
    equal = {k: v[1:].clone() for k, v in retain.items()}
    equal["labels"] = torch.where(torch.arange(equal["labels"].shape[1]) < 3, IGNORE, equal["input_ids"])
    module = model.model.layers[1]
    mine, _ = ou_forward_with_cache(model, equal, module, no_grad=False)
    theirs, _ = ou_forward_with_cache(reference, equal, reference.model.layers[1], no_grad=True)
    assert (equal["labels"] != IGNORE).sum(-1).unique().numel() == 1
    assert torch.allclose(objective_inputs.loss("rr", model, equal, ReferenceState(model=reference), layer=1),
                          ou_compute_activation_loss(mine, theirs, equal["labels"] != IGNORE), rtol=1e-12, atol=0)


def test_rmu_layer_and_trained_parameters_follow_the_rmu_code():
    assert [default_layer(n) for n in (32, 4, 2, 1, 40)] == [7, 1, 0, 0, 9]
    model = tiny_model("llama")
    assert layer_index(model, -1) == 0 and layer_index(model, 1.0) == 1
    for bad, match in ((2, "outside the model's 2 decoder layers"), (1.5, "integer"), (-1.5, "integer")):
        with pytest.raises(ValueError, match=match):
            layer_index(model, bad)
    assert rmu_trained_parameters(model, 1) == {"model.layers.0.mlp.down_proj.weight",
                                                "model.layers.1.mlp.down_proj.weight"}
    gpt2 = tiny_model("gpt2")
    assert rmu_trained_parameters(gpt2, -1) == {"transformer.h.0.mlp.c_proj.weight", "transformer.h.0.mlp.c_proj.bias"}
    with pytest.raises(ValueError, match="outside"):
        objective_inputs.loss(resolve("rmu", {"layer": 5}), model, _qa_batches(1)[0])
    assert RETAIN_TERMS["rr"].needs_reference_model and resolve("rmu", {}).hparams == {"layer": -1.0, "coeff": 6.5}
