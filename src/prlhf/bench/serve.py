"""`prlhf bench serve`: what `prlhf serve` sustains, in one run.

1. Throughput: 1, 8 and 32 concurrent clients, each a distinct known user, each sending requests back to back
   (max_tokens decoded to the end: ignore_eos). Aggregate tokens/s and p50/p95 latency per request.
   Compared, on the same 32 prompts and token count: plain batched `generate` on the same LM without user tokens
   (one call, in this process), and the 32 requests served one after another (the 1-client run).
2. Many users: one request's median latency and the server's resident memory with a low-rank user table of
   1,000,000 users, against the same run with 10 users.

The server runs as `prlhf serve` in its own process (what users run); clients are threads here, on keep-alive
HTTP connections. Timings on a shared machine are noisy: read the ratios.
"""

from __future__ import annotations

import http.client
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from prlhf.bench.machine import machine_summary
from prlhf.safe_io import atomic_write_json, atomic_write_text, results_folder
from prlhf.serve.background import free_port

OUTPUTS = ("serve.json", "serve.md")
CLIENTS = (1, 8, 32)


def _sizes(model: str, quick: bool) -> dict:
    tiny = model == "tiny"
    return {"max_tokens": 64 if tiny else 32, "rounds": 2 if quick else 4, "latency_requests": 10 if quick else 30, "latency_tokens": 16, "repeats": 3}


# ------------------------------------------------------------------------------------------------ runs


def train_runs(work: Path, model: str, threads: int, seed: int) -> dict[str, Path]:
    """A policy run with 40 users (individual, the default) and a low-rank one with 10; one step each: the speed
    of serving does not depend on what the weights learned."""
    from prlhf.config import TrainConfig
    from prlhf.data.tasks import build_length_task
    from prlhf.train.loop import train

    task = build_length_task(n_seen_users=40, n_unseen_users=0, n_prompts=120, train_pairs_per_user=2,
                             test_pairs_per_user=1, seed=seed)
    paths = task.write(work / "data")
    common = dict(data=str(paths["train"]), model=model, sft_steps=0, max_steps=1, batch_size=4, threads=threads,
                  seed=seed)
    runs = {"policy": work / "policy", "lowrank": work / "lowrank"}
    train(TrainConfig(out=str(runs["policy"]), **common), show_progress=False)
    ten = build_length_task(n_seen_users=10, n_unseen_users=0, n_prompts=60, train_pairs_per_user=2,
                            test_pairs_per_user=1, seed=seed)
    ten_paths = ten.write(work / "data10")
    train(TrainConfig(out=str(runs["lowrank"]), user_model="lowrank",
                      **{**common, "data": str(ten_paths["train"])}), show_progress=False)
    return runs | {"prompts": [r.prompt for r in task.test]}


def grow_user_table(source: Path, out: Path, n_users: int, seed: int) -> int:
    """A copy of the low-rank run whose table holds `n_users` users (random rows after the trained ones);
    returns the bytes of the table files (user_model.safetensors + users.json)."""
    from prlhf.runs.directory import current_version
    from prlhf.runs.users import extend_rows, read_user_table, write_user_table

    shutil.copytree(source, out)
    table = read_user_table(out)
    extra = n_users - len(table.registry)
    g = torch.Generator().manual_seed(seed)
    grown = extend_rows(table, (f"bulk-{i:07d}" for i in range(extra)),
                        torch.randn(extra, table.rows.shape[1], generator=g))
    write_user_table(out, grown, written_by="bench serve")
    return table_bytes(current_version(out))


def table_bytes(version: Path) -> int:
    return sum((version / name).stat().st_size for name in ("user_model.safetensors", "users.json"))


# ------------------------------------------------------------------------------------------------ server


MODEL_NAME = "served"


class ServerProcess:
    """`prlhf serve` on a free port, stopped on exit."""

    def __init__(self, run: Path, threads: int, log: Path, max_tokens: int, extra: tuple[str, ...] = ()):
        self.port = free_port()
        cmd = [sys.executable, "-m", "prlhf", "serve", "--run", str(run), "--port", str(self.port),
               "--model-name", MODEL_NAME,
               "--threads", str(threads), "--max-batch-size", "32", "--max-tokens-cap", str(max_tokens),
               "--max-prompt-tokens", "512", "--log-level", "warning", "--reload-interval", "0", *extra]
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self):
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prlhf serve exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with Client(self.port) as http:
                    if http.request("GET", "/health")[0] == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("prlhf serve did not come up within 300 s")

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0]) / 1024

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Client:
    """One keep-alive HTTP connection to the server (the standard library's: light, and no extra dependency)."""

    def __init__(self, port: int):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, str]:
        data = json.dumps(body).encode() if body is not None else None
        self.connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = self.connection.getresponse()
        return response.status, response.read().decode()

    def post(self, path: str, body: dict) -> dict:
        """The JSON answer of a POST that must succeed (anything but a 200 raises, with the server's words)."""
        status, text = self.request("POST", path, body)
        if status != 200:
            raise RuntimeError(f"{path}: the server answered {status}: {text[:200]}")
        return json.loads(text)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.connection.close()


def completion(client: Client, prompt: str, user: str, max_tokens: int) -> tuple[float, int]:
    """(seconds, completion tokens) of one request."""
    started = time.perf_counter()
    answer = client.post("/v1/completions", {"model": MODEL_NAME, "prompt": prompt, "user": user,
                                             "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    return time.perf_counter() - started, answer["usage"]["completion_tokens"]


def clients_run(port: int, prompts: list[str], users: list[str], clients: int, rounds: int, max_tokens: int) -> dict:
    """`clients` threads sending back to back: client i sends prompts[j] as users[j] for its share of j, `rounds`
    times (one client sends them all, in order)."""
    def client(i: int) -> list[tuple[float, int]]:
        mine = range(i, len(prompts), clients)
        with Client(port) as http:
            return [completion(http, prompts[j], users[j], max_tokens) for _ in range(rounds) for j in mine]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - started
    latencies = sorted(s for s, _ in results)
    tokens = sum(t for _, t in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "p50_s": _quantile(latencies, 0.5), "p95_s": _quantile(latencies, 0.95)}


def _quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


def plain_generate(run_dir: Path, prompts: list[str], max_tokens: int, repeats: int, threads: int) -> dict:
    """tokens/s of one batched HF `generate` call on the run's LM (LoRA on) without user tokens: the ceiling a
    personalized server is held to."""
    from prlhf.data.tokenize import adds_bos, encode_prompt
    from prlhf.runs.directory import load_run

    torch.set_num_threads(threads)
    run = load_run(run_dir)
    tok = run.tokenizer
    ids = [encode_prompt(tok, p, adds_bos(tok)) for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in ids])  # left-padded
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first call warms up
            started = time.perf_counter()
            out = run.model.lm.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_tokens,
                                        min_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                        eos_token_id=tok.eos_token_id)
            times.append(time.perf_counter() - started)
    tokens = (out.shape[1] - width) * len(prompts)
    seconds = statistics.median(times[1:])
    return {"batch": len(prompts), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


# ------------------------------------------------------------------------------------------------ the bench


def run_serve_bench(out: Path, model: str = "tiny", quick: bool = False, threads: int = 2, seed: int = 0,
                    many_users: int = 1_000_000) -> dict:
    sizes = {**_sizes(model, quick), "many_users": many_users}
    with results_folder(out, "serve", OUTPUTS), tempfile.TemporaryDirectory(prefix="prlhf_serve_") as scratch:
        work = Path(scratch)
        runs = train_runs(work, model, threads, seed)
        prompts = runs["prompts"][:max(CLIENTS)]
        users = [f"user_{i + 1:02d}" for i in range(max(CLIENTS))]
        max_tokens = sizes["max_tokens"]
        result = {"model": model, "quick": quick, "threads": threads, "max_tokens": max_tokens,
                  "machine": machine_summary(), "throughput": [], "many_users": {}}
        result["plain_generate"] = plain_generate(runs["policy"], prompts, max_tokens, sizes["repeats"], threads)
        with ServerProcess(runs["policy"], threads, work / "serve.log", max_tokens) as server:
            clients_run(server.port, prompts, users, max(CLIENTS), 1, max_tokens)  # warm-up
            for clients in CLIENTS:
                if clients == 1:  # the 32 requests of the 32-client run, one after another
                    row = clients_run(server.port, prompts, users, 1, 1, max_tokens)
                else:
                    row = clients_run(server.port, prompts[:clients], users[:clients], clients, sizes["rounds"],
                                      max_tokens)
                result["throughput"].append(row)
        result["many_users"] = compare_table_sizes(work, runs["lowrank"], sizes, threads, seed)
        top = result["throughput"][-1]["tokens_per_s"]
        result["ratios"] = {"vs_plain_generate": top / result["plain_generate"]["tokens_per_s"],
                            "vs_one_after_another": top / result["throughput"][0]["tokens_per_s"]}
        atomic_write_json(out / "serve.json", result)
        atomic_write_text(out / "serve.md", report(result))
    print(report(result), end="")
    return result


def compare_table_sizes(work: Path, lowrank: Path, sizes: dict, threads: int, seed: int) -> dict:
    """Median single-request latency and server RSS: 10 users vs `many_users` users in the low-rank table. Both
    servers answer the same pattern (10 users in turn, drawn from their table) with the prefix cache off, so every
    request computes its user's soft tokens: what differs is the size of the table alone."""
    from prlhf.runs.directory import current_version

    big = work / "lowrank_many"
    n = sizes["many_users"]
    rows = {"10": {"users": 10, "table_bytes": table_bytes(current_version(lowrank))}}
    rows[str(n)] = {"users": n, "table_bytes": grow_user_table(lowrank, big, n, seed)}
    g = torch.Generator().manual_seed(seed)
    bulk = [f"bulk-{int(i):07d}" for i in torch.randperm(n - 10, generator=g)[:10]]
    for key, run, ids in (("10", lowrank, [f"user_{i + 1:02d}" for i in range(10)]), (str(n), big, bulk)):
        with ServerProcess(run, threads, work / f"serve_{key}.log", sizes["latency_tokens"],
                           ("--prefix-cache-mb", "0")) as server:
            with Client(server.port) as http:
                for user in ids[:3]:
                    completion(http, "warm up", user, sizes["latency_tokens"])
                times = [completion(http, "Summarize: the day at the lake.", ids[i % len(ids)],
                                    sizes["latency_tokens"])[0] for i in range(sizes["latency_requests"])]
                held = metric(http.request("GET", "/metrics")[1], "prlhf_user_table_bytes")
            rows[key].update(median_latency_s=statistics.median(times), rss_mb=server.rss_mb(),
                             table_memory_bytes=held)
    small, large = rows["10"], rows[str(n)]
    return {"rows": rows, "latency_ratio": large["median_latency_s"] / small["median_latency_s"],
            "rss_growth_mb": large["rss_mb"] - small["rss_mb"],
            "table_growth_mb": (large["table_bytes"] - small["table_bytes"]) / 2 ** 20,
            "table_memory_growth_mb": (large["table_memory_bytes"] - small["table_memory_bytes"]) / 2 ** 20}


def metric(text: str, name: str) -> float:
    """One sample's value from Prometheus text."""
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def report(result: dict) -> str:
    lines = [f"# `prlhf serve` throughput ({result['model']}, {result['max_tokens']} tokens per request, "
             f"{result['threads']} threads)", "", f"Machine: {result['machine']}", "",
             "| clients (distinct users) | requests | tokens/s | p50 latency (s) | p95 latency (s) |",
             "|---|---|---|---|---|"]
    for row in result["throughput"]:
        lines.append(f"| {row['clients']} | {row['requests']} | {row['tokens_per_s']:.0f} | {row['p50_s']:.3f} | "
                     f"{row['p95_s']:.3f} |")
    plain, ratios = result["plain_generate"], result["ratios"]
    lines += ["", f"Plain batched `generate` (batch {plain['batch']}, no user tokens, one call): "
                  f"{plain['tokens_per_s']:.0f} tokens/s.",
              f"32 clients: **{ratios['vs_plain_generate']:.2f}x** plain batched generate (target >= 0.8x), "
              f"**{ratios['vs_one_after_another']:.1f}x** the same 32 requests one after another (target >= 5x).",
              ""]
    many = result["many_users"]
    if many:
        lines += ["| users in the low-rank table | table files (MB) | table in memory (MB) | server RSS (MB) | "
                  "median latency (s) |", "|---|---|---|---|---|"]
        for row in many["rows"].values():
            lines.append(f"| {row['users']:,} | {row['table_bytes'] / 2 ** 20:.1f} | "
                         f"{row['table_memory_bytes'] / 2 ** 20:.1f} | {row['rss_mb']:.0f} | "
                         f"{row['median_latency_s']:.4f} |")
        lines += ["", f"Latency ratio {many['latency_ratio']:.2f}x (target <= 1.1x). RSS grew "
                      f"{many['rss_growth_mb']:.0f} MB; the table grew {many['table_memory_growth_mb']:.0f} MB in "
                      f"memory and {many['table_growth_mb']:.0f} MB on disk (target: RSS grows by no more than the "
                      "table).", ""]
    return "\n".join(lines) + "\n"
