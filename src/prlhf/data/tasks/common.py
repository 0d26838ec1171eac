"""Shared pieces of the built-in synthetic tasks: the `Task` container and user/pole helpers."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from prlhf.config import ConfigError
from prlhf.data.schema import PreferenceRecord
from prlhf.safe_io import atomic_write_text, looks_like_run


@dataclass
class Task:
    """A generated multi-user preference task: train/test records plus the ground-truth user profiles."""

    name: str
    train: list[PreferenceRecord]
    test: list[PreferenceRecord]
    users: dict[str, dict]  # user_id -> {"seen": bool, ...task-specific keys}
    meta: dict = field(default_factory=dict)  # builder parameters + seed
    extra: dict[str, list[PreferenceRecord]] = field(default_factory=dict)  # more test splits, by file stem
    record_dimensions: dict[str, list[str]] = field(default_factory=dict)  # split -> each record's dimension

    @property
    def seen_users(self) -> list[str]:
        return [u for u, info in self.users.items() if info["seen"]]

    @property
    def unseen_users(self) -> list[str]:
        return [u for u, info in self.users.items() if not info["seen"]]

    def write(self, out_dir: str | os.PathLike, overwrite: bool = False) -> dict[str, Path]:
        """Write `train.jsonl`, `test.jsonl`, `users.json` (plus `<name>.jsonl` per extra split and
        `record_dimensions.json` when set) into `out_dir`; returns {"train"|"test"|"users"|name: path}.

        `out_dir` must be new, empty, or a data folder written here before (its users.json, with the task's
        "task", "meta" and "users", marks it); `overwrite` allows any other folder, never a run directory.
        Each file is written under an exclusive temporary name in the same folder and then `os.replace`d, so a
        reader never sees a half-written file (the replace is atomic on one filesystem).
        """
        out = Path(out_dir)
        check_data_target(out, overwrite)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"train": out / "train.jsonl", "test": out / "test.jsonl", "users": out / "users.json"}
        write_jsonl(paths["train"], self.train)
        write_jsonl(paths["test"], self.test)
        for name, records in self.extra.items():
            paths[name] = out / f"{name}.jsonl"
            write_jsonl(paths[name], records)
        if self.record_dimensions:
            paths["record_dimensions"] = out / "record_dimensions.json"
            _atomic_write(paths["record_dimensions"], json.dumps(self.record_dimensions) + "\n")
        doc = {"task": self.name, "meta": self.meta, "users": self.users}
        _atomic_write(paths["users"], json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        return paths


def is_task_folder(folder: Path) -> bool:
    """A folder `Task.write` wrote: its users.json holds the task document."""
    try:
        doc = json.loads((folder / "users.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and {"task", "meta", "users"} <= set(doc)


def data_folder_problem(out: Path, overwrite: bool) -> str | None:
    """Why `Task.write` must not write into `out` (None: it may)."""
    if os.path.lexists(out) and not out.is_dir():
        return "is a file, not a folder; choose another --out"
    if not out.is_dir() or not any(out.iterdir()) or is_task_folder(out):
        return None
    if looks_like_run(out):
        return "is a run directory; choose another --out (a run is never a data folder)"
    if not overwrite:
        return ("already exists and holds files `prlhf data build` did not write; choose another --out, or pass "
                "--overwrite to write into it")
    return None


def check_data_target(out: Path, overwrite: bool = False) -> None:
    """A one-line ConfigError when `Task.write` must not write into `out` (callers check before building)."""
    if problem := data_folder_problem(Path(out), overwrite):
        raise ConfigError(f"data build: {out} {problem}")


def record_to_dict(record: PreferenceRecord) -> dict[str, Any]:
    """The JSON form of a record; `user_text` is omitted when None (keeps files minimal and loader-friendly)."""
    d: dict[str, Any] = {
        "user_id": record.user_id,
        "prompt": record.prompt,
        "chosen": record.chosen,
        "rejected": record.rejected,
    }
    if record.user_text is not None:
        d["user_text"] = record.user_text
    return d


def write_jsonl(path: Path, records: Sequence[PreferenceRecord]) -> None:
    """One record per line, written atomically."""
    _atomic_write(path, "".join(json.dumps(record_to_dict(r), ensure_ascii=False) + "\n" for r in records))


def _atomic_write(path: Path, text: str) -> None:
    if path.is_dir() and not path.is_symlink():
        raise ConfigError(f"data build: {path} is a folder; choose another --out")
    atomic_write_text(path, text)  # a symlink planted at `path` is replaced, never followed


def assign_poles(
    n: int,
    majority_share: float,
    rng: random.Random | int,
    poles: tuple[str, str] = ("majority", "minority"),
) -> list[str]:
    """Give each of `n` users `poles[0]` with probability `majority_share`, else `poles[1]`.

    Draws are independent, so the realised share varies around `majority_share`; when n >= 2 and the draw
    came out one-sided, one randomly picked user is flipped so both poles exist (a task whose users all
    agree cannot test personalization).
    """
    if not 0.0 <= majority_share <= 1.0:
        raise ValueError(f"majority_share must be in [0, 1], got {majority_share}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    out = [poles[0] if rng.random() < majority_share else poles[1] for _ in range(n)]
    if n >= 2 and len(set(out)) == 1:
        missing = poles[1] if out[0] == poles[0] else poles[0]
        out[rng.randrange(n)] = missing
    return out


def make_user_ids(prefix: str, n: int) -> list[str]:
    """`prefix_01`, `prefix_02`, ... (zero-padded to at least 2 digits so ids sort naturally)."""
    width = max(2, len(str(n)))
    return [f"{prefix}_{i:0{width}d}" for i in range(1, n + 1)]


def split_items(items: Sequence[Any], test_fraction: float, rng: random.Random) -> tuple[list, list]:
    """Shuffle `items` and split into (train, test) with round(test_fraction * n) items in test (both non-empty)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if len(items) < 2:
        raise ValueError(f"need at least 2 prompts to split into train and test, got {len(items)}")
    shuffled = list(items)
    rng.shuffle(shuffled)
    n_test = min(max(1, round(test_fraction * len(shuffled))), len(shuffled) - 1)
    return shuffled[n_test:], shuffled[:n_test]


def sample_per_user(pool: Sequence[Any], k: int | None, rng: random.Random, what: str) -> list:
    """All of `pool` (k None) or a random sample of k items without replacement."""
    if k is None:
        return list(pool)
    if k < 0 or k > len(pool):
        raise ValueError(f"{what}={k} must be between 0 and the {len(pool)} available prompts")
    return rng.sample(list(pool), k)
