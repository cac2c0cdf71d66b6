"""Inner products taken during the decoder's last backward (`geffect.streaming`): same values as the
definition, each layer call released as its output gradient arrives, and the route where nothing streams."""
import pytest
import torch

from geffect_kernels import hf
from geffect_kernels.geffect import GEffectProfiler, streaming
from geffect_kernels.geffect.capture import Capture

from geffect_models import assert_matches_definition, batch, force, tiny_model


def spy_streamed(monkeypatch):
    """The names of the parameters handed to `StreamedProducts`, in order."""
    names = []
    original = streaming.StreamedProducts.__call__
    monkeypatch.setattr(streaming.StreamedProducts, "__call__",
                        lambda self, name, *a: names.append(name) or original(self, name, *a))
    return names


def same_length_batches(seed):
    forget = batch(seed=seed, prompt=2)
    retain = batch(batch_size=2, seed=seed + 1, pad_first=False)
    del retain["attention_mask"]
    return forget, retain


# GA's gradient is the forget risk's times −1, NPO's scaled per sample. Llama and Qwen2 round their norms in
# float32, so only an exact factor (−1) reproduces the definition's float64 there.
@pytest.mark.parametrize("kind, objective", [("llama", "ga"), ("qwen2", "ga"), ("gpt2", "npo")])
@pytest.mark.parametrize("form", ["gram", "projection"])
def test_streamed_products_match_definition(kind, objective, form, monkeypatch):
    """Stacked batches, an objective that is a per-sample multiple of the forget NLL: one backward, every
    decoder parameter's products taken as its gradient arrives (in either form), per parameter and per
    instance, equal to the materialized definition. GPT-2's embedding is tied to the head: held instead."""
    force(monkeypatch, form)
    streamed = spy_streamed(monkeypatch)
    model = tiny_model(kind)
    forget, retain = same_length_batches(41)
    ref = hf.token_logprobs(model, forget).detach() + 0.3 * torch.randn(3, 6, dtype=torch.float64)
    result = GEffectProfiler(model, groups="parameter").measure_unlearning(objective, forget, retain,
                                                                           ref_logprobs=ref, per_instance=True)
    held = {"lm_head.weight", "transformer.wte.weight"}
    assert sorted(streamed) == sorted(n for n, _ in model.named_parameters() if n not in held)
    linear = [e.form for e in result.plan if e.parameter in streamed and e.parameter.endswith("weight")
              and "norm" not in e.parameter and "ln_" not in e.parameter and "emb" not in e.parameter
              and "wpe" not in e.parameter]
    assert linear and set(linear) == {form}
    assert_matches_definition(model, objective, forget, retain, ref, result)


# Every way Python reads a tensor's value back: on a GPU each one waits for the backward's queued kernels.
HOST_READS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist", "cpu", "numpy")


@pytest.mark.parametrize("objective, form, per_instance", [("npo", "projection", True), ("npo", "gram", True),
                                                           ("npo", "projection", False), ("wga", "projection", True)])
def test_streamed_products_read_nothing_back_during_the_backward(objective, form, per_instance, monkeypatch):
    """What runs inside the backward (each tap: the call's uses, their products) leaves every value on the
    device (read once, at the end), so on a GPU it never stalls the backward; the values still equal the
    definition."""
    force(monkeypatch, form)
    original, calls = Capture._arrived, []

    def refuse(method):
        def read(*args, **kwargs):
            raise AssertionError(f"Tensor.{method} inside the streamed products")
        return read

    def guarded(self, *args):
        calls.append(args[0])
        saved = {method: getattr(torch.Tensor, method) for method in HOST_READS}
        try:
            for method in HOST_READS:
                setattr(torch.Tensor, method, refuse(method))
            return original(self, *args)
        finally:
            for method, fn in saved.items():
                setattr(torch.Tensor, method, fn)

    monkeypatch.setattr(Capture, "_arrived", guarded)
    streamed = spy_streamed(monkeypatch)
    model = tiny_model("gpt2")
    forget, retain = same_length_batches(47)
    ref = hf.token_logprobs(model, forget).detach() + 0.3 * torch.randn(3, 6, dtype=torch.float64)
    result = GEffectProfiler(model, groups="parameter").measure_unlearning(
        objective, forget, retain, ref_logprobs=ref, per_instance=per_instance)
    assert len(calls) > 10 and len(streamed) > 10
    assert_matches_definition(model, objective, forget, retain, ref, result)


def test_each_call_is_released_as_its_gradient_arrives(monkeypatch):
    """During the backward the number of calls still holding their input and output only goes down."""
    held_counts = []
    original = Capture._arrived

    def arrived(self, index, grad):
        original(self, index, grad)
        held_counts.append(sum(call.output is not None for call in self.calls))

    monkeypatch.setattr(Capture, "_arrived", arrived)
    model = tiny_model("llama")
    forget, retain = same_length_batches(43)
    GEffectProfiler(model).measure_unlearning("ga", forget, retain)
    n_calls = len(held_counts)
    assert n_calls > 10 and held_counts == list(range(n_calls - 1, -1, -1))


@pytest.mark.parametrize("kind, objective, lengths", [("llama", "wga", (7, 7)), ("gpt2", "npo", (7, 8)),
                                                      ("gpt2", "wga", (7, 8))])
def test_last_backward_streams_against_the_held_gradients(kind, objective, lengths, monkeypatch):
    """WGA takes a backward of its own, and then a forward per batch; batches of different lengths take a
    forward each: the last backward streams each parameter against the uses held from the earlier ones, with
    the same values as the definition."""
    streamed = spy_streamed(monkeypatch)
    model = tiny_model(kind)
    forget, retain = batch(seed=45, length=lengths[0]), batch(seed=46, length=lengths[1])
    ref = hf.token_logprobs(model, forget).detach() + 0.3 * torch.randn(3, lengths[0] - 1, dtype=torch.float64)
    result = GEffectProfiler(model, groups="parameter").measure_unlearning(objective, forget, retain,
                                                                           ref_logprobs=ref, per_instance=True)
    held = {"lm_head.weight", "transformer.wte.weight"}
    assert sorted(streamed) == sorted(n for n, _ in model.named_parameters() if n not in held)
    assert_matches_definition(model, objective, forget, retain, ref, result)


def test_a_model_that_modifies_a_layer_output_in_place(monkeypatch):
    """A streamed capture hands the model a view of each layer's output, which autograd forbids modifying in
    place: such a model runs again with a plain capture, where that layer's output is no longer the tensor
    its weight gradient is made of, so its parameters take the dense route (exact, but not per instance)."""
    streamed = spy_streamed(monkeypatch)
    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp

    def forward_in_place(x):
        out = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        return out.mul_(1.5)

    mlp.forward = forward_in_place
    forget, retain = same_length_batches(47)
    profiler = GEffectProfiler(model, groups="parameter")
    result = profiler.measure_unlearning("ga", forget, retain)
    assert streamed == []
    assert {e.parameter for e in result.plan if e.form == "dense"} == {"model.layers.0.mlp.down_proj.weight"}
    assert_matches_definition(model, "ga", forget, retain, None, result)
    with pytest.raises(ValueError, match="modified in place"):
        profiler.measure_unlearning("ga", forget, retain, per_instance=True)


def test_capture_refuses_streaming_it_was_not_built_for():
    model = tiny_model("llama")
    params = dict(model.named_parameters())
    ids = batch(seed=49)["input_ids"]
    plain = Capture(model, params)
    with plain:
        hidden = hf.final_hidden_states(model, ids, None)
    with pytest.raises(ValueError, match="stream=True"):
        plain.gradient(hidden, torch.ones_like(hidden), on_use=lambda *a: None)
    streamed = Capture(model, params, stream=True)
    with streamed:
        hidden = hf.final_hidden_states(model, ids, None)
    streamed.gradient(hidden, torch.ones_like(hidden), retain_graph=True, on_use=lambda *a: None)
    with pytest.raises(RuntimeError, match="released"):
        streamed.gradient(hidden, torch.ones_like(hidden))


def test_gradient_checkpointing_streams_with_exact_values(monkeypatch):
    """Hugging Face gradient checkpointing (non-reentrant, its default; active in train mode, no dropout in
    this model) recomputes activations in the backward: the taps still fire and the values are exact."""
    streamed = spy_streamed(monkeypatch)
    model = tiny_model("llama")
    model.gradient_checkpointing_enable()
    model.train()
    forget, retain = same_length_batches(51)
    result = GEffectProfiler(model, groups="parameter").measure_unlearning("ga", forget, retain, per_instance=True)
    assert sorted(streamed) == sorted(n for n, _ in model.named_parameters() if n != "lm_head.weight")
    assert_matches_definition(model, "ga", forget, retain, None, result)
