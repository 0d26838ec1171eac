"""Collecting comparisons: the SQLite store (schema, idempotent retries, users' own rows), the feedback routes of
`prlhf serve --db`, `prlhf data export`, and a server killed with SIGKILL mid-burst losing nothing it acknowledged."""

from __future__ import annotations

import http.client
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
import torch

from prlhf.cli.main import main
from prlhf.data.loading import load_records
from prlhf.data.store import SCHEMA_VERSION, ComparisonStore, StoreError
from prlhf.runs.directory import load_run
from prlhf.serve.app import Limits, PersonalizedServer
from postgres_helpers import postgres_bin, postgres_server
from serve_helpers import free_port, running, train_tiny_runs


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server started for these tests (`make test` installs the server and requires this)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        psycopg = None
    if (postgres_bin() is None or psycopg is None) and not os.environ.get("PRLHF_REQUIRE_POSTGRES"):
        pytest.skip("PostgreSQL or psycopg is not installed (`make test` installs both)")
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh store URL of each backend (a new database per test on the shared PostgreSQL server)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/db/feedback.db"
    import psycopg

    base = request.getfixturevalue("postgres_url")
    name = f"t_{os.getpid()}_{time.monotonic_ns()}"
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return base.rsplit("/", 1)[0] + "/" + name


def test_store_schema_retries_and_users(db_url):
    store = ComparisonStore(db_url)
    assert store.backend.version() == SCHEMA_VERSION
    pair = store.add_pair("u1", [{"role": "user", "content": "hi"}], "A", "B", run="r", version="v1",
                          sampling={"temperature": 1.0})
    assert store.get(pair.id).status == "pending" and store.get(pair.id).record() is None
    with pytest.raises(StoreError, match="of user 'u2'"):
        store.decide(pair.id, "a", user_id="u2")  # not theirs
    decided = store.decide(pair.id, "b", user_id="u1")
    assert store.decide(pair.id, "b").decided_at == decided.decided_at  # a retry changes nothing
    with pytest.raises(StoreError, match="already decided"):
        store.decide(pair.id, "a")
    record = store.get(pair.id).record()
    assert (record.chosen, record.rejected, record.prompt) == ("B", "A", [{"role": "user", "content": "hi"}])
    first = store.add_record("u2", "p", "yes", "no", id="k1")
    assert store.add_record("u2", "p", "yes", "no", id="k1") == first  # the same retry: stored once
    with pytest.raises(StoreError, match="taken"):
        store.add_record("u2", "p", "other", "no", id="k1")
    store.add_pair("u2", "p", "x", "y")
    assert [c.id for c in store.of_user("u2")][-1] == "k1" and store.decided_count("u2") == 1
    token = store.invite("u1")
    assert store.user_of_token(token) == "u1" and store.user_of_token("nope") is None
    assert store.delete_user("u2") == 2 and store.of_user("u2") == [] and store.decided_count("u1") == 1
    store.close()
    again = ComparisonStore(db_url)  # reopening migrates nothing
    assert [c.id for c in again.all()] == [pair.id] and again.user_of_token(token) == "u1"
    again.backend.set_version(99)
    again.close()
    with pytest.raises(StoreError, match="newer"):
        ComparisonStore(db_url)


def test_two_stores_on_one_postgresql_share_its_rows_and_retries(postgres_url):
    """Two server processes' stores on one database: concurrent retries of the same ids land once."""
    first, second = ComparisonStore(postgres_url), ComparisonStore(postgres_url)

    def write(store, start):
        for i in range(start, start + 40):
            store.add_record(f"w{i % 4}", f"p{i}", "yes", "no", id=f"shared-{i % 60}")

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda args: write(*args), [(first, 0), (second, 20)]))
    ids = [c.id for c in first.all()]
    assert sorted(ids) == sorted(f"shared-{i}" for i in range(60))  # the 20 ids both wrote: once each
    assert sorted(c.id for c in second.all()) == sorted(ids)
    first.close()
    second.close()


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    return train_tiny_runs(tmp_path_factory.mktemp("feedback"), names=("policy",))["policy"]


def test_pairs_choices_full_records_and_export(policy_dir, tmp_path, capsys, db_url):
    store = ComparisonStore(db_url)
    server = PersonalizedServer(load_run(policy_dir), "tiny", Limits(max_prompt_tokens=64, max_tokens=16),
                                reload_interval=None, store=store)
    with running(server) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        pair = client.completions.create(model="tiny", prompt="Summarize: the cat", user="user_01", max_tokens=8,
                                         seed=1, extra_body={"compare": True})
        assert len(pair.choices) == 2
        cid = pair.model_extra["prlhf"]["comparison_id"]
        http = httpx.Client(base_url=url)
        answer = http.post("/v1/feedback", json={"comparison_id": cid, "choice": "b", "user": "user_01"})
        assert answer.status_code == 200 and answer.json()["user_comparisons"] == 1
        assert http.post("/v1/feedback", json={"comparison_id": cid, "choice": "a"}).status_code == 409
        assert http.post("/v1/feedback", json={"comparison_id": "nope", "choice": "a"}).status_code == 404
        full = {"user": "newcomer", "prompt": "Write a note.", "chosen": "Dear team, ...", "rejected": "hey",
                "id": "client-key-1"}
        assert http.post("/v1/feedback", json=full).json()["user_comparisons"] == 1
        assert http.post("/v1/feedback", json=full).json()["user_comparisons"] == 1  # retried: stored once
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                              user="newcomer", max_tokens=8, extra_body={"compare": True})
        http.post("/v1/feedback", json={"comparison_id": chat.model_extra["prlhf"]["comparison_id"],
                                        "choice": "tie"})
        for bad, status in [({"choice": "a"}, 400), ({"comparison_id": cid, "choice": "best"}, 400),
                            ({"user": "u", "prompt": "p", "chosen": "x"}, 400),
                            ({"user": "u", "prompt": "p", "chosen": "x", "rejected": "x"}, 400),
                            ({"comparison_id": cid, "choice": "a", "extra": 1}, 400)]:
            response = http.post("/v1/feedback", json=bad)
            assert response.status_code == status and "error" in response.json(), (bad, response.text)
        listed = http.get("/v1/feedback", params={"user": "user_01"}).json()["data"]
        assert [(c["id"], c["choice"], c["response_b"]) for c in listed] == [(cid, "b", pair.choices[1].text)]
        assert listed[0]["version"] == "v1" and listed[0]["sampling"]["seed"] == 1
        assert http.get("/v1/feedback").status_code == 400
    store.close()
    out = tmp_path / "collected.jsonl"
    argv = ["data", "export", "--db", db_url, "--out", str(out),
            "--ties-out", str(tmp_path / "ties.jsonl")]
    assert main(argv) == 0
    assert "left out: 1 tie or both-bad" in capsys.readouterr().out
    records = load_records(out)  # what prlhf train and prlhf adapt read
    chosen = {r.user_id: (r.chosen, r.rejected) for r in records}
    assert chosen == {"user_01": (pair.choices[1].text, pair.choices[0].text), "newcomer": ("Dear team, ...", "hey")}
    assert json.loads((tmp_path / "ties.jsonl").read_text())["choice"] == "tie"
    assert main(argv) == 2  # refuses to overwrite
    assert main(["data", "export", "--db", "mysql://x/y", "--out", str(tmp_path / "o.jsonl")]) == 2


def test_feedback_needs_the_store(policy_dir):
    server = PersonalizedServer(load_run(policy_dir), "tiny", reload_interval=None)
    with running(server) as url:
        assert httpx.post(f"{url}/v1/feedback", json={"comparison_id": "x", "choice": "a"}).status_code == 404
        response = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "user": "u",
                                                             "compare": True})
        assert response.status_code == 400 and "--db" in response.json()["error"]["message"]


def test_a_killed_server_keeps_every_acknowledged_comparison_once(policy_dir, tmp_path):
    """8 clients write 1,000 comparisons; the server is SIGKILLed mid-burst, restarted, and asked for them."""
    db = f"sqlite:///{tmp_path}/feedback.db"

    def start():
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "prlhf", "serve", "--run", str(policy_dir), "--db", db,
                                 "--port", str(port), "--threads", "1", "--log-level", "warning"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return proc, port
            except httpx.HTTPError:
                time.sleep(0.1)

    proc, port = start()
    acknowledged, lock, kill_at = [], threading.Lock(), 300

    def client(worker: int) -> int:
        sent = 0
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for i in range(125):
            key = f"w{worker}-{i}"
            body = json.dumps({"user": f"writer-{worker}", "prompt": f"prompt {i}", "chosen": f"yes {i}",
                               "rejected": f"no {i}", "id": key})
            try:
                connection.request("POST", "/v1/feedback", body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                return sent  # the server is gone
            sent += 1
            if response.status == 200:
                with lock:
                    acknowledged.append(key)
                    if len(acknowledged) == kill_at:
                        os.kill(proc.pid, signal.SIGKILL)
        return sent

    with ThreadPoolExecutor(8) as pool:
        sent = sum(pool.map(client, range(8)))
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL and kill_at <= len(acknowledged) < 1000 and sent <= 1000
    proc, port = start()  # the database after a kill: WAL recovery on open
    try:
        stored = []
        for worker in range(8):
            rows = httpx.get(f"http://127.0.0.1:{port}/v1/feedback",
                             params={"user": f"writer-{worker}", "limit": 1000}).json()["data"]
            stored += [row["id"] for row in rows]
    finally:
        proc.terminate()
        proc.wait(30)
    assert set(acknowledged) <= set(stored)  # nothing acknowledged is lost
    assert len(stored) == len(set(stored))   # nothing is there twice
    assert len(stored) - len(acknowledged) <= 8  # at most the writes in flight when it died (committed, unanswered)


def test_a_new_user_is_onboarded_live_after_k_comparisons(policy_dir, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(policy_dir, run_dir)
    store = ComparisonStore(f"sqlite:///{tmp_path}/feedback.db")
    server = PersonalizedServer(load_run(run_dir), "tiny", Limits(max_prompt_tokens=64, max_tokens=16),
                                reload_interval=None, store=store, onboard_after=3)
    records = load_records(policy_dir.parent / "data" / "test.jsonl")
    mine = [r for r in records if r.user_id == records[0].user_id][:3]
    more = [r for r in records if r.user_id != records[0].user_id][:3]
    with running(server) as url:
        http = httpx.Client(base_url=url)
        generic = http.post("/v1/completions", json={"model": "tiny", "prompt": mine[0].prompt, "user": "newcomer",
                                                     "max_tokens": 12, "temperature": 0}).json()
        states = [http.post("/v1/feedback", json={"user": "newcomer", "prompt": r.prompt, "chosen": r.chosen,
                                                  "rejected": r.rejected}).json()["user_model"] for r in mine]
        assert states == ["generic", "generic", "fitting"], states
        deadline = time.monotonic() + 60
        while server.onboarding.status("newcomer") != "active":
            assert time.monotonic() < deadline, "not onboarded within 60 s"
            time.sleep(0.1)
        own = http.post("/v1/completions", json={"model": "tiny", "prompt": mine[0].prompt, "user": "newcomer",
                                                 "max_tokens": 12, "temperature": 0}).json()
        row_before = server.users.snapshot().model.state_dict()["offsets.weight"][
            server.users.snapshot().registry.index("newcomer")].clone()
        # three more winners (6 = 2 x 3): the known user's row is fitted again, from where it is
        states = [http.post("/v1/feedback", json={"user": "newcomer", "prompt": r.prompt, "chosen": r.chosen,
                                                  "rejected": r.rejected}).json()["user_model"] for r in more]
        assert states == ["active", "active", "fitting"], states
        while server.onboarding.status("newcomer") != "active":
            assert time.monotonic() < deadline + 60, "not refitted within 60 s"
            time.sleep(0.1)
        snapshot = server.users.snapshot()
        row_after = snapshot.model.state_dict()["offsets.weight"][snapshot.registry.index("newcomer")]
    store.close()
    assert snapshot.version == "v3" and server.onboarding.fitted["newcomer"]["refit"] is True
    assert server.onboarding.fitted["newcomer"]["pairs"] == 6 and not torch.equal(row_before, row_after)
    assert generic["prlhf"]["user_known"] is False, generic
    assert own["prlhf"] == {"user": "newcomer", "user_known": True, "version": "v2"}, (own, server.onboarding.fitted)
    table = load_run(run_dir)  # committed: the run's current version holds the new user
    assert "newcomer" in table.registry and json.loads((run_dir / "run.json").read_text())["version"] == "v3"


def test_a_fit_that_loses_the_race_to_another_writer_is_fitted_again(policy_dir, tmp_path, monkeypatch):
    """Another writer (a second server on the run, `prlhf users`) commits while a new user is being fitted: the
    fit is not committed over that change but done again on the moved run, with no further comparison needed."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(policy_dir, run_dir)
    store = ComparisonStore(f"sqlite:///{tmp_path}/feedback.db")
    server = PersonalizedServer(load_run(run_dir), "tiny", Limits(max_prompt_tokens=64, max_tokens=16),
                                reload_interval=None, store=store, onboard_after=3)
    other = load_run(run_dir).registry.user_ids[0]
    commit, bases = server.onboarding._commit, []

    def racing_commit(table, based_on, users):
        bases.append(based_on)
        if len(bases) == 1:  # the other writer gets in first
            assert main(["users", "delete", "--run", str(run_dir), "--user", other]) == 0
        return commit(table, based_on, users)

    monkeypatch.setattr(server.onboarding, "_commit", racing_commit)
    records = load_records(policy_dir.parent / "data" / "test.jsonl")
    mine = [r for r in records if r.user_id == records[0].user_id][:3]
    with running(server) as url:
        http = httpx.Client(base_url=url)
        for r in mine:
            http.post("/v1/feedback", json={"user": "newcomer", "prompt": r.prompt, "chosen": r.chosen,
                                            "rejected": r.rejected}).raise_for_status()
        deadline = time.monotonic() + 60
        while server.onboarding.status("newcomer") != "active":
            assert time.monotonic() < deadline, "not onboarded within 60 s after losing the race"
            time.sleep(0.1)
    store.close()
    assert bases == ["v1", "v2"]  # fitted on v1, lost to the delete (v2), fitted again on v2
    final = load_run(run_dir)
    assert "newcomer" in final.registry and other not in final.registry  # neither change undoes the other
    assert json.loads((run_dir / "run.json").read_text())["version"] == "v3"


def test_tokens_act_as_their_user_only_and_admin_calls_need_the_key(policy_dir, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(policy_dir, run_dir)
    store = ComparisonStore(f"sqlite:///{tmp_path}/feedback.db")
    server = PersonalizedServer(load_run(run_dir), "tiny", Limits(max_prompt_tokens=64, max_tokens=16),
                                reload_interval=None, store=store, api_keys=["sk-admin"], onboard_after=2)
    admin = {"Authorization": "Bearer sk-admin"}
    with running(server) as url:
        http = httpx.Client(base_url=url)
        assert http.post("/v1/admin/invite", json={"user": "ann"}).status_code == 401  # no key
        ann = http.post("/v1/admin/invite", json={"user": "ann"}, headers=admin).json()
        bob = http.post("/v1/admin/invite", json={"user": "bob"}, headers=admin).json()
        as_ann = {"Authorization": f"Bearer {ann['token']}"}
        assert ann["link"] == f"/ui?token={ann['token']}" and "Which answer" in http.get(ann["link"]).text
        # a token acts as its own user: the body's user is filled in, another user's is refused
        pair = http.post("/v1/completions", headers=as_ann, json={"model": "tiny", "prompt": "Summarize: x",
                                                                   "max_tokens": 6, "compare": True}).json()
        assert pair["prlhf"]["user"] == "ann" and pair["prlhf"]["shown_left"] in ("a", "b")
        for method, path, body in [("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "user": "bob"}),
                                   ("POST", "/v1/feedback", {"user": "bob", "prompt": "p", "chosen": "c",
                                                             "rejected": "r"}),
                                   ("GET", "/v1/feedback?user=bob", None), ("GET", "/v1/me?user=bob", None),
                                   ("POST", "/v1/admin/invite", {"user": "eve"}),
                                   ("DELETE", "/v1/admin/users/bob", None)]:
            response = http.request(method, path, json=body, headers=as_ann)
            assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden", (path, body)
        with_bobs = {"Authorization": f"Bearer {bob['token']}"}  # bob cannot decide ann's pair
        decided = http.post("/v1/feedback", headers=with_bobs,
                            json={"comparison_id": pair["prlhf"]["comparison_id"], "choice": "a"})
        assert decided.status_code == 404
        assert http.post("/v1/feedback", headers=as_ann,
                         json={"comparison_id": pair["prlhf"]["comparison_id"], "choice": "a"}).status_code == 200
        http.post("/v1/feedback", headers=as_ann, json={"prompt": "Write.", "chosen": "Dear all", "rejected": "yo"})
        assert http.get("/v1/me", headers=as_ann).json()["comparisons"] == 2
        deadline = time.monotonic() + 60
        while "ann" not in server.users.snapshot().registry:  # onboarded after 2
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert http.get("/v1/feedback", headers={"Authorization": "Bearer wrong"}).status_code == 401
        # forgetting ann: her row, comparisons and token go; the export keeps none of hers
        gone = http.delete("/v1/admin/users/ann?export=true", headers=admin).json()
        assert gone["table_row_deleted"] is True and gone["comparisons_deleted"] == 2 and len(gone["export"]) == 2
        assert http.get("/v1/me", headers=as_ann).status_code == 401  # her token no longer exists
        after = http.post("/v1/completions", headers=admin, json={"model": "tiny", "prompt": "x", "user": "ann"})
        assert after.json()["prlhf"]["user_known"] is False
    store.close()
    db = sqlite3.connect(tmp_path / "feedback.db")
    assert db.execute("SELECT COUNT(*) FROM comparisons WHERE user_id = 'ann'").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM tokens WHERE user_id = 'ann'").fetchone()[0] == 0
    assert "ann" not in load_run(run_dir).registry
    assert main(["data", "export", "--db", str(tmp_path / "feedback.db"), "--out", str(tmp_path / "x.jsonl")]) == 0
    assert "ann" not in (tmp_path / "x.jsonl").read_text()


def test_invite_command_prints_a_working_token(tmp_path, capsys):
    db = f"sqlite:///{tmp_path}/feedback.db"
    assert main(["serve", "invite", "carol", "--db", db]) == 0
    token = capsys.readouterr().out.split("(shown once): ")[1].split()[0]
    store = ComparisonStore(db)
    assert store.user_of_token(token) == "carol" and store.user_of_token(token + "x") is None
    assert main(["serve", "invite", "--db", db]) == 2 and main(["serve", "invite", "dave"]) == 2
