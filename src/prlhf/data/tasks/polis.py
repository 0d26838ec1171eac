"""Polis participants: real people's agree / disagree votes on each other's statements (The Computational
Democracy Project's open data, CC BY 4.0; read at run time from `../shared/data/polis/` or any folder of
conversation folders in the Polis export format).

A conversation folder holds `comments.csv` (statements; moderated = -1 are left out), `participants-votes.csv`
(one row per participant: `participant`, `group-id` and other counts, then one column per comment id holding
1 agree, -1 disagree, 0 pass or empty for not seen) and `summary.csv` (key, value rows; `topic` is required).

A record: the prompt names the conversation's topic and asks for a statement the user agrees with; chosen = a
statement the participant agreed with, rejected = one they disagreed with, both from the same conversation.
user_id = `<conversation>/<participant>` (unique across conversations).

Splits (content-disjoint): each conversation's statements are split once into training and test statements;
no test record uses a training statement, so no test statement occurs in any training record.
- `train.jsonl`: seen participants' pairs on training statements (at most `train_pairs_per_user` each).
- `test.jsonl`: seen participants' pairs on test statements, plus unseen participants' (held out wholly).
- `adapt.jsonl`: unseen participants' pairs on training statements (at most `adapt_pairs_per_user` each), to fit
  them as new users; never scored.
`held_out="votes"` is the collaborative-filtering split instead (not content-disjoint): each participant's own
voted statements are split, so their test pairs use statements they never voted on in training, which other
participants' training records may use.
A participant takes part when they agreed and disagreed with at least `min_train_votes` training statements each
and `min_test_votes` test statements each; a share `unseen_fraction` of them (per conversation) is unseen.
`split="validation"` drops the test statements altogether and splits the training statements again: its
`test.jsonl` is a validation split carved from training data, for tuning without touching the reported test.

users.json keeps each participant's Polis `group-id` (the opinion group Polis computed from all their votes);
`user_id_from="group"` trains with `<conversation>/group-<g>` as the seen participants' user id (the
"opinion group" baseline; unseen participants keep their own id, i.e. the generic user).
"""

from __future__ import annotations

import csv
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from prlhf.data.schema import DataError, PreferenceRecord
from prlhf.data.tasks.common import Task

ATTRIBUTION = ("Data was gathered using the Polis software (compdemocracy.org/polis) and is sub-licensed under CC BY "
               "4.0 with Attribution to The Computational Democracy Project. The data and more information about how "
               "the data was collected can be found at the links listed in UPSTREAM_README.md (\"Individual case "
               "study URLs\") of the source folder.")
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[5] / "shared" / "data" / "polis"
PROMPT_TEMPLATE = "Conversation: {topic}\nWrite a statement you agree with.\nStatement:"
VOTES = {"1": 1, "-1": -1, "0": 0}  # empty = not seen
USER_ID_FROM = ("participant", "group")
SPLITS = ("test", "validation")
HELD_OUT = ("statements", "votes")  # statements: no test statement in any training record; votes: per participant


@dataclass(frozen=True)
class Conversation:
    name: str  # the folder name
    topic: str
    statements: dict[int, str]  # comment id -> text (moderated-out and repeated texts left out)
    votes: dict[str, dict[int, int]]  # participant -> {comment id: 1 | -1 | 0} on kept statements
    groups: dict[str, str | None]  # participant -> Polis group id (None: none given)
    n_moderated: int  # statements left out by the moderator
    n_repeated: int  # statements left out because an earlier statement has the same text

    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(topic=self.topic)


def default_data_dir() -> Path:
    """$PRLHF_POLIS_DIR, else `../shared/data/polis` from the working directory, else next to the source checkout."""
    if os.environ.get("PRLHF_POLIS_DIR"):
        return Path(os.environ["PRLHF_POLIS_DIR"])
    here = Path.cwd().parent / "shared" / "data" / "polis"
    return here if here.is_dir() else DEFAULT_DATA_DIR


def list_conversations(source: str | Path) -> list[str]:
    """The sub-folders of `source` that hold a Polis export (a comments.csv), sorted."""
    source = Path(source)
    if not source.is_dir():
        raise DataError(str(source), "Polis folder not found (give --source DIR)")
    return sorted(p.name for p in source.iterdir() if (p / "comments.csv").is_file())


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(file line of the row's start, row)]) of a CSV file; blank rows skipped."""
    if not path.is_file():
        raise DataError(str(path), "file not found (is this a Polis conversation folder?)")
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(str(path), "empty file, expected a header row", location="line 1")
            rows, start = [], reader.line_num + 1
            for row in reader:
                if any(cell.strip() for cell in row):
                    rows.append((start, row))
                start = reader.line_num + 1
        except csv.Error as exc:
            raise DataError(str(path), f"bad CSV: {exc}", location=f"line {reader.line_num}") from None
        except UnicodeDecodeError:
            raise DataError(str(path), "not UTF-8 text") from None
    return [h.strip() for h in header], rows


def _int(value: str, path: Path, line: int, field: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise DataError(str(path), f"expected an integer, got {value!r}", location=f"line {line}",
                        field=field) from None


def _columns(header: list[str], path: Path, required: Sequence[str]) -> dict[str, int]:
    index = {name: i for i, name in enumerate(header)}
    for name in required:
        if name not in index:
            raise DataError(str(path), "missing column in the header", location="line 1", field=name)
    return index


def _cell(row: list[str], col: int, header: list[str], path: Path, line: int) -> str:
    if col >= len(row):
        raise DataError(str(path), f"row has {len(row)} fields, the header {len(header)}", location=f"line {line}",
                        field=header[col])
    return row[col]


def load_topic(folder: Path) -> str:
    path = folder / "summary.csv"
    if not path.is_file():
        raise DataError(str(path), "file not found (is this a Polis conversation folder?)")
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.reader(f):
            if len(row) >= 2 and row[0].strip() == "topic" and _clean(row[1]):
                return _clean(row[1])
    raise DataError(str(path), "no non-empty 'topic' row", field="topic")


def load_statements(folder: Path) -> tuple[dict[int, str], int, int]:
    """(comment id -> text of the kept statements, moderated-out count, repeated-text count)."""
    path = folder / "comments.csv"
    header, rows = _rows(path)
    cols = _columns(header, path, ("comment-id", "moderated", "comment-body"))
    statements: dict[int, str] = {}
    texts: set[str] = set()
    moderated = repeated = 0
    for line, row in rows:
        cid = _int(_cell(row, cols["comment-id"], header, path, line), path, line, "comment-id")
        mod = _int(_cell(row, cols["moderated"], header, path, line), path, line, "moderated")
        if mod not in (-1, 0, 1):
            raise DataError(str(path), f"expected -1, 0 or 1, got {mod}", location=f"line {line}", field="moderated")
        text = _clean(_cell(row, cols["comment-body"], header, path, line))
        if cid in statements:
            raise DataError(str(path), f"comment id {cid} appears twice", location=f"line {line}", field="comment-id")
        if mod == -1:
            moderated += 1
            continue
        if not text:
            raise DataError(str(path), "empty statement", location=f"line {line}", field="comment-body")
        if text.lower() in texts:  # two ids, one text: a pair could compare a statement with itself
            repeated += 1
            continue
        texts.add(text.lower())
        statements[cid] = text
    return statements, moderated, repeated


def load_votes(folder: Path, kept: set[int]) -> tuple[dict[str, dict[int, int]], dict[str, str | None]]:
    """(participant -> {comment id: vote} on the kept statements, participant -> group id or None)."""
    path = folder / "participants-votes.csv"
    header, rows = _rows(path)
    cols = _columns(header, path, ("participant", "group-id"))
    # vote columns are the ones named by an integer comment id (exports differ in their other columns, e.g. xid)
    vote_cols = [(i, int(h)) for i, h in enumerate(header) if re.fullmatch(r"\d+", h) and int(h) in kept]
    votes: dict[str, dict[int, int]] = {}
    groups: dict[str, str | None] = {}
    for line, row in rows:
        if len(row) != len(header):
            raise DataError(str(path), f"row has {len(row)} fields, the header {len(header)}",
                            location=f"line {line}")
        pid = row[cols["participant"]].strip()
        if not pid:
            raise DataError(str(path), "empty participant id", location=f"line {line}", field="participant")
        if pid in votes:
            raise DataError(str(path), f"participant {pid} appears twice", location=f"line {line}",
                            field="participant")
        mine = {}
        for col, cid in vote_cols:
            cell = row[col].strip()
            if not cell:
                continue
            if cell not in VOTES:
                raise DataError(str(path), f"expected 1, -1, 0 or empty, got {cell!r}", location=f"line {line}",
                                field=header[col])
            mine[cid] = VOTES[cell]
        votes[pid] = mine
        groups[pid] = row[cols["group-id"]].strip() or None
    return votes, groups


def load_conversation(folder: str | Path) -> Conversation:
    """One Polis conversation folder; bad files raise DataError naming file, line and field."""
    folder = Path(folder)
    topic = load_topic(folder)
    statements, moderated, repeated = load_statements(folder)
    votes, groups = load_votes(folder, set(statements))
    return Conversation(folder.name, topic, statements, votes, groups, moderated, repeated)


def draw_pairs(agreed: Sequence[int], disagreed: Sequence[int], cap: int, rng: random.Random) -> list[tuple[int, int]]:
    """Up to `cap` distinct (agreed, disagreed) pairs; every statement is used once before any is used twice."""
    a, d = list(agreed), list(disagreed)
    rng.shuffle(a)
    rng.shuffle(d)
    n = min(cap, len(a) * len(d))
    # k < max(|a|, |d|): one of the two indices runs through its list, so these pairs are distinct
    pairs = [(a[k % len(a)], d[k % len(d)]) for k in range(min(n, max(len(a), len(d))))]
    used = set(pairs)
    while len(pairs) < n:
        pair = (rng.choice(a), rng.choice(d))
        if pair not in used:
            used.add(pair)
            pairs.append(pair)
    return pairs


def _split_statements(ids: Sequence[int], fraction: float, rng: random.Random) -> tuple[set[int], set[int]]:
    order = sorted(ids)
    rng.shuffle(order)
    n_test = min(max(1, round(fraction * len(order))), len(order) - 1)
    return set(order[n_test:]), set(order[:n_test])


def _side(votes: dict[int, int], statements: set[int]) -> tuple[list[int], list[int]]:
    """(agreed, disagreed) statement ids among `statements`, sorted."""
    agreed = sorted(c for c, v in votes.items() if v == 1 and c in statements)
    disagreed = sorted(c for c, v in votes.items() if v == -1 and c in statements)
    return agreed, disagreed


def _own_split(votes: dict[int, int], fraction: float, split: str, rng: random.Random) -> tuple[set[int], set[int]]:
    """held_out="votes": (training, held-out) statements of one participant, from those they voted on. For the
    validation split, the statements their test split would hold are dropped and the rest split again (`rng` is
    the participant's own, so both splits start from the same draw)."""
    voted = sorted(c for c, v in votes.items() if v != 0)
    if len(voted) < 2:
        return set(voted), set()
    train, test = _split_statements(voted, fraction, rng)
    if split == "validation":
        train, test = (_split_statements(sorted(train), fraction, rng) if len(train) >= 2 else (train, set()))
    return train, test


def build_polis_task(
    source: str | Path | None = None,
    conversations: Sequence[str] | None = None,
    test_statement_fraction: float = 0.3,
    unseen_fraction: float = 0.1,
    train_pairs_per_user: int = 16,
    test_pairs_per_user: int = 8,
    adapt_pairs_per_user: int = 16,
    min_train_votes: int = 2,
    min_test_votes: int = 1,
    split: str = "test",
    user_id_from: str = "participant",
    held_out: str = "statements",
    seed: int = 0,
) -> Task:
    """Build the Polis task (see the module docstring); deterministic for a given seed and data.

    `conversations`: folder names under `source` (None = every conversation folder there). Each conversation's
    statement split and participant draw depend only on (seed, conversation), so a subset of conversations gets
    the same splits as the full set.
    """
    if not 0.0 < test_statement_fraction < 1.0:
        raise ValueError(f"test_statement_fraction must be in (0, 1), got {test_statement_fraction}")
    if not 0.0 <= unseen_fraction < 1.0:
        raise ValueError(f"unseen_fraction must be in [0, 1), got {unseen_fraction}")
    if min(train_pairs_per_user, test_pairs_per_user, adapt_pairs_per_user) < 1:
        raise ValueError("train_pairs_per_user, test_pairs_per_user and adapt_pairs_per_user must be >= 1")
    if min_train_votes < 1 or min_test_votes < 1:
        raise ValueError("min_train_votes and min_test_votes must be >= 1")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if held_out not in HELD_OUT:
        raise ValueError(f"held_out must be one of {', '.join(HELD_OUT)}, got {held_out!r}")
    if user_id_from not in USER_ID_FROM:
        raise ValueError(f"user_id_from must be one of {', '.join(USER_ID_FROM)}, got {user_id_from!r}")
    root = Path(source) if source is not None else default_data_dir()
    available = list_conversations(root)
    names = list(conversations) if conversations else available
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"no conversation folder(s) {', '.join(missing)} under {root}; found: {', '.join(available)}")

    train, test, adapt = [], [], []
    users: dict[str, dict] = {}
    per_conversation: dict[str, dict] = {}
    for name in names:
        conv = load_conversation(root / name)
        rng = random.Random(f"{seed}:{name}")
        if len(conv.statements) < 2:
            raise ValueError(f"{name}: {len(conv.statements)} statement(s) left after moderation, need >= 2")
        train_ids, test_ids = _split_statements(list(conv.statements), test_statement_fraction, rng)
        if split == "validation":  # the test statements are dropped; the validation ones come out of training
            if len(train_ids) < 2:
                raise ValueError(f"{name}: too few training statements to carve a validation split")
            train_ids, test_ids = _split_statements(list(train_ids), test_statement_fraction, rng)
        sides = {pid: (train_ids, test_ids) for pid in conv.votes}
        if held_out == "votes":  # each participant's own statements split; seen statements stay out of validation
            sides = {pid: _own_split(votes, test_statement_fraction, split, random.Random(f"{seed}:{name}:{pid}"))
                     for pid, votes in conv.votes.items()}
        eligible = []
        for pid in conv.votes:
            tr_a, tr_d = _side(conv.votes[pid], sides[pid][0])
            te_a, te_d = _side(conv.votes[pid], sides[pid][1])
            if min(len(tr_a), len(tr_d)) >= min_train_votes and min(len(te_a), len(te_d)) >= min_test_votes:
                eligible.append(pid)
        rng.shuffle(eligible)
        n_unseen = round(unseen_fraction * len(eligible))
        unseen = set(eligible[:n_unseen])

        def records(pid: str, statements: set[int], cap: int) -> list[PreferenceRecord]:
            pairs = draw_pairs(*_side(conv.votes[pid], statements), cap, rng)
            return [PreferenceRecord(user_id=f"{name}/{pid}", prompt=conv.prompt(), chosen=" " + conv.statements[a],
                                     rejected=" " + conv.statements[d]) for a, d in pairs]

        for pid in sorted(eligible, key=_natural):
            uid = f"{name}/{pid}"
            is_seen = pid not in unseen
            fit = records(pid, sides[pid][0], train_pairs_per_user if is_seen else adapt_pairs_per_user)
            held = records(pid, sides[pid][1], test_pairs_per_user)
            (train if is_seen else adapt).extend(fit)
            test.extend(held)
            n_votes = sum(1 for v in conv.votes[pid].values() if v != 0)
            users[uid] = {"seen": is_seen, "conversation": name, "participant": pid, "group": conv.groups[pid],
                          "n_votes": n_votes, "n_train_pairs" if is_seen else "n_adapt_pairs": len(fit),
                          "n_test_pairs": len(held)}
        per_conversation[name] = {
            "topic": conv.topic, "n_statements": len(conv.statements), "n_moderated_out": conv.n_moderated,
            "n_repeated_text": conv.n_repeated,
            "n_train_statements": len(train_ids) if held_out == "statements" else None,  # votes: per participant
            "n_test_statements": len(test_ids) if held_out == "statements" else None,
            "n_participants": len(conv.votes),
            "n_seen": len(eligible) - n_unseen, "n_unseen": n_unseen,
            "groups": sorted({g for g in conv.groups.values() if g is not None}, key=_natural)}

    meta = {"source": str(root), "conversations": names, "test_statement_fraction": test_statement_fraction,
            "unseen_fraction": unseen_fraction, "train_pairs_per_user": train_pairs_per_user,
            "test_pairs_per_user": test_pairs_per_user, "adapt_pairs_per_user": adapt_pairs_per_user,
            "min_train_votes": min_train_votes,
            "min_test_votes": min_test_votes, "split": split, "held_out": held_out, "user_id_from": user_id_from,
            "seed": seed,
            "prompt_template": PROMPT_TEMPLATE, "attribution": ATTRIBUTION, "per_conversation": per_conversation,
            "n_seen": sum(c["n_seen"] for c in per_conversation.values()),
            "n_unseen": sum(c["n_unseen"] for c in per_conversation.values())}
    task = Task(name="polis", train=train, test=test, users=users, meta=meta)
    task.extra["adapt"] = adapt
    if user_id_from == "group":
        rename = to_group_ids(task)
        task = replace(task, train=rename(task.train), test=rename(task.test))
        for info in task.users.values():
            if info["seen"]:
                info["trained_as"] = group_user_id(info)
    return task


def group_user_id(info: dict) -> str:
    """`<conversation>/group-<g>` of a participant's users.json entry (`group-none` where Polis gave none)."""
    return f"{info['conversation']}/group-{info['group'] if info['group'] is not None else 'none'}"


def to_group_ids(task: Task) -> Callable[[list[PreferenceRecord]], list[PreferenceRecord]]:
    """records -> the same records with each seen participant's user id replaced by their opinion group's;
    unseen participants keep their own id (unknown to a run: the generic user)."""
    rename = {u: group_user_id(info) for u, info in task.users.items() if info["seen"]}
    return lambda records: [replace(r, user_id=rename.get(r.user_id, r.user_id)) for r in records]


def _natural(key: str):
    """Sort participant / group ids numerically where they are numbers."""
    return (0, int(key), "") if key.isdigit() else (1, 0, key)
