"""torch.compile(fullgraph=True) of every public loss on every CPU backend: no graph break, and the compiled call
equals the eager one to rounding, gradients included (hidden, weight, bias; float64 and float32).

The "aot_eager" backend runs dynamo, fake tensors and AOT autograd (what the custom operators' fake
implementations and registered autograd must satisfy) without inductor's C++ code generation, which one test runs.
"""
import pytest
import torch
import torch.nn.functional as F

import geffect_kernels as gk
from geffect_kernels.catalog import LOGPROBS, OWN_DISTRIBUTION
from geffect_kernels.backends.triton import config as triton_config
from formulas import IGNORE, ceu, kl, logprobs, objective, undial

from test_hf import batch, tiny

# triton: its interpreter on CPU tensors, float32 only (the backend sends float64 to torch)
BACKENDS = ["torch", "cpp_cpu", "triton"]
DTYPES = {"torch": [torch.float64, torch.float32], "cpp_cpu": [torch.float64, torch.float32],
          "triton": [torch.float32]}
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5}
# the second dtype of a backend: one loss per operator kind (the graph around them does not depend on the dtype)
FLOAT32_LOSSES = ("token_logprobs", "unlearning_loss wtnpo", "kl_loss", "unlearning_loss_from_logits wga")


def _inputs(dtype, *, B=2, T=7, H=12, V=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5).to(dtype).requires_grad_()
    b = (0.3 * torch.randn(V, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    y = torch.randint(0, V, (B, T), generator=g)
    y[torch.rand(B, T, generator=g) < 0.3] = IGNORE
    y[0, 2], y[1, 0] = IGNORE, 5
    return h, w, b, y


def _reference(h, w, b, y):
    """A frozen reference model's head inputs and ℓ_ref near the model's own."""
    g = torch.Generator().manual_seed(7)
    noise_h, noise_w = (torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device) for t in (h, w))
    ref_h = (h.detach().double() + 0.2 * noise_h).to(h.dtype)
    ref_w = (w.detach().double() + 0.1 * noise_w).to(w.dtype)
    lp, _ = logprobs(ref_h, ref_w, y, b.detach(), shift=True)
    return ref_h, ref_w, lp.to(torch.float64 if h.dtype == torch.float64 else torch.float32)


def _upstream(length, device):
    """Per-position upstream gradients of ℓ_t, not all equal (token_logprobs's backward takes any)."""
    return torch.linspace(-1, 2, length, dtype=torch.float64, device=device)


def _losses(backend, ref_h, ref_w, ref_lp):
    """Each public loss as a scalar function of (hidden, weight, bias, labels)."""
    kw = dict(backend=backend, shift=True)
    return {
        "token_logprobs": lambda h, w, b, y: (gk.token_logprobs(h, w, y, bias=b, softcap=4.0, **kw)
                                              * _upstream(h.shape[1] - 1, h.device)).sum(),
        "unlearning_loss ga": lambda h, w, b, y: gk.unlearning_loss("ga", h, w, y, bias=b, **kw),
        "unlearning_loss wtnpo": lambda h, w, b, y: gk.unlearning_loss("wtnpo", h, w, y, bias=b, ref_logprobs=ref_lp,
                                                                       softcap=4.0, **kw),
        "unlearning_loss npo": lambda h, w, b, y: gk.unlearning_loss("npo", h, w, y, bias=b, ref_logprobs=ref_lp,
                                                                     **kw),
        "unlearning_loss ceu": lambda h, w, b, y: gk.unlearning_loss("ceu", h, w, y, bias=b, **kw),
        "kl_loss": lambda h, w, b, y: gk.kl_loss(h, w, ref_h, ref_w, y, bias=b, ref_bias=b.detach(), **kw),
        "token_logprobs_from_logits": lambda h, w, b, y: (
            gk.token_logprobs_from_logits(F.linear(h, w, b), y, softcap=4.0, **kw) * _upstream(h.shape[1] - 1, h.device)
        ).sum(),
        "unlearning_loss_from_logits wga": lambda h, w, b, y: gk.unlearning_loss_from_logits(
            "wga", F.linear(h, w, b), y, alpha=0.5, inplace=True, **kw),
        "unlearning_loss_from_logits ceu": lambda h, w, b, y: gk.unlearning_loss_from_logits("ceu", F.linear(h, w, b),
                                                                                             y, **kw),
        "undial_loss": lambda h, w, b, y: gk.undial_loss(h, w, ref_h, ref_w, y, beta=3.0, bias=b, ref_bias=b.detach(),
                                                         softcap=4.0, **kw),
    }


def _formula(name, h, w, b, y, ref_h, ref_w, ref_lp):
    """The same losses from tests/formulas.py, in float64."""
    if name.startswith("token_logprobs"):
        lp, _ = logprobs(h, w, y, b, 4.0, shift=True)
        return (lp * _upstream(h.shape[1] - 1, h.device)).sum()
    if name == "kl_loss":
        return kl(h[:, :-1], w, ref_h[:, :-1], ref_w, y[:, 1:], b, b.detach())
    if name == "undial_loss":
        return undial(h, w, ref_h, ref_w, y, 3.0, b, b.detach(), 4.0, shift=True)
    objective_name = name.split()[1]
    if objective_name == "ceu":
        return ceu(h, w, y, 1, b, shift=True)
    lp, valid = logprobs(h, w, y, b, 4.0 if objective_name == "wtnpo" else None, shift=True)
    hparams = {"alpha": 0.5} if objective_name == "wga" else {}
    return objective(objective_name, lp, valid, ref_lp if objective_name in ("wtnpo", "npo") else None, **hparams)


def _value_and_grads(fn, h, w, b, y):
    loss = fn(h, w, b, y)
    return loss, torch.autograd.grad(loss, [h, w, b])


def _assert_close(got, expected, rtol):
    got, expected = got.double(), expected.double()
    err = ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
    assert err <= rtol, f"max relative error {err:.2e}"


CASES = [(backend, dtype) for backend in BACKENDS for dtype in DTYPES[backend]]


@pytest.mark.parametrize("backend,dtype", CASES, ids=[f"{b}-{str(d)[6:]}" for b, d in CASES])
def test_every_loss_compiles_whole_and_equals_eager(backend, dtype):
    if backend == "triton" and not triton_config.interpreting():
        pytest.skip("CPU tensors run the triton backend only under TRITON_INTERPRET=1")
    if backend not in gk.available_backends("cpu"):
        pytest.skip(f"{backend} is not available here")
    torch._dynamo.reset()
    h, w, b, y = _inputs(dtype)
    ref_h, ref_w, ref_lp = _reference(h, w, b, y)
    for name, fn in _losses(backend, ref_h, ref_w, ref_lp).items():
        if dtype != DTYPES[backend][0] and name not in FLOAT32_LOSSES:
            continue
        if dtype == DTYPES[backend][0]:  # tracing does not depend on the dtype: explained once per backend
            explained = torch._dynamo.explain(fn)(h, w, b, y)
            assert explained.graph_break_count == 0, (name, explained.break_reasons)
            assert explained.graph_count == 1, name
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        got, got_grads = _value_and_grads(compiled, h, w, b, y)
        eager, eager_grads = _value_and_grads(fn, h, w, b, y)
        assert got.dtype == eager.dtype, name
        _assert_close(got, eager, TOLERANCE[dtype])
        for g_got, g_eager in zip(got_grads, eager_grads):
            assert g_got.dtype == g_eager.dtype == dtype, name
            _assert_close(g_got, g_eager, TOLERANCE[dtype])
        if dtype == torch.float64:  # and both equal the formula
            h64, w64, b64 = (t.detach().requires_grad_() for t in (h, w, b))
            formula, formula_grads = _value_and_grads(
                lambda h, w, b, y: _formula(name, h, w, b, y, ref_h, ref_w, ref_lp), h64, w64, b64, y)
            _assert_close(got, formula, 1e-12)
            for g_got, g_formula in zip(got_grads, formula_grads):
                _assert_close(g_got, g_formula, 1e-10)


@pytest.mark.parametrize("backend", ["torch", "oracle"])
def test_every_objective_traces_whole(backend):
    """Every catalog objective `unlearning_loss` takes (the ones above are also compiled and compared), and
    oracle's plain torch."""
    h, w, b, y = _inputs(torch.float64)
    ref_lp = _reference(h, w, b, y)[2]
    for name, objective_entry in gk.OBJECTIVES.items():
        if objective_entry.inputs not in (LOGPROBS, OWN_DISTRIBUTION):  # not a loss of one batch's head
            continue
        if backend == "oracle" and name not in ("npo", "ceu"):  # its plain torch: one of each path is enough
            continue
        ref = ref_lp if objective_entry.needs_ref else None

        def loss(h, w, b, y):
            return gk.unlearning_loss(name, h, w, y, bias=b, ref_logprobs=ref, shift=True, backend=backend)

        explained = torch._dynamo.explain(loss)(h, w, b, y)
        assert explained.graph_break_count == 0, (name, explained.break_reasons)
    explained = torch._dynamo.explain(lambda h, w, b, y: gk.undial_loss(h, w, h.detach(), w.detach(), y, bias=b,
                                                                        shift=True, backend=backend))(h, w, b, y)
    assert explained.graph_break_count == 0, ("undial_loss", explained.break_reasons)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_stats_compiles_whole(backend):
    if backend == "triton" and not triton_config.interpreting():
        pytest.skip("CPU tensors run the triton backend only under TRITON_INTERPRET=1")
    h, w, b, y = _inputs(torch.float32)

    def stats(h, w, b, y):
        return gk.token_stats(h, w, y, bias=b, softcap=4.0, shift=True, backend=backend)

    explained = torch._dynamo.explain(stats)(h, w, b, y)
    assert explained.graph_break_count == 0, explained.break_reasons
    got = torch.compile(stats, backend="aot_eager", fullgraph=True)(h, w, b, y)
    for g, e in zip(got, stats(h, w, b, y)):
        assert not g.requires_grad and g.shape == (2, 6)
        _assert_close(g, e, 1e-6)


def test_inductor_compiles_the_main_loss():
    """inductor (C++ code generation on a CPU) around the custom operators: the loss and its gradients."""
    torch._dynamo.reset()

    def loss(h, w, b, y):
        return gk.unlearning_loss("wga", h, w, y, bias=b, shift=True, backend="cpp_cpu", alpha=0.7)

    h, w, b, y = _inputs(torch.float64)
    got, got_grads = _value_and_grads(torch.compile(loss, backend="inductor", fullgraph=True), h, w, b, y)
    eager, eager_grads = _value_and_grads(loss, h, w, b, y)
    _assert_close(got, eager, 1e-12)
    for g_got, g_eager in zip(got_grads, eager_grads):
        _assert_close(g_got, g_eager, 1e-12)


@pytest.mark.parametrize("name", ["ga", "npo"])
def test_dynamic_shapes(name):
    """One graph for every batch size: the operators' fake implementations take symbolic shapes."""
    torch._dynamo.reset()

    def loss(h, w, b, y, ref):
        return gk.unlearning_loss(name, h, w, y, bias=b, ref_logprobs=ref, shift=True, backend="torch")

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True, dynamic=True)
    for B, T in ((2, 7), (3, 5)):
        h, w, b, y = _inputs(torch.float64, B=B, T=T, seed=B)
        ref = None if name == "ga" else _reference(h, w, b, y)[2]
        got, got_grads = _value_and_grads(lambda *args: compiled(*args, ref), h, w, b, y)
        eager, eager_grads = _value_and_grads(lambda *args: loss(*args, ref), h, w, b, y)
        _assert_close(got, eager, 1e-12)
        for g_got, g_eager in zip(got_grads, eager_grads):
            _assert_close(g_got, g_eager, 1e-12)


def _llama(adapted):
    model = tiny("llama")
    if adapted:  # B ≠ 0 (init_lora_weights=False): the head's adapter changes the logits and gets gradients
        from peft import LoraConfig, get_peft_model
        config = LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
        model = get_peft_model(model, config)
    return model.double().eval()


@pytest.mark.parametrize("adapted", [False, True], ids=["llama", "llama-lora-on-head"])
def test_hf_unlearning_loss_compiles_whole_on_a_llama(adapted):
    """The decoder, the head (with a LoRA adapter: the concatenated inputs of `hf.LMHead.adapted`) and the loss in
    one graph (fullgraph: a break would raise); every trainable parameter's gradient equal to eager's."""
    torch._dynamo.reset()
    model = _llama(adapted)
    data = batch()
    with torch.no_grad():
        ref = gk.hf.token_logprobs(model, data) - 0.1

    def loss(model, data):
        return gk.hf.unlearning_loss("npo", model, data, ref_logprobs=ref, backend="torch")

    params = [p for p in model.parameters() if p.requires_grad]
    assert not adapted or sum("lm_head" in n for n, p in model.named_parameters() if p.requires_grad) == 2
    got = torch.compile(loss, backend="aot_eager", fullgraph=True)(model, data)
    got_grads = torch.autograd.grad(got, params)
    eager = loss(model, data)
    _assert_close(got, eager, 1e-12)
    for g_got, g_eager in zip(got_grads, torch.autograd.grad(eager, params)):
        _assert_close(g_got, g_eager, 1e-10)


def test_compiled_call_refuses_a_label_outside_the_vocabulary():
    """The label check of CPU tensors runs inside the operator (no graph break), before any kernel reads a row."""
    h, w, b, y = _inputs(torch.float32)
    y[1, 3] = 37
    compiled = torch.compile(lambda h, w, y: gk.unlearning_loss("ga", h, w, y, backend="cpp_cpu"), backend="aot_eager",
                             fullgraph=True)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 37\) or ignore_index=-100; found 37"):
        compiled(h, w, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the triton backend's compiled kernels need a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_on_a_gpu_compiles_with_inductor(dtype):
    """The Triton kernels behind the operators, inductor's own kernels around them: each loss and its gradients
    equal to the eager call (the same kernels run in both)."""
    torch._dynamo.reset()
    h, w, b, y = (t.detach().to("cuda").requires_grad_(t.requires_grad) for t in _inputs(torch.float32, H=64, V=301))
    h, w, b = (t.detach().to(dtype).requires_grad_() for t in (h, w, b))
    y = y.to("cuda")
    ref_h, ref_w, ref_lp = _reference(h, w, b, y)
    for name, fn in _losses("triton", ref_h, ref_w, ref_lp).items():
        got, got_grads = _value_and_grads(torch.compile(fn, fullgraph=True), h, w, b, y)
        eager, eager_grads = _value_and_grads(fn, h, w, b, y)
        _assert_close(got, eager, 1e-5)
        for g_got, g_eager in zip(got_grads, eager_grads):
            assert g_got.dtype == dtype, name
            _assert_close(g_got, g_eager, 1e-5 if dtype == torch.float32 else 1e-2)
