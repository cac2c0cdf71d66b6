"""The expected peak memory of a training run per device, from the model's config and the run's settings.

A run's memory has a fixed part (weights, AdamW's state, a kept reference) and a part that comes and goes within a
step. The peak is the largest of three moments:

- the backward of a micro-step: the activations saved by the forward, the fused head's working chunk and the
  gradients as they arrive (the head's first, when the activations are all still there; all of them once the
  activations are gone);
- the optimizer step: every gradient, AdamW's two moments and the temporary of its multi-tensor update (on a GPU);
- a G-effect measurement, when the run profiles: the activations plus the gradients the profiler holds.

With FSDP2 over R ranks the weights, gradients and AdamW state are sharded (/R), each rank runs 1/R of every global
batch, and two decoder blocks (the one running and the one prefetched) and the root are gathered in the compute
dtype. The activation counts are those of a Llama-style decoder (RMSNorm, SDPA attention, gated MLP): the tensors
autograd saves per token and layer, fewer with LoRA (a frozen linear keeps no input) and one layer input per layer
plus one layer recomputed with gradient checkpointing. benchmarks/train_memory.py compares the plan with the
measured peak resident memory of CPU runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..backends.autograd import CHUNK_BYTES
from ..objectives import OBJECTIVES
from ..structured_files import read_json

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
REFERENCE_DEVICES = (None, "cpu")
PROFILED_GRADIENTS = 3  # the objective's, the forget risk's and the retain risk's, at most, held by the profiler
LORA_DEFAULT_TARGETS = ("q_proj", "v_proj")  # peft's for Llama
MIB, GIB = 2**20, 2**30


@dataclass(frozen=True)
class ModelShape:
    """A Llama-style decoder's sizes, read from its Hugging Face config."""
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """From a transformers config, its dict, or a model folder (its config.json)."""
        if isinstance(config, (str, Path)):
            path = Path(config) / "config.json" if Path(config).is_dir() else Path(config)
            config = read_json(path)
            if not isinstance(config, dict):
                raise ValueError(f"{path}: the model's config must be a JSON object")
        values = config if isinstance(config, dict) else config.to_dict()
        values = values.get("text_config", values) if "hidden_size" not in values else values
        needed = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
        missing = [k for k in needed if not isinstance(values.get(k), int)]
        if missing:
            raise ValueError(f"the memory plan needs a Llama-style decoder config; {', '.join(missing)} missing")
        heads = values["num_attention_heads"]
        return cls(layers=values["num_hidden_layers"], hidden=values["hidden_size"],
                   intermediate=values["intermediate_size"], heads=heads,
                   kv_heads=values.get("num_key_value_heads") or heads,
                   head_dim=values.get("head_dim") or values["hidden_size"] // heads, vocab=values["vocab_size"],
                   tied=bool(values.get("tie_word_embeddings", False)))

    def linears(self) -> dict[str, tuple[int, int]]:
        """Each decoder block's linear layers: ``{name: (in_features, out_features)}``."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def block_params(self) -> int:
        return sum(a * b for a, b in self.linears().values()) + 2 * self.hidden

    @property
    def root_params(self) -> int:  # embedding, final norm, head
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.block_params + self.root_params

    def lora_params(self, r: int, targets) -> int:
        shapes = self.linears()
        unknown = [t for t in targets if t not in shapes]
        if unknown:
            raise ValueError(f"LoRA target(s) {', '.join(unknown)} are not linear layers of a Llama-style block "
                             f"({', '.join(shapes)})")
        return self.layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


@dataclass(frozen=True)
class PlanSettings:
    """What a run's memory depends on besides the model (the `TrainConfig` and `geffect train` names)."""
    objective: str = "ga"
    retain_objective: str = "nll"  # nll, kl, rr or none
    batch_size: int = 8  # samples per micro-batch per side, global (split over the ranks)
    seq_len: int = 512
    n_forget: int = 0  # forget samples (their reference log-probabilities are kept on the host)
    dtype: str = "float32"  # of the loaded weights
    lora_r: int | None = None
    lora_targets: tuple = LORA_DEFAULT_TARGETS
    gradient_checkpointing: bool = False
    reference_device: str | None = None  # "cpu": a full fine-tuning KL reference kept on the host
    geffect: bool = False
    device: str = "cuda"  # cuda: bf16 autocast and multi-tensor AdamW; cpu: as the CPU loop runs
    world: int = 1  # FSDP2 ranks

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; valid: {', '.join(OBJECTIVES)}")
        if self.retain_objective not in ("nll", "kl", "rr", "none"):
            raise ValueError(f"unknown retain objective {self.retain_objective!r}; valid: nll, kl, rr, none")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {self.dtype!r}; valid: {', '.join(DTYPE_BYTES)}")
        if self.reference_device not in REFERENCE_DEVICES:
            raise ValueError(f"reference_device must be None or 'cpu', got {self.reference_device!r}")
        for name in ("batch_size", "seq_len", "world"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.lora_r is not None and (not isinstance(self.lora_r, int) or self.lora_r < 1):
            raise ValueError(f"the LoRA rank must be a positive integer, got {self.lora_r!r}")


@dataclass
class Plan:
    """Bytes per device: each term, each moment of a step, the peak, and what is kept on the host instead."""
    shape: ModelShape
    settings: PlanSettings
    terms: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)
    host: dict = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    def fits(self, device_bytes: int) -> bool:
        return self.peak <= device_bytes


def plan(shape: ModelShape, settings: PlanSettings) -> Plan:
    s, m = settings, shape
    lora = s.lora_r is not None
    ranks = s.world
    w = DTYPE_BYTES[s.dtype]
    gpu = s.device != "cpu"
    # compute dtype: bf16 autocast on a GPU, the weights' half dtype anywhere
    c = 2 if gpu or w == 2 else 4
    # the residual stream: float32 when the trained weights are float32 masters, else the weights' dtype
    residual = 4 if not lora or w == 4 else w
    trainable = m.lora_params(s.lora_r, s.lora_targets) if lora else m.params
    p = Plan(shape, settings)
    t = p.terms
    t["weights"] = (w * m.params + 4 * trainable if lora else 4 * m.params) // ranks
    if ranks > 1:  # FSDP2: two blocks and the root gathered in the compute dtype
        t["gathered blocks"] = c * (2 * m.block_params + m.root_params)
    elif not lora and c < 4:  # autocast's half copies of the float32 masters, saved for the backward
        t["autocast copies"] = c * (m.params - m.vocab * m.hidden)
    t["adamw state"] = 8 * trainable // ranks
    t["gradients"] = 4 * trainable // ranks

    needs_ref = OBJECTIVES[s.objective].needs_ref
    # a retain term or objective that reads the starting model itself (KL, RR): a frozen copy in full fine-tuning
    kl = s.retain_objective in ("kl", "rr") or OBJECTIVES[s.objective].needs_reference_model
    if kl and not lora:
        copy = w * m.params // ranks
        if s.reference_device == "cpu" and gpu:
            p.host["reference copy"] = copy
        else:
            t["reference copy"] = copy
    if needs_ref:
        p.host["reference log-probabilities"] = 4 * s.n_forget * s.seq_len

    sides = 1 + (s.retain_objective != "none")
    tokens = math.ceil(s.batch_size / ranks) * s.seq_len  # one side's, this rank's
    per_layer = _layer_activation_bytes(m, c, residual, lora, s.lora_targets if lora else ())
    if s.gradient_checkpointing:
        acts = sides * tokens * m.layers * m.hidden * residual + tokens * per_layer
    else:
        acts = sides * tokens * m.layers * per_layer
    # the final norm's input and output and the head's input, per token
    acts += sides * tokens * m.hidden * (2 * residual + 4)
    t["activations"] = acts
    # a fused loss takes its gradients in its forward: each side holds its hidden states' gradient (and the head's,
    # gathered whole under FSDP2, when the head trains) until the backward; one chunk of float32 logits, overwritten
    # by their gradient, comes and goes; a KL term keeps the reference's hidden states (and its head, from a CPU
    # reference)
    held = sides * tokens * m.hidden * 4 + (0 if lora else sides * 4 * m.vocab * m.hidden)
    if kl:
        held += tokens * m.hidden * c + (c * m.vocab * m.hidden if s.reference_device == "cpu" and gpu else 0)
    t["fused head"] = held
    chunk_rows = min(tokens, max(1, CHUNK_BYTES // (4 * m.vocab)))
    t["logits chunk"] = chunk_rows * m.vocab * 4
    if s.geffect:
        t["profiler"] = PROFILED_GRADIENTS * 4 * trainable // ranks

    fixed = t["weights"] + t["adamw state"] + t.get("gathered blocks", 0) + t.get("reference copy", 0)
    # autograd runs the later side's graph first: its gradients all arrive while the earlier side's activations wait
    side_acts = acts // sides if not s.gradient_checkpointing else tokens * m.layers * m.hidden * residual
    p.phases["backward"] = fixed + t.get("autocast copies", 0) + t["logits chunk"] + max(
        acts + held, t["gradients"] + side_acts * (sides - 1) + held // sides)
    # multi-tensor AdamW on a GPU makes one float32 temporary of every parameter; the CPU one loops per tensor
    step_temp = 4 * trainable // ranks if gpu else 4 * (m.vocab * m.hidden if not lora else 0)
    p.phases["optimizer step"] = fixed + t["gradients"] + step_temp
    if s.geffect:
        p.phases["G-effects"] = fixed + acts + held + t["logits chunk"] + t["profiler"]
    return p


def _layer_activation_bytes(m: ModelShape, c: int, residual: int, lora: bool, targets) -> int:
    """Bytes autograd keeps per token for one decoder block's backward.

    Trained in full: each RMSNorm its input and output, attention its q, k, v and output (SDPA keeps a
    log-sum-exp per head, not the T×T probabilities), o_proj its input, the MLP gate, up, SiLU output and their
    product. With LoRA a frozen linear keeps no input: a norm's output is kept only for an adapter reading it, o_proj's
    and down_proj's inputs only for theirs, and each adapter keeps its input (in float32) and its rank-r middle.
    """
    h, q, kv, i = m.hidden, m.heads * m.head_dim, m.kv_heads * m.head_dim, m.intermediate
    # an RMSNorm in half precision computes in float32: its float32 input and output, then the half output
    norm_in, norm_out = (4, 4 + c) if residual < 4 else (residual, residual)
    attention = c * (2 * q + 2 * kv)  # q, k, v after rotary, and the output
    mlp = c * 3 * i  # gate (SiLU's input), SiLU's output, up
    if not lora:
        return 2 * h * (norm_in + norm_out) + attention + c * q + mlp + c * i
    targets = set(targets)
    kept = 2 * h * norm_in + attention + mlp
    kept += h * norm_out * (bool(targets & {"q_proj", "k_proj", "v_proj"}) + bool(targets & {"gate_proj", "up_proj"}))
    kept += c * q * ("o_proj" in targets) + c * i * ("down_proj" in targets)
    shapes = m.linears()
    r = 8  # the adapters' middle is small beside any of the above; its rank only scales it
    kept += sum(4 * (shapes[name][0] + r) for name in targets) if c < 4 else sum(4 * r for _ in targets)
    return kept


def format_plan(plans: dict) -> str:
    """A table: one column per plan (``{label: Plan}``), rows the terms, the moments and the peak, in GiB (MiB when
    every peak is under 1 GiB)."""
    labels = list(plans)
    rows = []
    names = []
    for plan_ in plans.values():
        names += [n for n in plan_.terms if n not in names]
    for name in names:
        rows.append((name, [pl.terms.get(name) for pl in plans.values()]))
    for name in ("backward", "optimizer step", "G-effects"):
        if any(name in pl.phases for pl in plans.values()):
            rows.append((f"at the {name}", [pl.phases.get(name) for pl in plans.values()]))
    rows.append(("peak per device", [pl.peak for pl in plans.values()]))
    host = sorted({n for pl in plans.values() for n in pl.host})
    for name in host:
        rows.append((f"on the host: {name}", [pl.host.get(name) for pl in plans.values()]))
    unit, size = ("GiB", GIB) if max(pl.peak for pl in plans.values()) >= GIB else ("MiB", MIB)
    width = max(len(r[0]) for r in rows)
    cols = [max(len(label), 9) for label in labels]
    lines = [" " * width + "  " + "  ".join(f"{label:>{w}}" for label, w in zip(labels, cols))]
    for name, values in rows:
        cells = "  ".join(f"{'-' if v is None else f'{v / size:.2f}':>{w}}" for v, w in zip(values, cols))
        lines.append(f"{name:<{width}}  {cells}")
    lines.append(f"({unit})")
    return "\n".join(lines)
