"""Joining rows into a running batch: two KV caches of different lengths become one, padded on the left.

Positions are passed explicitly (each row counts its own real tokens), and padded slots are masked out, so a row
decodes the same tokens whether or not others joined around it. Only plain growing caches (every layer a
DynamicLayer) can be joined; for others (sliding windows, static or quantized caches) the engine lets new
requests wait for the next batch instead.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch.nn import functional as F


def joinable(cache) -> bool:
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:  # transformers 4.x before cache layers
        return False
    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer and getattr(layer, "keys", None) is not None
                                               for layer in cache.layers)


def join(cache, mask: torch.Tensor, other, other_mask: torch.Tensor) -> torch.Tensor:
    """Append `other`'s rows to `cache` (in place) and return the joined (B + B', L) attention mask.
    Caches hold (B, H, L, D) keys and values per layer; the shorter side is left-padded to the longer."""
    length = max(mask.shape[1], other_mask.shape[1])
    for layer, extra in zip(cache.layers, other.layers):
        layer.keys = torch.cat([_left_pad(layer.keys, length), _left_pad(extra.keys, length)], dim=0)
        layer.values = torch.cat([_left_pad(layer.values, length), _left_pad(extra.values, length)], dim=0)
    return torch.cat([F.pad(mask, (length - mask.shape[1], 0)), F.pad(other_mask, (length - other_mask.shape[1], 0))])


def _left_pad(states: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(states, (0, 0, length - states.shape[-2], 0))  # (B, H, L, D): zeros before the first slot


def trim(cache, mask: torch.Tensor, slack: int = 16) -> torch.Tensor:
    """Drop the leading columns no row attends to any more (a batch that runs on while rows leave and join keeps
    them otherwise, and every step would attend over a growing width); returns the trimmed mask. Done only once
    at least `slack` columns (and a quarter of the width) are free, so that it is not a copy per step."""
    used = mask.any(0)  # (L,)
    first = int(used.nonzero()[0]) if used.any() else mask.shape[1]
    if first < max(slack, mask.shape[1] // 4):
        return mask
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
    return mask[:, first:]


class PrefixCache:
    """The KV cache of each user's prefix [BOS] [u_1 ... u_T]: the same for every request of that user under one
    version of the user table, so a returning user's prefill runs over the prompt only (soft tokens made a
    short prompt's prefill about 1.5x as long). Least recently used users are evicted past `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._entries: OrderedDict = OrderedDict()  # (version, user index) -> [(keys, values) per layer]
        self.hits = self.misses = 0

    def __contains__(self, key) -> bool:
        return key in self._entries

    def get(self, key) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, key, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        size = sum(k.nbytes + v.nbytes for k, v in layers)
        if size > self.max_bytes:
            return
        self._entries[key] = layers
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= sum(k.nbytes + v.nbytes for k, v in old)

    def keep_version(self, version) -> None:
        """Forget the prefixes of other user-table versions (a reload happened)."""
        for key in [k for k in self._entries if k[0] != version]:
            old = self._entries.pop(key)
            self.bytes -= sum(k.nbytes + v.nbytes for k, v in old)


def rows_of(cache) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """A joinable cache of U rows -> per row, its (H, P, D) keys and values per layer (copies)."""
    return [[(layer.keys[i].clone(), layer.values[i].clone()) for layer in cache.layers]
            for i in range(cache.layers[0].keys.shape[0])]


def stack_rows(entries: list[list[tuple[torch.Tensor, torch.Tensor]]]):
    """Per-row prefixes of equal length -> one DynamicCache of B rows."""
    from transformers.cache_utils import DynamicCache

    layers = len(entries[0])
    return DynamicCache(ddp_cache_data=[(torch.stack([e[l][0] for e in entries]),
                                         torch.stack([e[l][1] for e in entries])) for l in range(layers)])
