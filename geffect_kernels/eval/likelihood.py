"""What a model says about answers: length-normalized log-probabilities (teacher-forced, through the
fused token log-probabilities on the hidden states), membership and memorization scores from its per-token
statistics, and greedy generations."""
from __future__ import annotations

import torch

from .. import hf
from ..catalog import IGNORE_INDEX
from ..geffect.sharded import is_sharded
from ..data.prompts import collate, encode_pair, padding_id, prompt_ids
from .membership import ATTACKS, attack_scores
from .memorization import exact_memorization, extraction_strength
from .sample_stats import sample_stats


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def mean_answer_logprobs(model, tokenizer, questions, answers, *, batch_size=64) -> torch.Tensor:
    """log P(a | q) / |a| for each pair: the mean log-probability of the answer tokens (and EOS)."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    pad = padding_id(tokenizer)
    examples = [encode_pair(tokenizer, q, a) for q, a in zip(questions, answers)]
    out = []
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(_device(model)) for k, v in collate(examples[start:start + batch_size], pad).items()}
        logprobs = hf.token_logprobs(model, batch).double()
        counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)
        out.append((logprobs.sum(-1) / counts.clamp_min(1)).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def memorization_scores(model, tokenizer, examples, *, batch_size=32) -> dict:
    """Per-sample lists for encoded ``examples``: each membership attack's score (``mia_loss``, ``mia_zlib``,
    ``mia_min_k``, ``mia_min_k++``; see `membership`), ``exact_memorization`` and ``extraction_strength``."""
    stats = sample_stats(model, examples, padding_id(tokenizer), batch_size=batch_size)
    texts = tokenizer.batch_decode([s.target_ids for s in stats], skip_special_tokens=True)
    scores = [attack_scores(s, text) for s, text in zip(stats, texts)]
    out = {f"mia_{name}": [s[name] for s in scores] for name in ATTACKS}
    out["exact_memorization"] = [exact_memorization(s.argmax_hit) for s in stats]
    out["extraction_strength"] = [extraction_strength(s.argmax_hit) for s in stats]
    return out


@torch.no_grad()
def greedy_answers(model, tokenizer, questions, *, max_new_tokens=200, batch_size=64) -> list[str]:
    """Greedy continuations of each question's prompt, decoded without special tokens."""
    return greedy_continuations(model, tokenizer, [prompt_ids(tokenizer, q) for q in questions],
                                max_new_tokens=max_new_tokens, batch_size=batch_size)


@torch.no_grad()
def greedy_continuations(model, tokenizer, prompts, *, max_new_tokens=200, batch_size=64, strip=True) -> list[str]:
    """Greedy continuations of token-id prompts, decoded without special tokens (and stripped); a continuation
    stops at the model's last position (``config.max_position_embeddings``) when that comes before
    ``max_new_tokens``."""
    pad = padding_id(tokenizer)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(map(len, chunk))
        new_tokens = max_new_tokens if limit is None else min(max_new_tokens, limit - width)
        if new_tokens < 1:  # the prompts fill every position: nothing can follow them
            texts += [""] * len(chunk)
            continue
        # left padding: every prompt ends at the same column, so generation continues all of them together
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in chunk], device=_device(model))
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=_device(model))
        # a sharded model's forward passes are collective: its ranks generate in lockstep until all are done
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                   do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                   synced_gpus=is_sharded(model))
        texts += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    return [t.strip() for t in texts] if strip else texts
