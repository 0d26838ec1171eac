"""Seeded, resumable batch order over the training pairs, and batched passes over a whole dataset."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from prlhf.data.tokenize import EncodedPair, PairBatch, collate_pairs
from prlhf.users.registry import UserRegistry


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffled batches of example indices; the order of epoch e depends only on (seed, e), so a resumed run
    sees exactly the batches it would have seen."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        for start in range(0, self.n, self.batch_size):
            yield order[start:start + self.batch_size]

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size


class PairCollator:
    """Index lists -> PairBatch. Without a registry (reference passes) every pair gets the generic index 0."""

    def __init__(self, pairs: Sequence[EncodedPair], registry: UserRegistry | None, pad_id: int):
        self.pairs, self.pad_id = pairs, pad_id
        self.user_idx = (registry.indices([p.user_id for p in pairs]) if registry is not None
                         else torch.zeros(len(pairs), dtype=torch.long))  # (N,)

    def __call__(self, indices: list[int]) -> PairBatch:
        idx = torch.tensor(indices, dtype=torch.long)
        return collate_pairs([self.pairs[i] for i in indices], self.user_idx[idx], idx, self.pad_id)


def length_sorted_batches(pairs: Sequence[EncodedPair], batch_size: int) -> list[list[int]]:
    """For passes without gradients: similar lengths together wastes less compute on padding."""
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].prompt_ids) + max(len(pairs[i].chosen_ids),
                                                                                    len(pairs[i].rejected_ids)))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
