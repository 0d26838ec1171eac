"""`prlhf serve` through the real `openai` client on 127.0.0.1: completions, chat, streaming, n > 1, the user field
(a known user's soft tokens, the generic user for anyone else), batching across users, best-of-n with a reward
model, limits, bad requests, API keys, and live reload of the user table."""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from prlhf.cli.main import main
from prlhf.evaluate.generation import generate_texts
from prlhf.evaluate.scoring import score_responses
from prlhf.runs.directory import load_run
from prlhf.serve.app import Limits, PersonalizedServer
from serve_helpers import running, train_tiny_runs

USERS = ["user_01", "user_02", "user_03"]
PROMPTS = ["Summarize: the quiet cat carried a map.", "hello world", "The cat carried"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return train_tiny_runs(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def policy(runs):
    return load_run(runs["policy"])


def make_server(run, **kwargs) -> PersonalizedServer:
    kwargs.setdefault("limits", Limits(max_prompt_tokens=64, max_tokens=32, request_timeout=30))
    return PersonalizedServer(run, "tiny", reload_interval=None, **kwargs)


def client(url: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)


def greedy(c, prompt: str, user: str | None, max_tokens: int = 16) -> str:
    extra = {"user": user} if user is not None else {}
    return c.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, **extra)


@pytest.fixture(scope="module")
def served(policy):
    with running(make_server(policy)) as url:
        yield url


def test_models_completion_chat_stream_and_n(served):
    c = client(served)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    done = greedy(c, PROMPTS[0], "user_01")
    assert done.object == "text_completion" and done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.completion_tokens >= 1 and done.usage.prompt_tokens > 0
    assert done.model_extra["prlhf"] == {"user": "user_01", "user_known": True, "version": "v1"}

    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}], n=3,
                                     max_tokens=8, temperature=1.0, seed=7, user="user_02")
    assert [ch.index for ch in chat.choices] == [0, 1, 2] and chat.object == "chat.completion"
    assert all(ch.message.role == "assistant" for ch in chat.choices)
    again = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}], n=3,
                                      max_tokens=8, temperature=1.0, seed=7, user="user_02")
    assert [ch.message.content for ch in again.choices] == [ch.message.content for ch in chat.choices]  # seed

    # streaming gives the same text as the same request answered whole, and usage at the end when asked
    chunks = list(c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0,
                                       user="user_01", stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == done.choices[0].text
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == done.choices[0].finish_reason
    whole = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=12,
                                      temperature=0, user="user_03")
    parts = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=12, temperature=0, user="user_03", stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == whole.choices[0].message.content


def test_temperature_zero_equals_prlhf_generate_and_unknown_users_get_the_generic_user(served, policy, runs,
                                                                                        capsys):
    c = client(served)
    texts = {u: [greedy(c, p, u).choices[0].text for p in PROMPTS] for u in USERS + ["stranger", None]}
    for user in USERS + ["stranger"]:
        assert [t.strip() for t in texts[user]] == generate_texts(policy, PROMPTS, [user] * 3, max_new_tokens=16)
    assert texts["stranger"] == texts[None]  # an unknown id and no id: both the generic user
    assert any(texts[u] != texts[None] for u in USERS)  # and the users' own tokens do change the answer
    assert main(["generate", "--run", str(runs["policy"]), "--user", "user_02", "--prompt", PROMPTS[1],
                 "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out.strip() == texts["user_02"][1].strip()
    unknown = greedy(c, PROMPTS[0], "stranger")
    assert unknown.model_extra["prlhf"]["user_known"] is False
    metrics = httpx.get(f"{served}/metrics").text
    assert "prlhf_unknown_user_requests_total" in metrics


def test_concurrent_users_are_decoded_in_one_batch_each_with_its_own_tokens(policy):
    server = make_server(policy, batch_wait=0.5)  # wide enough that all requests join one batch
    users = USERS + ["stranger", "user_02", "user_01"]
    prompts = [PROMPTS[i % 3] for i in range(len(users))]
    with running(server) as url:
        c = client(url)
        with ThreadPoolExecutor(len(users)) as pool:
            together = list(pool.map(lambda up: greedy(c, up[1], up[0]).choices[0].text, zip(users, prompts)))
        alone = [greedy(c, p, u).choices[0].text for u, p in zip(users, prompts)]
        sizes = _histogram(httpx.get(f"{url}/metrics").text, "prlhf_batch_size")
    assert together == alone
    assert sizes["le=4.0"] < sizes["count"]  # decoding steps with all 6 rows (alone: every step had 1)


def _histogram(text: str, name: str) -> dict:
    """{"count": ..., "sum": ..., "le=B": cumulative count} of a Prometheus histogram."""
    values = {}
    for line in text.splitlines():
        for part in ("count", "sum"):
            if line.startswith(f"{name}_{part} "):
                values[part] = float(line.split()[1])
        if line.startswith(f"{name}_bucket{{le="):
            values["le=" + line.split('"')[1]] = float(line.split()[1])
    return values


def test_best_of_is_reranked_by_the_users_reward_model(policy, runs):
    reward = load_run(runs["reward"])
    with running(make_server(policy, reward=reward)) as url:
        c = client(url)
        out = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, n=2, user="user_01", seed=3,
                                   extra_body={"best_of": 5})
        chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                         user="user_02", seed=3, extra_body={"best_of": 3})
    rewards = out.model_extra["prlhf"]["rewards"]
    assert len(out.choices) == 2 and rewards == sorted(rewards, reverse=True)
    texts = [ch.text for ch in out.choices]
    assert score_responses(reward, ["user_01"] * 2, [PROMPTS[0]] * 2, texts) == pytest.approx(rewards, abs=1e-5)
    assert len(chat.choices) == 1 and len(chat.model_extra["prlhf"]["rewards"]) == 1
    # without a reward model, best_of is refused
    with running(make_server(policy)) as url, pytest.raises(openai.BadRequestError, match="reward-run"):
        client(url).completions.create(model="tiny", prompt="x", extra_body={"best_of": 2})


BAD = [  # (body, status, param or message fragment)
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"prompt": "hi"}, 400, "model"),
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "gpt-9", "prompt": "hi"}, 404, "model"),
    ({"model": "tiny", "prompt": 7}, 400, "prompt"),
    ({"model": "tiny", "prompt": []}, 400, "prompt"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 33}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ({"model": "tiny", "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": "hi", "n": 0}, 400, "n"),
    ({"model": "tiny", "prompt": "hi", "n": True}, 400, "n"),
    ({"model": "tiny", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "tiny", "prompt": "hi", "seed": 1.5}, 400, "seed"),
    ({"model": "tiny", "prompt": "hi", "user": 12}, 400, "user"),
    ({"model": "tiny", "prompt": "hi", "logprobs": 3}, 400, "logprobs"),
    ({"model": "tiny", "prompt": "word " * 200}, 400, "prompt"),
    ({"model": "tiny", "prompt": "hi", "stream": "yes"}, 400, "stream"),
]
BAD_CHAT = [
    ({"model": "tiny"}, 400, "messages"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": "hello"}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"model": "tiny", "messages": [{"role": "user"}]}, 400, "content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi " * 200}]}, 400, "messages"),
]


def test_bad_requests_get_openai_error_objects_and_the_server_keeps_answering(served):
    c = client(served)
    expected = greedy(c, PROMPTS[2], "user_03").choices[0].text
    cases = [("/v1/completions", *case) for case in BAD] + [("/v1/chat/completions", *case) for case in BAD_CHAT]
    cases += [("/v1/nothing", {"model": "tiny"}, 404, "no such route"), ("/v1/models/gpt-9", None, 404, "model")]
    with httpx.Client(base_url=served) as http:
        for _ in range(3):  # a bounded loop of bad requests, each followed by a good one
            for path, body, status, fragment in cases:
                if body is None:
                    response = http.get(path)
                else:
                    content = body if isinstance(body, bytes) else json.dumps(body).encode()
                    response = http.post(path, content=content, headers={"content-type": "application/json"})
                assert response.status_code == status, (path, body, response.text)
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"]
                assert fragment in (error["param"] or "") + error["message"], (body, error)
                assert "Traceback" not in response.text
                assert greedy(c, PROMPTS[2], "user_03").choices[0].text == expected
    # the same through the client: its own exception classes
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-9", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="cap"):
        c.completions.create(model="tiny", prompt="hi", max_tokens=1000)


class Gate:
    """Holds the engine's worker inside decode until released (to fill the queue deterministically)."""

    def __init__(self, engine):
        self.entered, self.release = threading.Event(), threading.Event()
        original = engine.decode

        def decode(rows):
            self.entered.set()
            self.release.wait(30)
            return original(rows)

        engine.decode = decode


def test_a_full_queue_gets_429_and_a_slow_answer_503_never_a_hang(policy):
    server = make_server(policy, max_batch=1, max_queue=1, batch_wait=0.0,
                         limits=Limits(max_prompt_tokens=64, max_tokens=32, request_timeout=1.0))
    gate = Gate(server.engine)
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 4}
    with running(server) as url, httpx.Client(base_url=url, timeout=20) as http, ThreadPoolExecutor(2) as pool:
        first = pool.submit(http.post, "/v1/completions", json=body)
        assert gate.entered.wait(10)  # the worker holds the first request
        second = pool.submit(http.post, "/v1/completions", json=body)
        for _ in range(200):  # until the second one waits in the queue
            if server.engine.queue_depth == 1:
                break
            threading.Event().wait(0.01)
        third = http.post("/v1/completions", json=body)
        assert third.status_code == 429 and third.json()["error"]["code"] == "rate_limit_exceeded"
        timed_out = first.result()
        assert timed_out.status_code == 503 and timed_out.json()["error"]["code"] == "timeout"
        gate.release.set()
        assert second.result().status_code in (200, 503)
        assert http.post("/v1/completions", json=body).status_code == 200  # and it recovers
        assert 'prlhf_rejected_requests_total{reason="queue_full"} 1.0' in http.get("/metrics").text


def test_api_key_is_required_when_configured(policy):
    with running(make_server(policy, api_keys=["sk-right", "sk-other"])) as url:
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="sk-wrong").models.list()
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200  # for load balancers
        assert greedy(client(url, api_key="sk-other"), "hi", "user_01").choices[0].text is not None
        assert [m.id for m in client(url, api_key="sk-right").models.list().data] == ["tiny"]


def test_a_new_user_table_version_is_served_without_restart_and_in_flight_requests_keep_theirs(runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs["policy"], run_dir)
    run = load_run(run_dir)
    server = make_server(run)
    engine, armed, hold, held = server.engine, threading.Event(), threading.Event(), threading.Event()
    original = engine._advance

    def advance(row, token):  # once armed, the request of user_02 pauses after its first token
        if armed.is_set() and row.user_id == "user_02" and len(row.tokens) == 1 and not hold.is_set():
            hold.set()
            held.wait(30)
        return original(row, token)

    engine._advance = advance
    with running(server) as url:
        c = client(url)
        answers = {p: {u: greedy(c, p, u).choices[0].text for u in ("user_02", "stranger")} for p in PROMPTS}
        prompt = next(p for p in PROMPTS if answers[p]["user_02"] != answers[p]["stranger"])
        before = answers[prompt]
        armed.set()
        with ThreadPoolExecutor(1) as pool:
            streaming = pool.submit(lambda: list(c.completions.create(
                model="tiny", prompt=prompt, max_tokens=16, temperature=0, user="user_02", stream=True)))
            assert hold.wait(10)
            assert main(["users", "delete", "--run", str(run_dir), "--user", "user_02"]) == 0
            assert server.users.reload_if_changed()
            held.set()
            chunks = streaming.result()
        assert "".join(ch.choices[0].text for ch in chunks) == before["user_02"]  # finished on v1
        assert {ch.model_extra["prlhf"]["version"] for ch in chunks} == {"v1"}
        after = greedy(c, prompt, "user_02")
        assert after.model_extra["prlhf"] == {"user": "user_02", "user_known": False, "version": "v2"}
        assert after.choices[0].text == before["stranger"]
        assert httpx.get(f"{url}/health").json()["version"] == "v2"


def test_prlhf_serve_command_with_an_api_key_file(runs, tmp_path):
    """The CLI as users start it: a subprocess on a free port, key required, stopped with SIGTERM."""
    import subprocess
    import sys
    import time

    from serve_helpers import free_port

    keys = tmp_path / "keys"
    keys.write_text("# one key per line\nsk-test-123\n")
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prlhf", "serve", "--run", str(runs["policy"]), "--port",
                                 str(port), "--api-key-file", str(keys), "--threads", "1", "--access-log"],
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            assert httpx.post(f"{url}/v1/completions", json={"model": "policy", "prompt": "hi"}).status_code == 401
            answer = client(url, api_key="sk-test-123").completions.create(model="policy", prompt="hi", max_tokens=4,
                                                                           user="user_01")
            assert answer.model_extra["prlhf"]["user_known"] is True
        finally:
            proc.terminate()
            code = proc.wait(30)
    text = log.read_text()
    assert code == 0 and "sk-test-123" not in text and "127.0.0.1" in text


def test_serve_refuses_bad_setups_in_one_line(runs, tmp_path, capsys):
    empty = tmp_path / "keys"
    empty.write_text("\n# nothing\n")
    cases = [(["--run", str(runs["reward"])], "reward-model run"),
             (["--run", str(runs["policy"]), "--api-key-file", str(empty)], "holds no key"),
             (["--run", str(runs["policy"]), "--api-key-file", str(tmp_path / "missing")], "cannot read"),
             (["--run", str(runs["policy"]), "--max-batch-size", "0"], "--max-batch-size"),
             (["--run", str(runs["policy"]), "--onboard-steps", "0"], "--onboard-steps"),
             (["--run", str(tmp_path / "nothing")], "nothing")]
    for argv, fragment in cases:
        assert main(["serve", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("prlhf: error: ") and err.count("\n") == 1 and fragment in err, err


def test_a_stream_that_runs_past_the_timeout_ends_with_an_error_event(policy):
    server = make_server(policy, limits=Limits(max_prompt_tokens=64, max_tokens=32, request_timeout=0.5))
    gate = Gate(server.engine)
    with running(server) as url:
        with httpx.stream("POST", f"{url}/v1/completions", timeout=20,
                          json={"model": "tiny", "prompt": "hi", "max_tokens": 4, "stream": True}) as response:
            body = response.read().decode()
        gate.release.set()
        assert response.status_code == 200  # the status line went out before the timeout
        (event,) = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]
        assert event["error"]["code"] == "timeout"
        with pytest.raises(openai.APIError, match="no answer within"):  # the client raises it as an error
            gate.release.clear()
            list(client(url).completions.create(model="tiny", prompt="hi", max_tokens=4, stream=True))
        gate.release.set()
