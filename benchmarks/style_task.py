"""Conflicting style preferences (issue 2's check): 16 users x 3 opposing style dimensions, ~100 pairs per user.
Runs the CLI exactly as a user would, times each `prlhf train`, and writes JSON + Markdown.

    python benchmarks/style_task.py --out benchmarks/results/style
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

METHODS = {"vanilla_dpo": ["--user-model", "uniform"], "p_dpo_individual": ["--user-model", "individual"],
           "p_dpo_cluster": ["--user-model", "cluster", "--clusters", "8"]}


def sh(*args: str) -> None:
    subprocess.run(["prlhf", *args], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/style")
    parser.add_argument("--work", default="/tmp/prlhf_style_bench", help="scratch folder for data and runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each `prlhf train`")
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    subprocess.run(["rm", "-rf", str(work)], check=True)
    out.mkdir(parents=True, exist_ok=True)
    sh("data", "build", "style", "--out", str(work / "data"), "--seed", str(args.seed))
    users = json.loads((work / "data" / "users.json").read_text())["users"]
    results = {}
    for name, flags in METHODS.items():
        start = time.time()
        sh("train", "--data", str(work / "data" / "train.jsonl"), "--out", str(work / name), "--model", "tiny",
           "--threads", str(args.threads), "--seed", str(args.seed), "--quiet", *flags)
        seconds = time.time() - start
        sh("eval", "--run", str(work / name), "--data", str(work / "data" / "test.jsonl"),
           "--out", str(work / f"{name}.json"))
        ev = json.loads((work / f"{name}.json").read_text())
        results[name] = {"train_command_seconds": round(seconds, 1), **{k: ev[k] for k in (
            "mean_user_accuracy", "worst_user_accuracy", "unseen_accuracy", "accuracy")}}
    seen = [u for u, i in users.items() if i["seen"]]
    report = {"task": "style (16 seen + 4 unseen users, 3 dimensions, majority share 0.7)", "seed": args.seed,
              "machine": f"{platform.machine()}, {platform.python_version()}, {args.threads} threads",
              "n_seen_users": len(seen), "methods": results}
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = ["| method | train command (s) | mean seen-user acc | worst seen user | unseen (pooled) |",
             "|---|---|---|---|---|"]
    lines += [f"| {m} | {r['train_command_seconds']:.0f} | {r['mean_user_accuracy']:.2f} | "
              f"{r['worst_user_accuracy']:.2f} | {r['unseen_accuracy']:.2f} |" for m, r in results.items()]
    table = "\n".join(lines) + "\n"
    command = f"python benchmarks/style_task.py --out {out} --seed {args.seed} --threads {args.threads}"
    (out / "results.md").write_text(f"# Style task\n\nCommand: `{command}`\n\n" + table)
    print(table)


if __name__ == "__main__":
    main()
