"""Personalized generation for one or many users, batched and with the KV cache, plus length statistics."""

from __future__ import annotations

from collections.abc import Sequence
from statistics import mean

import torch

from prlhf.data.tokenize import adds_bos, encode_prompt, prompt_text_with_user
from prlhf.runs.directory import LoadedRun


def generate_texts(run: LoadedRun, prompts: Sequence[str], user_ids: Sequence[str], max_new_tokens: int = 64,
                   do_sample: bool = False, seed: int = 0, batch_size: int = 32, user_texts=None,
                   **generate_kwargs) -> list[str]:
    """One completion per (prompt, user) row; unseen users get the generic embedding."""
    tok = run.tokenizer
    bos = adds_bos(tok)
    user_texts = user_texts or [None] * len(prompts)
    ids = [encode_prompt(tok, prompt_text_with_user(p, t), bos) for p, t in zip(prompts, user_texts)]
    users = run.registry.indices(user_ids)
    torch.manual_seed(seed)
    out = []
    for s in range(0, len(ids), batch_size):
        new = run.model.generate(ids[s:s + batch_size], users[s:s + batch_size], tok.pad_token_id,
                                 tok.eos_token_id, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                 **generate_kwargs)
        out.extend(tok.decode(row, skip_special_tokens=True).strip() for row in new)
    return out


def length_stats(texts_by_user: dict[str, list[str]]) -> dict[str, dict]:
    return {u: {"mean_chars": mean(len(t) for t in texts), "mean_words": mean(len(t.split()) for t in texts),
                "n": len(texts)} for u, texts in texts_by_user.items()}
