"""`prlhf bench speed`: TRL's DPOTrainer vs prlhf on the same model, data and batch size, in one run.

Throughput methods run one at a time, each in its own subprocess, so each peak RSS is its own. Step times are
medians over the steady-state steps (the first steps and the last, which saves, are dropped); figures are medians
over repeats. Timings on a shared machine are noisy: read the ratios.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from prlhf.bench.machine import machine_summary
from prlhf.safe_io import atomic_write_text, results_folder

WARMUP_STEPS = 3
METHODS = ("trl_dpo", "prlhf_dpo", "prlhf_pdpo_a1", "prlhf_pdpo_a05")

# what the benchmark writes into --out (anything else there is refused: prlhf.safe_io.results_folder)
OUTPUTS = ("speed.json", "speed.md")


def _sizes(quick: bool) -> dict:
    return {"pairs_per_user": 16 if quick else 48, "batch_size": 8, "steps": 12 if quick else 30,
            "repeats": 1 if quick else 3, "users": (10, 10_000, 100_000), "gen_tokens": 48 if quick else 96}


def prepare(work: Path, quick: bool, seed: int = 0) -> dict:
    """Data (the length task) and one tiny base model + tokenizer on disk, shared by every method."""
    from prlhf.data.tasks import build_length_task
    from prlhf.model.tiny import build_tiny_model, build_tiny_tokenizer
    from prlhf.train.setup import record_texts

    sizes = _sizes(quick)
    task = build_length_task(train_pairs_per_user=sizes["pairs_per_user"], test_pairs_per_user=4, seed=seed)
    paths = task.write(work / "data")
    tok = build_tiny_tokenizer(record_texts(task.train))
    model = build_tiny_model(tok, seed=seed)
    model.save_pretrained(work / "base")
    tok.save_pretrained(work / "base")
    return {"train": str(paths["train"]), "base": str(work / "base"), "n_pairs": len(task.train), **sizes}


# ---- workers (one process each) -----------------------------------------------------------------------------

def _median_step(times: list[float]) -> float:
    steady = times[WARMUP_STEPS:-1] or times
    return statistics.median(steady)


def worker_trl(setup: dict, out: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in Path(setup["train"]).read_text().splitlines()]
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(setup["base"])
    tok = AutoTokenizer.from_pretrained(setup["base"])
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    args = DPOConfig(output_dir=str(out / "trl"), per_device_train_batch_size=setup["batch_size"],
                     max_steps=setup["steps"], learning_rate=1e-3, beta=0.5, logging_steps=10 ** 6,
                     save_strategy="no", report_to="none", max_length=512, seed=0, use_cpu=True,
                     dataloader_num_workers=0)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=lora,
                         callbacks=[Stamp()])
    start = time.perf_counter()
    trainer.train()
    steps = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
    return {"step_s": _median_step(steps), "wall_s": time.perf_counter() - start}


def worker_prlhf(setup: dict, out: Path, user_model: str, alpha: float) -> dict:
    from prlhf.config import TrainConfig
    from prlhf.train.loop import train

    run = out / "run"
    start = time.perf_counter()
    train(TrainConfig(data=setup["train"], out=str(run), model=setup["base"], user_model=user_model, alpha=alpha,
                      batch_size=setup["batch_size"], max_steps=setup["steps"], sft_steps=0, lr=1e-3, beta=0.5,
                      log_steps=1, save_steps=setup["steps"], seed=0), show_progress=False)
    elapsed = [json.loads(line)["elapsed_s"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [b - a for a, b in zip([0.0] + elapsed[:-1], elapsed)]
    return {"step_s": _median_step(steps), "wall_s": time.perf_counter() - start}


def run_worker(method: str, setup_path: str, out: str) -> None:
    torch.set_num_threads(int(os.environ.get("PRLHF_BENCH_THREADS", "2")))
    setup, out_dir = json.loads(Path(setup_path).read_text()), Path(out)
    if method == "trl_dpo":
        result = worker_trl(setup, out_dir)
    else:
        kind, alpha = {"prlhf_dpo": ("uniform", 1.0), "prlhf_pdpo_a1": ("individual", 1.0),
                       "prlhf_pdpo_a05": ("individual", 0.5)}[method]
        result = worker_prlhf(setup, out_dir, kind, alpha)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["pairs_per_s"] = setup["batch_size"] / result["step_s"]
    print("RESULT " + json.dumps(result))


def measure_method(method: str, setup_path: Path, work: Path, threads: int) -> dict:
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        env = {**os.environ, "PRLHF_BENCH_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run([sys.executable, "-m", "prlhf.bench.speed", "--worker", method, str(setup_path), tmp],
                              capture_output=True, text=True, env=env)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


# ---- in-process measurements ----------------------------------------------------------------------------------

def step_time_by_users(setup: dict, users: tuple[int, ...], sparse: bool, repeats: int = 12) -> dict[str, float]:
    """Median optimizer-step time of P-DPO (alpha 0.5) on one fixed batch whose users are among the first 10,
    with a user table of N rows."""
    from prlhf.data.collate import collate_pairs
    from prlhf.data.loading import load_records
    from prlhf.data.tokenize import encode_records
    from prlhf.losses import p_dpo_loss
    from prlhf.model.loading import add_lora, load_base
    from prlhf.model.personalized import PersonalizedLM
    from prlhf.train.loop import policy_logps
    from prlhf.train.optim import RowSparseAdamW, clip_grad_norm_
    from prlhf.users.models import build_user_model

    base, tok = load_base(setup["base"])
    pairs = encode_records(load_records(setup["train"])[:setup["batch_size"]], tok)
    result = {}
    for n in users:
        torch.manual_seed(0)
        model_base, _ = load_base(setup["base"])
        um = build_user_model("individual", n, 10, model_base.config.hidden_size, init="uniform", sparse=sparse)
        model = PersonalizedLM(add_lora(model_base), um, prefix_len=1)
        opt = RowSparseAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        batch = collate_pairs(pairs, torch.arange(len(pairs)) % 10 + 1, torch.arange(len(pairs)), tok.pad_token_id)
        ref = torch.zeros(len(pairs))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            uc, ur, gc, gr = policy_logps(model, batch, True, True)
            out, _ = p_dpo_loss(uc, ur, gc, gr, ref, ref, beta=0.5, alpha=0.5)
            out.losses.mean().backward()
            clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        result[str(n)] = statistics.median(times[2:])
    return result


def generation_speed(setup: dict, new_tokens: int, repeats: int = 3) -> dict[str, float]:
    """Tokens/s of personalized generation (user tokens, KV cache) vs plain `generate` on the same LoRA model."""
    from prlhf.data.loading import load_records
    from prlhf.data.tokenize import encode_prompt
    from prlhf.model.loading import add_lora, load_base
    from prlhf.model.personalized import PersonalizedLM
    from prlhf.users.models import build_user_model

    base, tok = load_base(setup["base"])
    model = PersonalizedLM(add_lora(base), build_user_model("individual", 10, 10, base.config.hidden_size,
                                                            init="uniform"), prefix_len=1).eval()
    prompts = [encode_prompt(tok, r.prompt, True) for r in load_records(setup["train"])[:8]]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])  # left-padded
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
              eos_token_id=tok.eos_token_id)

    def plain():
        with torch.no_grad():
            model.lm.generate(input_ids=ids, attention_mask=mask, **kw)

    def personalized():
        model.generate(prompts, torch.arange(8) % 10 + 1, **kw)

    speeds = {}
    for name, fn in (("plain", plain), ("personalized", personalized)):
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        speeds[name] = len(prompts) * new_tokens / statistics.median(times)
    return speeds


# ---- the benchmark -------------------------------------------------------------------------------------------

def run_speed_bench(out: Path, quick: bool = False, threads: int = 2) -> dict:
    torch.set_num_threads(threads)
    # the runs' scratch files go to a temporary folder that is removed afterwards, even on an error
    with results_folder(out, "speed", OUTPUTS), tempfile.TemporaryDirectory(prefix="prlhf_speed_") as scratch:
        work = Path(scratch)
        setup = prepare(work, quick)
        setup_path = work / "setup.json"
        setup_path.write_text(json.dumps(setup))
        runs: dict[str, list[dict]] = {m: [] for m in METHODS}
        for repeat in range(setup["repeats"]):
            for method in METHODS:  # interleaved, so drifts in machine load hit every method alike
                runs[method].append(measure_method(method, setup_path, work, threads))
                print(f"[{repeat + 1}/{setup['repeats']}] {method}: {runs[method][-1]['pairs_per_s']:.1f} pairs/s, "
                      f"peak RSS {runs[method][-1]['peak_rss_mb']:.0f} MB", flush=True)
        med = {m: {k: statistics.median(r[k] for r in rs) for k in ("pairs_per_s", "peak_rss_mb", "wall_s")}
               for m, rs in runs.items()}
        result = {
            "pairs_per_s": {m: med[m]["pairs_per_s"] for m in METHODS},
            "peak_rss_mb": {m: med[m]["peak_rss_mb"] for m in METHODS},
            "wall_s": {m: med[m]["wall_s"] for m in METHODS},
            "step_s_by_users": step_time_by_users(setup, setup["users"], sparse=True),
            "step_s_by_users_dense_table": step_time_by_users(setup, setup["users"], sparse=False),
            "gen_tokens_per_s": generation_speed(setup, setup["gen_tokens"]),
            "setup": {k: setup[k] for k in ("n_pairs", "batch_size", "steps", "repeats")} | {
                "model": "tiny (2-layer Llama, hidden 64)", "threads": threads, "quick": quick,
                "machine": machine_summary()},
        }
        result["ratios"] = ratios(result)
        atomic_write_text(out / "speed.json", json.dumps(result, indent=1) + "\n")
        atomic_write_text(out / "speed.md", render(result))
        print(render(result))
        return result


def ratios(r: dict) -> dict[str, float]:
    pps, users, gen = r["pairs_per_s"], r["step_s_by_users"], r["gen_tokens_per_s"]
    return {"prlhf_dpo_vs_trl": pps["prlhf_dpo"] / pps["trl_dpo"],
            "prlhf_pdpo_a1_vs_trl": pps["prlhf_pdpo_a1"] / pps["trl_dpo"],
            "prlhf_pdpo_a05_vs_trl": pps["prlhf_pdpo_a05"] / pps["trl_dpo"],
            "peak_rss_prlhf_max_vs_trl": max(r["peak_rss_mb"][m] for m in METHODS[1:]) / r["peak_rss_mb"]["trl_dpo"],
            "step_100k_vs_10_users": users["100000"] / users["10"],
            "step_100k_vs_10_users_dense_table": (r["step_s_by_users_dense_table"]["100000"]
                                                  / r["step_s_by_users_dense_table"]["10"]),
            "personalized_vs_plain_generation": gen["personalized"] / gen["plain"]}


def render(r: dict) -> str:
    s, q = r["setup"], r["ratios"]
    lines = [f"# prlhf bench speed{' --quick' if s['quick'] else ''}", "",
             f"Model {s['model']}; {s['n_pairs']} pairs, batch {s['batch_size']} pairs, {s['steps']} steps, "
             f"medians over {s['repeats']} repeat(s); {s['threads']} threads; {s['machine']}.", "",
             "| method | pairs/s | vs TRL | peak RSS (MB) |", "|---|---|---|---|"]
    for m in METHODS:
        lines.append(f"| {m} | {r['pairs_per_s'][m]:.1f} | {r['pairs_per_s'][m] / r['pairs_per_s']['trl_dpo']:.2f}x | "
                     f"{r['peak_rss_mb'][m]:.0f} |")
    lines += ["", "| users in the table | step (s), sparse rows | step (s), dense table |", "|---|---|---|"]
    for n in r["step_s_by_users"]:
        lines.append(f"| {int(n):,} | {r['step_s_by_users'][n]:.4f} | {r['step_s_by_users_dense_table'][n]:.4f} |")
    lines += ["", f"Step time at 100k users / 10 users: {q['step_100k_vs_10_users']:.2f}x (dense table: "
                  f"{q['step_100k_vs_10_users_dense_table']:.2f}x).", "",
              f"Generation: plain {r['gen_tokens_per_s']['plain']:.0f} tokens/s, personalized "
              f"{r['gen_tokens_per_s']['personalized']:.0f} tokens/s "
              f"({q['personalized_vs_plain_generation']:.2f}x).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        run_worker(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        raise SystemExit("usage: prlhf bench speed [--quick] --out DIR")
