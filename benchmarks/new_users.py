"""New users after training (issue 5): accuracy of unseen users vs the number k of their comparisons.

Trains a P-DPO individual run on the style task's 16 seen users (`prlhf train --model tiny`, default settings),
then, for each of 8 unseen users, keeps a fixed held-out set of 25 of their 45 pairs and adapts their embedding
(`prlhf.train.adapt.adapt_users`, LM and known users frozen) on k of the other 20, for k in {0, 1, 2, 5, 10, 20}
(k = 0 is the generic user). Each k > 0 is repeated over several draws of the k pairs. A second run, trained on
the same task with `user_text` profiles, measures the text warm start (k = 0, 1, 2, 5, with and without).

    python benchmarks/new_users.py --out benchmarks/results/new_users
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import torch

from prlhf.config import ADAPT_LR_FACTOR, DEFAULT_STEPS
from prlhf.data.tasks import build_style_task
from prlhf.evaluate.run_eval import evaluate_run
from prlhf.runs.directory import load_run
from prlhf.train.adapt import adapt_users, default_adapt_lr

KS = (0, 1, 2, 5, 10, 20)
WARM_KS = (0, 1, 2, 5)
N_EVAL = 25  # fixed held-out pairs per unseen user, the same for every k
TASK = dict(n_seen_users=16, n_unseen_users=8, train_pairs_per_user=100, test_pairs_per_user=45, seed=0)


def train_run(work: Path, name: str, with_user_text: bool, threads: int, reuse: bool) -> tuple[Path, object, float]:
    task = build_style_task(**TASK, with_user_text=with_user_text)
    data, run_dir = work / f"data_{name}", work / f"run_{name}"
    task.write(data)
    seconds = float("nan")
    if not (reuse and (run_dir / "run.json").is_file()):
        shutil.rmtree(run_dir, ignore_errors=True)
        start = time.time()
        subprocess.run(["prlhf", "train", "--data", str(data / "train.jsonl"), "--out", str(run_dir), "--model",
                        "tiny", "--threads", str(threads), "--quiet"], check=True, stdout=subprocess.DEVNULL)
        seconds = time.time() - start
    return run_dir, task, seconds


def split_pools(task, seed: int = 0) -> tuple[dict[str, list], dict[str, list]]:
    """Per unseen user: (pool of 20 adaptation pairs, fixed 25 evaluation pairs), seeded."""
    pools, evals = {}, {}
    for uid in task.unseen_users:
        recs = [r for r in task.test if r.user_id == uid]
        random.Random(f"{seed}:{uid}").shuffle(recs)
        evals[uid], pools[uid] = recs[:N_EVAL], recs[N_EVAL:]
    return pools, evals


def draw(pools: dict[str, list], k: int, repeat: int) -> list:
    """k pairs of each user's pool; repeat r takes a different (seeded) subset."""
    out = []
    for uid, pool in pools.items():
        order = list(range(len(pool)))
        random.Random(f"draw:{repeat}:{uid}").shuffle(order)
        out += [pool[i] for i in order[:k]]
    return out


def curve(run, pools, evals, ks, repeats: int, steps: int, lr: float, warm_start: str = "none",
          known=None) -> dict:
    """{k: {"mean", "per_draw", "seconds_per_user"}}: mean over unseen users of their held-out accuracy."""
    eval_records = [r for recs in evals.values() for r in recs]
    results = {}
    for k in ks:
        accs, secs = [], []
        for rep in range(1 if k == 0 else repeats):
            fit = draw(pools, max(k, 1), rep)  # k = 0: one step is fitted but the "start" accuracy is reported
            _, report = adapt_users(run, fit, eval_records=eval_records, steps=steps if k else 1, lr=lr,
                                    warm_start=warm_start, known_records=known, show_progress=False)
            key = "start" if k == 0 else "after"
            accs.append(statistics.mean(u[key] for u in report["users"].values()))
            secs.append(report["seconds_per_user"])
        results[k] = {"mean": statistics.mean(accs), "std": statistics.pstdev(accs), "per_draw": accs,
                      "seconds_per_user": None if k == 0 else statistics.mean(secs)}
        print(f"  {warm_start:>4} k={k:>2}: accuracy {results[k]['mean']:.3f} (+- {results[k]['std']:.3f})"
              + ("" if k == 0 else f", {results[k]['seconds_per_user']:.2f} s per user"), flush=True)
    return results


def single_user_timing(run, pools, evals, steps: int, lr: float) -> dict:
    """Wall time of adapting one user alone (reference pass, fitting, before/after evaluation), k = 10 and 20."""
    uid = next(iter(pools))
    out = {}
    for k in (10, 20):
        start = time.time()
        adapt_users(run, pools[uid][:k], eval_records=evals[uid], steps=steps, lr=lr, user=uid, show_progress=False)
        out[k] = round(time.time() - start, 2)
        print(f"  one user alone, k={k}: {out[k]:.2f} s wall", flush=True)
    return out


def sweep(run, pools, evals, k: int, lrs, steps_list) -> dict:
    """Learning rate x steps at one k (tuning the defaults; reported, not used for the table)."""
    eval_records = [r for recs in evals.values() for r in recs]
    out = {}
    for lr in lrs:
        for steps in steps_list:
            _, rep = adapt_users(run, draw(pools, k, 0), eval_records=eval_records, steps=steps, lr=lr,
                                 show_progress=False)
            out[f"lr={lr},steps={steps}"] = round(rep["mean_after"], 3)
            print(f"  sweep k={k} lr={lr} steps={steps}: {rep['mean_after']:.3f}", flush=True)
    return out


def plot(results: dict, seen_mean: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = list(KS)
    main = results["k_curve"]
    ax.errorbar(xs, [main[k]["mean"] for k in xs], yerr=[main[k]["std"] for k in xs], marker="o", capsize=3,
                label="unseen users, adapted (plain run)")
    for name, style in (("none", "s--"), ("text", "^-")) if "warm_start" in results else ():
        c = results["warm_start"][name]
        ax.plot(list(WARM_KS), [c[k]["mean"] for k in WARM_KS], style,
                label=f"user_text run, warm start: {name}")
    ax.axhline(seen_mean, color="gray", ls=":", label=f"seen users (mean) {seen_mean:.2f}")
    ax.axhline(0.9 * seen_mean, color="red", ls=":", lw=0.8, label="0.9 x seen")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(xs, [str(k) for k in xs])
    ax.set_xlabel("comparisons of the new user (k)")
    ax.set_ylabel("held-out accuracy (25 pairs per user)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/new_users")
    parser.add_argument("--work", default="/tmp/prlhf_new_users_bench", help="scratch folder for data and runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="draws of the k pairs per k > 0")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--lr", type=float, default=None,
                        help="adaptation rate (default: the library's, ADAPT_LR_FACTOR x the run's user-model rate)")
    parser.add_argument("--sweep", action="store_true", help="also sweep lr x steps at k = 10")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs in --work")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task (users, pairs, splits)")
    parser.add_argument("--no-warm-start", action="store_true", help="skip the user_text warm-start part")
    args = parser.parse_args()
    TASK["seed"] = args.seed
    torch.set_num_threads(args.threads)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    run_dir, task, train_s = train_run(work, "plain", False, args.threads, args.reuse)
    run = load_run(run_dir)
    seen_eval = evaluate_run(run, [r for r in task.test if r.user_id in set(task.seen_users)])
    seen_mean = seen_eval["mean_user_accuracy"]
    print(f"seen users: mean accuracy {seen_mean:.3f} (train {train_s:.0f} s)", flush=True)
    pools, evals = split_pools(task)
    trained_lr = run.config.resolved_user_lr()  # the rate the run trained its users' offsets with
    lr = args.lr or default_adapt_lr(run.config, "individual")
    results = {"seen_mean_accuracy": seen_mean, "seen_worst_accuracy": seen_eval["worst_user_accuracy"],
               "train_seconds": None if math.isnan(train_s) else round(train_s, 1)}
    if args.sweep:
        factors = sorted({0.3, 1.0, 3.0, 10.0, ADAPT_LR_FACTOR})  # multiples of the trained rate, like the default
        results["sweep_k10"] = sweep(run, pools, evals, 10, [round(f * trained_lr, 6) for f in factors], (20, 40))
    results["k_curve"] = curve(run, pools, evals, KS, args.repeats, args.steps, lr)
    results["single_user_wall_seconds"] = single_user_timing(run, pools, evals, args.steps, lr)

    if not args.no_warm_start:
        text_dir, text_task, text_train_s = train_run(work, "text", True, args.threads, args.reuse)
        text_run = load_run(text_dir)
        text_seen = evaluate_run(text_run, [r for r in text_task.test if r.user_id in set(text_task.seen_users)])
        print(f"user_text run: seen mean accuracy {text_seen['mean_user_accuracy']:.3f}", flush=True)
        t_pools, t_evals = split_pools(text_task)
        results["text_run_seen_mean_accuracy"] = text_seen["mean_user_accuracy"]
        results["warm_start"] = {ws: curve(text_run, t_pools, t_evals, WARM_KS, args.repeats, args.steps, lr,
                                           warm_start=ws, known=text_task.train) for ws in ("none", "text")}

    k10 = results["k_curve"][10]["mean"]
    slowest = max(results["single_user_wall_seconds"].values())
    results["targets"] = {"k10_over_seen": k10 / seen_mean, "k10_target_met": k10 >= 0.9 * seen_mean,
                          "max_seconds_per_user": slowest, "seconds_target_met": slowest <= 30}
    command = (f"python benchmarks/new_users.py --out {args.out}" + (" --sweep" if args.sweep else "")
               + (f" --seed {args.seed}" if args.seed else "") + (" --no-warm-start" if args.no_warm_start else "")
               + (f" --lr {args.lr}" if args.lr else ""))
    report = {"task": {**TASK, "n_eval_per_unseen_user": N_EVAL, "adapt_pool_per_unseen_user": 45 - N_EVAL},
              "command": command, "steps": args.steps, "lr": lr, "trained_user_lr": trained_lr,
              "repeats": args.repeats,
              "machine": f"{platform.machine()}, Python {platform.python_version()}, {args.threads} threads",
              **results}
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(results, seen_mean, out / "accuracy_vs_k.png")
    table = markdown(results)
    (out / "results.md").write_text(
        f"# New users: accuracy vs number of comparisons\n\nCommand: `{command}`\n\n"
        f"Style task, {TASK['n_seen_users']} seen users (P-DPO individual, `prlhf train --model tiny`, default "
        f"settings), {TASK['n_unseen_users']} unseen users with a fixed held-out set of {N_EVAL} pairs each; "
        f"adaptation on k of their other {45 - N_EVAL} pairs ({args.steps} AdamW steps, lr {lr:.3g} = "
        f"{lr / trained_lr:.3g}x the rate the run trained its users' offsets with, only the new rows train), mean "
        f"over unseen users, +- std over {args.repeats} draws of the k pairs. "
        f"Machine: {report['machine']}.\n\n" + table)
    print(table)


def markdown(results: dict) -> str:
    seen = results["seen_mean_accuracy"]
    lines = [f"Seen users (same run, their test pairs): mean accuracy {seen:.3f}, worst "
             f"{results['seen_worst_accuracy']:.3f}.\n",
             "| k | unseen-user accuracy | / seen mean | s per user (fit) |", "|---|---|---|---|"]
    for k, v in results["k_curve"].items():
        s = "-" if v["seconds_per_user"] is None else f"{v['seconds_per_user']:.2f}"
        lines.append(f"| {k}{' (generic)' if k == 0 else ''} | {v['mean']:.3f} +- {v['std']:.3f} | "
                     f"{v['mean'] / seen:.2f} | {s} |")
    if "warm_start" in results:
        ws = results["warm_start"]
        lines += ["", f"Warm start from `user_text` (run trained with profiles; seen mean "
                      f"{results['text_run_seen_mean_accuracy']:.3f}):", "",
                  "| k | warm start none | warm start text |", "|---|---|---|"]
        for k in WARM_KS:
            lines.append(f"| {k} | {ws['none'][k]['mean']:.3f} +- {ws['none'][k]['std']:.3f} | "
                         f"{ws['text'][k]['mean']:.3f} +- {ws['text'][k]['std']:.3f} |")
    lines += ["", "One user adapted alone (wall seconds incl. reference pass and evaluation): "
              + ", ".join(f"k={k}: {v:.2f} s" for k, v in results["single_user_wall_seconds"].items())]
    t = results["targets"]
    lines += ["", f"Targets: k=10 reaches {t['k10_over_seen']:.2f} x the seen mean (target >= 0.9: "
                  f"{'met' if t['k10_target_met'] else 'NOT met'}); one user adapted alone takes "
                  f"<= {t['max_seconds_per_user']:.2f} s wall (target <= 30 s: "
                  f"{'met' if t['seconds_target_met'] else 'NOT met'})."]
    if "sweep_k10" in results:
        lines += ["", "Tuning sweep at k = 10 (draw 0), mean unseen accuracy: "
                  + ", ".join(f"{k}: {v}" for k, v in results["sweep_k10"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
