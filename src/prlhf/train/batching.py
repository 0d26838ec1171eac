"""Seeded, resumable batch order over the training pairs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffled batches of example indices; the order of epoch e depends only on (seed, e), so a resumed run
    sees exactly the batches it would have seen.

    With `lengths`, batches are length-aware: the shuffled order is cut into chunks of `bucket` optimizer steps,
    each chunk is sorted by length and cut into steps, the steps are shuffled again, and each step is yielded as
    its `group` consecutive batches (group = processes x accumulation steps). Pairs of similar length share a
    step (less padding), every epoch still sees a fresh random mix, and a step holds the same pairs whether it
    runs as 1 batch of 8, 2 processes x 4 or 8 accumulated batches of 1.
    """

    def __init__(self, n: int, batch_size: int, seed: int, lengths: Sequence[int] | None = None, bucket: int = 32,
                 group: int = 1):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, 0
        self.lengths, self.bucket, self.group = lengths, bucket, group

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        if self.lengths is not None:
            step = self.batch_size * self.group
            steps = []
            for start in range(0, self.n, step * self.bucket):
                block = sorted(order[start:start + step * self.bucket], key=self.lengths.__getitem__)
                steps += [block[s:s + step] for s in range(0, len(block), step)]
            order = [i for k in torch.randperm(len(steps), generator=g).tolist() for i in steps[k]]
        yield from (order[s:s + self.batch_size] for s in range(0, self.n, self.batch_size))

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size
