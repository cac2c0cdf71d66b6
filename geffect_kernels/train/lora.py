"""LoRA adapters (peft) for a training run, and loading a saved adapter back onto its base model.

Only the adapters train: the optimizer, the G-effects and the saved model (``save_pretrained`` of a
``PeftModel`` writes the adapter alone) cover the trainable parameters. The adapters are drawn on the CPU from
a seed, so a model whose base weights are still on the meta device (a sharded load, `hf_shards`) gets the same
adapters as one loaded whole.
"""
from __future__ import annotations

from pathlib import Path
from ..structured_files import read_json

ADAPTER_CONFIG = "adapter_config.json"


def add_lora(model, r: int, alpha: float | None = None, targets: list[str] | None = None, base_path=None, *,
             seed: int = 0):
    """``model`` wrapped in rank-``r`` LoRA adapters on the modules named ``targets`` (peft's default for
    the architecture when None); ``alpha`` defaults to 2r; the adapters drawn from ``seed`` (peft's
    initialization). ValueError (one line) when no module matches."""
    from peft import LoraConfig, get_peft_model

    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"the LoRA rank must be a positive integer, got {r!r}")
    if alpha is not None:
        from ..ranges import POSITIVE, check_number
        check_number("the LoRA alpha", alpha, POSITIVE)
    config = LoraConfig(r=r, lora_alpha=2 * r if alpha is None else alpha, lora_dropout=0.0,
                        target_modules=list(targets) if targets else None, task_type="CAUSAL_LM")
    if targets:
        _check_targets(model, targets)
    try:
        peft_model = get_peft_model(model, config, low_cpu_mem_usage=True)  # adapters on the meta device
    except ValueError as err:
        raise ValueError(f"LoRA: {str(err).splitlines()[0]}") from None
    _draw_adapters(peft_model, seed)
    if base_path is not None:  # an adapter folder then names where its base model lives
        peft_model.peft_config["default"].base_model_name_or_path = str(Path(base_path).resolve())
    return peft_model


def _draw_adapters(peft_model, seed):
    """Initialize the (meta-device) adapters on the CPU with peft's own initialization, then move each beside
    its base weights when those are real (a meta-device base keeps them on the CPU until it is sharded)."""
    import torch
    from peft.tuners.lora import LoraLayer

    init = peft_model.peft_config["default"].init_lora_weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in peft_model.modules():
            if not isinstance(module, LoraLayer):
                continue
            adapters = [getattr(module, name) for name in module.adapter_layer_names]
            for adapter in adapters:
                adapter.to_empty(device="cpu")
            module.reset_lora_parameters("default", init)
            base = module.get_base_layer().weight
            if not base.is_meta:
                for adapter in adapters:
                    adapter.to(base.device)


def _check_targets(model, targets):
    names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]  # peft's matching
    if missing:
        import torch.nn as nn
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"LoRA target(s) {', '.join(missing)} match no module of {type(model).__name__}; "
                         f"its linear layers are {', '.join(linear)}")


def is_adapter_dir(path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_adapter(path, load_base, trainable=True):
    """The ``PeftModel`` saved in ``path``: its base model from ``load_base(base_path)`` plus the adapter,
    trainable by default (G-effects are taken over the trainable parameters: here the adapter's)."""
    from peft import PeftModel

    config = read_json(Path(path) / ADAPTER_CONFIG)
    base_path = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not base_path or not isinstance(base_path, str):
        raise ValueError(f"{path}/{ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    return PeftModel.from_pretrained(load_base(base_path), path, is_trainable=trainable)
