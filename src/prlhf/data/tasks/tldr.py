"""Real labelers: OpenAI's human comparisons of Reddit TL;DR summaries (Stiennon et al. 2020), one user per
labeler (`worker`). Read at run time from `../shared/data/summarize-from-feedback/` or any folder of files in the
official comparisons schema (the full ~64k release works the same); nothing of the data ships with the package.

One comparison per line: `{"info": {"id", "post", "title", "subreddit"}, "summaries": [{"text"}, {"text"}],
"choice": 0|1, "worker": "...", ...}`. The prompt renders the post (subreddit, title, post, then "TL;DR:");
chosen = `summaries[choice]`, rejected = the other one.

Splits (content-disjoint: a post's comparisons all land on one side, for every labeler):
- `train.jsonl`: seen labelers' comparisons on training posts.
- `test.jsonl`: seen labelers' comparisons on held-out posts, and every comparison of the unseen labelers. Posts
  rated by an unseen labeler are held out for everyone, so no test post occurs in training.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from prlhf.data.schema import DataError, PreferenceRecord
from prlhf.data.tasks.common import Task

ATTRIBUTION = ("OpenAI summarize-from-feedback human comparisons (Stiennon et al. 2020, 'Learning to summarize from "
               "human feedback'), OpenAI's Modified MIT License; Reddit posts from the Webis TL;DR corpus "
               "(CC BY 4.0).")
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[5] / "shared" / "data" / "summarize-from-feedback"
PROMPT_END = "TL;DR:"


@dataclass(frozen=True)
class Comparison:
    """One labeler's judgement, with what the split and the length statistics need."""

    record: PreferenceRecord
    post_key: str  # the post's text: comparisons of one post share it (content, not an id, decides the split)
    chosen_longer: bool | None  # None when both summaries have the same length in characters


def default_data_dir() -> Path:
    """$PRLHF_TLDR_DIR, else `../shared/data/summarize-from-feedback` from the working directory, else next to the
    source checkout (the persona builder resolves its folder the same way)."""
    if os.environ.get("PRLHF_TLDR_DIR"):
        return Path(os.environ["PRLHF_TLDR_DIR"])
    here = Path.cwd().parent / "shared" / "data" / "summarize-from-feedback"
    return here if here.is_dir() else DEFAULT_DATA_DIR


def render_prompt(subreddit: str, title: str, post: str) -> str:
    return f"SUBREDDIT: r/{subreddit}\nTITLE: {title.strip()}\nPOST: {post.strip()}\n{PROMPT_END}"


def _as_response(text: str) -> str:
    # the summaries follow "TL;DR:" after a space (the official texts start with one); keep that for all
    return text if text[:1].isspace() else " " + text


def parse_comparison(line: str, source: str, where: str) -> Comparison | None:
    """One upstream line -> a Comparison, or None for a record without a Reddit post whose info has an `article`
    instead (the release's CNN/DM comparisons). Bad lines raise DataError naming file, line and field."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(source, f"invalid JSON: {e.msg}", location=where) from None
    if not isinstance(row, dict):
        raise DataError(source, f"expected a JSON object, got {type(row).__name__}", location=where)
    info = row.get("info")
    if not isinstance(info, dict):
        raise DataError(source, "missing or not an object", location=where, field="info")
    if info.get("post") is None and "article" in info:
        return None  # a CNN/DM comparison: no Reddit post to render
    for key in ("post", "title", "subreddit"):
        if not isinstance(info.get(key), str):
            raise DataError(source, "missing or not a string", location=where, field=f"info.{key}")
    worker = row.get("worker")
    if not isinstance(worker, str) or not worker:
        raise DataError(source, "missing or not a non-empty string", location=where, field="worker")
    summaries = row.get("summaries")
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise DataError(source, "expected a list of two summaries", location=where, field="summaries")
    texts = []
    for i, summary in enumerate(summaries):
        if not isinstance(summary, dict) or not isinstance(summary.get("text"), str):
            raise DataError(source, "missing or not a string", location=where, field=f"summaries[{i}].text")
        texts.append(_as_response(summary["text"]))
    choice = row.get("choice")
    if isinstance(choice, bool) or choice not in (0, 1):
        raise DataError(source, f"expected 0 or 1, got {choice!r}", location=where, field="choice")
    chosen, rejected = texts[choice], texts[1 - choice]
    record = PreferenceRecord(user_id=worker, prompt=render_prompt(info["subreddit"], info["title"], info["post"]),
                              chosen=chosen, rejected=rejected)
    longer = None if len(chosen) == len(rejected) else len(chosen) > len(rejected)
    return Comparison(record, info["post"].strip(), longer)


def load_comparisons(source: str | Path) -> tuple[list[Comparison], dict]:
    """Every `*.json` / `*.jsonl` file of `source` (sorted by name), one comparison per line. Returns the
    comparisons with exact duplicates dropped (same labeler, post, chosen and rejected) and the counts."""
    folder = Path(source)
    if not folder.is_dir():
        raise DataError(str(folder), "comparisons folder not found (pass --source DIR)")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".jsonl"))
    if not files:
        raise DataError(str(folder), "no *.json or *.jsonl comparison files in this folder")
    out, seen = [], set()
    counts = {"files": [p.name for p in files], "n_read": 0, "n_without_post": 0, "n_duplicates": 0}
    for path in files:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                counts["n_read"] += 1
                comparison = parse_comparison(line, str(path), f"line {lineno}")
                if comparison is None:
                    counts["n_without_post"] += 1
                    continue
                r = comparison.record
                key = (r.user_id, r.prompt, r.chosen, r.rejected)
                if key in seen:
                    counts["n_duplicates"] += 1
                    continue
                seen.add(key)
                out.append(comparison)
    if not out:
        raise DataError(str(folder), "no comparison with a Reddit post (info.post) in these files")
    return out, counts


def long_rate(comparisons: list[Comparison]) -> float | None:
    """Share of comparisons (with summaries of unequal length) where the labeler chose the longer summary."""
    flags = [c.chosen_longer for c in comparisons if c.chosen_longer is not None]
    return sum(flags) / len(flags) if flags else None


def build_tldr_task(
    source: str | Path | None = None,
    n_unseen_users: int = 6,
    n_seen_users: int | None = None,
    unseen_users: list[str] | None = None,
    min_comparisons: int = 0,
    test_post_fraction: float = 0.25,
    max_train_pairs_per_user: int | None = None,
    max_test_pairs_per_user: int | None = None,
    unseen_pool: str = "smaller_half",
    seed: int = 0,
) -> Task:
    """Build the TL;DR labelers task (see the module docstring); deterministic for a given seed and data.

    Labelers with fewer than `min_comparisons` comparisons are left out. `unseen_users` names the unseen
    labelers; otherwise `n_unseen_users` are drawn by seed from the half of the labelers with the fewest
    comparisons (`unseen_pool="smaller_half"`: the prolific ones stay seen) or from all (`"all"`). The other labelers are seen (`n_seen_users` of them,
    drawn by seed, when given). Posts not rated by an unseen labeler go to test with probability about
    `test_post_fraction` (a seeded shuffle of the posts). `max_train_pairs_per_user` and `max_test_pairs_per_user`
    cap each labeler's training and held-out comparisons (seeded samples, the data's order kept). A labeler left without training comparisons is unseen.
    """
    if not 0.0 < test_post_fraction < 1.0:
        raise ValueError(f"test_post_fraction must be in (0, 1), got {test_post_fraction}")
    if unseen_pool not in ("smaller_half", "all"):
        raise ValueError(f"unseen_pool must be 'smaller_half' or 'all', got {unseen_pool!r}")
    if n_unseen_users < 0 or (n_seen_users is not None and n_seen_users < 1):
        raise ValueError("need n_unseen_users >= 0 and n_seen_users >= 1")
    folder = Path(source) if source is not None else default_data_dir()
    comparisons, counts = load_comparisons(folder)
    rng = random.Random(seed)

    by_user: dict[str, list[Comparison]] = defaultdict(list)
    for c in comparisons:
        by_user[c.record.user_id].append(c)
    labelers = sorted(u for u, cs in by_user.items() if len(cs) >= min_comparisons)
    if unseen_users is not None:
        missing = sorted(set(unseen_users) - set(labelers))
        if missing:
            raise ValueError(f"unseen labeler(s) {missing} not in the data (or below min_comparisons)")
        unseen = sorted(unseen_users)
    else:
        if n_unseen_users >= len(labelers):
            raise ValueError(f"{n_unseen_users} unseen labelers requested but only {len(labelers)} labelers kept")
        pool = labelers
        if unseen_pool == "smaller_half":  # the prolific labelers stay seen: personalization needs their data
            by_size = sorted(labelers, key=lambda u: (len(by_user[u]), u))
            pool = sorted(by_size[:max(n_unseen_users, len(by_size) // 2)])
        unseen = sorted(rng.sample(pool, n_unseen_users))
    rest = [u for u in labelers if u not in unseen]
    if n_seen_users is not None:
        if n_seen_users > len(rest):
            raise ValueError(f"{n_seen_users} seen labelers requested but only {len(rest)} left after the unseen")
        rest = sorted(rng.sample(rest, n_seen_users))
    if not rest:
        raise ValueError("no seen labeler left: lower n_unseen_users or min_comparisons")
    unseen_set = set(unseen)
    kept = set(rest) | unseen_set

    # posts: every post an unseen labeler rated is held out for everyone; the others are split by seed
    forced = {c.post_key for u in unseen for c in by_user[u]}
    free = sorted({c.post_key for u in rest for c in by_user[u]} - forced)
    rng.shuffle(free)
    n_test_free = round(test_post_fraction * len(free))
    test_posts = forced | set(free[:n_test_free])

    train, test, users = [], [], {}
    for uid in sorted(kept):
        mine = by_user[uid]
        held = [c for c in mine if uid in unseen_set or c.post_key in test_posts]
        fit = [c for c in mine if uid not in unseen_set and c.post_key not in test_posts]
        fit = _sample(fit, max_train_pairs_per_user, rng)
        held = _sample(held, max_test_pairs_per_user, rng)
        train += [c.record for c in fit]
        test += [c.record for c in held]
        users[uid] = {"seen": bool(fit), "n_comparisons": len(mine), "n_train": len(fit), "n_test": len(held),
                      "n_posts": len({c.post_key for c in mine}), "long_rate": long_rate(mine),
                      "long_rate_train": long_rate(fit), "long_rate_test": long_rate(held)}

    meta = {"source": str(folder), "attribution": ATTRIBUTION, **counts, "n_comparisons": len(comparisons),
            "n_labelers": len(by_user), "n_labelers_kept": len(kept), "min_comparisons": min_comparisons,
            "unseen_pool": unseen_pool if unseen_users is None else "named",
            "n_seen_users": sum(u["seen"] for u in users.values()),
            "n_unseen_users": sum(not u["seen"] for u in users.values()),
            "test_post_fraction": test_post_fraction, "max_train_pairs_per_user": max_train_pairs_per_user,
            "max_test_pairs_per_user": max_test_pairs_per_user,
            "n_posts": len({c.post_key for u in kept for c in by_user[u]}),
            "n_test_posts": len(test_posts & {c.post_key for u in kept for c in by_user[u]}),
            "n_posts_held_for_unseen": len(forced), "seed": seed}
    return Task(name="tldr", train=train, test=test, users=users, meta=meta)


def _sample(items: list, cap: int | None, rng: random.Random) -> list:
    """At most `cap` of `items` (a seeded sample in their original order); all of them when cap is None."""
    if cap is None or len(items) <= cap:
        return items
    keep = set(rng.sample(range(len(items)), cap))
    return [x for i, x in enumerate(items) if i in keep]
