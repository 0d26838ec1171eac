"""Evaluate a trained run on a held-out file: the `prlhf eval` JSON."""

from __future__ import annotations

from collections.abc import Sequence

from prlhf.data.schema import PreferenceRecord
from prlhf.model.scoring import implicit_reward_margins, per_user_accuracy
from prlhf.runs.directory import LoadedRun


def evaluate_run(run: LoadedRun, records: Sequence[PreferenceRecord], batch_size: int = 32,
                 show_progress: bool = False) -> dict:
    pairs = run.encode(records)
    margins = implicit_reward_margins(run.model, pairs, run.registry, run.tokenizer.pad_token_id, batch_size,
                                      show_progress)
    return per_user_accuracy(records, margins, run.registry)
