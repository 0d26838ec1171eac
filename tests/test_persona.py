"""Persona-trait users: statement loading and errors, pole semantics, the two test splits, user_text, writing."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import write_persona_traits

from prlhf.data.schema import DataError
from prlhf.data.tasks.persona import (
    DIMENSIONS,
    Statement,
    build_persona_task,
    load_statements,
    profile_text,
    resolve_dimensions,
)

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "anthropic-persona"
SMALL = dict(n_seen_users=12, n_unseen_users=4, statements_per_pole=20, train_pairs_per_user=20,
             test_pairs_per_user=6, dimensions=["politics", "risk"])


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory) -> Path:
    return write_persona_traits(tmp_path_factory.mktemp("persona"))


@pytest.fixture(scope="module")
def task(fake_dir):
    return build_persona_task(**SMALL, seed=0, data_dir=fake_dir)


def test_answers_follow_the_pole() -> None:
    s = Statement("politics", "politically-liberal", "q", "No")
    assert s.answers_for("politically-liberal") == (" No", " Yes")  # the file's trait gives the matching answer
    assert s.answers_for("politically-conservative") == (" Yes", " No")  # the opposite pole the other one


def test_every_record_matches_its_users_pole(task, fake_dir) -> None:
    statements = {s.prompt(): s for rows in load_statements(fake_dir, resolve_dimensions(SMALL["dimensions"])).values()
                  for s in rows}
    for split in (task.train, task.test, task.extra["test_pairs"]):
        for rec in split:
            s = statements[rec.prompt]
            pole = task.users[rec.user_id]["profile"][s.dimension]
            assert (rec.chosen.strip() == s.matching) == (pole == s.pole)
            assert {rec.chosen, rec.rejected} == {" Yes", " No"}
            assert rec.user_text == profile_text(task.users[rec.user_id]["profile"])


def test_splits(task) -> None:
    seen, unseen = set(task.seen_users), set(task.unseen_users)
    assert len(seen) == 12 and len(unseen) == 4
    assert {r.user_id for r in task.train} == seen
    own, raters = defaultdict(set), defaultdict(set)
    for r in task.train:
        own[r.user_id].add(r.prompt)
        raters[r.prompt].add(r.user_id)
    # pairs split: held-out pairs of a seen user are statements others rated in training, never their own
    for r in task.extra["test_pairs"]:
        assert r.prompt not in own[r.user_id] and raters[r.prompt] - {r.user_id}
    assert {r.user_id for r in task.extra["test_pairs"]} == seen | unseen
    # test.jsonl is split statements: statements never seen in training (content-disjoint)
    train_prompts = {r.prompt for r in task.train}
    assert task.test and not {r.prompt for r in task.test} & train_prompts
    assert {r.user_id for r in task.test} == seen | unseen
    assert len(task.record_dimensions["test"]) == len(task.test)
    assert len(task.record_dimensions["test_pairs"]) == len(task.extra["test_pairs"])
    assert set(task.record_dimensions["train"]) == {"politics", "risk"}


def test_both_poles_present_and_deterministic(fake_dir, task) -> None:
    for seed in range(10):
        t = build_persona_task(**{**SMALL, "majority_share": 1.0}, seed=seed, data_dir=fake_dir)
        for dim in ("politics", "risk"):
            assert len({t.users[u]["profile"][dim] for u in t.seen_users}) == 2
    again = build_persona_task(**SMALL, seed=0, data_dir=fake_dir)
    assert again.train == task.train and again.users == task.users


def test_write_keeps_attribution_and_extra_split(task, tmp_path) -> None:
    paths = task.write(tmp_path)
    assert paths["test_pairs"].is_file()
    meta = json.loads(paths["users"].read_text())["meta"]
    assert "CC-BY-4.0" in meta["attribution"]
    dims = json.loads(paths["record_dimensions"].read_text())
    assert len(dims["test_pairs"]) == len(task.extra["test_pairs"])


def test_bad_files_name_file_line_and_field(tmp_path) -> None:
    folder = write_persona_traits(tmp_path / "p", n=4)
    path = folder / "risk-averse.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = json.dumps({"question": "q", "statement": "s", "answer_matching_behavior": " Maybe"})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as exc:
        load_statements(folder, {"risk": DIMENSIONS["risk"]})
    assert "risk-averse.jsonl" in str(exc.value) and "line 3" in str(exc.value)
    assert "answer_matching_behavior" in str(exc.value)
    for bad, field in (("[1, 2]", "expected a JSON object"), ('{"question": "q", "statement": "s", '
                       '"answer_matching_behavior": " Yes", "label_confidence": "high"}', "label_confidence"),
                       ("{not json", "invalid JSON")):
        lines[2] = bad
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(DataError, match=field) as exc:
            load_statements(folder, {"risk": DIMENSIONS["risk"]})
        assert "line 3" in str(exc.value)
    with pytest.raises(DataError, match="trait file not found"):
        load_statements(tmp_path / "missing", {"risk": DIMENSIONS["risk"]})
    with pytest.raises(ValueError, match="unknown dimension"):
        resolve_dimensions(["politcs"])
    assert resolve_dimensions(["agreeableness/narcissism"]) == {"agreeableness/narcissism":
                                                                ("agreeableness", "narcissism")}


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="../shared/data/anthropic-persona not present")
def test_real_data_default_dimensions() -> None:
    by_dim = load_statements(REAL_DATA, DIMENSIONS)
    for dim, rows in by_dim.items():
        assert len(rows) > 1500, dim  # two files of 1,000 statements, few duplicates
        assert {s.matching for s in rows} == {"Yes", "No"}
    t = build_persona_task(n_seen_users=64, n_unseen_users=16, seed=0, data_dir=REAL_DATA)
    assert t.meta["n_seen_profiles"] >= 8 and len(t.train) == 64 * 60
