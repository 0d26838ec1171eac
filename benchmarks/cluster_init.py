"""Does the cluster model's slow start come from its even initial mix? A sweep of `--cluster-logit-std`.

With small initial mixing logits (std 0.1, the default) every user starts as an even mix of the K prototypes, so
all users look alike; where the poles are balanced their gradients cancel in the prototypes. This runs the
paper's length experiment (`prlhf bench length`'s data and settings: tiny model, 20 seen users, 40 pairs each,
3 epochs, K = 2) at majority shares 0.5 / 0.7 / 0.9 over several seeds, for each logit std, and reports majority
and minority accuracy of seen users.

    python benchmarks/cluster_init.py --out benchmarks/results/cluster_init
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from prlhf.bench.length import MAJORITY, MINORITY, group_accuracy
from prlhf.bench.machine import machine_summary
from prlhf.config import TINY_LR, TrainConfig
from prlhf.data.tasks import build_length_task
from prlhf.evaluate.run_eval import evaluate_run
from prlhf.runs.directory import load_run
from prlhf.train.loop import train


def run(out: Path, shares: list[float], seeds: list[int], stds: list[float], threads: int) -> dict:
    torch.set_num_threads(threads)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    for p in shares:
        for seed in seeds:
            task = build_length_task(n_seen_users=20, n_unseen_users=4, majority_share=p, train_pairs_per_user=40,
                                     test_pairs_per_user=20, seed=seed)
            data = task.write(work / f"p{p}_s{seed}" / "data")
            base = None
            for std in stds:
                run_dir = work / f"p{p}_s{seed}" / f"std{std}"
                start = time.time()
                train(TrainConfig(data=str(data["train"]), out=str(run_dir), model=base or "tiny", epochs=3,
                                  sft_steps=-1 if base is None else 0, lr=TINY_LR, seed=seed, threads=threads,
                                  report_to="none", user_model="cluster", clusters=2, cluster_logit_std=std),
                      show_progress=False)
                base = base or str(run_dir / "base")  # one warmed-up tiny base per (p, seed)
                ev = evaluate_run(load_run(run_dir), task.test)
                row = {"p": p, "seed": seed, "logit_std": std,
                       "majority_accuracy": group_accuracy(ev, task.users, MAJORITY),
                       "minority_accuracy": group_accuracy(ev, task.users, MINORITY),
                       "mean_user_accuracy": ev["mean_user_accuracy"],
                       "worst_user_accuracy": ev["worst_user_accuracy"], "seconds": round(time.time() - start, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows, "shares": shares, "seeds": seeds, "logit_stds": stds, "machine": machine_summary()}


def render(doc: dict) -> str:
    lines = ["# Cluster model (K = 2) on the length task: initial mixing-logit std", "",
             f"Seeds {doc['seeds']}; medians over seeds, then the range. Seen users' held-out accuracy.", "",
             "| p | logit std | majority acc (median, range) | minority acc (median, range) | worst seen user |",
             "|---|---|---|---|---|"]
    for p in doc["shares"]:
        for std in doc["logit_stds"]:
            rs = [r for r in doc["rows"] if r["p"] == p and r["logit_std"] == std]

            def cell(key):
                xs = [r[key] for r in rs if r[key] is not None]
                return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})" if xs else "-"
            lines.append(f"| {p} | {std} | {cell('majority_accuracy')} | {cell('minority_accuracy')} | "
                         f"{cell('worst_user_accuracy')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shares", default="0.5,0.7,0.9")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--stds", default="0.1,1.0,3.0", help="initial mixing-logit stds to compare")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    doc = run(args.out, [float(x) for x in args.shares.split(",")], [int(x) for x in args.seeds.split(",")],
              [float(x) for x in args.stds.split(",")], args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out / "report.md").write_text(render(doc))
    print(render(doc))


if __name__ == "__main__":
    main()
