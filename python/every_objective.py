"""Every unlearning objective on a tiny random Llama: loss, gradient norm and the mean token weight.

Each catalog entry reads what its ``inputs`` say (the forget answers' log-probabilities, substitute answers for
PO/DPO, a layer's activations for RMU); `objective_inputs.loss` computes any of them from the model and the batch.

    python python/every_objective.py

Runs on CPU in seconds, offline (the model is built from a config, nothing is downloaded).
"""
import copy
import time

import torch
import transformers

import geffect_kernels as gk
from geffect_kernels import hf, objective_inputs
from geffect_kernels.objective_inputs import ReferenceState

torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
model = transformers.LlamaForCausalLM(config)
reference = copy.deepcopy(model).eval()  # the "original" model NPO / TNPO compare against
model.train()

input_ids = torch.randint(0, config.vocab_size, (4, 32))
batch = {"input_ids": input_ids, "labels": input_ids.clone()}
batch["labels"][:, :8] = gk.IGNORE_INDEX  # the prompt does not count; only the answer tokens are unlearned

# substitute answers (PO, DPO): the same prompts with other answer tokens, e.g. a refusal
alternate_ids = input_ids.clone()
alternate_ids[:, 8:20] = torch.randint(0, config.vocab_size, (4, 12))
alternate = {"input_ids": alternate_ids[:, :20], "labels": alternate_ids[:, :20].clone()}
alternate["labels"][:, :8] = gk.IGNORE_INDEX
forget_batch = objective_inputs.with_alternate(batch, alternate)

with torch.no_grad():
    ref_logprobs = hf.token_logprobs(reference, batch)  # [4, 31]: HF labels are shifted
    state = ReferenceState(ref_logprobs, hf.token_logprobs(reference, alternate), model=reference)

print(f"{'objective':<8} {'loss':>10} {'|grad|':>10} {'mean w_t':>9} {'ms':>7}")
for name, objective in gk.OBJECTIVES.items():
    model.zero_grad()
    start = time.perf_counter()
    loss = objective_inputs.loss(name, model, forget_batch, state)
    loss.backward()
    ms = 1e3 * (time.perf_counter() - start)
    grad_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None))
    mean_weight = "—"
    if objective.gradient_on_forget_logprobs:  # token weights: gradients Σ_t w_t ∇ℓ_t of the forget answers
        with torch.no_grad():
            logprobs = hf.token_logprobs(model, batch)
        mask = batch["labels"][:, 1:] != gk.IGNORE_INDEX
        weights = gk.token_weights(name, logprobs, ref_logprobs if objective.needs_ref else None, mask=mask)
        mean_weight = f"{weights[mask].mean().item():.2e}"
    print(f"{name:<8} {loss.item():>10.4f} {grad_norm.item():>10.4f} {mean_weight:>9} {ms:>7.1f}")

# Retain and representation losses compare the model with the reference: take one SGD step (on the
# last objective's gradient, which reaches the layers up to RMU's) so that the two differ.
with torch.no_grad():
    for p in model.parameters():
        if p.grad is not None:
            p -= 0.05 * p.grad
    ref_hidden = hf.final_hidden_states(reference, input_ids)
x = hf.head_inputs(model, batch)
kl = gk.kl_loss(x.hidden, x.weight, ref_hidden, reference.lm_head.weight, x.labels, shift=True)
print(f"kl       {kl.item():>10.4f}")
print(f"rmu      {gk.rmu_loss(x.hidden, gk.rmu_direction(config.hidden_size), coeff=6.5).item():>10.4f}")
print(f"rr       {gk.rr_loss(x.hidden, ref_hidden).item():>10.4f}")
