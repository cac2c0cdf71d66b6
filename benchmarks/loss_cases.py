"""The fused losses' cases: inputs, the GPU correctness cases (against float64 on the same rounded inputs) and the
timed providers (this package's backends, the three-matmul floor, naive eager, Liger and CCE where importable).

GPU shapes are the issue's (N 8192, H 4096, V 128256 / 32000, bf16, flat and peaky; DESIGN §6); ``smoke`` shrinks
them so that the same code runs on CPU under the Triton interpreter.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

import geffect_kernels as gk
from geffect_kernels.backends.triton import config as triton_config
from geffect_kernels.triton import set_logits_budget
from geffect_kernels.backends.triton.fast_path import fast_rows
from geffect_kernels.backends.triton.kl_fast import fast_kl_rows

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
NAMES = {BF16: "bf16", FP16: "fp16", FP32: "fp32", torch.float64: "fp64"}
GiB = 2**30
FAST_BUDGET = 3 * GiB  # fast mode at N 8192, V 128256 in one chunk
KL_FAST_BUDGET = 8 * GiB  # fast KL at N 8192, V 128256 in one chunk: two float32 logit rows per token, 7.8 GiB
NPO_SEQUENCES = 8


# ------------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Inputs:
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    labels: torch.Tensor
    ref_logprobs: torch.Tensor  # reference model's ℓ (tnpo, wtnpo, npo): this model's plus noise
    ref_hidden: torch.Tensor  # reference model's hidden states (kl)
    ref_weight: torch.Tensor

    def double(self):
        """The same rounded values in float64: the oracle's inputs."""
        d = lambda t: None if t is None else t.double()  # noqa: E731
        return replace(self, hidden=d(self.hidden), weight=d(self.weight), bias=d(self.bias),
                       ref_logprobs=d(self.ref_logprobs), ref_hidden=d(self.ref_hidden), ref_weight=d(self.ref_weight))


def make_inputs(n, h, v, dist, dtype, device, *, bias=False, seed=0):
    """Logits ~ N(0, 0.6²) ("flat", median max-probability ~1e-4 at V 128k) or hidden 8× larger ("peaky");
    drawn in float32 on the device, rounded to ``dtype``; one position in 13 ignored."""
    g = torch.Generator(device=device).manual_seed(seed)
    scale = 8.0 if dist == "peaky" else 1.0
    hidden = (torch.randn(n, h, device=device, generator=g) * scale).to(dtype)
    weight = (torch.randn(v, h, device=device, generator=g) * (0.6 / h**0.5)).to(dtype)
    b = (torch.randn(v, device=device, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    labels[::13] = -100
    with torch.no_grad():
        set_logits_budget(0)
        lp = gk.token_logprobs(hidden.float(), weight.float(), labels, bias=None if b is None else b.float(),
                               backend="torch")
    ref_logprobs = lp + 0.3 * torch.randn(lp.shape, device=device, generator=g)
    ref_hidden = (hidden.float() + 0.1 * scale * torch.randn(n, h, device=device, generator=g)).to(dtype)
    ref_weight = (weight.float() + 0.01 / h**0.5 * torch.randn(v, h, device=device, generator=g)).to(dtype)
    return Inputs(hidden, weight, b, labels, ref_logprobs, ref_hidden, ref_weight)


def loss_fn(objective, inputs, backend, *, softcap=None):
    """loss(hidden, weight, bias) of ``objective`` on ``inputs`` through ``backend``."""
    x = inputs
    if objective == "kl":
        return lambda h, w, b: gk.kl_loss(h, w, x.ref_hidden, x.ref_weight, x.labels, bias=b, softcap=softcap,
                                          backend=backend)
    if objective == "undial":
        return lambda h, w, b: gk.undial_loss(h, w, x.ref_hidden, x.ref_weight, x.labels, bias=b, softcap=softcap,
                                              backend=backend)
    if objective in ("npo", "simnpo"):  # sequence level: NPO_SEQUENCES sequences
        def seq(h, w, b):
            return gk.unlearning_loss(objective, h.reshape(NPO_SEQUENCES, -1, h.shape[-1]), w,
                                      x.labels.reshape(NPO_SEQUENCES, -1), bias=b, softcap=softcap, backend=backend,
                                      **({"ref_logprobs": x.ref_logprobs.reshape(NPO_SEQUENCES, -1)}
                                         if objective == "npo" else {}))
        return seq
    ref = {"ref_logprobs": x.ref_logprobs} if objective in ("tnpo", "wtnpo") else {}
    return lambda h, w, b: gk.unlearning_loss(objective, h, w, x.labels, bias=b, softcap=softcap, backend=backend,
                                              **ref)


# --------------------------------------------------------------------------------------------- correctness
@dataclass(frozen=True)
class Check:
    name: str
    backend: str
    objective: str
    dtype: torch.dtype
    n: int = 4096
    h: int = 1024
    v: int = 32000
    dist: str = "flat"
    bias: bool = False
    softcap: float | None = None
    budget: int = 0  # triton logits budget: 0 lean, > 0 fast mode
    chunks: int = 1  # fast mode: tokens split in this many chunks (budget sized for it)

    @property
    def tolerance(self):
        """(loss, gradients) relative to float64 on the same rounded inputs."""
        return 1e-3, 5e-3 if self.dtype == BF16 else 3e-3

    def smoke(self):
        """The same case at a size the interpreter runs in a second; in float32 on the triton backend (the
        interpreter's 16-bit arithmetic is not the GPU's, so 16-bit inputs would run the torch fallback)."""
        dtype = FP32 if self.backend == "triton" else self.dtype
        return replace(self, n=48 if self.n < 10_000 else 64, h=32, v=301 if self.v < 100_000 else 509, dtype=dtype)


def correctness_checks():
    big = dict(n=17000, h=256, v=128256)  # N·V = 2.18e9 > 2^31: 64-bit indexing of logits-sized buffers
    return [
        Check("lean", "triton", "ga", BF16),
        Check("lean peaky", "triton", "wga", BF16, dist="peaky"),
        Check("lean tnpo", "triton", "tnpo", BF16),
        Check("fast single-chunk", "triton", "ga", BF16, budget=FAST_BUDGET),
        Check("fast single-chunk peaky", "triton", "wga", BF16, dist="peaky", budget=FAST_BUDGET),
        Check("fast multi-chunk", "triton", "tnpo", BF16, chunks=3),
        Check("bias+softcap V50257 lean", "triton", "ga", BF16, v=50257, bias=True, softcap=30.0),
        Check("bias+softcap V50257 fast", "triton", "wga", BF16, v=50257, bias=True, softcap=30.0,
              budget=FAST_BUDGET),
        Check("npo (token_logprobs backward)", "triton", "npo", BF16),
        Check("float16 lean", "triton", "ga", FP16, n=2048),
        Check("float16 fast", "triton", "tnpo", FP16, n=2048, budget=FAST_BUDGET),
        Check("float32 lean", "triton", "wga", FP32),
        Check("float32 fast", "triton", "ga", FP32, budget=FAST_BUDGET),
        Check("kl", "triton", "kl", BF16),
        Check("kl softcap+bias", "triton", "kl", BF16, softcap=30.0, bias=True),
        Check("kl float16", "triton", "kl", FP16, n=2048),
        Check("kl fast single-chunk", "triton", "kl", BF16, budget=KL_FAST_BUDGET),
        Check("kl fast multi-chunk", "triton", "kl", BF16, chunks=3),
        Check("kl fast softcap+bias", "triton", "kl", BF16, softcap=30.0, bias=True, budget=KL_FAST_BUDGET),
        Check("kl fast peaky", "triton", "kl", BF16, dist="peaky", budget=KL_FAST_BUDGET),
        Check("kl fast float16", "triton", "kl", FP16, n=2048, budget=KL_FAST_BUDGET),
        Check("kl fast float32", "triton", "kl", FP32, budget=KL_FAST_BUDGET),
        Check("undial", "triton", "undial", BF16),
        Check("undial fast softcap+bias", "triton", "undial", BF16, softcap=30.0, bias=True, budget=KL_FAST_BUDGET),
        Check("ceu", "triton", "ceu", BF16),
        Check("ceu fast peaky", "triton", "ceu", BF16, dist="peaky", budget=KL_FAST_BUDGET),
        Check("N*V>2^31 lean", "triton", "ga", BF16, **big),
        Check("N*V>2^31 fast", "triton", "wga", BF16, **big, budget=8 * GiB),
        Check("torch chunked float16", "torch", "ga", FP16, n=2048),
        Check("csrc cuda bf16", "cpp_cuda", "wga", BF16),
        Check("csrc cuda float16", "cpp_cuda", "ga", FP16, n=2048),
        Check("csrc cuda kl softcap", "cpp_cuda", "kl", BF16, softcap=30.0),
        Check("csrc cuda undial", "cpp_cuda", "undial", BF16),
        Check("csrc cuda ceu softcap", "cpp_cuda", "ceu", BF16, softcap=30.0),
    ]


def _budget(check, inputs):
    if check.chunks > 1:  # room for ~N/chunks rows of what fast mode holds and the float32 dW accumulator
        rows = -(-check.n // check.chunks)
        if check.objective in ("kl", "undial", "ceu"):  # both heads' float32 logits (CE-U: its own only)
            per_row = (4 if check.objective == "ceu" else 8) * (check.v + 64)
        else:  # stored exponentials and tile maxima
            per_row = (check.v + 64) * inputs.weight.element_size() + (check.v // 64 + 2) * 4
        return inputs.weight.numel() * 4 + rows * per_row
    return check.budget


def fast_chunk_rows(objective, inputs, budget):
    """Tokens per fast-mode chunk that ``budget`` gives ``objective`` (0: lean)."""
    if objective in ("kl", "undial", "ceu"):
        return fast_kl_rows(inputs.hidden, inputs.weight, budget, own=objective == "ceu")
    return fast_rows(inputs.hidden, inputs.weight, budget)


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-300)).item()


def grads_of(fn, inputs, want_bias):
    leaves = [inputs.hidden.detach().requires_grad_(), inputs.weight.detach().requires_grad_()]
    bias = inputs.bias.detach().requires_grad_() if want_bias and inputs.bias is not None else inputs.bias
    loss = fn(leaves[0], leaves[1], bias)
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), grads


def run_check(check, device, smoke):
    """(loss error, dh error, dW error, note, shape) of one case against the chunked torch backend in float64."""
    if smoke:
        triton_config.FAST_MIN_ROWS = 8  # let the tiny smoke shapes take the fast path's chunking too
    inputs = make_inputs(check.n, check.h, check.v, check.dist, check.dtype, device, bias=check.bias)
    budget = _budget(check, inputs)
    set_logits_budget(budget)
    try:
        rows = fast_chunk_rows(check.objective, inputs, budget)
        loss, (dh, dw) = grads_of(loss_fn(check.objective, inputs, check.backend, softcap=check.softcap), inputs,
                                  False)
    finally:
        set_logits_budget(0)
    exact = inputs.double()
    ref_loss, (ref_dh, ref_dw) = grads_of(loss_fn(check.objective, exact, "torch", softcap=check.softcap), exact,
                                          False)
    mode = f"fast, {rows} of {check.n} rows per chunk" if rows else "lean"
    note = f"{mode}; N·V={check.n * check.v:.3g}" if check.backend == "triton" else ""
    return (abs((loss.double() - ref_loss) / ref_loss).item(), _rel(dh, ref_dh), _rel(dw, ref_dw), note,
            f"N={check.n},H={check.h},V={check.v},{check.dist}")


def with_budget(fn, budget):
    """``fn`` run with the triton logits budget ``budget`` (the fused losses form their gradients in the call)."""
    def run(*args):
        set_logits_budget(budget)
        try:
            return fn(*args)
        finally:
            set_logits_budget(0)
    return run


def no_sync_calls(inputs, backend):
    """Forward+backward calls that must not make the host wait on the device."""
    logits = (inputs.hidden.float() @ inputs.weight.float().T).to(inputs.hidden.dtype)
    calls = {
        "wga": loss_fn("wga", inputs, backend),
        "tnpo": loss_fn("tnpo", inputs, backend),
        "kl": loss_fn("kl", inputs, backend),
        "wga from logits": lambda h, w, b: gk.unlearning_loss_from_logits(
            "wga", logits.detach().requires_grad_(), inputs.labels, backend=backend),
    }
    if backend == "triton":
        calls["kl fast"] = with_budget(loss_fn("kl", inputs, backend), KL_FAST_BUDGET)
    return calls


# --------------------------------------------------------------------------------------------------- speed
def floor(x):
    """Three bare matmuls of the shapes a fused head needs (logits, dh, dW): the floor of any fused loss."""
    def run(h, w, b):
        z = h @ w.T
        return z @ w, z.T @ h
    return run


def liger_flce(accum_dtype=None, token_scaling=False):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    kwargs = {"accum_dtype": accum_dtype} if accum_dtype is not None else {}
    if token_scaling:
        kwargs["use_token_scaling"] = True
    loss = LigerFusedLinearCrossEntropyLoss(**kwargs)
    return lambda x: lambda h, w, b: loss(w, h, x.labels)


def liger_jsd():
    from liger_kernel.transformers import LigerFusedLinearJSD
    jsd = LigerFusedLinearJSD(jsd_beta=1.0)
    return lambda x: lambda h, w, b: jsd(h, w, x.ref_hidden, x.ref_weight)


def cce(filter_eps="auto"):
    from cut_cross_entropy import linear_cross_entropy
    kwargs = {} if filter_eps == "auto" else {"filter_eps": filter_eps}
    return lambda x: lambda h, w, b: linear_cross_entropy(h, w, x.labels, **kwargs)


def ours(backend, budget=0):
    """A provider: objective -> (triton logits budget to set, inputs -> loss function)."""
    return lambda objective: (budget, lambda x: loss_fn(objective, x, backend))


def package(factory):
    """A provider from another package: ``factory()`` raises ImportError when it is not installed."""
    return lambda objective: (0, factory())


# Every provider by name. The floor and naive eager (full logits and autograd: the `oracle` backend, as plain torch
# writes it) are members of every group; the others are listed per group in test_fused_losses.py.
PROVIDERS = {
    "floor: 3 matmuls": lambda objective: (0, floor),
    "naive eager": ours("oracle"),
    "torch": ours("torch"),
    "cpp_cpu": ours("cpp_cpu"),
    "cpp_cuda": ours("cpp_cuda"),
    "triton lean": ours("triton"),
    "triton fast": lambda objective: ours("triton", KL_FAST_BUDGET if objective in ("kl", "undial", "ceu")
                                          else FAST_BUDGET)(objective),
    "liger bf16 acc": package(liger_flce),
    "liger fp32 acc": package(lambda: liger_flce(torch.float32)),
    "liger token scaling": package(lambda: liger_flce(token_scaling=True)),
    "cce default": package(cce),
    "cce exact": package(lambda: cce(None)),
    "liger jsd beta=1": package(liger_jsd),
}
OURS = {"naive eager", "torch", "cpp_cpu", "cpp_cuda", "triton lean", "triton fast"}  # compute the package's loss
