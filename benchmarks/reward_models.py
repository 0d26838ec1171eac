"""Personalized reward models (issue 6) on the tiny model, side by side with P-DPO in one run:

1. style task (16 seen + 4 unseen users, 3 opposing dimensions): held-out accuracy of P-RM individual / cluster /
   uniform (vanilla RM) next to P-DPO individual / vanilla DPO (implicit reward);
2. length task: the same comparison, then best-of-n with each user's P-RM over samples of a plain policy
   (vanilla DPO): mean length of the chosen response per group for N = 1, 2, 4, 8.

    python benchmarks/reward_models.py --out benchmarks/results/reward_models
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import time
from pathlib import Path
from statistics import mean

import torch

from prlhf.config import TINY_LR, TrainConfig
from prlhf.data.tasks import build_length_task, build_style_task
from prlhf.evaluate.generation import generate_texts
from prlhf.evaluate.run_eval import evaluate_run
from prlhf.evaluate.scoring import score_responses
from prlhf.runs.directory import load_run
from prlhf.train.loop import train

METHODS = {
    "p_rm_individual": {"objective": "rm", "user_model": "individual"},
    "p_rm_cluster": {"objective": "rm", "user_model": "cluster"},
    "rm_uniform": {"objective": "rm", "user_model": "uniform"},
    "p_dpo_individual": {"objective": "dpo", "user_model": "individual"},
    "vanilla_dpo": {"objective": "dpo", "user_model": "uniform"},
}
KEYS = ("mean_user_accuracy", "worst_user_accuracy", "unseen_accuracy")


def compare(task, work: Path, threads: int, seed: int, clusters: int) -> tuple[dict, dict]:
    paths = task.write(work / "data")
    results, runs, bases = {}, {}, {}
    for name, overrides in METHODS.items():
        run_dir = work / name
        start = time.time()
        extra = {"clusters": clusters} if overrides["user_model"] == "cluster" else {}
        base = bases.get(overrides["objective"])  # each objective's default warm-up differs (TINY_SFT_STEPS)
        # lr and epochs given explicitly: once `model` is the saved base folder, the tiny defaults no longer apply
        epochs = TrainConfig(model="tiny", objective=overrides["objective"]).resolved_epochs()
        train(TrainConfig(data=str(paths["train"]), out=str(run_dir), model=base or "tiny", seed=seed, lr=TINY_LR,
                          epochs=epochs, sft_steps=-1 if base is None else 0, threads=threads, report_to="none",
                          **overrides, **extra), show_progress=False)
        bases.setdefault(overrides["objective"], str(run_dir / "base"))  # one warmed-up base per objective
        runs[name] = load_run(run_dir)
        ev = evaluate_run(runs[name], task.test)
        results[name] = {**{k: ev[k] for k in KEYS}, "seconds": round(time.time() - start, 1)}
        print(f"{task.name} {name}: " + ", ".join(f"{k} {ev[k]:.3f}" for k in KEYS), flush=True)
    return results, runs


def best_of_n_lengths(task, policy, reward, ns=(1, 2, 4, 8), n_prompts: int = 8, seed: int = 0) -> dict:
    """For each seen user and held-out prompt: N_max samples from the plain policy, scored once by the user's
    P-RM; best-of-k keeps the top-scored of the first k samples. Returns group -> k -> mean characters."""
    rng = random.Random(seed)
    prompts = rng.sample(sorted({r.prompt for r in task.test}), n_prompts)
    users = task.seen_users
    n_max = max(ns)
    rows = [(u, p) for u in users for p in prompts for _ in range(n_max)]
    texts = generate_texts(policy, [p for _, p in rows], [u for u, _ in rows], max_new_tokens=80, do_sample=True,
                           seed=seed)
    rewards = score_responses(reward, [u for u, _ in rows], [p for _, p in rows], texts)
    out: dict[str, dict[int, list[int]]] = {}
    for i in range(0, len(rows), n_max):
        group = task.users[rows[i][0]]["group"]
        cand = list(zip(texts[i:i + n_max], rewards[i:i + n_max]))
        for k in ns:
            best = max(cand[:k], key=lambda c: c[1])[0]
            out.setdefault(group, {}).setdefault(k, []).append(len(best))
    return {g: {k: round(mean(v), 1) for k, v in by_k.items()} for g, by_k in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/reward_models")
    parser.add_argument("--work", default="/tmp/prlhf_reward_bench")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out, work = Path(args.out), Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    style = build_style_task(seed=args.seed)
    style_results, _ = compare(style, work / "style", args.threads, args.seed, clusters=8)
    length = build_length_task(n_seen_users=10, n_unseen_users=4, train_pairs_per_user=40, test_pairs_per_user=20,
                               seed=args.seed)
    length_results, runs = compare(length, work / "length", args.threads, args.seed, clusters=2)
    bon = best_of_n_lengths(length, runs["vanilla_dpo"], runs["p_rm_individual"], seed=args.seed)
    print("best-of-n mean characters by group:", bon)
    doc = {"style": style_results, "length": length_results, "best_of_n_chars": bon, "seed": args.seed,
           "model": "tiny", "threads": args.threads, "seconds": round(time.time() - start, 1),
           "machine": f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}",
           "command": f"python benchmarks/reward_models.py --out {args.out}"}
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["# Personalized reward models vs P-DPO (tiny model)", "", f"Command: `{doc['command']}`", ""]
    for task_name, res in (("style (16 seen + 4 unseen users)", style_results),
                           ("length (10 seen + 4 unseen users)", length_results)):
        lines += [f"## {task_name}", "", "| method | mean seen-user acc | worst seen user | unseen (pooled) | s |",
                  "|---|---|---|---|---|"]
        lines += [f"| {m} | {r['mean_user_accuracy']:.3f} | {r['worst_user_accuracy']:.3f} | "
                  f"{r['unseen_accuracy']:.3f} | {r['seconds']:.0f} |" for m, r in res.items()]
        lines.append("")
    ks = sorted({k for by_k in bon.values() for k in by_k})
    lines += ["## Best-of-n on the length task (policy: vanilla DPO; reranker: the user's P-RM individual)", "",
              "Mean characters of the chosen response, seen users, 8 held-out prompts each.", "",
              "| group | " + " | ".join(f"N={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    lines += [f"| {g} | " + " | ".join(f"{by_k[k]:.0f}" for k in ks) + " |" for g, by_k in sorted(bon.items())]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
