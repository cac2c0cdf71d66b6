"""What a model says about answers: length-normalized log-probabilities (teacher-forced, through the
fused token log-probabilities on the hidden states) and greedy generations."""
from __future__ import annotations

import torch

from .. import hf
from ..geffect.sharded import is_sharded
from ..data.prompts import collate, encode_pair, prompt_ids


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def mean_answer_logprobs(model, tokenizer, questions, answers, *, batch_size=64) -> torch.Tensor:
    """log P(a | q) / |a| for each pair: the mean log-probability of the answer tokens (and EOS)."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = [encode_pair(tokenizer, q, a) for q, a in zip(questions, answers)]
    out = []
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(_device(model)) for k, v in collate(examples[start:start + batch_size], pad).items()}
        logprobs = hf.token_logprobs(model, batch).double()
        counts = (batch["labels"][:, 1:] != -100).sum(-1)
        out.append((logprobs.sum(-1) / counts.clamp_min(1)).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@torch.no_grad()
def greedy_answers(model, tokenizer, questions, *, max_new_tokens=200, batch_size=64) -> list[str]:
    """Greedy continuations of each question's prompt, decoded without special tokens."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = []
    for start in range(0, len(questions), batch_size):
        prompts = [prompt_ids(tokenizer, q) for q in questions[start:start + batch_size]]
        width = max(map(len, prompts))
        # left padding: every prompt ends at the same column, so generation continues all of them together
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=_device(model))
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=_device(model))
        # a sharded model's forward passes are collective: its ranks generate in lockstep until all are done
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                   do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                   synced_gpus=is_sharded(model))
        texts += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    return [t.strip() for t in texts]
