"""String user ids <-> user-model indices. Index 0 is the generic user; seen users are 1..N."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

GENERIC_INDEX = 0


class UserRegistry:
    """Maps dataset user ids to indices. Unknown ids map to the generic user (index 0), with a notice."""

    def __init__(self, user_ids: Iterable[str] = ()):
        self._index: dict[str, int] = {}
        for uid in user_ids:
            self.add(uid)
        self._noticed: set[str] = set()

    @classmethod
    def from_records(cls, records) -> "UserRegistry":
        # Sorted so the same data always gives the same indices, whatever the row order.
        return cls(sorted({r.user_id for r in records}))

    def add(self, user_id: str) -> int:
        if user_id not in self._index:
            self._index[user_id] = len(self._index) + 1
        return self._index[user_id]

    def __len__(self) -> int:
        """Number of seen users N (the generic user is not counted)."""
        return len(self._index)

    def __contains__(self, user_id: str) -> bool:
        return user_id in self._index

    @property
    def user_ids(self) -> list[str]:
        return list(self._index)

    def index(self, user_id: str) -> int:
        return int(self.indices([user_id])[0])

    def indices(self, user_ids: Iterable[str]) -> torch.Tensor:
        """(B,) indices; unknown ids get the generic user, with one notice per call for the ids not noticed yet."""
        user_ids = list(user_ids)
        out = torch.tensor([self._index.get(u, GENERIC_INDEX) for u in user_ids], dtype=torch.long)
        new = sorted({u for u in user_ids if u not in self._index} - self._noticed)
        if new:
            self._noticed.update(new)
            shown = ", ".join(repr(u) for u in new[:5]) + (f" and {len(new) - 5} more" if len(new) > 5 else "")
            logger.info("%d user(s) not seen in training use the generic user embedding: %s", len(new), shown)
        return out

    def to_dict(self) -> dict:
        return {"generic_index": GENERIC_INDEX, "users": dict(self._index)}

    @classmethod
    def from_dict(cls, data: dict) -> "UserRegistry":
        reg = cls()
        # Keep the saved indices exactly (they address rows of the saved user model).
        for uid, idx in sorted(data["users"].items(), key=lambda kv: kv[1]):
            if idx != len(reg._index) + 1:
                raise ValueError(f"user registry: indices must be 1..N without gaps, got {idx} for {uid!r}")
            reg._index[uid] = idx
        return reg

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "UserRegistry":
        return cls.from_dict(json.loads(Path(path).read_text()))


class CompactRegistry:
    """A read-only UserRegistry in three flat arrays: the ids' UTF-8 bytes in sorted order, their offsets, and
    their indices. The id's length plus 8 bytes per user where a dict takes about 160, which is what lets one
    server hold a million users in little more memory than their rows; a lookup is a binary search (~20
    comparisons, a few microseconds)."""

    def __init__(self, user_ids: Sequence[str]):
        """`user_ids` in index order: user_ids[i] has index i + 1."""
        encoded = [u.encode() for u in user_ids]
        order = sorted(range(len(encoded)), key=encoded.__getitem__)
        lengths = np.fromiter((len(encoded[i]) for i in order), dtype=np.int64, count=len(order))
        offsets = np.concatenate([[0], np.cumsum(lengths)])  # (N+1,)
        wide = offsets[-1] >= 2 ** 31 or len(order) >= 2 ** 31
        self._offsets = offsets.astype(np.int64 if wide else np.int32)
        self._blob = b"".join(encoded[i] for i in order)
        self._index = (np.asarray(order, dtype=np.int64) + 1).astype(self._offsets.dtype)  # (N,) in sorted order
        self._noticed: set[str] = set()

    @classmethod
    def of(cls, registry: UserRegistry) -> CompactRegistry:
        return cls(registry.user_ids)

    def __len__(self) -> int:
        return len(self._index)

    def _find(self, user_id: str) -> int:
        key, lo, hi = user_id.encode(), 0, len(self._index)
        offsets, blob = self._offsets, self._blob
        while lo < hi:
            mid = (lo + hi) // 2
            if blob[offsets[mid]:offsets[mid + 1]] < key:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(self._index) and blob[offsets[lo]:offsets[lo + 1]] == key:
            return int(self._index[lo])
        return GENERIC_INDEX

    def __contains__(self, user_id: str) -> bool:
        return self._find(user_id) != GENERIC_INDEX

    def index(self, user_id: str) -> int:
        return self._find(user_id)

    def indices(self, user_ids: Iterable[str]) -> torch.Tensor:
        return torch.tensor([self._find(u) for u in user_ids], dtype=torch.long)

    @property
    def user_ids(self) -> list[str]:
        """In index order."""
        ids = [""] * len(self._index)
        for i, index in enumerate(self._index.tolist()):
            ids[index - 1] = self._blob[self._offsets[i]:self._offsets[i + 1]].decode()
        return ids

    @property
    def nbytes(self) -> int:
        return len(self._blob) + self._offsets.nbytes + self._index.nbytes
