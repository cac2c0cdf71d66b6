"""What test_distributed_loop.py and its rank worker share: the data, the settings and an evaluate hook."""
import torch
from transformers import AutoTokenizer

from geffect_kernels import hf
from geffect_kernels.data import encode_pairs, load_qa
from geffect_kernels.train import TrainConfig


def data(workspace):
    """The forget and retain sets of a `test_cli.make_workspace` folder."""
    tokenizer = AutoTokenizer.from_pretrained(workspace / "model")
    return tuple(encode_pairs(tokenizer, load_qa(workspace / f"{name}.json")) for name in ("forget", "retain"))


def config(out, **changes):
    return TrainConfig(**{"objective": "npo", "steps": 4, "lr": 0.01, "batch_size": 4, "eval_every": 2,
                          "geffect_every": 2, "checkpoint_every": 2, "backend": "torch", "out_dir": str(out),
                          **changes})


def probe(forget):
    """``evaluate(model)``: the summed negative log-likelihood of three forget samples (a sharded model's forward
    pass takes every rank)."""
    batch = forget.batch([0, 1, 2])

    def evaluate(model):
        with torch.no_grad():
            return {"probe_nll": -float(hf.token_logprobs(model, batch, backend="torch").double().sum())}
    return evaluate
