"""Records -> token ids (prompt, chosen, rejected), with the truncation rules of a run's config."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from prlhf.data.render import render_record
from prlhf.data.schema import PreferenceRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedPair:
    prompt_ids: list[int]    # starts with BOS when the tokenizer uses one
    chosen_ids: list[int]    # ends with EOS
    rejected_ids: list[int]  # ends with EOS
    user_id: str


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer starts sequences with BOS (Llama does, GPT-2 does not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def prompt_text_with_user(prompt_text: str, user_text: str | None) -> str:
    # Explicit preferences (P-RLHF.md §2): the user's own words go before the prompt, seen by the reference too.
    return prompt_text if not user_text else f"{user_text}\n\n{prompt_text}"


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, bos: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if bos and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def encode_records(records: Sequence[PreferenceRecord], tokenizer: PreTrainedTokenizerBase, max_length: int = 512,
                   max_prompt_length: int = 256, use_user_text: bool = True) -> list[EncodedPair]:
    """Tokenize each record; prompts keep their last `max_prompt_length` tokens (BOS kept), responses are cut
    so that prompt + response fits in `max_length` (soft user tokens come on top)."""
    bos = adds_bos(tokenizer)
    eos = tokenizer.eos_token_id
    encoded, truncated = [], 0
    for rec in records:
        prompt_text, chosen_text, rejected_text = render_record(rec, tokenizer)
        prompt = encode_prompt(tokenizer, prompt_text_with_user(prompt_text, rec.user_text if use_user_text else None),
                               bos)
        if len(prompt) > max_prompt_length:
            prompt = prompt[:int(bos)] + prompt[len(prompt) - max_prompt_length + int(bos):]
            truncated += 1
        budget = max(1, max_length - len(prompt))
        responses = []
        for text in (chosen_text, rejected_text):
            ids = tokenizer(text, add_special_tokens=False).input_ids + [eos]
            if len(ids) > budget:
                ids, truncated = ids[:budget], truncated + 1
            responses.append(ids)
        encoded.append(EncodedPair(prompt, responses[0], responses[1], rec.user_id))
    if truncated:
        logger.warning("truncated %d prompts/responses to max_length=%d / max_prompt_length=%d",
                       truncated, max_length, max_prompt_length)
    return encoded


def encode_as_configured(records: Sequence[PreferenceRecord], tokenizer: PreTrainedTokenizerBase,
                         config) -> list[EncodedPair]:
    """encode_records with a run's own settings: `config` is its TrainConfig (max_length, max_prompt_length,
    use_user_text)."""
    return encode_records(records, tokenizer, config.max_length, config.max_prompt_length, config.use_user_text)
