"""The models and batches that the sharded-profiler test and its rank worker share."""
import torch
from peft import LoraConfig, get_peft_model

from geffect_kernels import hf

from geffect_models import batch, tiny_model

OBJECTIVES = ("npo", "wga", "ga")
HPARAMS = {"npo": {"beta": 0.5}}


def model(case):
    model = tiny_model("llama", seed=0)
    if case == "lora":
        torch.manual_seed(1)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                            init_lora_weights=False)
        model = get_peft_model(model, config).double()
    return model.eval()


def batches():
    """Global forget batch (5 samples: uneven slices on two ranks), retain batch and reference log-probs."""
    forget, retain = batch(batch_size=5, seed=11, prompt=2), batch(batch_size=4, length=7, seed=12)
    g = torch.Generator().manual_seed(13)
    with torch.no_grad():
        ref = hf.token_logprobs(tiny_model("llama", seed=3), forget) + 0.1 * torch.randn(5, 6, generator=g,
                                                                                         dtype=torch.float64)
    return forget, retain, ref
