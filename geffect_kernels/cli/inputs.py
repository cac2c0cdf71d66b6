"""The command's inputs checked before anything runs, and the models, tokenizers and devices they name."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import CLIError, first_line


def parse_hparams(pairs):
    """``["beta=0.5", "alpha=2"]`` -> ``{"beta": 0.5, "alpha": 2.0}`` (ranges are checked by the objectives)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key:
            raise CLIError(f"--hparam takes NAME=NUMBER, got {pair!r}")
    return out


def hparams_per_objective(objectives, hparams) -> dict:
    """Each hyper-parameter goes to the objectives that take it; one that none of them takes is an error
    (the same rule for train and profile)."""
    from ..catalog import OBJECTIVES

    unknown = [name for name in objectives if name not in OBJECTIVES]
    if unknown:
        raise CLIError(f"unknown objective {unknown[0]!r}; choose from {', '.join(OBJECTIVES)}")
    if not isinstance(hparams, dict):
        raise CLIError(f"hparams must be a mapping NAME: NUMBER (e.g. beta: 0.5), got {hparams!r}")
    unused = [k for k in hparams if not any(k in OBJECTIVES[name].defaults for name in objectives)]
    if unused:
        takes = "; ".join(f"{name}: {', '.join(OBJECTIVES[name].defaults) or 'none'}" for name in objectives)
        raise CLIError(f"hyper-parameter {unused[0]!r} is taken by none of the objectives ({takes})")
    return {name: {k: v for k, v in hparams.items() if k in OBJECTIVES[name].defaults} for name in objectives}


def usable_device(name):
    """``--device`` as a torch device that works here (``cuda`` without a GPU does not); None: cuda when there is
    one, else cpu."""
    import torch

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except Exception as err:  # torch raises RuntimeError, AssertionError, ... by device type
        raise CLIError(f"--device {name}: not usable here ({first_line(err)})") from err
    return device


def checked_out_dir(path) -> Path:
    """``--out`` checked before anything is computed: a folder (or a path that can become one) we may write."""
    if not str(path).strip():
        raise CLIError("--out must name a folder, got an empty path")
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise CLIError(f"--out {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"--out {path}: {existing} is not writable")
    return path


def quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_model(path, device="cpu", dtype=None, _adapters=()):
    """The causal LM (or LoRA adapter on its base) in ``path`` on ``device``, its weights in ``dtype`` (a torch
    dtype name; None: float32)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..train.lora import is_adapter_dir, load_adapter

    path = Path(path)
    if is_adapter_dir(path):  # a LoRA adapter written by `geffect train --lora-r`: its base model plus it
        chain = (*_adapters, path.resolve())
        if path.resolve() in _adapters:
            raise CLIError(f"{_adapters[0]}: LoRA adapters whose base models lead back to themselves "
                           f"({' -> '.join(map(str, chain))}); the chain must end in a full model folder")
        return load_adapter(path, lambda base: load_model(base, device, dtype, chain)).to(device)
    check_model_dir(path)
    try:
        AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype or "float32"))
    except Exception as err:  # a corrupt or truncated weights file, pickled weights, a foreign config...
        raise CLIError(f"{path} does not hold a loadable causal language model "
                       f"({type(err).__name__}: {first_line(err)})") from err
    return model.to(device)


def check_model_dir(path: Path):
    if not (path / "config.json").exists():
        raise CLIError(f"{path} is not a Hugging Face model directory (no config.json)")
    from ..structured_files import read_json

    if not isinstance(read_json(path / "config.json"), dict):  # one line for a file transformers cannot parse
        raise CLIError(f"{path / 'config.json'}: not a JSON object")


def check_shardable(path: Path):
    """What several processes need to read ``path`` straight into shards (`hf_shards`): a full model folder with
    safetensors weights."""
    from ..train.hf_shards import weight_files
    from ..train.lora import is_adapter_dir

    if is_adapter_dir(path):
        raise CLIError(f"--model {path} is a LoRA adapter: several processes load a full model folder into shards "
                       f"(train the adapter further in one process)")
    check_model_dir(path)
    weight_files(path)


def load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (ValueError, OSError) as err:
        raise CLIError(f"no tokenizer in {path} ({str(err).splitlines()[0]}); pass --tokenizer DIR") from None


def check_lengths(data, model_config, source, truncate=True):
    """CLIError when an encoded example is longer than the positions of a model with learned position embeddings
    (it would index past them at the first step); a rotary model runs past them (extrapolated), and a length
    too large for memory ends as `OutOfMemory`."""
    limit = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    longest = max((len(e["input_ids"]) for e in data.examples), default=0) if data is not None else 0
    if not limit or longest <= limit:
        return
    rotary = any(getattr(model_config, key, None) for key in ("rope_parameters", "rope_theta", "rope_scaling"))
    if rotary:
        return
    raise CLIError(f"{source}: an example (question and answer) has {longest} tokens, more than the model's "
                   f"{limit} positions; " + (f"pass --max-length {limit} to truncate them" if truncate else
                                             "shorten them"))


def read_model_config(path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)
