"""G-effects of several objectives on a local Hugging Face model, per layer, without training.

    python python/profile_local_model.py MODEL_DIR FORGET.json RETAIN.json [OUT_DIR]

FORGET/RETAIN are TOFU-format files (question, answer). Writes OUT_DIR/profile.csv and profile.png and
prints the totals; the same as `geffect profile`, spelled out.
"""
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from geffect_kernels import hf
from geffect_kernels.data import encode_pairs, load_qa
from geffect_kernels.eval.report import write_profile
from geffect_kernels.geffect import GEffectProfiler

if len(sys.argv) < 4:
    sys.exit(__doc__)
model_dir, forget_file, retain_file = sys.argv[1:4]
out_dir = Path(sys.argv[4] if len(sys.argv) > 4 else "profile-out")
device = "cuda" if torch.cuda.is_available() else "cpu"
model = AutoModelForCausalLM.from_pretrained(model_dir).to(device)
tokenizer = AutoTokenizer.from_pretrained(model_dir)

def batch_of(path, n=16):
    pairs = load_qa(path)[:n]
    return {k: v.to(device) for k, v in encode_pairs(tokenizer, pairs).batch(range(len(pairs))).items()}

forget, retain = batch_of(forget_file), batch_of(retain_file)
with torch.no_grad():  # the model is its own reference before any unlearning step
    ref_logprobs = hf.token_logprobs(model.eval(), forget)
profiler = GEffectProfiler(model, groups="layer")
results = {name: profiler.measure_unlearning(name, forget, retain, ref_logprobs=ref_logprobs)
           for name in ("ga", "npo", "wga", "tnpo", "wtnpo")}
print(write_profile(results, out_dir))
