"""Dataset statistics for a quick sanity check before training."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence

from prlhf.data.render import content_text
from prlhf.data.schema import PreferenceRecord

Stats = dict[str, float | None]


def summarize(records: Sequence[PreferenceRecord]) -> dict:
    """Counts and min/median/max statistics of pairs per user and character lengths."""
    pairs = Counter(record.user_id for record in records)
    return {
        "rows": len(records),
        "users": len(pairs),
        "pairs_per_user": _stats(list(pairs.values())),
        "has_user_text": sum(record.user_text is not None for record in records),
        "conversational": sum(isinstance(record.prompt, list) for record in records),
        "chars": {
            field: _stats([len(content_text(getattr(record, field))) for record in records])
            for field in ("prompt", "chosen", "rejected")
        },
    }


def format_summary(summary: dict, source: str) -> str:
    """A short multi-line, human-readable rendering of `summarize`'s result."""
    lines = [
        f"{source}: {summary['rows']} rows, {summary['users']} users",
        f"  pairs/user: {_format_stats(summary['pairs_per_user'])}",
        f"  with user_text: {summary['has_user_text']}, conversational prompts: {summary['conversational']}",
    ]
    lines += [f"  {field} chars: {_format_stats(stats)}" for field, stats in summary["chars"].items()]
    return "\n".join(lines)


def _stats(values: list[int]) -> Stats:
    if not values:
        return {"min": None, "median": None, "max": None}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _format_stats(stats: Stats) -> str:
    return ", ".join(f"{key} {_number(stats[key])}" for key in ("min", "median", "max"))


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"
