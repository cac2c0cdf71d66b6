"""A minimal unlearning loop with the public API (about 60 lines): NPO on a forget set plus an NLL retain
term, through the fused losses on the final hidden states and the LM head, with G-effects every 5 steps.

    python python/unlearning_loop.py                       # the embedded demo data and a tiny Llama
    python python/unlearning_loop.py MODEL_DIR FORGET.json RETAIN.json
"""
import sys

import torch

from geffect_kernels import IGNORE_INDEX, hf
from geffect_kernels.data import demo_data, encode_pairs, load_qa, qa_texts, train_tokenizer
from geffect_kernels.geffect import GEffectHistory, GEffectProfiler
from geffect_kernels.train import tiny_llama

torch.manual_seed(0)
if len(sys.argv) == 4:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    forget_pairs, retain_pairs = load_qa(sys.argv[2]), load_qa(sys.argv[3])
else:  # offline: the demo authors and a randomly initialized tiny Llama (forgetting noise, but it runs)
    data = demo_data(10)
    tokenizer = train_tokenizer(qa_texts(data.all_training), vocab_size=512)
    model = tiny_llama(tokenizer, hidden_size=64, layers=2, heads=2, intermediate_size=128)
    forget_pairs, retain_pairs = data.forget, data.retain

forget, retain = encode_pairs(tokenizer, forget_pairs), encode_pairs(tokenizer, retain_pairs)
forget_batch = forget.batch(range(min(8, len(forget))))
with torch.no_grad():  # NPO compares with the starting model: its log-probs, once
    ref_logprobs = hf.token_logprobs(model.eval(), forget_batch)

optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
profiler, history = GEffectProfiler(model), GEffectHistory("npo")
model.train()
for step in range(20):
    retain_batch = retain.batch([(step * 8 + k) % len(retain) for k in range(8)])
    if step % 5 == 0:  # G-effects at the parameters this step starts from
        history.record(step, profiler.measure_unlearning("npo", forget_batch, retain_batch,
                                                         ref_logprobs=ref_logprobs))
    loss = (hf.unlearning_loss("npo", model, forget_batch, ref_logprobs=ref_logprobs)
            + hf.unlearning_loss("nll", model, retain_batch))
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    print(f"step {step:2d}  loss {loss.item():.4f}")

with torch.no_grad():
    after = hf.token_logprobs(model.eval(), forget_batch)
valid = forget_batch["labels"][:, 1:] != IGNORE_INDEX
print(f"forget-set mean token log-prob: {ref_logprobs[valid].mean():.3f} -> {after[valid].mean():.3f}")
for step, result in zip(history.steps, history.results):
    print(f"step {step:2d}  e_forget {result.total['forget']:+.4g}  e_retain {result.total['retain']:+.4g}")
