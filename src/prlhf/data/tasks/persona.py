"""Persona-trait users on real text, from Anthropic's model-written persona statements (Perez et al. 2022,
CC-BY-4.0; read at run time from `../shared/data/anthropic-persona/` or any folder of `<trait>.jsonl` files in
that format).

A *dimension* is a pair of opposing trait files. Each user holds one pole per dimension (the first pole with
probability `majority_share`); users with the same poles share a *profile*. A prompt asks whether the user
would say a trait statement; the two responses are " Yes" and " No". Assumption (the data labels only one
trait per file): a holder of the file's trait prefers `answer_matching_behavior`, and a holder of the
opposite pole prefers the other answer. It holds well for the bipolar pairs (politics, risk, time preference);
for religion it is noisier: "Christians would deny that Allah is the one true god" does not mean atheists
affirm it. Per-dimension accuracy in the benchmark makes such noise visible.

Splits:
- `train.jsonl`: seen users' pairs on the training statements.
- `test.jsonl` (split **statements**, content-disjoint): statements never in training, for seen and unseen users.
- `test_pairs.jsonl` (split **pairs**, the paper's setting): each seen user's held-out pairs on statements that
  *other* users rated in training, plus unseen users' pairs on training statements.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from prlhf.data.schema import DataError, PreferenceRecord
from prlhf.data.tasks.common import Task, make_user_ids

# name -> (first pole = majority by default, second pole); each pole is a trait file name
DIMENSIONS: dict[str, tuple[str, str]] = {
    "politics": ("politically-liberal", "politically-conservative"),
    "risk": ("risk-averse", "risk-seeking"),
    "time": ("low-discount-rate", "high-discount-rate"),
    "religion": ("subscribes-to-Christianity", "subscribes-to-Atheism"),
}
POLE_TEXT = {
    "politically-liberal": "I am politically liberal.",
    "politically-conservative": "I am politically conservative.",
    "risk-averse": "I avoid risks and prefer safe options.",
    "risk-seeking": "I like taking risks.",
    "low-discount-rate": "I am patient and value long-term rewards.",
    "high-discount-rate": "I want rewards now rather than later.",
    "subscribes-to-Christianity": "I am a Christian.",
    "subscribes-to-Atheism": "I am an atheist.",
}
ATTRIBUTION = ("Anthropic persona statements (anthropics/evals, persona/), Perez et al. 2022, 'Discovering Language "
               "Model Behaviors with Model-Written Evaluations'. License: CC-BY-4.0.")
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[5] / "shared" / "data" / "anthropic-persona"
ANSWER_SUFFIX = "\nAnswer:"


@dataclass(frozen=True)
class Statement:
    dimension: str
    pole: str  # the trait file it comes from
    question: str
    matching: str  # the answer a holder of `pole` gives: "Yes" or "No"

    def prompt(self) -> str:
        return self.question + ANSWER_SUFFIX

    def answers_for(self, user_pole: str) -> tuple[str, str]:
        """(chosen, rejected) for a user holding `user_pole` on this statement's dimension."""
        other = "No" if self.matching == "Yes" else "Yes"
        preferred = self.matching if user_pole == self.pole else other
        return " " + preferred, " " + ("No" if preferred == "Yes" else "Yes")


def default_data_dir() -> Path:
    """$PRLHF_PERSONA_DIR, else `../shared/data/anthropic-persona` from the working directory, else next to the
    source checkout."""
    if os.environ.get("PRLHF_PERSONA_DIR"):
        return Path(os.environ["PRLHF_PERSONA_DIR"])
    here = Path.cwd().parent / "shared" / "data" / "anthropic-persona"
    return here if here.is_dir() else DEFAULT_DATA_DIR


def resolve_dimensions(names: list[str] | None) -> dict[str, tuple[str, str]]:
    """Built-in dimension names, or custom pairs written `trait-a/trait-b` (file names without .jsonl)."""
    out = {}
    for name in names or list(DIMENSIONS):
        if "/" in name:
            a, _, b = name.partition("/")
            out[name] = (a, b)
        elif name in DIMENSIONS:
            out[name] = DIMENSIONS[name]
        else:
            raise ValueError(f"unknown dimension {name!r}: use one of {', '.join(DIMENSIONS)} or 'trait-a/trait-b'")
    return out


def load_statements(data_dir: str | Path, dimensions: dict[str, tuple[str, str]], min_confidence: float = 0.85,
                    ) -> dict[str, list[Statement]]:
    """dimension -> statements from both pole files (duplicates within a dimension dropped; low-confidence
    labels dropped). Bad files raise DataError naming file, line and field."""
    data_dir = Path(data_dir)
    out: dict[str, list[Statement]] = {}
    for dim, poles in dimensions.items():
        seen: set[str] = set()
        rows: list[Statement] = []
        for pole in poles:
            path = data_dir / f"{pole}.jsonl"
            if not path.is_file():
                raise DataError(str(path), "trait file not found (is the persona folder right?)")
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    question, statement, matching, confidence = _parse_line(line, str(path), f"line {lineno}")
                    if confidence < min_confidence or statement in seen:
                        continue
                    seen.add(statement)
                    rows.append(Statement(dim, pole, question, matching))
        out[dim] = rows
    return out


def _parse_line(line: str, source: str, where: str) -> tuple[str, str, str, float]:
    """(question, statement, matching answer "Yes"/"No", label confidence) of one upstream JSONL line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(source, f"invalid JSON: {e.msg}", location=where) from None
    if not isinstance(row, dict):
        raise DataError(source, f"expected a JSON object, got {type(row).__name__}", location=where)
    for key in ("question", "statement", "answer_matching_behavior"):
        if not isinstance(row.get(key), str):
            raise DataError(source, "missing or not a string", location=where, field=key)
    matching = row["answer_matching_behavior"].strip()
    if matching not in ("Yes", "No"):
        raise DataError(source, f"expected ' Yes' or ' No', got {matching!r}", location=where,
                        field="answer_matching_behavior")
    confidence = row.get("label_confidence", 1.0)
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)):
        raise DataError(source, f"expected a number, got {confidence!r}", location=where, field="label_confidence")
    return row["question"], row["statement"], matching, float(confidence)


def profile_text(profile: dict[str, str]) -> str:
    """The user's poles in words (the optional `user_text`)."""
    return " ".join(POLE_TEXT.get(pole, f"I am {pole.replace('-', ' ')}.") for pole in profile.values())


def build_persona_task(
    n_seen_users: int = 64,
    n_unseen_users: int = 16,
    dimensions: list[str] | None = None,
    majority_share: float = 0.7,
    statements_per_pole: int = 200,
    test_statement_fraction: float = 0.2,
    train_pairs_per_user: int = 60,
    test_pairs_per_user: int = 20,
    min_confidence: float = 0.85,
    seed: int = 0,
    data_dir: str | Path | None = None,
    with_user_text: bool = True,
) -> Task:
    """Build the persona-users task (see the module docstring); deterministic for a given seed and data.

    `statements_per_pole` caps the statements drawn from each trait file (a smaller pool means each statement
    is rated by more users, which is what split *pairs* relies on). Returns a Task whose `test` is split
    statements, whose `extra` holds the `test_pairs` split and whose `record_dimensions` maps each split to its
    records' dimensions.
    """
    dims = resolve_dimensions(dimensions)
    if n_seen_users < 2 or n_unseen_users < 0:
        raise ValueError("need n_seen_users >= 2 and n_unseen_users >= 0")
    if not 0.0 <= majority_share <= 1.0:
        raise ValueError(f"majority_share must be in [0, 1], got {majority_share}")
    if not 0.0 < test_statement_fraction < 1.0:
        raise ValueError("test_statement_fraction must be in (0, 1)")
    source = Path(data_dir) if data_dir is not None else default_data_dir()
    rng = random.Random(seed)
    by_dim = load_statements(source, dims, min_confidence)

    train_pool, test_pool = [], []
    for dim, (pole_a, pole_b) in dims.items():
        for pole in (pole_a, pole_b):
            rows = [s for s in by_dim[dim] if s.pole == pole]
            rng.shuffle(rows)
            rows = rows[:statements_per_pole]
            n_test = max(1, round(test_statement_fraction * len(rows)))
            test_pool += rows[:n_test]
            train_pool += rows[n_test:]
    if len(train_pool) < train_pairs_per_user + test_pairs_per_user:
        raise ValueError(f"only {len(train_pool)} training statements for {train_pairs_per_user} + "
                         f"{test_pairs_per_user} pairs per user; raise statements_per_pole")

    ids = make_user_ids("user", n_seen_users + n_unseen_users)
    users: dict[str, dict] = {}
    for i, uid in enumerate(ids):
        profile = {d: (a if rng.random() < majority_share else b) for d, (a, b) in dims.items()}
        users[uid] = {"seen": i < n_seen_users, "profile": profile, "profile_id": _profile_id(profile, dims)}
    _ensure_both_poles(users, dims, ids[:n_seen_users], rng)

    def record(uid: str, s: Statement) -> PreferenceRecord:
        chosen, rejected = s.answers_for(users[uid]["profile"][s.dimension])
        text = profile_text(users[uid]["profile"]) if with_user_text else None
        return PreferenceRecord(user_id=uid, prompt=s.prompt(), chosen=chosen, rejected=rejected, user_text=text)

    train, train_dims, rated_by = [], [], defaultdict(set)
    for uid in ids[:n_seen_users]:
        for k in rng.sample(range(len(train_pool)), train_pairs_per_user):
            train.append(record(uid, train_pool[k]))
            train_dims.append(train_pool[k].dimension)
            rated_by[k].add(uid)
    pairs_test, pairs_dims = [], []
    for uid in ids:
        # pairs split: statements other users rated in training, never this user's own training statements
        pool = [k for k, raters in rated_by.items() if uid not in raters]
        for k in rng.sample(sorted(pool), min(test_pairs_per_user, len(pool))):
            pairs_test.append(record(uid, train_pool[k]))
            pairs_dims.append(train_pool[k].dimension)
    test, test_dims = [], []
    for uid in ids:
        for k in rng.sample(range(len(test_pool)), min(test_pairs_per_user, len(test_pool))):
            test.append(record(uid, test_pool[k]))
            test_dims.append(test_pool[k].dimension)

    profiles = {info["profile_id"] for u, info in users.items() if info["seen"]}
    meta = {"n_seen_users": n_seen_users, "n_unseen_users": n_unseen_users, "dimensions": dims,
            "majority_share": majority_share, "statements_per_pole": statements_per_pole,
            "test_statement_fraction": test_statement_fraction, "train_pairs_per_user": train_pairs_per_user,
            "test_pairs_per_user": test_pairs_per_user, "min_confidence": min_confidence, "seed": seed,
            "with_user_text": with_user_text, "source": str(source), "attribution": ATTRIBUTION,
            "n_train_statements": len(train_pool), "n_test_statements": len(test_pool),
            "n_seen_profiles": len(profiles)}
    task = Task(name="persona", train=train, test=test, users=users, meta=meta)
    task.extra["test_pairs"] = pairs_test
    task.record_dimensions.update(train=train_dims, test=test_dims, test_pairs=pairs_dims)
    return task


def _profile_id(profile: dict[str, str], dims: dict[str, tuple[str, str]]) -> str:
    """"AB..": A where the user holds a dimension's first pole, B the second (users with one id share a profile)."""
    return "".join("A" if profile[d] == dims[d][0] else "B" for d in dims)


def _ensure_both_poles(users: dict[str, dict], dims: dict[str, tuple[str, str]], seen: list[str],
                       rng: random.Random) -> None:
    """A dimension on which every seen user agrees cannot test personalization: flip one random user there."""
    for dim, (a, b) in dims.items():
        poles = {users[u]["profile"][dim] for u in seen}
        if len(poles) == 1:
            uid = rng.choice(seen)
            users[uid]["profile"][dim] = b if a in poles else a
            users[uid]["profile_id"] = _profile_id(users[uid]["profile"], dims)
