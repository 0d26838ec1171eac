"""Onboarding pairs: the training pairs a run's known users disagree on, chosen to span the ways they differ, served
to each new user first (`prlhf users onboard-pairs`, `prlhf serve --onboard-pairs`, POST /v1/onboarding/next)."""

from __future__ import annotations

import json

import httpx2 as httpx
import pytest
import torch

from prlhf.cli.main import main
from prlhf.data.loading import load_records
from prlhf.data.schema import DataError
from prlhf.data.store import ComparisonStore
from prlhf.runs.directory import load_run
from prlhf.serve.app import Limits, PersonalizedServer
from prlhf.train.onboard_pairs import (OnboardPair, choose_onboarding_pairs, read_onboard_pairs, spanning_pairs,
                                       write_onboard_pairs)
from serve_helpers import running, train_tiny_runs


def test_spanning_pairs_take_each_way_of_differing_then_ask_again_and_skip_unanimous_pairs():
    a, b = [1, 1, -1, -1], [1, -1, 1, -1]  # two independent splits of 4 users
    signs = torch.tensor([a, a, [1, 1, 1, 1], b, [-x for x in a], b, [-1, -1, -1, -1]], dtype=torch.float)
    prompts = ["p0", "p1", "p2", "p3", "p4", "p3", "p6"]
    first = spanning_pairs(signs, prompts, 2)
    assert sorted(first) in ([0, 3], [1, 3], [3, 4])  # one of each split, not two of the same
    everything = spanning_pairs(signs, prompts, 10)
    assert 2 not in everything and 6 not in everything  # unanimous: they tell nobody apart
    assert len(everything) == 4 and not {3, 5} <= set(everything)  # rows 3 and 5 share a prompt: one of them
    assert {prompts[i] for i in everything} == {"p0", "p1", "p3", "p4"}
    assert spanning_pairs(torch.ones(3, 4), ["x", "y", "z"], 5) == []


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return train_tiny_runs(tmp_path_factory.mktemp("onboard"), names=("policy",))


def test_chosen_pairs_are_training_texts_that_split_the_known_users(runs, tmp_path):
    records = load_records(runs["policy"].parent / "data" / "train.jsonl")
    run = load_run(runs["policy"])
    pairs = choose_onboarding_pairs(run, records, 6, seed=0)
    assert pairs, "the tiny run's three users should disagree on some pair"
    texts = {(r.prompt, frozenset((r.chosen, r.rejected))) for r in records}
    assert all((p.prompt, frozenset((p.response_a, p.response_b))) in texts for p in pairs)
    assert len({p.prompt for p in pairs}) == len(pairs)
    assert all(0 < p.split < 1 for p in pairs)  # no pair every known user answers alike
    assert choose_onboarding_pairs(run, records, 6, seed=0) == pairs  # the seed decides
    path = tmp_path / "pairs.jsonl"
    write_onboard_pairs(path, pairs)
    assert read_onboard_pairs(path) == [OnboardPair(p.prompt, p.response_a, p.response_b, round(p.split, 4))
                                        for p in pairs]


@pytest.mark.parametrize("line, where", [
    ("not json", "line 2: invalid JSON"),
    ('{"prompt": "", "response_a": "x", "response_b": "y"}', "line 2, field 'prompt'"),
    ('{"prompt": "p", "response_a": "x"}', "line 2, field 'response_b'"),
    ('{"prompt": "p", "response_a": "x", "response_b": "x"}', "line 2, field 'response_b': the two responses"),
    ('{"prompt": "p", "response_a": "x", "response_b": "y", "split": "half"}', "line 2, field 'split'"),
])
def test_a_bad_onboarding_file_is_one_line_naming_line_and_field(tmp_path, line, where):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "p", "response_a": "x", "response_b": "y"}\n' + line + "\n")
    with pytest.raises(DataError, match=where.replace("(", r"\(")):
        read_onboard_pairs(path)
    assert str(path) in str(pytest.raises(DataError, read_onboard_pairs, path).value)


def test_the_server_shows_each_user_its_pairs_first_then_says_done(runs, tmp_path):
    pairs = [OnboardPair("Write about the sea.", "Short.", "A long answer about the sea.", 0.5),
             OnboardPair([{"role": "user", "content": "hi"}], "Hello there.", "hey", 0.3)]
    store = ComparisonStore(f"sqlite:///{tmp_path}/feedback.db")
    token = store.invite("ann")
    server = PersonalizedServer(load_run(runs["policy"]), "tiny", Limits(max_prompt_tokens=64, max_tokens=16),
                                reload_interval=None, store=store, onboard_after=0, onboard_pairs=pairs)
    as_ann = {"Authorization": f"Bearer {token}"}
    with running(server) as url:
        http = httpx.Client(base_url=url, headers=as_ann)
        assert http.get("/v1/me").json()["onboard_pairs_left"] == 2
        first = http.post("/v1/onboarding/next", json={}).json()
        assert (first["number"], first["total"], first["prompt"]) == (1, 2, "Write about the sea.")
        assert [c["text"] for c in first["choices"]] == ["Short.", "A long answer about the sea."]
        again = http.post("/v1/onboarding/next", json={}).json()  # not answered yet: the same pair again
        assert again["number"] == 1 and again["comparison_id"] != first["comparison_id"]
        assert http.post("/v1/feedback", json={"comparison_id": first["comparison_id"], "choice": "b"}).status_code \
            == 200
        second = http.post("/v1/onboarding/next", json={}).json()
        assert (second["number"], second["prompt"]) == (2, [{"role": "user", "content": "hi"}])
        assert http.get("/v1/me").json()["onboard_pairs_left"] == 1
        http.post("/v1/feedback", json={"comparison_id": second["comparison_id"], "choice": "tie"})
        assert http.post("/v1/onboarding/next", json={}).json() == {"object": "onboarding.pair", "done": True,
                                                                     "total": 2}
        assert http.get("/v1/me").json()["onboard_pairs_left"] == 0
        other = http.post("/v1/onboarding/next", json={"user": "bob"})  # a token acts as its own user only
        assert other.status_code == 403 and other.json()["error"]["code"] == "forbidden"
        assert httpx.post(f"{url}/v1/onboarding/next", json={"user": "bob"}).json()["number"] == 1  # bob: his own
    store.close()
    out = tmp_path / "collected.jsonl"
    assert main(["data", "export", "--db", f"sqlite:///{tmp_path}/feedback.db", "--out", str(out)]) == 0
    records = [r for r in load_records(out) if r.user_id == "ann"]  # the answer with a winner trains ann's row
    assert [(r.prompt, r.chosen, r.rejected) for r in records] == [("Write about the sea.",
                                                                     "A long answer about the sea.", "Short.")]


def test_a_server_without_pairs_says_so_and_pairs_need_the_store(runs, tmp_path):
    store = ComparisonStore(f"sqlite:///{tmp_path}/feedback.db")
    server = PersonalizedServer(load_run(runs["policy"]), "tiny", reload_interval=None, store=store)
    with running(server) as url:
        response = httpx.post(f"{url}/v1/onboarding/next", json={"user": "ann"})
        assert response.status_code == 404 and "--onboard-pairs" in response.json()["error"]["message"]
        assert httpx.get(f"{url}/v1/me", params={"user": "ann"}).json()["onboard_pairs_left"] == 0
    store.close()
    with pytest.raises(ValueError, match="store"):
        PersonalizedServer(load_run(runs["policy"]), "tiny", reload_interval=None,
                           onboard_pairs=[OnboardPair("p", "a", "b", 0.5)])


def test_onboard_pairs_command_writes_the_file_and_serve_checks_it(runs, tmp_path, capsys):
    data = runs["policy"].parent / "data" / "train.jsonl"
    out = tmp_path / "pairs.jsonl"
    argv = ["users", "onboard-pairs", "--run", str(runs["policy"]), "--data", str(data), "--out", str(out),
            "--pairs", "4"]
    assert main(argv) == 0
    assert "read them before serving" in capsys.readouterr().out
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert 1 <= len(written) <= 4 and set(written[0]) == {"prompt", "response_a", "response_b", "split"}
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err  # never overwritten unasked
    assert main(["serve", "--run", str(runs["policy"]), "--onboard-pairs", str(out)]) == 2
    assert "--onboard-pairs needs --db" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p"}\n')
    assert main(["serve", "--run", str(runs["policy"]), "--onboard-pairs", str(tmp_path / "bad.jsonl"), "--db",
                 f"sqlite:///{tmp_path}/db.db"]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.jsonl, line 1, field 'response_a'" in err and len(err.splitlines()) == 1
