"""What a G-effect-guided training step costs against an unguided one (the floor), on the CPU: Llama-shaped model
(random weights), NPO objective (reference log-probabilities: the model's own plus noise, so that NPO is not GA)
plus the nll retain term, 4 sequences per side, the steps the training loop runs (`guidance.step`), gradients left
in ``.grad`` (no optimizer update, which all three share):

- ``step``: forward of both terms, one backward of their weighted sum (the loop's unguided micro-step);
- ``rectify``: the two terms' gradients taken apart, rectified per layer, summed;
- ``instance``: the retain term's backward, then the forget batch's per-sample retaining G-effects from the step's
  own factors, the weights and the weighted gradient (`guidance.instance`).

    python -m pytest benchmarks/test_guidance.py --benchmark-only
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

import bench
from geffect_kernels import hf
from geffect_kernels.guidance import step as guided
from geffect_kernels.objective_inputs import ReferenceState
from geffect_kernels.train import TrainConfig
from geffect_kernels.train.losses import objective_loss
from large_shapes import SEQS, build, token_batches

CONFIGS = [("tiny", 8)] if bench.TINY else [("L4-H256", 64), ("L4-H512", 64)]  # (shape, tokens per sequence)
METHODS = ["step", "rectify", "instance"]


@functools.lru_cache(maxsize=1)
def run_of(shape, tokens):
    """What `guidance.step` reads of a `train.loop.Run`."""
    model = build(shape, torch.float32, "cpu").train()
    forget, retain = ({**b, "labels": b["input_ids"]} for b in token_batches(shape, tokens, "cpu"))
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        ref = hf.token_logprobs(model, forget) + 0.5 * torch.randn(SEQS, tokens - 1, generator=g)
    config = TrainConfig(objective="npo", retain_objective="nll", batch_size=SEQS, progress=False)
    return SimpleNamespace(
        model=model, config=config, autocast=torch.autocast("cpu", enabled=False),
        forget_batch=lambda micro: (forget, ReferenceState(logprobs=ref)), retain_batch=lambda micro: retain,
        objective_loss=lambda name, batch, ref_logprobs=None, hparams=None: objective_loss(
            name, model, batch, backend=config.backend, ref_logprobs=ref_logprobs, hparams=hparams))


def method_of(run, name):
    params = [p for p in run.model.parameters() if p.requires_grad]

    def clear():
        for p in params:
            p.grad = None

    def step():
        clear()
        forget, ref = run.forget_batch(0)
        (run.objective_loss("npo", forget, ref) + run.objective_loss("nll", run.retain_batch(0))).backward()

    def rectify():
        clear()
        guided.rectified_gradients(run, 0)

    def instance():
        clear()
        guided.instance_gradients(run, 0, 1.0)

    return {"step": step, "rectify": rectify, "instance": instance}[name]


@pytest.mark.parametrize("shape,tokens,method", [pytest.param(s, t, m, id=f"cpu-{s}-T{t}-{m}")
                                                 for s, t in CONFIGS for m in METHODS])
def test_guided_step_cost(benchmark, shape, tokens, method):
    run = run_of(shape, tokens)
    bench.timed(benchmark, method_of(run, method), torch.device("cpu"), role="floor" if method == "step" else None,
                method=method, group=f"guidance {shape} {SEQS}x{tokens} tokens float32 cpu")
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in run.model.parameters())
