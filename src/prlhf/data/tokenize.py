"""Records -> token ids -> padded batches. User indices travel as tensors next to the tokens."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from prlhf.data.render import render_record
from prlhf.data.schema import PreferenceRecord
from prlhf.model.logprobs import IGNORE_INDEX

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedPair:
    prompt_ids: list[int]    # starts with BOS when the tokenizer uses one
    chosen_ids: list[int]    # ends with EOS
    rejected_ids: list[int]  # ends with EOS
    user_id: str


@dataclass
class PairBatch:
    """B pairs stacked as 2B sequences: rows [0, B) are chosen, rows [B, 2B) rejected (prompt + response)."""

    input_ids: torch.Tensor       # (2B, L), right-padded
    attention_mask: torch.Tensor  # (2B, L)
    labels: torch.Tensor          # (2B, L), IGNORE_INDEX on prompt and padding
    user_idx: torch.Tensor        # (B,) user-model index of each pair's user (0 = generic)
    example_idx: torch.Tensor     # (B,) position of each pair in its dataset (to look up cached ref log-probs)

    def to(self, device) -> "PairBatch":
        return PairBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels,
                                                   self.user_idx, self.example_idx)))

    def __len__(self) -> int:
        return self.user_idx.shape[0]


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


def collate_pairs(pairs: Sequence[EncodedPair], user_idx: torch.Tensor, example_idx: torch.Tensor,
                  pad_id: int) -> PairBatch:
    seqs = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    prompt_lens = [len(p.prompt_ids) for p in pairs] * 2
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for row, (seq, plen) in enumerate(zip(seqs, prompt_lens)):
        input_ids[row, :len(seq)] = torch.tensor(seq)
        attention_mask[row, :len(seq)] = 1
        labels[row, plen:len(seq)] = torch.tensor(seq[plen:])
    return PairBatch(input_ids, attention_mask, labels, user_idx, example_idx)
