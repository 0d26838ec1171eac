"""Encoded pairs -> padded batches: B pairs as 2B right-padded rows, labels masked outside the responses.

User indices travel as tensors next to the tokens; passes without gradients go in length-sorted batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from prlhf.data.tokenize import EncodedPair

IGNORE_INDEX = -100  # the label of positions that are not scored (prompt, user tokens, padding)


class UserIndex(Protocol):
    """What the collator needs of a user registry (prlhf.users.registry.UserRegistry)."""

    def indices(self, user_ids: Sequence[str]) -> torch.Tensor: ...


@dataclass(frozen=True)
class PairLayout:
    """A batch's structure as Python values, so work that needs it (prompt sharing) does not wait on the device."""

    prompt_key: tuple[int, ...]  # (B,) equal for pairs whose prompt ids are equal
    prompt_len: tuple[int, ...]  # (B,) prompt tokens (where the labels start)
    row_len: tuple[int, ...]     # (2B,) real tokens of each row: chosen rows, then rejected
    users: tuple[int, ...]       # (B,) user_idx


@dataclass
class PairBatch:
    """B pairs stacked as 2B sequences: rows [0, B) are chosen, rows [B, 2B) rejected (prompt + response)."""

    input_ids: torch.Tensor       # (2B, L), right-padded
    attention_mask: torch.Tensor  # (2B, L)
    labels: torch.Tensor          # (2B, L), IGNORE_INDEX on prompt and padding
    user_idx: torch.Tensor        # (B,) user-model index of each pair's user (0 = generic)
    example_idx: torch.Tensor     # (B,) position of each pair in its dataset (to look up cached ref log-probs)
    layout: PairLayout | None = None  # stays on the host

    def to(self, device, non_blocking: bool = False) -> "PairBatch":
        return PairBatch(*(t.to(device, non_blocking=non_blocking) for t in (
            self.input_ids, self.attention_mask, self.labels, self.user_idx, self.example_idx)), self.layout)

    def __len__(self) -> int:
        return self.user_idx.shape[0]


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
    keys: dict[tuple[int, ...], int] = {}
    layout = PairLayout(tuple(keys.setdefault(tuple(p.prompt_ids), len(keys)) for p in pairs),
                        tuple(prompt_lens[:len(pairs)]), tuple(len(s) for s in seqs), tuple(user_idx.tolist()))
    return PairBatch(input_ids, attention_mask, labels, user_idx, example_idx, layout)


class PairCollator:
    """Index lists -> PairBatch. Without a registry (reference passes) every pair gets the generic index 0."""

    def __init__(self, pairs: Sequence[EncodedPair], registry: UserIndex | None, pad_id: int):
        self.pairs, self.pad_id = pairs, pad_id
        self.user_idx = (registry.indices([p.user_id for p in pairs]) if registry is not None
                         else torch.zeros(len(pairs), dtype=torch.long))  # (N,)

    def __call__(self, indices: list[int]) -> PairBatch:
        idx = torch.tensor(indices, dtype=torch.long)
        return collate_pairs([self.pairs[i] for i in indices], self.user_idx[idx], idx, self.pad_id)


def pair_length(pair: EncodedPair) -> int:
    """Padded width of the pair's rows: its prompt plus the longer response."""
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


def length_sorted_batches(pairs: Sequence[EncodedPair], batch_size: int) -> list[list[int]]:
    """For passes without gradients: similar lengths together wastes less compute on padding."""
    order = sorted(range(len(pairs)), key=lambda i: pair_length(pairs[i]))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
