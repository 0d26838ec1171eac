"""Before/after of the training loop's hot path: the same `prlhf train` runs from two source trees, interleaved.

The "before" tree is a git worktree of an earlier commit (by default c66674e, the last one before metrics stayed
on the device, one finiteness check per optimizer step, torch's fused AdamW for the dense parameters and prompt
groups from the collator). Both trees train the same data from the same base with the same flags; step time is
the median of the steady-state steps (metrics.jsonl's elapsed_s, logged every step in both), and the logged losses
of the two trees are compared (the AdamW kernel changes rounding, nothing else changes the maths).

    python benchmarks/hot_loop.py --out benchmarks/results/hot_loop [--model tiny|smollm2-135m] [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from prlhf.bench.speed import (MAX_LENGTH, MAX_PROMPT_LENGTH, PRLHF_METHODS, logged_step_times, median_step,
                               prepare)
from prlhf.safe_io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]


def tree_env(src: Path) -> dict:
    return {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(src / "src"), "TQDM_DISABLE": "1",
            "TOKENIZERS_PARALLELISM": "false", "HOME": str(Path.home())}


def check_imports_from(src: Path) -> None:
    """The tree's own prlhf is the one imported (PYTHONPATH before the installed package)."""
    found = subprocess.run([sys.executable, "-c", "import prlhf; print(prlhf.__file__)"], capture_output=True,
                           text=True, env=tree_env(src), check=True).stdout.strip()
    if not Path(found).resolve().is_relative_to((src / "src").resolve()):
        raise SystemExit(f"{src}: imports prlhf from {found}")


def train_once(src: Path, setup: dict, method: str, dtype: str, out: Path, threads: int) -> dict:
    kind, alpha = PRLHF_METHODS[method]
    cmd = [sys.executable, "-m", "prlhf", "train", "--data", setup["train"], "--out", str(out), "--model",
           setup["base"], "--user-model", kind, "--alpha", str(alpha), "--batch-size", str(setup["batch_size"]),
           "--max-steps", str(setup["steps"]), "--sft-steps", "0", "--lr", "1e-3", "--beta", "0.5",
           "--log-steps", "1", "--save-steps", str(setup["steps"]), "--seed", "0", "--max-length", str(MAX_LENGTH),
           "--max-prompt-length", str(MAX_PROMPT_LENGTH), "--reference-cache", "none", "--report-to", "none",
           "--threads", str(threads), "--mixed-precision", "bf16" if dtype == "bf16" else "no"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=tree_env(src))
    if proc.returncode != 0:
        raise RuntimeError(f"{src.name} {method}: {proc.stderr[-2000:]}")
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"step_s": median_step(logged_step_times(out)), "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--before", default="c66674e", help="the commit to compare against (default c66674e)")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="prlhf_hot_loop_") as scratch:
        work = Path(scratch)
        before = work / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(before), args.before], check=True,
                       capture_output=True)
        try:
            setup = prepare(work / "setup", quick=False, model=args.model)
            trees = {"before": before, "after": REPO}
            for src in trees.values():
                check_imports_from(src)
            runs = {t: {m: [] for m in PRLHF_METHODS} for t in trees}
            for repeat in range(args.repeats):
                for method in PRLHF_METHODS:
                    for tree, src in trees.items():  # interleaved: load drifts hit both trees alike
                        r = train_once(src, setup, method, args.dtype, work / f"{tree}_{method}_{repeat}",
                                       args.threads)
                        runs[tree][method].append(r)
                        print(f"[{repeat + 1}/{args.repeats}] {tree} {method}: {r['step_s']:.4f} s/step", flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)], check=False)
    result = {"model": args.model, "dtype": args.dtype, "before": args.before, "repeats": args.repeats,
              "batch_size": setup["batch_size"], "steps": setup["steps"], "methods": {}}
    for m in PRLHF_METHODS:
        b = statistics.median(r["step_s"] for r in runs["before"][m])
        a = statistics.median(r["step_s"] for r in runs["after"][m])
        diff = max(abs(x - y) for x, y in zip(runs["before"][m][0]["losses"], runs["after"][m][0]["losses"]))
        result["methods"][m] = {"step_s_before": b, "step_s_after": a, "speedup": b / a,
                                "max_logged_loss_difference": diff}
    name = f"hot_loop_{args.model}_{args.dtype}"
    lines = [f"# Training loop before ({args.before}) / after: {args.model}, {args.dtype}", "",
             f"Batch {setup['batch_size']} pairs, {setup['steps']} steps, medians over {args.repeats} repeat(s), "
             f"{args.threads} threads.", "",
             "| method | s/step before | s/step after | speed-up | max difference of logged losses |",
             "|---|---|---|---|---|"]
    for m, r in result["methods"].items():
        lines.append(f"| {m} | {r['step_s_before']:.4f} | {r['step_s_after']:.4f} | {r['speedup']:.2f}x | "
                     f"{r['max_logged_loss_difference']:.2e} |")
    atomic_write_text(out / f"{name}.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(out / f"{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
