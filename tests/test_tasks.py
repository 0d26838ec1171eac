"""Built-in synthetic tasks: determinism, splits, user poles, pair semantics, sizes and `Task.write`."""

from __future__ import annotations

import json
import random

import pytest

from prlhf.data.schema import PreferenceRecord
from prlhf.data.tasks import (TASKS, Task, build_length_task, build_persona_task, build_polis_task, build_style_task,
                              build_tldr_task)
from prlhf.data.tasks.common import assign_poles, record_to_dict
from prlhf.data.tasks.length import word_count
from prlhf.data.tasks.style import DIMENSIONS, TOPICS, classify_style, profile_text, random_content, render_style

# small sizes keep the suite at well under a second per task
SMALL_LENGTH = dict(n_seen_users=6, n_unseen_users=3, n_prompts=60, test_fraction=0.25)
SMALL_STYLE = dict(n_seen_users=8, n_unseen_users=3, train_pairs_per_user=40, test_pairs_per_user=10)


@pytest.fixture(scope="module")
def length_task() -> Task:
    return build_length_task(**SMALL_LENGTH, seed=3)


@pytest.fixture(scope="module")
def style_task() -> Task:
    return build_style_task(**SMALL_STYLE, seed=3, with_user_text=True)


def _users_in(records: list[PreferenceRecord]) -> set[str]:
    return {r.user_id for r in records}


def _vocab(task: Task) -> set[str]:
    words: set[str] = set()
    for r in task.train + task.test:
        for text in (r.prompt, r.chosen, r.rejected):
            words.update(w.strip(".,:!") for w in text.lower().split())
    return words


# ---------------------------------------------------------------- common


def test_registry() -> None:
    assert TASKS == {"length": build_length_task, "style": build_style_task, "persona": build_persona_task,
                     "tldr": build_tldr_task, "polis": build_polis_task}


@pytest.mark.parametrize("name", ["length", "style"])
def test_deterministic_for_seed(name: str) -> None:
    kwargs = SMALL_LENGTH if name == "length" else SMALL_STYLE
    a, b, c = TASKS[name](**kwargs, seed=1), TASKS[name](**kwargs, seed=1), TASKS[name](**kwargs, seed=2)
    assert a.train == b.train and a.test == b.test and a.users == b.users and a.meta == b.meta
    assert a.train != c.train


def test_assign_poles_guarantees_both() -> None:
    for seed in range(50):
        # share 1.0 would give all-majority without the guarantee
        poles = assign_poles(5, 1.0, random.Random(seed), ("a", "b"))
        assert sorted(set(poles)) == ["a", "b"] and poles.count("b") == 1
    assert assign_poles(1, 1.0, 0, ("a", "b")) == ["a"]
    assert assign_poles(0, 0.5, 0) == []
    many = assign_poles(2000, 0.7, 0, ("a", "b"))
    assert 0.65 < many.count("a") / 2000 < 0.75


@pytest.mark.parametrize("name", ["length", "style"])
def test_write_roundtrip(name: str, tmp_path, length_task: Task, style_task: Task) -> None:
    task = length_task if name == "length" else style_task
    paths = task.write(tmp_path / "out")
    assert set(paths) == {"train", "test", "users"}
    for split, records in (("train", task.train), ("test", task.test)):
        lines = paths[split].read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines]
        assert [PreferenceRecord(**row) for row in rows] == records
        assert rows == [record_to_dict(r) for r in records]
        # user_text is present exactly when set
        assert all(("user_text" in row) == (name == "style") for row in rows)
    doc = json.loads(paths["users"].read_text(encoding="utf-8"))
    assert doc == {"task": task.name, "meta": task.meta, "users": task.users}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["test.jsonl", "train.jsonl", "users.json"]


# ---------------------------------------------------------------- length


def test_length_split_and_users(length_task: Task) -> None:
    train_prompts = {r.prompt for r in length_task.train}
    test_prompts = {r.prompt for r in length_task.test}
    assert not train_prompts & test_prompts
    assert len(test_prompts) == 15 and len(train_prompts) == 45
    # content-disjoint: test stories' subjects and objects never occur in any training text
    train_words = {w.strip(".") for r in length_task.train for t in (r.prompt, r.chosen, r.rejected)
                   for w in t.lower().split()}
    held_out = set(length_task.meta["test_subjects"]) | set(length_task.meta["test_objects"])
    assert held_out and not held_out & train_words
    assert all(set(p.lower().strip(".").split()) & held_out for p in test_prompts)
    seen, unseen = set(length_task.seen_users), set(length_task.unseen_users)
    assert seen == {f"user_{i:02d}" for i in range(1, 7)} and unseen == {f"unseen_{i:02d}" for i in range(1, 4)}
    assert _users_in(length_task.train) == seen
    assert _users_in(length_task.test) == seen | unseen
    for group in (seen, unseen):
        assert {length_task.users[u]["group"] for u in group} == {"long", "short"}
    assert all(r.prompt.startswith("Summarize: ") for r in length_task.train)


def test_length_pairs(length_task: Task) -> None:
    for r in length_task.train + length_task.test:
        assert r.chosen != r.rejected and r.user_text is None
        long_chosen = word_count(r.chosen) > word_count(r.rejected)
        assert long_chosen == (length_task.users[r.user_id]["group"] == "long")
        short, long = sorted((r.chosen, r.rejected), key=word_count)
        assert 5 <= word_count(short) <= 9 and short.count(".") == 1
        assert 25 <= word_count(long) <= 40 and long.count(".") in (3, 4)
        # same topic: the short summary reuses the story's subject and object
        story_words = set(r.prompt.lower().rstrip(".").split())
        assert len(story_words & set(short.lower().rstrip(".").split())) >= 3


def test_length_short_summary_invents_nothing(length_task: Task) -> None:
    for r in length_task.train + length_task.test:
        short = min((r.chosen, r.rejected), key=word_count)
        story = set(r.prompt.lower().rstrip(".").split()) | {"a"}
        assert set(short.lower().rstrip(".").split()) <= story, (r.prompt, short)


def test_length_sizes() -> None:
    full = build_length_task()
    assert len(full.train) == 10 * 240 and len(full.test) == 14 * 60
    meta = {k: v for k, v in full.meta.items() if k not in ("test_subjects", "test_objects")}
    assert meta == dict(n_seen_users=10, n_unseen_users=4, majority_share=0.7, n_prompts=300,
                        test_fraction=0.2, train_pairs_per_user=None, test_pairs_per_user=None, seed=0)
    assert len(full.meta["test_subjects"]) == 4 and len(full.meta["test_objects"]) == 3
    assert len(_vocab(full)) < 300
    small = build_length_task(n_seen_users=3, n_unseen_users=2, n_prompts=40, train_pairs_per_user=7,
                              test_pairs_per_user=4, seed=5)
    assert len(small.train) == 3 * 7 and len(small.test) == 5 * 4
    for uid in small.users:  # a per-user sample has no repeated prompt
        prompts = [r.prompt for r in small.train + small.test if r.user_id == uid]
        assert len(prompts) == len(set(prompts))
    with pytest.raises(ValueError):
        build_length_task(n_prompts=20, train_pairs_per_user=100)


# ---------------------------------------------------------------- style


def test_render_and_classify_all_styles() -> None:
    content = random_content("the office move", random.Random(0))
    for formal in (True, False):
        for bullets in (True, False):
            for warm in (True, False):
                for variant in range(6):
                    text = render_style(content, formal, bullets, warm, variant)
                    assert classify_style(text) == {"formality": "formal" if formal else "casual",
                                                    "layout": "bullets" if bullets else "prose",
                                                    "tone": "warm" if warm else "blunt"}
                    assert word_count(text) <= 40 and "the office move" in text.lower()
                    assert ("'" in text) != formal  # contractions mark casual text only
    with pytest.raises(ValueError):
        classify_style("some unrelated text")


def test_style_split_and_users(style_task: Task) -> None:
    assert not {r.prompt for r in style_task.train} & {r.prompt for r in style_task.test}
    # content-disjoint: no test topic occurs anywhere in training, prompts or notes
    test_topics = set(style_task.meta["test_topics"])
    assert test_topics and {t for t in TOPICS if any(t in r.prompt for r in style_task.test)} == test_topics
    train_text = " ".join(f"{r.prompt} {r.chosen} {r.rejected}" for r in style_task.train).lower()
    assert not any(t in train_text for t in test_topics)
    seen, unseen = set(style_task.seen_users), set(style_task.unseen_users)
    assert _users_in(style_task.train) == seen and _users_in(style_task.test) == seen | unseen
    for dim, poles in DIMENSIONS.items():
        assert {style_task.users[u][dim] for u in seen} == set(poles)
        assert {style_task.users[u][dim] for u in unseen} == set(poles)
    assert all(set(info) == {"formality", "layout", "tone", "seen"} for info in style_task.users.values())


def test_style_pairs(style_task: Task) -> None:
    picked = set()
    for r in style_task.train + style_task.test:
        chosen, rejected = classify_style(r.chosen), classify_style(r.rejected)
        differing = [d for d in DIMENSIONS if chosen[d] != rejected[d]]
        assert len(differing) == 1
        dim = differing[0]
        picked.add(dim)
        assert chosen[dim] == style_task.users[r.user_id][dim]
        assert word_count(r.chosen) <= 40 and word_count(r.rejected) <= 40
        profile = {d: style_task.users[r.user_id][d] for d in DIMENSIONS}
        assert r.user_text == profile_text(profile)
    assert picked == set(DIMENSIONS)


def test_style_sizes_and_user_text_flag() -> None:
    task = build_style_task(n_seen_users=5, n_unseen_users=2, train_pairs_per_user=12, test_pairs_per_user=3, seed=9)
    assert len(task.train) == 5 * 12 and len(task.test) == 7 * 3
    assert all(r.user_text is None for r in task.train + task.test)
    assert task.meta["with_user_text"] is False and task.meta["seed"] == 9
    full = build_style_task()
    assert len(full.train) == 16 * 100 and len(full.test) == 20 * 25
    assert len(_vocab(full)) < 300

