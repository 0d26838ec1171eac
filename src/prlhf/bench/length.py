"""`prlhf bench length`: the paper's experiment 1 as a table (majority vs minority accuracy per method) and a
sweep of the majority share p: vanilla DPO serves the majority, so its minority accuracy falls as p grows,
while P-DPO's holds. Tiny model, pure P-DPO objective (no NLL term)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from prlhf.bench.experiment import train_on_one_base
from prlhf.bench.machine import machine_summary
from prlhf.bench.methods import PAPER_METHODS, pick
from prlhf.config import TINY_LR, TrainConfig
from prlhf.data.tasks import build_length_task
from prlhf.data.tasks.common import _atomic_write
from prlhf.evaluate.report import save_figure
from prlhf.evaluate.run_eval import evaluate_run
from prlhf.safe_io import results_folder

METHODS = pick(PAPER_METHODS, clusters=2)
MAJORITY, MINORITY = "long", "short"  # the length task gives the majority share to long-preferring users

# what the benchmark writes into --out (anything else there is refused: prlhf.safe_io.results_folder)
OUTPUTS = ("results.json", "report.md", "minority_vs_share.png", "experiment.yaml", "work")


def group_accuracy(result: dict, users: dict, group: str) -> float | None:
    accs = [v["accuracy"] for u, v in result["per_user"].items() if v["seen"] and users[u]["group"] == group]
    return sum(accs) / len(accs) if accs else None


def run_length_bench(out: Path, shares: tuple[float, ...] = (0.5, 0.7, 0.9), quick: bool = False,
                     threads: int = 2, seed: int = 0, n_users: int = 20) -> dict:
    torch.set_num_threads(threads)
    pairs_per_user, epochs = (24, 3) if quick else (40, 3)
    with results_folder(out, "length", OUTPUTS):
        work = out / "work"
        shutil.rmtree(work, ignore_errors=True)
        results: dict[str, dict] = {}
        for p in shares:
            task = build_length_task(n_seen_users=n_users, n_unseen_users=4, majority_share=p,
                                     train_pairs_per_user=pairs_per_user, test_pairs_per_user=20, seed=seed)
            data = task.write(work / f"p{p}" / "data")
            groups = {g: sum(1 for u in task.seen_users if task.users[u]["group"] == g) for g in (MAJORITY, MINORITY)}
            results[str(p)] = {"n_seen_users_by_group": groups, "methods": {}}
            base = TrainConfig(data=str(data["train"]), out="", model="tiny", epochs=epochs, lr=TINY_LR, seed=seed,
                               threads=threads, report_to="none")
            for done in train_on_one_base(base, METHODS, work / f"p{p}"):  # one tiny base per p, shared
                name = done.name
                ev = evaluate_run(done.run, task.test)
                results[str(p)]["methods"][name] = {
                    "majority_accuracy": group_accuracy(ev, task.users, MAJORITY),
                    "minority_accuracy": group_accuracy(ev, task.users, MINORITY),
                    "mean_user_accuracy": ev["mean_user_accuracy"], "worst_user_accuracy": ev["worst_user_accuracy"],
                    "unseen_accuracy": ev["unseen_accuracy"], "seconds": round(time.time() - done.started, 1)}
                r = results[str(p)]["methods"][name]
                print(f"p={p} {name}: majority {r['majority_accuracy']:.2f}, minority {r['minority_accuracy']:.2f}",
                      flush=True)
        doc = {"task": "length (tiny model)", "shares": results, "n_seen_users": n_users, "seed": seed,
               "train_pairs_per_user": pairs_per_user, "epochs": epochs, "quick": quick, "threads": threads,
               "machine": machine_summary()}
        _atomic_write(out / "results.json", json.dumps(doc, indent=1) + "\n")
        _atomic_write(out / "report.md", render(doc))
        plot(doc, out / "minority_vs_share.png")
        shutil.rmtree(work, ignore_errors=True)
        return doc


def _f(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def render(doc: dict) -> str:
    lines = ["# Length experiment: majority vs minority accuracy as the majority share grows", "",
             f"{doc['n_seen_users']} seen users (+4 unseen), {doc['train_pairs_per_user']} pairs each, "
             f"{doc['epochs']} epochs, tiny model, seed {doc['seed']}. Majority = prefers long; minority = short.", "",
             "| majority share p | users (maj/min) | method | majority acc | minority acc | worst seen user | unseen |",
             "|---|---|---|---|---|---|---|"]
    for p, res in doc["shares"].items():
        g = res["n_seen_users_by_group"]
        for name, r in res["methods"].items():
            lines.append(f"| {p} | {g[MAJORITY]}/{g[MINORITY]} | {name} | {_f(r['majority_accuracy'])} | "
                         f"{_f(r['minority_accuracy'])} | {_f(r['worst_user_accuracy'])} | "
                         f"{_f(r['unseen_accuracy'])} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = [float(p) for p in doc["shares"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in METHODS:
        for group, style in ((MINORITY, "-o"), (MAJORITY, ":x")):
            key = f"{'minority' if group == MINORITY else 'majority'}_accuracy"
            ax.plot(shares, [doc["shares"][str(p)]["methods"][name][key] for p in shares], style,
                    label=f"{name} ({'minority' if group == MINORITY else 'majority'})")
    ax.set_xlabel("majority share p")
    ax.set_ylabel("held-out accuracy (seen users)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
