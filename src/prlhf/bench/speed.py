"""`prlhf bench speed`: TRL's DPOTrainer vs prlhf on the same model, data, batch size and precision, in one run.

Rows: TRL with its reference computed inside every step (`trl_dpo`, its default) and computed once before training
(`trl_dpo_precomputed`, `precompute_ref_log_probs=True`), prlhf's vanilla DPO, and P-DPO at alpha 1 and 0.5 (whose
reference is always one pass before training). Two figures per row: pairs/s per optimizer step (the steady-state
median) and end to end, where the one-off reference pass over the N training pairs is counted: one epoch takes
ref_s + N / per_step, so end to end = N / (ref_s + N / per_step). Each method runs in its own process, the methods
interleaved within each repeat so drifts in machine load hit all alike; figures are medians over repeats. Next to
them: the model FLOPs each method's step needs (`prlhf.bench.flops`), the machine's sustained matmul rate at the
run's dtype and shapes, and the share of it each method reaches. Timings on a shared machine are noisy: read the
ratios.

Models: `tiny` (the length task, as before) or a preset (`smollm2-135m`, `gemma3-270m`) on TL;DR posts with
realistic lengths: prompts of 128-256 tokens (cut from the start, so "TL;DR:" stays), the labelers' summaries as
responses, the labelers as users.
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from prlhf.bench.flops import ModelShape, flops_per_pair
from prlhf.bench.machine import machine_summary
from prlhf.safe_io import atomic_write_text, results_folder

WARMUP_STEPS = 3
METHODS = ("trl_dpo", "trl_dpo_precomputed", "prlhf_dpo", "prlhf_pdpo_a1", "prlhf_pdpo_a05")
PRLHF_METHODS = {"prlhf_dpo": ("uniform", 1.0), "prlhf_pdpo_a1": ("individual", 1.0),
                 "prlhf_pdpo_a05": ("individual", 0.5)}
MODELS = ("tiny", "smollm2-135m", "gemma3-270m")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROMPT_TOKENS = (128, 256)  # realistic-length runs: prompts in this range
USER_TOKENS = 1  # TrainConfig's default T_u
# LoRA dropout of both sides. 0 by default, because TRL's DPOTrainer zeroes every nn.Dropout after wrapping the
# model in PEFT (DPOConfig.disable_dropout, True by default), LoRA's own included: what TRL's defaults run. A
# dropout > 0 turns that off on TRL's side, so that both sides draw the same masks (prlhf train's default is 0.05).
LORA_DROPOUT = 0.0
MAX_LENGTH, MAX_PROMPT_LENGTH = 1024, 512  # above every bench text: neither trainer truncates

# what the benchmark writes into --out (anything else there is refused: prlhf.safe_io.results_folder)
OUTPUTS = ("speed.json", "speed.md")


def _sizes(model: str, quick: bool) -> dict:
    if model == "tiny":
        return {"pairs_per_user": 16 if quick else 48, "batch_size": 8, "steps": 12 if quick else 30,
                "repeats": 1 if quick else 3, "users": (10, 10_000, 100_000), "gen_tokens": 48 if quick else 96}
    return {"n_pairs": 16 if quick else 32, "batch_size": 4, "steps": 6 if quick else 8, "repeats": 1 if quick else 2}


def prepare(work: Path, quick: bool, seed: int = 0, model: str = "tiny") -> dict:
    """Data and one base model + tokenizer on disk, shared by every method."""
    if model == "tiny":
        return _prepare_tiny(work, quick, seed)
    return _prepare_real(work, model, quick, seed)


def _prepare_tiny(work: Path, quick: bool, seed: int) -> dict:
    """The length task and the tiny model built from it."""
    from prlhf.data.tasks import build_length_task
    from prlhf.model.tiny import build_tiny_model, build_tiny_tokenizer
    from prlhf.train.setup import record_texts

    sizes = _sizes("tiny", quick)
    task = build_length_task(train_pairs_per_user=sizes["pairs_per_user"], test_pairs_per_user=4, seed=seed)
    paths = task.write(work / "data")
    tok = build_tiny_tokenizer(record_texts(task.train))
    base = build_tiny_model(tok, seed=seed)
    base.save_pretrained(work / "base")
    tok.save_pretrained(work / "base")
    return {"model": "tiny", "train": str(paths["train"]), "base": str(work / "base"), "n_pairs": len(task.train),
            **sizes}


def _prepare_real(work: Path, model: str, quick: bool, seed: int) -> dict:
    """TL;DR comparisons with prompts of 128-256 of the model's tokens (longer posts cut from the start), a seeded
    sample of n_pairs, written as plain records so both trainers read the same text and neither truncates."""
    from transformers import AutoTokenizer

    from prlhf.data.tasks.tldr import default_data_dir, load_comparisons
    from prlhf.model.presets import resolve_model

    sizes = _sizes(model, quick)
    base = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(base)
    comparisons, _ = load_comparisons(default_data_dir())
    random.Random(seed).shuffle(comparisons)
    low, high = PROMPT_TOKENS
    rows = []
    for c in comparisons:
        ids = tok(c.record.prompt, add_special_tokens=False)["input_ids"]
        if len(ids) < low:
            continue
        prompt = tok.decode(ids[-high:]) if len(ids) > high else c.record.prompt
        rows.append({"user_id": c.record.user_id, "prompt": prompt, "chosen": c.record.chosen,
                     "rejected": c.record.rejected})
        if len(rows) == sizes["n_pairs"]:
            break
    train = work / "data" / "train.jsonl"
    train.parent.mkdir(parents=True)
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": model, "train": str(train), "base": base, "n_pairs": len(rows), **sizes}


# ---- workers (one process each) -----------------------------------------------------------------------------

def median_step(times: list[float]) -> float:
    steady = times[WARMUP_STEPS:-1] or times
    return statistics.median(steady)


def logged_step_times(run: Path) -> list[float]:
    """Each optimizer step's seconds, from a run's metrics.jsonl logged every step."""
    elapsed = [json.loads(line)["elapsed_s"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [b - a for a, b in zip([0.0] + elapsed[:-1], elapsed)]


def worker_trl(setup: dict, out: Path, precompute: bool, dtype: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in Path(setup["train"]).read_text().splitlines()]
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(setup["base"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(setup["base"])
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    args = DPOConfig(output_dir=str(out / "trl"), per_device_train_batch_size=setup["batch_size"],
                     max_steps=setup["steps"], learning_rate=1e-3, beta=0.5, logging_steps=10 ** 6,
                     save_strategy="no", report_to="none", max_length=MAX_LENGTH, seed=0, use_cpu=True,
                     dataloader_num_workers=0, bf16=dtype == "bf16", precompute_ref_log_probs=precompute,
                     disable_dropout=setup.get("lora_dropout", LORA_DROPOUT) == 0)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=setup.get("lora_dropout", LORA_DROPOUT),
                      target_modules="all-linear", task_type="CAUSAL_LM")
    built = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=lora,
                         callbacks=[Stamp()])
    start = time.perf_counter()
    trainer.train()
    steps = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
    # the constructor tokenizes and (precomputed) runs the reference pass: the difference of the two variants'
    # constructor times is that pass (run_speed_bench)
    return {"step_s": median_step(steps), "wall_s": time.perf_counter() - built, "init_s": start - built}


def worker_prlhf(setup: dict, out: Path, user_model: str, alpha: float, dtype: str) -> dict:
    from prlhf.config import TrainConfig
    from prlhf.train.loop import train

    run = out / "run"
    start = time.perf_counter()
    summary = train(TrainConfig(
        data=setup["train"], out=str(run), model=setup["base"], user_model=user_model, alpha=alpha,
        batch_size=setup["batch_size"], max_steps=setup["steps"], sft_steps=0, lr=1e-3, beta=0.5, log_steps=1,
        save_steps=setup["steps"], seed=0, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH,
        reference_cache="none", mixed_precision="bf16" if dtype == "bf16" else "no", report_to="none",
        lora_dropout=setup.get("lora_dropout", LORA_DROPOUT)),
        show_progress=False)
    return {"step_s": median_step(logged_step_times(run)), "wall_s": time.perf_counter() - start,
            "reference_s": summary["reference_seconds"]}


def run_worker(method: str, setup_path: str, out: str, dtype: str = "fp32") -> None:
    torch.set_num_threads(int(os.environ.get("PRLHF_BENCH_THREADS", "2")))
    setup, out_dir = json.loads(Path(setup_path).read_text()), Path(out)
    if method.startswith("trl_dpo"):
        result = worker_trl(setup, out_dir, method == "trl_dpo_precomputed", dtype)
    else:
        kind, alpha = PRLHF_METHODS[method]
        result = worker_prlhf(setup, out_dir, kind, alpha, dtype)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["pairs_per_s"] = setup["batch_size"] / result["step_s"]
    print("RESULT " + json.dumps(result))


def measure_method(method: str, setup_path: Path, work: Path, threads: int, dtype: str = "fp32") -> dict:
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        env = {**os.environ, "PRLHF_BENCH_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
               "TQDM_DISABLE": "1"}
        proc = subprocess.run([sys.executable, "-m", "prlhf.bench.speed", "--worker", method, str(setup_path), tmp,
                               dtype], capture_output=True, text=True, env=env)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


# ---- in-process measurements ----------------------------------------------------------------------------------

def pdpo_step(model, opt, batch, alpha: float, dtype: str = "fp32") -> None:
    """One P-DPO optimizer step on `batch` against a zero reference: what the in-process timings measure."""
    from prlhf.losses import p_dpo_loss
    from prlhf.train.loop import policy_logps
    from prlhf.train.optim import clip_grad_norm_

    ref = torch.zeros(len(batch))
    with torch.autocast("cpu", dtype=DTYPES[dtype], enabled=dtype != "fp32"):
        uc, ur, gc, gr = policy_logps(model, batch, True, alpha < 1)
        out, _ = p_dpo_loss(uc, ur, gc, gr, ref, ref, beta=0.5, alpha=alpha)
    out.losses.mean().backward()
    clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_time_by_users(setup: dict, users: tuple[int, ...], sparse: bool, repeats: int = 12) -> dict[str, float]:
    """Median optimizer-step time of P-DPO (alpha 0.5) on one fixed batch whose users are among the first 10,
    with a user table of N rows."""
    from prlhf.data.collate import collate_pairs
    from prlhf.data.loading import load_records
    from prlhf.data.tokenize import encode_records
    from prlhf.model.loading import add_lora, load_base
    from prlhf.model.personalized import PersonalizedLM
    from prlhf.train.optim import RowSparseAdamW
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
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            pdpo_step(model, opt, batch, alpha=0.5)
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


def profile_step(setup: dict, dtype: str, steps: int = 2) -> dict[str, float]:
    """Where one P-DPO (alpha 1) optimizer step's CPU time goes, by kind of operator (prlhf.bench.flops)."""
    from prlhf.bench.flops import profile_groups
    from prlhf.data.collate import collate_pairs
    from prlhf.data.loading import load_records
    from prlhf.data.tokenize import adds_bos, encode_records
    from prlhf.model.loading import add_lora, load_base
    from prlhf.model.personalized import PersonalizedLM
    from prlhf.train.optim import RowSparseAdamW
    from prlhf.users.models import build_user_model

    torch.manual_seed(0)
    base, tok = load_base(setup["base"])
    pairs = encode_records(load_records(setup["train"])[:setup["batch_size"]], tok, max_length=MAX_LENGTH,
                           max_prompt_length=MAX_PROMPT_LENGTH)
    um = build_user_model("individual", 10, USER_TOKENS, base.config.hidden_size, init="uniform", sparse=True)
    model = PersonalizedLM(add_lora(base, dropout=setup.get("lora_dropout", LORA_DROPOUT)), um,
                           prefix_len=int(adds_bos(tok))).train()
    opt = RowSparseAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = collate_pairs(pairs, torch.arange(len(pairs)) % 10 + 1, torch.arange(len(pairs)), tok.pad_token_id)

    def step():
        pdpo_step(model, opt, batch, alpha=1.0, dtype=dtype)

    step()  # warm-up
    return profile_groups(step, steps)


# ---- the benchmark -------------------------------------------------------------------------------------------

def run_speed_bench(out: Path, quick: bool = False, threads: int = 2, model: str = "tiny",
                    dtypes: tuple[str, ...] | None = None, lora_dropout: float = LORA_DROPOUT) -> dict:
    """Every method at every dtype (the first is the headline), interleaved, then the in-process measurements.
    `lora_dropout` is both sides' (see LORA_DROPOUT)."""
    if not 0 <= lora_dropout < 1:
        raise ValueError(f"lora dropout must be in [0, 1), not {lora_dropout}")
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r} (choose from {', '.join(MODELS)})")
    dtypes = dtypes or (("fp32",) if model == "tiny" else ("bf16", "fp32"))
    if unknown := [d for d in dtypes if d not in DTYPES]:
        raise ValueError(f"unknown dtype(s) {unknown} (choose from {', '.join(DTYPES)})")
    torch.set_num_threads(threads)
    # the runs' scratch files go to a temporary folder that is removed afterwards, even on an error
    with results_folder(out, "speed", OUTPUTS), tempfile.TemporaryDirectory(prefix="prlhf_speed_") as scratch:
        work = Path(scratch)
        setup = prepare(work, quick, model=model) | {"lora_dropout": lora_dropout}
        setup_path = work / "setup.json"
        setup_path.write_text(json.dumps(setup))
        runs: dict[str, dict[str, list[dict]]] = {d: {m: [] for m in METHODS} for d in dtypes}
        for repeat in range(setup["repeats"]):
            for dtype in dtypes:
                for method in METHODS:  # interleaved, so drifts in machine load hit every method alike
                    r = measure_method(method, setup_path, work, threads, dtype)
                    runs[dtype][method].append(r)
                    print(f"[{repeat + 1}/{setup['repeats']}] {dtype} {method}: {r['pairs_per_s']:.2f} pairs/s, "
                          f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        base, pairs = encoded_pairs(setup)
        lengths, shape = data_lengths(pairs), ModelShape.of(base, lora_r=8)
        flops = flops_per_pair(shape, pairs, METHODS, USER_TOKENS)
        by_dtype = {d: summarise(runs[d], setup, flops, shape, lengths, d) for d in dtypes}
        result = {"model": model, "dtype": dtypes[0], **by_dtype[dtypes[0]], "by_dtype": by_dtype}
        if model == "tiny":
            result |= {"step_s_by_users": step_time_by_users(setup, setup["users"], sparse=True),
                       "step_s_by_users_dense_table": step_time_by_users(setup, setup["users"], sparse=False),
                       "gen_tokens_per_s": generation_speed(setup, setup["gen_tokens"])}
        result["profile_s"] = profile_step(setup, dtypes[0])
        result["setup"] = {k: setup[k] for k in ("n_pairs", "batch_size", "steps", "repeats")} | {
            "model": "tiny (2-layer Llama, hidden 64)" if model == "tiny" else model, "threads": threads,
            "quick": quick, "dtypes": list(dtypes), "lengths": lengths, "machine": machine_summary(),
            "lora_dropout": lora_dropout}
        result["ratios"] = ratios(result)
        atomic_write_text(out / "speed.json", json.dumps(result, indent=1) + "\n")
        atomic_write_text(out / "speed.md", render(result))
        print(render(result))
        return result


def encoded_pairs(setup: dict):
    """The bench's base model and its pairs as prlhf encodes them (what the lengths and FLOPs are counted on)."""
    from prlhf.data.loading import load_records
    from prlhf.data.tokenize import encode_records
    from prlhf.model.loading import load_base

    base, tok = load_base(setup["base"])
    return base, encode_records(load_records(setup["train"]), tok, max_length=MAX_LENGTH,
                                max_prompt_length=MAX_PROMPT_LENGTH)


def data_lengths(pairs) -> dict:
    """Token counts of the encoded pairs (min / median / max)."""
    def span(xs):
        return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}

    return {"prompt": span([len(p.prompt_ids) for p in pairs]),
            "response": span([len(r) for p in pairs for r in (p.chosen_ids, p.rejected_ids)])}


def summarise(runs: dict[str, list[dict]], setup: dict, flops: dict, shape, lengths: dict, dtype: str) -> dict:
    """Medians over repeats, end-to-end rates and the share of the matmul peak, for one dtype; `flops`:
    flops_per_pair of the bench's pairs, `shape` their model's ModelShape."""
    from prlhf.bench.flops import matmul_rates

    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("pairs_per_s", "peak_rss_mb", "wall_s")}
           for m, rs in runs.items()}
    # TRL's one-off pass: its precomputed variant's constructor minus the in-step one's (same tokenization)
    trl_ref = max(0.0, statistics.median(r["init_s"] for r in runs["trl_dpo_precomputed"])
                  - statistics.median(r["init_s"] for r in runs["trl_dpo"]))
    reference_s = {"trl_dpo": 0.0, "trl_dpo_precomputed": trl_ref} | {
        m: statistics.median(r["reference_s"] for r in runs[m]) for m in PRLHF_METHODS}
    n = setup["n_pairs"]
    per_step = {m: med[m]["pairs_per_s"] for m in METHODS}
    end_to_end = {m: n / (reference_s[m] + n / per_step[m]) for m in METHODS}

    tokens = setup["batch_size"] * round(lengths["prompt"]["median"] + 2 * lengths["response"]["median"])
    rates = matmul_rates(shape, tokens, DTYPES[dtype])
    peak = max(rates.values())
    return {"pairs_per_s": per_step, "end_to_end_pairs_per_s": end_to_end, "reference_s": reference_s,
            "peak_rss_mb": {m: med[m]["peak_rss_mb"] for m in METHODS},
            "wall_s": {m: med[m]["wall_s"] for m in METHODS},
            "flops_per_pair": flops, "matmul_flops_by_shape": rates, "matmul_peak_flops": peak,
            "peak_share": {m: flops[m]["step"] * per_step[m] / peak for m in METHODS}}


def ratios(r: dict) -> dict[str, float]:
    pps, e2e = r["pairs_per_s"], r["end_to_end_pairs_per_s"]
    out = {}
    for m in PRLHF_METHODS:
        out[f"{m}_vs_trl"] = pps[m] / pps["trl_dpo"]
        out[f"{m}_vs_trl_precomputed"] = pps[m] / pps["trl_dpo_precomputed"]
        out[f"{m}_end_to_end_vs_trl"] = e2e[m] / e2e["trl_dpo"]
        out[f"{m}_end_to_end_vs_trl_precomputed"] = e2e[m] / e2e["trl_dpo_precomputed"]
    rss = r["peak_rss_mb"]
    out["peak_rss_prlhf_max_vs_trl"] = max(rss[m] for m in PRLHF_METHODS) / rss["trl_dpo"]
    if "step_s_by_users" in r:
        users, dense = r["step_s_by_users"], r["step_s_by_users_dense_table"]
        out["step_100k_vs_10_users"] = users["100000"] / users["10"]
        out["step_100k_vs_10_users_dense_table"] = dense["100000"] / dense["10"]
        out["personalized_vs_plain_generation"] = r["gen_tokens_per_s"]["personalized"] / r["gen_tokens_per_s"]["plain"]
    return out


def _method_table(block: dict) -> list[str]:
    pps, e2e = block["pairs_per_s"], block["end_to_end_pairs_per_s"]
    lines = ["| method | pairs/s per step | vs TRL | vs TRL precomputed | reference pass (s) | pairs/s end to end | "
             "vs TRL | vs TRL precomputed | GFLOP per pair (step) | share of matmul peak | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in METHODS:
        lines.append(
            f"| {m} | {pps[m]:.2f} | {pps[m] / pps['trl_dpo']:.2f}x | {pps[m] / pps['trl_dpo_precomputed']:.2f}x | "
            f"{block['reference_s'][m]:.1f} | {e2e[m]:.2f} | {e2e[m] / e2e['trl_dpo']:.2f}x | "
            f"{e2e[m] / e2e['trl_dpo_precomputed']:.2f}x | {block['flops_per_pair'][m]['step'] / 1e9:.2f} | "
            f"{100 * block['peak_share'][m]:.0f}% | {block['peak_rss_mb'][m]:.0f} |")
    lines.append("")
    lines.append(f"Matmul peak {block['matmul_peak_flops'] / 1e9:.0f} GFLOP/s (the best of the model's linear shapes "
                 "at the run's dtype: " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in
                                                    block["matmul_flops_by_shape"].items()) + ").")
    return lines


def render(r: dict) -> str:
    s, q = r["setup"], r["ratios"]
    ln = s.get("lengths")
    lines = [f"# prlhf bench speed --model {r['model']}{' --quick' if s['quick'] else ''}", "",
             f"Model {s['model']}; {s['n_pairs']} pairs, batch {s['batch_size']} pairs, {s['steps']} steps, "
             f"medians over {s['repeats']} repeat(s); {s['threads']} threads; LoRA r 8 on all linear layers, dropout "
             f"{s.get('lora_dropout', LORA_DROPOUT):g} on both sides; {s['machine']}."]
    if ln:
        lines.append(f"Tokens per pair (prlhf's encoding): prompt {ln['prompt']['min']}-{ln['prompt']['max']} "
                     f"(median {ln['prompt']['median']:g}), responses {ln['response']['min']}-{ln['response']['max']} "
                     f"(median {ln['response']['median']:g}).")
    lines += ["", "End to end = one epoch over the N pairs with the one-off reference pass counted: "
              "N / (reference s + N / per-step pairs/s). TRL in-step computes the reference inside every step.", ""]
    for dtype in s.get("dtypes", ["fp32"]):
        lines += [f"## {dtype}", ""] + _method_table(r["by_dtype"][dtype]) + [""]
    if "profile_s" in r:
        kinds, ops = r["profile_s"]["by_kind"], r["profile_s"]["top_operators"]
        total = sum(kinds.values())
        lines += [f"## One P-DPO (alpha 1) step, {r['dtype']}: self CPU time by operator kind", "",
                  "| kind | s | share |", "|---|---|---|"]
        lines += [f"| {k} | {v:.3f} | {100 * v / total:.0f}% |" for k, v in kinds.items()] + [""]
        lines += ["Top operators: " + ", ".join(f"`{k}` {v:.3f} s" for k, v in ops.items()) + ".", ""]
    if "step_s_by_users" in r:
        lines += ["| users in the table | step (s), sparse rows | step (s), dense table |", "|---|---|---|"]
        for n in r["step_s_by_users"]:
            lines.append(f"| {int(n):,} | {r['step_s_by_users'][n]:.4f} | "
                         f"{r['step_s_by_users_dense_table'][n]:.4f} |")
        lines += ["", f"Step time at 100k users / 10 users: {q['step_100k_vs_10_users']:.2f}x (dense table: "
                      f"{q['step_100k_vs_10_users_dense_table']:.2f}x).", "",
                  f"Generation: plain {r['gen_tokens_per_s']['plain']:.0f} tokens/s, personalized "
                  f"{r['gen_tokens_per_s']['personalized']:.0f} tokens/s "
                  f"({q['personalized_vs_plain_generation']:.2f}x).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--worker":
        run_worker(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
    else:
        raise SystemExit("usage: prlhf bench speed [--quick] [--model M] [--dtype D,...] --out DIR")
