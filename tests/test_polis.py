"""Polis participants: CSV loading and its one-line errors, moderation, the content-disjoint split, unseen
participants, caps, opinion-group ids, the validation split, the CLI, and `bench polis --quick` at a toy size."""

from __future__ import annotations

import csv
import json
import random
from collections import defaultdict
from pathlib import Path

import pytest

from prlhf.bench import experiment
from prlhf.bench import polis as polis_bench
from prlhf.cli.main import main
from prlhf.data.schema import DataError
from prlhf.data.tasks import TASKS
from prlhf.data.tasks.polis import (
    ATTRIBUTION,
    build_polis_task,
    draw_pairs,
    group_user_id,
    load_conversation,
)

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "polis"
N_STATEMENTS, N_PARTICIPANTS = 24, 40
MODERATED = {3, 11}  # comment ids the moderator removed
CAPS = dict(train_pairs_per_user=5, test_pairs_per_user=3)


def write_conversation(folder: Path, topic: str, seed: int, with_xid: bool = False) -> Path:
    """A Polis export: two opinion groups that agree with opposite halves of the statements (10% of votes flipped,
    some passes and unseen), two moderated-out statements; `with_xid` adds the column newer exports have."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    with (folder / "comments.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["timestamp", "datetime", "comment-id", "author-id", "agrees", "disagrees", "moderated",
                    "comment-body"])
        for cid in range(N_STATEMENTS):
            side = "parks and trees" if cid % 2 else "roads and cars"
            w.writerow([1000 + cid, "Mon", cid, 0, 1, 1, -1 if cid in MODERATED else 1,
                        f"We want more {side}, says statement {cid} on {topic}."])
    meta = ["participant"] + (["xid"] if with_xid else []) + ["group-id", "n-comments", "n-votes", "n-agree",
                                                              "n-disagree"]
    with (folder / "participants-votes.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(meta + [str(c) for c in range(N_STATEMENTS)])
        for pid in range(N_PARTICIPANTS):
            group = pid % 2
            votes = []
            for cid in range(N_STATEMENTS):
                r = rng.random()
                if r < 0.15:
                    votes.append("")
                elif r < 0.2:
                    votes.append("0")
                else:
                    agree = (cid % 2 == group) != (rng.random() < 0.1)
                    votes.append("1" if agree else "-1")
            w.writerow([pid] + ([""] if with_xid else []) + [group, 0, 0, 0, 0] + votes)
    (folder / "summary.csv").write_text(f"topic,{topic}\nurl,https://pol.is/x\nvoters,{N_PARTICIPANTS}\n",
                                        encoding="utf-8")
    return folder


def write_polis_source(root: Path) -> Path:
    write_conversation(root / "conv-a", "Parks in town", 1)
    write_conversation(root / "conv-b", "Roads in town", 2, with_xid=True)
    return root


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_polis_source(tmp_path_factory.mktemp("polis"))


@pytest.fixture(scope="module")
def task(source):
    return build_polis_task(source=source, **CAPS, seed=0)


def statements_of(records) -> set[str]:
    return {text.strip() for r in records for text in (r.chosen, r.rejected)}


def test_registered_and_attribution(task) -> None:
    assert TASKS["polis"] is build_polis_task
    assert task.meta["attribution"] == ATTRIBUTION and "CC BY 4.0" in ATTRIBUTION
    assert "The Computational Democracy Project" in ATTRIBUTION


def test_moderated_statements_are_dropped(source, task) -> None:
    conv = load_conversation(source / "conv-a")
    assert set(conv.statements) == set(range(N_STATEMENTS)) - MODERATED and conv.n_moderated == len(MODERATED)
    texts = statements_of(task.train + task.test + task.extra["adapt"])
    assert not any(f"statement {cid} on" in t for cid in MODERATED for t in texts)


def test_records_follow_the_votes(source, task) -> None:
    convs = {name: load_conversation(source / name) for name in ("conv-a", "conv-b")}
    text_id = {(name, text): cid for name, c in convs.items() for cid, text in c.statements.items()}
    for r in task.train + task.test + task.extra["adapt"]:
        name, pid = r.user_id.split("/")
        votes = convs[name].votes[pid]
        assert votes[text_id[name, r.chosen.strip()]] == 1 and votes[text_id[name, r.rejected.strip()]] == -1
        assert convs[name].topic in r.prompt and "agree" in r.prompt


def test_split_is_content_disjoint(task) -> None:
    train_side = statements_of(task.train) | statements_of(task.extra["adapt"])
    assert train_side and statements_of(task.test)
    assert not train_side & statements_of(task.test)  # no test statement occurs in any training record


def test_unseen_participants_and_unique_ids(task) -> None:
    seen, unseen = set(task.seen_users), set(task.unseen_users)
    assert unseen and seen and not seen & unseen
    assert {r.user_id for r in task.train} == seen
    assert {r.user_id for r in task.extra["adapt"]} == unseen  # their training-statement pairs, for new users only
    assert {r.user_id for r in task.test} == seen | unseen
    # participant 0 of both conversations: two users
    assert {u for u in task.users if u.endswith("/0")} == {"conv-a/0", "conv-b/0"}
    assert task.meta["n_seen"] == len(seen) and task.meta["n_unseen"] == len(unseen)


def test_caps_and_distinct_pairs(task) -> None:
    per_user = defaultdict(list)
    for split, cap in ((task.train, 5), (task.test, 3)):
        counts = defaultdict(int)
        for r in split:
            counts[r.user_id] += 1
            per_user[r.user_id, cap].append((r.chosen, r.rejected))
        assert max(counts.values()) == cap
    assert all(len(pairs) == len(set(pairs)) for pairs in per_user.values())
    for uid, info in task.users.items():
        if info["seen"]:
            assert info["n_train_pairs"] == sum(r.user_id == uid for r in task.train)


def test_draw_pairs_uses_every_statement_before_repeating() -> None:
    pairs = draw_pairs([1, 2, 3], [7, 8], cap=4, rng=random.Random(0))
    assert len(pairs) == len(set(pairs)) == 4
    assert {a for a, _ in pairs[:3]} == {1, 2, 3} and {d for _, d in pairs[:3]} == {7, 8}
    assert len(draw_pairs([1, 2], [7], cap=16, rng=random.Random(0))) == 2  # all there are


def test_group_ids(source, task) -> None:
    assert {info["group"] for info in task.users.values()} == {"0", "1"}
    grouped = build_polis_task(source=source, **CAPS, user_id_from="group", seed=0)
    assert {r.user_id for r in grouped.train} <= {"conv-a/group-0", "conv-a/group-1", "conv-b/group-0",
                                                  "conv-b/group-1"}
    unseen = set(task.unseen_users)
    assert {r.user_id for r in grouped.test} - {group_user_id(i) for i in task.users.values()} == unseen
    for plain, renamed in zip(task.test, grouped.test):  # same pairs, only the ids differ
        assert (plain.chosen, plain.rejected) == (renamed.chosen, renamed.rejected)
        info = task.users[plain.user_id]
        assert renamed.user_id == (group_user_id(info) if info["seen"] else plain.user_id)
    assert grouped.users["conv-a/0"]["trained_as"] == "conv-a/group-0"


def test_validation_split_never_touches_test_statements(source, task) -> None:
    val = build_polis_task(source=source, **CAPS, split="validation", seed=0)
    everything = statements_of(val.train + val.test + val.extra["adapt"])
    assert everything and not everything & statements_of(task.test)
    assert not statements_of(val.train) & statements_of(val.test)


def test_deterministic_and_per_conversation(source, task) -> None:
    again = build_polis_task(source=source, **CAPS, seed=0)
    assert again.train == task.train and again.test == task.test
    only_b = build_polis_task(source=source, conversations=["conv-b"], **CAPS, seed=0)
    assert only_b.train == [r for r in task.train if r.user_id.startswith("conv-b/")]
    assert build_polis_task(source=source, **CAPS, seed=1).train != task.train


@pytest.mark.parametrize("file, edit, expected", [
    ("participants-votes.csv", lambda rows: rows[3].__setitem__(10, "yes"),
     "participants-votes.csv, line 4, field '4': expected 1, -1, 0 or empty, got 'yes'"),
    ("participants-votes.csv", lambda rows: rows[0].__setitem__(1, "group"),
     "participants-votes.csv, line 1, field 'group-id': missing column in the header"),
    ("participants-votes.csv", lambda rows: rows[5].pop(),
     "participants-votes.csv, line 6: row has 29 fields, the header 30"),
    ("comments.csv", lambda rows: rows[2].__setitem__(6, "x"),
     "comments.csv, line 3, field 'moderated': expected an integer, got 'x'"),
    ("comments.csv", lambda rows: rows[5].__setitem__(7, " "),
     "comments.csv, line 6, field 'comment-body': empty statement"),
])
def test_malformed_csv_is_one_line_naming_file_line_field(tmp_path, file, edit, expected) -> None:
    folder = write_conversation(tmp_path / "conv", "Topic", 0)
    with (folder / file).open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    edit(rows)
    with (folder / file).open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(DataError) as err:
        build_polis_task(source=tmp_path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(folder / file)) and message.endswith(expected.split(
        ", ", 1)[1]), message


def test_missing_topic_and_folder(tmp_path) -> None:
    folder = write_conversation(tmp_path / "conv", "Topic", 0)
    (folder / "summary.csv").write_text("url,https://pol.is/x\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"summary.csv, field 'topic'"):
        build_polis_task(source=tmp_path)
    with pytest.raises(DataError, match="Polis folder not found"):
        build_polis_task(source=tmp_path / "absent")
    with pytest.raises(ValueError, match="no conversation folder"):
        build_polis_task(source=tmp_path, conversations=["nope"])


def test_cli_data_build(source, tmp_path, capsys) -> None:
    out = tmp_path / "data"
    assert main(["data", "build", "polis", "--source", str(source), "--out", str(out), "--train-pairs-per-user",
                 "5", "--test-pairs-per-user", "3", "--conversations", "conv-a"]) == 0
    assert {p.name for p in out.iterdir()} == {"train.jsonl", "test.jsonl", "users.json", "adapt.jsonl"}
    doc = json.loads((out / "users.json").read_text())
    assert doc["task"] == "polis" and doc["meta"]["attribution"] == ATTRIBUTION
    assert doc["meta"]["conversations"] == ["conv-a"] and all("group" in u for u in doc["users"].values())
    assert "seen" in capsys.readouterr().out
    grouped = tmp_path / "grouped"
    assert main(["data", "build", "polis", "--source", str(source), "--out", str(grouped), "--user-id-from",
                 "group"]) == 0
    assert all("/group-" in json.loads(line)["user_id"] for line in (grouped / "train.jsonl").read_text().splitlines())
    assert main(["data", "build", "polis", "--source", str(source), "--out", str(tmp_path / "x"), "--users",
                 "3"]) == 2
    assert "not for real participants: --users" in capsys.readouterr().err
    votes = tmp_path / "votes"
    assert main(["data", "build", "polis", "--source", str(source), "--out", str(votes), "--held-out", "votes"]) == 0
    assert json.loads((votes / "users.json").read_text())["meta"]["held_out"] == "votes"
    for flag, value in (("--held-out", "votes"), ("--split", "validation"), ("--conversations", "conv-a")):
        assert main(["data", "build", "style", "--out", str(tmp_path / "style"), flag, value]) == 2
        assert f"{flag} only apply to polis" in capsys.readouterr().err  # not silently ignored
    assert not (tmp_path / "style").exists()
    bad = write_conversation(tmp_path / "broken" / "conv", "T", 0)
    (bad / "comments.csv").write_text("comment-id,moderated\n1,1\n", encoding="utf-8")
    assert main(["data", "build", "polis", "--source", str(bad.parent), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "comments.csv, line 1, field 'comment-body'" in err


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="../shared/data/polis is not here")
def test_real_data_has_1000_seen_participants() -> None:
    task = build_polis_task(source=REAL_DATA, conversations=polis_bench.DEFAULT_CONVERSATIONS,
                            train_pairs_per_user=polis_bench.FULL.train_pairs_per_user,
                            test_pairs_per_user=polis_bench.FULL.test_pairs_per_user)
    assert task.meta["n_seen"] >= 1000  # the benchmark's own conversation
    assert not (statements_of(task.train) | statements_of(task.extra["adapt"])) & statements_of(task.test)
    assert sum(1 for u in task.unseen_users if task.users[u]["n_adapt_pairs"] >= 10) >= polis_bench.FULL.adapt_users
    everything = build_polis_task(source=REAL_DATA)
    assert everything.meta["n_seen"] >= 3000 and len(everything.meta["conversations"]) == 13


@pytest.mark.slow
def test_bench_polis_quick_writes_results(source, tmp_path, monkeypatch) -> None:
    """The documented files and schema; then --reuse-runs takes every finished method instead of training it."""
    out = tmp_path / "bench"
    args = ["bench", "polis", "--quick", "--source", str(source), "--out", str(out), "--threads", "1", "--epochs", "1"]
    assert main(args + ["--keep-runs"]) == 0
    assert (out / "work" / "scores" / "new_participants.json").is_file()
    first = json.loads((out / "results.json").read_text())

    def no_training(*args, **kwargs):
        raise AssertionError("a finished method was trained again")

    monkeypatch.setattr(experiment, "train", no_training)
    # the new participants' start is no method's setting: every run is taken, only they are fitted again
    saved = out / "work" / "scores" / "new_participants.json"
    fitted = saved.read_bytes()
    assert main(args + ["--keep-runs", "--reuse-runs", "--new-participant-start", "covotes"]) == 0
    warm = json.loads((out / "results.json").read_text())
    assert warm["methods"] == first["methods"] and first["new_participants"]["start"] == "none"
    assert warm["new_participants"]["start"] == "covotes" and 0.0 <= warm["new_participants"]["mean_start"] <= 1.0
    assert "at the rows their votes predict" in (out / "report.md").read_text()
    saved.write_bytes(fitted)
    assert main(args + ["--reuse-runs"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["methods"] == first["methods"] and doc["new_participants"] == first["new_participants"]
    assert doc["task"] == "polis" and doc["model"] == "tiny" and doc["split"] == "statements"
    assert list(doc["methods"]) == list(polis_bench.METHODS)
    for r in doc["methods"].values():
        for key in ("accuracy", "mean_user_accuracy", "worst_user_accuracy", "unseen_accuracy", "train_seconds"):
            assert isinstance(r[key], float), key
        assert r["n_seen_users"] == doc["n_users"] and set(r["per_conversation_accuracy"]) == {"conv-a", "conv-b"}
    assert doc["methods"]["opinion_groups"]["config"]["user_ids"] == "opinion group"
    new = doc["new_participants"]
    assert new["n_users"] == polis_bench.QUICK.adapt_users and new["k"] == polis_bench.QUICK.adapt_k
    assert 0.0 <= new["mean_after"] <= 1.0
    assert set(doc["targets"]) == {f"{pre}{m}_minus_{other}" for m in ("individual", "cluster", "lowrank")
                                   for pre, other in (("", "vanilla"), ("", "opinion_groups"), ("unseen_", "vanilla"))
                                   } | {"new_participants_over_seen_mean"}
    assert doc["targets"]["individual_minus_vanilla"]["target"] == ">= 0.03"
    assert doc["attribution"] == ATTRIBUTION
    assert (out / "report.md").is_file() and (out / "accuracy.png").is_file()
    assert not (out / "work").exists()  # no data derived from the Polis files stays behind


def test_held_out_votes_splits_each_participants_own_statements(source, task) -> None:
    votes = build_polis_task(source=source, **CAPS, held_out="votes", seed=0)
    assert votes.meta["held_out"] == "votes" and task.meta["held_out"] == "statements"
    by_user = defaultdict(lambda: (set(), set()))
    for side, records in ((0, votes.train + votes.extra["adapt"]), (1, votes.test)):
        for r in records:
            by_user[r.user_id][side].update({r.chosen.strip(), r.rejected.strip()})
    assert votes.test and all(not train & test for train, test in by_user.values())  # never voted on in training
    trained = statements_of(votes.train)
    assert statements_of(votes.test) & trained  # ... but other participants' training uses them: not disjoint
    val = build_polis_task(source=source, **CAPS, held_out="votes", split="validation", seed=0)
    for r in val.train + val.test:  # a participant's validation and training pairs avoid their test statements
        test_side = by_user[r.user_id][1]
        assert r.chosen.strip() not in test_side and r.rejected.strip() not in test_side
    with pytest.raises(ValueError, match="held_out"):
        build_polis_task(source=source, held_out="nope")


def test_cli_offers_the_builders_held_out_choices() -> None:
    from prlhf.cli import polis_cmds
    from prlhf.data.tasks import polis

    assert polis_cmds.HELD_OUT == polis.HELD_OUT  # written out in the CLI to keep its start-up light


def test_bench_sizes_take_zero_as_a_size() -> None:
    """--new-participants 0 means none: it used to fall back to the preset's 32 (0 read as 'not given')."""
    assert polis_bench.bench_size(False, adapt_users=0).adapt_users == 0
    assert polis_bench.bench_size(False, adapt_users=None) == polis_bench.FULL
    assert polis_bench.bench_size(True, epochs=3.0).epochs == 3.0
