"""The first comparisons to show a new user: pairs from a run's training data on which its known users disagree,
each on its own prompt (a new user's choices between two samples of the served model teach their row little:
both samples come from the generic user's taste, and differ in content as much as in what users disagree on).

For every candidate pair (a, b) and every known user u, the run predicts whether u prefers a: the sign of the
implicit reward margin under u's row (P-RLHF.md §4), a matrix S (pairs, users) of +-1. A pair every known user
answers alike says nothing about a newcomer; a pair that splits them does. Pairs are taken greedily, as
column-pivoted Gram-Schmidt over the rows of S centred per pair: each next pair is the one whose split of the
known users is least explained by the splits already chosen, so together they span the ways these users differ;
then again on other prompts, round after round, until k.

The pairs hold texts only: no user id and no label (the label was their author's; a newcomer gives their own).
They are shown as written to other users, so an operator should read the file before serving it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from prlhf.data.schema import DataError, PreferenceRecord
from prlhf.model.scoring import compute_reference_logps, implicit_reward_margins
from prlhf.runs.directory import LoadedRun

DEFAULT_POOL = 400  # candidates, each scored under every known user taken: pool x users margins
MAX_USERS = 64      # known users taken (drawn by the seed where a run has more): their splits stand for the rest


@dataclass(frozen=True)
class OnboardPair:
    prompt: object  # text, or a list of chat messages
    response_a: str
    response_b: str
    split: float    # the share of known users the run predicts to prefer response_a

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "response_a": self.response_a, "response_b": self.response_b,
                "split": round(self.split, 4)}


def candidate_pairs(records: Sequence[PreferenceRecord], pool: int, seed: int) -> list[PreferenceRecord]:
    """Distinct (prompt, pair of responses), at most `pool` of them drawn by `seed`."""
    seen, out = set(), []
    for rec in records:
        key = (repr(rec.prompt), frozenset((rec.chosen, rec.rejected)))
        if key not in seen and rec.chosen != rec.rejected:
            seen.add(key)
            out.append(rec)
    random.Random(seed).shuffle(out)
    return out[:pool]


def predicted_choices(run: LoadedRun, candidates: Sequence[PreferenceRecord], users: Sequence[str],
                      user_texts: dict[str, str] | None = None, batch_size: int = 32) -> torch.Tensor:
    """(P, U) +-1: does known user u prefer candidate p's `chosen` text, by the sign of u's margin. A run that
    reads user_text reads each user's own (`user_texts`)."""
    user_texts = user_texts or {}
    as_user = [PreferenceRecord(u, c.prompt, c.chosen, c.rejected, user_texts.get(u))
               for u in users for c in candidates]  # user-major
    pad = run.tokenizer.pad_token_id
    pairs = run.encode(as_user)
    reference = None
    if not getattr(run.model, "is_reward_model", False):  # user-blind: computed once per candidate, not per user
        ref_c, ref_r = compute_reference_logps(run.model, pairs[:len(candidates)], pad, batch_size, show_progress=False)
        reference = (ref_c.repeat(len(users)), ref_r.repeat(len(users)))
    margins = implicit_reward_margins(run.model, pairs, run.registry, pad, batch_size, reference=reference)
    return torch.where(margins.view(len(users), len(candidates)).T > 0, 1.0, -1.0)  # (P, U)


def spanning_pairs(signs: torch.Tensor, prompt_keys: Sequence[str], k: int) -> list[int]:
    """Indices of up to k rows of `signs` (P, U) of +-1, greedily, each on a prompt not taken yet: the next row is
    the one with the largest part of its centred split outside the span of the splits taken in this round. When
    no row adds a new split, a new round starts (the same ways of differing, asked again on other prompts: a fit
    learns more from several answers per way); it stops when only unanimous rows are left."""
    centred = signs - signs.mean(1, keepdim=True)  # (P, U): 0 for a pair every user answers alike
    tiny = 1e-4 * signs.shape[1] ** 0.5
    residual, chosen, taken = centred.clone(), [], set()
    while len(chosen) < k:
        norms = residual.norm(dim=1)  # (P,)
        for i, key in enumerate(prompt_keys):
            if key in taken:  # a prompt once: a newcomer is asked about different texts
                norms[i] = -1.0
        best = int(norms.argmax())
        if norms[best] <= tiny:
            if torch.equal(residual, centred):  # a fresh round found nothing either
                break
            residual = centred.clone()
            continue
        chosen.append(best)
        taken.add(prompt_keys[best])
        direction = residual[best] / residual[best].norm()  # (U,)
        residual = residual - (residual @ direction).unsqueeze(1) * direction  # projected out of every row
    return chosen


def choose_onboarding_pairs(run: LoadedRun, records: Sequence[PreferenceRecord], k: int, pool: int = DEFAULT_POOL,
                            seed: int = 0, max_users: int = MAX_USERS) -> list[OnboardPair]:
    """Up to `k` pairs of `records` (a run's training data), on distinct prompts, that split the run's known
    users most and each in a new way; shown order a/b drawn by `seed` (the author's chosen is not always a)."""
    if run.model.num_user_tokens == 0:
        raise ValueError(f"{run.path}: a user-blind run predicts the same choice for every user; choose pairs with "
                         "a personalized run (individual, cluster or lowrank)")
    users = run.registry.user_ids
    if len(users) > max_users:
        users = sorted(random.Random(seed).sample(users, max_users))
    if len(users) < 2:
        raise ValueError(f"{run.path}: choosing pairs that split known users needs a run with at least 2 of them "
                         f"({len(users)} known)")
    candidates = candidate_pairs(records, pool, seed)
    if not candidates:
        raise ValueError("no pair to choose from: every record's chosen and rejected are the same text")
    texts = {r.user_id: r.user_text for r in records if r.user_text}
    signs = predicted_choices(run, candidates, users, texts)  # (P, U)
    chosen = spanning_pairs(signs, [repr(c.prompt) for c in candidates], k)
    rng = random.Random(seed)
    out = []
    for i in chosen:
        c, share = candidates[i], float((signs[i] > 0).float().mean())
        if rng.random() < 0.5:
            out.append(OnboardPair(c.prompt, c.chosen, c.rejected, share))
        else:
            out.append(OnboardPair(c.prompt, c.rejected, c.chosen, 1.0 - share))
    return out


def write_onboard_pairs(path: Path, pairs: Sequence[OnboardPair]) -> None:
    """JSONL, one pair per line, written whole or not at all."""
    from prlhf.safe_io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(p.to_dict()) + "\n" for p in pairs))


def read_onboard_pairs(path: str | Path) -> list[OnboardPair]:
    """What `write_onboard_pairs` wrote (or an operator's own file: prompt, response_a, response_b per line);
    a bad line is a DataError naming the file, line and field."""
    source, out = str(path), []
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(source, f"cannot read the onboarding pairs ({getattr(exc, 'strerror', None) or exc})") \
            from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(source, f"invalid JSON ({err.msg} at column {err.colno})", where) from None
        if not isinstance(row, dict):
            raise DataError(source, "expected an object with prompt, response_a and response_b", where)
        prompt = row.get("prompt")
        if not (isinstance(prompt, str) and prompt.strip()) and not _is_messages(prompt):
            raise DataError(source, "expected non-empty text or a list of {role, content} messages", where, "prompt")
        for field in ("response_a", "response_b"):
            if not isinstance(row.get(field), str) or not row[field].strip():
                raise DataError(source, "expected non-empty text", where, field)
        if row["response_a"] == row["response_b"]:
            raise DataError(source, "the two responses are the same text", where, "response_b")
        split = row.get("split", 0.5)
        if isinstance(split, bool) or not isinstance(split, (int, float)) or not 0 <= split <= 1:
            raise DataError(source, "expected a number from 0 to 1 (or no split)", where, "split")
        out.append(OnboardPair(prompt, row["response_a"], row["response_b"], float(split)))
    if not out:
        raise DataError(source, "no onboarding pair in the file")
    return out


def _is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
