"""String user ids <-> user-model indices. Index 0 is the generic user; seen users are 1..N."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

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
