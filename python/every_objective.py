"""Every unlearning objective on a tiny random Llama: loss, gradient norm and the mean token weight.

    python python/every_objective.py

Runs on CPU in seconds, offline (the model is built from a config, nothing is downloaded).
"""
import copy
import time

import torch
import transformers

import geffect_kernels as gk
from geffect_kernels import hf

torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
model = transformers.LlamaForCausalLM(config)
reference = copy.deepcopy(model).eval()  # the "original" model NPO / TNPO compare against
model.train()

input_ids = torch.randint(0, config.vocab_size, (4, 32))
batch = {"input_ids": input_ids, "labels": input_ids.clone()}
batch["labels"][:, :8] = gk.IGNORE_INDEX  # the prompt does not count; only the answer tokens are unlearned

with torch.no_grad():
    ref_logprobs = hf.token_logprobs(reference, batch)  # [4, 31]: HF labels are shifted

print(f"{'objective':<8} {'loss':>10} {'|grad|':>10} {'mean w_t':>9} {'ms':>7}")
for name in gk.OBJECTIVES:
    model.zero_grad()
    start = time.perf_counter()
    loss = hf.unlearning_loss(name, model, batch, ref_logprobs=ref_logprobs)
    loss.backward()
    ms = 1e3 * (time.perf_counter() - start)
    grad_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None))
    with torch.no_grad():
        logprobs = hf.token_logprobs(model, batch)
    mask = batch["labels"][:, 1:] != gk.IGNORE_INDEX
    weights = gk.token_weights(name, logprobs, ref_logprobs if gk.OBJECTIVES[name].needs_ref else None, mask=mask)
    print(f"{name:<8} {loss.item():>10.4f} {grad_norm.item():>10.4f} {weights[mask].mean().item():>9.2e} {ms:>7.1f}")

# Retain and representation losses compare the model with the reference: take one SGD step (on the
# last objective's gradient) so that the two differ.
with torch.no_grad():
    for p in model.parameters():
        p -= 0.05 * p.grad
    ref_hidden = hf.final_hidden_states(reference, input_ids)
x = hf.head_inputs(model, batch)
kl = gk.kl_loss(x.hidden, x.weight, ref_hidden, reference.lm_head.weight, x.labels, shift=True)
print(f"kl       {kl.item():>10.4f}")
print(f"rmu      {gk.rmu_loss(x.hidden, gk.rmu_direction(config.hidden_size), coeff=6.5).item():>10.4f}")
print(f"rr       {gk.rr_loss(x.hidden, ref_hidden).item():>10.4f}")
