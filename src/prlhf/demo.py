"""`prlhf demo`: the paper's first experiment (conflicting length preferences, P-RLHF.md §5.1) end to end on
the built-in tiny model: vanilla DPO vs P-DPO individual vs P-DPO cluster, per-user accuracy, generations."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from prlhf.bench.experiment import train_on_one_base
from prlhf.bench.methods import PAPER_METHODS, pick
from prlhf.config import TINY_LR, TrainConfig
from prlhf.data.tasks import build_length_task
from prlhf.evaluate.generation import generate_texts, length_stats
from prlhf.evaluate.report import accuracy_plot, accuracy_table
from prlhf.evaluate.run_eval import evaluate_run
from prlhf.runs.directory import write_json_atomic


@dataclass(frozen=True)
class DemoSize:
    train_pairs_per_user: int
    test_pairs_per_user: int
    epochs: float
    gen_prompts: int


# The demo's policies must write, so the tiny base warms up (train's default for P-DPO does not): 100 steps. A
# 600-step warm-up wrote more fluently but scored 0.70 mean / 0.05 worst seen user with P-DPO on the held-out
# stories (new subjects and objects).
DEMO_SFT_STEPS = 100
QUICK = DemoSize(train_pairs_per_user=40, test_pairs_per_user=20, epochs=3, gen_prompts=4)
FULL = DemoSize(train_pairs_per_user=120, test_pairs_per_user=40, epochs=3, gen_prompts=10)


def run_demo(out: Path, quick: bool = False, threads: int = 2, seed: int = 0, nll_weight: float = 0.5) -> dict:
    size = QUICK if quick else FULL
    start = time.time()
    if threads:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    task = build_length_task(n_seen_users=10, n_unseen_users=4, majority_share=0.7,
                             train_pairs_per_user=size.train_pairs_per_user,
                             test_pairs_per_user=size.test_pairs_per_user, seed=seed)
    paths = task.write(out / "data")
    print(f"length task: {len(task.train)} train / {len(task.test)} test pairs, {len(task.seen_users)} seen and "
          f"{len(task.unseen_users)} unseen users (majority share 0.7 prefer long)")

    evals, runs = {}, {}
    base = TrainConfig(data=str(paths["train"]), out="", model="tiny", epochs=size.epochs, sft_steps=DEMO_SFT_STEPS,
                       lr=TINY_LR, seed=seed, threads=threads, nll_weight=nll_weight)
    # all methods share the tiny base warmed up by the first; a demo re-run replaces its own previous runs
    for done in train_on_one_base(base, pick(PAPER_METHODS, clusters=2), out / "runs", show_progress=True):
        method, summary = done.name, done.summary
        runs[method] = done.run
        evals[method] = evaluate_run(done.run, task.test)
        print(f"{method}: trained {summary['steps']} steps in {summary['train_seconds']:.0f}s, mean seen-user "
              f"accuracy {evals[method]['mean_user_accuracy']:.2f}, worst {evals[method]['worst_user_accuracy']:.2f}")

    generation, samples = generate_per_user(runs, task, size.gen_prompts, seed)
    metrics = {"users": {u: {"group": i["group"], "seen": i["seen"]} for u, i in task.users.items()},
               "methods": evals, "generation": generation, "quick": quick, "nll_weight": nll_weight,
               "seconds": round(time.time() - start, 1)}
    write_json_atomic(out / "metrics.json", metrics)
    table = accuracy_table(evals, metrics["users"])
    accuracy_plot(evals, out / "per_user_accuracy.png", metrics["users"], group_key="group",
                  title="Length task: per-user held-out accuracy")
    report = render_report(metrics, table, samples)
    (out / "report.md").write_text(report)
    print("\n" + table)
    print(summarise_groups(metrics))
    for line in samples_text(samples):
        print(line)
    print(f"\nartifacts: {out}/metrics.json, report.md, per_user_accuracy.png ({metrics['seconds']:.0f}s in all)")
    return metrics


def generate_per_user(runs: dict, task, n_prompts: int, seed: int):
    """Mean generated length per user and method, on held-out prompts; plus one sample per group for show."""
    rng = random.Random(seed)
    prompts = rng.sample(sorted({r.prompt for r in task.test}), n_prompts)
    users = sorted(task.users)
    generation, samples = {}, {}
    for method, run in runs.items():
        rows = [(p, u) for u in users for p in prompts]
        texts = generate_texts(run, [p for p, _ in rows], [u for _, u in rows], max_new_tokens=80, do_sample=True,
                               seed=seed)
        by_user = {u: [t for (p, uu), t in zip(rows, texts) if uu == u] for u in users}
        generation[method] = length_stats(by_user)
        samples[method] = {group: next((u, prompts[0], by_user[u][0]) for u in users
                                       if task.users[u]["group"] == group and task.users[u]["seen"])
                           for group in ("long", "short")}
    return generation, samples


def group_means(metrics: dict, method: str) -> dict[str, dict[str, float]]:
    out = {}
    for group in ("long", "short"):
        users = [u for u, i in metrics["users"].items() if i["group"] == group and i["seen"]]
        acc = [metrics["methods"][method]["per_user"][u]["accuracy"] for u in users]
        chars = [metrics["generation"][method][u]["mean_chars"] for u in users]
        out[group] = {"accuracy": sum(acc) / len(acc), "mean_chars": sum(chars) / len(chars), "users": len(users)}
    return out


def summarise_groups(metrics: dict) -> str:
    lines = ["| method | long-preferring: accuracy | short-preferring: accuracy | long: mean chars | "
             "short: mean chars |", "|---|---|---|---|---|"]
    for method in metrics["methods"]:
        g = group_means(metrics, method)
        lines.append(f"| {method} | {g['long']['accuracy']:.2f} | {g['short']['accuracy']:.2f} | "
                     f"{g['long']['mean_chars']:.0f} | {g['short']['mean_chars']:.0f} |")
    return "\n".join(lines) + "\n"


def samples_text(samples: dict) -> list[str]:
    lines = []
    for method, by_group in samples.items():
        for group, (user, prompt, text) in by_group.items():
            lines.append(f"[{method}] {user} ({group}-preferring) <- {prompt!r}\n    {text!r}")
    return lines


def render_report(metrics: dict, table: str, samples: dict) -> str:
    cmd = "prlhf demo" + (" --quick" if metrics["quick"] else "") + f" --nll-weight {metrics['nll_weight']:g}"
    objective = ("the paper's objective (no NLL term)" if not metrics["nll_weight"] else
                 f"each loss plus an NLL term on the chosen response (weight {metrics['nll_weight']:g}, as in RPO / "
                 "TRL's rpo_alpha), the same for all three methods, which keeps the random-init tiny model "
                 "writing fluent text")
    return (f"# prlhf demo: conflicting length preferences\n\nCommand: `{cmd}` ({metrics['seconds']:.0f}s).\n"
            "Seen users prefer the longer response with probability 0.7 (the majority), else the shorter one; "
            "unseen users appear only in the test pairs and are scored with the generic user. "
            f"Objective: {objective}.\n\n"
            "## Per-user held-out accuracy (implicit reward)\n\n" + table + "\n## By group (seen users)\n\n"
            + summarise_groups(metrics) + "\n![per-user accuracy](per_user_accuracy.png)\n\n## Sample generations\n\n"
            + "\n".join(f"- {line}" for line in samples_text(samples)) + "\n")
