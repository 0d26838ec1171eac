"""`prlhf bench persona`: the paper's baselines on persona-trait users (real statements), one table per split.

Every trained method goes through `prlhf.train.train` and is scored by per-user implicit-reward accuracy
(`prlhf eval`'s numbers). `prompting` trains nothing: the base model, with the user's profile text before the
prompt, is scored by its own likelihood preference log p(chosen) - log p(rejected).
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from prlhf.bench.experiment import train_method
from prlhf.bench.machine import machine_summary
from prlhf.bench.methods import pick
from prlhf.bench.options import bench_train_options
from prlhf.config import TrainConfig
from prlhf.data.tasks.common import _atomic_write, write_jsonl
from prlhf.data.tasks.persona import ATTRIBUTION, build_persona_task
from prlhf.data.tokenize import encode_records
from prlhf.evaluate.report import save_figure
from prlhf.model.scoring import implicit_reward_margins, per_user_accuracy
from prlhf.runs.directory import load_run
from prlhf.safe_io import results_folder
from prlhf.train.loop import train
from prlhf.train.reference import cached_reference_logps, reference_cache_dir

logger = logging.getLogger(__name__)
SPLITS = {"pairs": "test_pairs", "statements": "test"}  # split -> file stem; statements = content-disjoint

# what the benchmark writes into --out (anything else there is refused: prlhf.safe_io.results_folder)
OUTPUTS = ("results.json", "statements", "curves.json", "report.md", "accuracy.png", "learning_curves.png",
           "experiment.yaml", "work")


@dataclass(frozen=True)
class PersonaSize:
    n_seen: int
    n_unseen: int
    statements_per_pole: int
    train_pairs_per_user: int
    test_pairs_per_user: int
    epochs: float
    curve_pairs_per_user: int  # per user, for the learning curves (a subset of each test split)
    evals: int  # learning-curve points


QUICK = PersonaSize(32, 8, 30, 40, 12, 4, 4, 4)
FULL_TINY = PersonaSize(128, 32, 100, 60, 20, 4, 4, 6)
FULL_PRETRAINED = PersonaSize(64, 16, 12, 48, 8, 12, 2, 4)  # 576 steps of 64 pairs per trained method


OPT_IN_METHODS = ("p_dpo_lowrank",)  # beyond the paper's baselines: run only when named in `methods`


def method_overrides(n_profiles: int) -> dict[str, dict | None]:
    """name -> TrainConfig overrides (None: prompting, which trains nothing). The cluster model gets one cluster
    per profile, and a small variant a quarter of that."""
    m = pick(["vanilla_dpo", "text_dpo", "p_dpo_individual", "p_dpo_cluster", "p_dpo_individual_text",
              "p_dpo_lowrank"], clusters=n_profiles)
    return {"vanilla_dpo": m["vanilla_dpo"], "prompting": None, "text_dpo": m["text_dpo"],
            "p_dpo_individual": m["p_dpo_individual"], "p_dpo_cluster": m["p_dpo_cluster"],
            "p_dpo_cluster_small": {**m["p_dpo_cluster"], "clusters": max(2, n_profiles // 4)},
            "p_dpo_individual_text": m["p_dpo_individual_text"], "p_dpo_lowrank": m["p_dpo_lowrank"]}


def per_dimension(records, dims: list[str], margins: torch.Tensor, seen: set[str]) -> dict[str, float]:
    """Seen users' pooled accuracy per dimension."""
    correct, total = defaultdict(int), defaultdict(int)
    for rec, dim, m in zip(records, dims, margins.tolist()):
        if rec.user_id in seen:
            correct[dim] += m > 0
            total[dim] += 1
    return {d: correct[d] / total[d] for d in sorted(total)}


def run_persona_bench(out: Path, model: str = "tiny", n_users: int | None = None, quick: bool = False,
                      seed: int = 0, methods: list[str] | None = None, dimensions: list[str] | None = None,
                      epochs: float | None = None, data_dir: str | None = None, keep_runs: bool = False,
                      statements_per_pole: int | None = None, train_pairs_per_user: int | None = None,
                      curve_points: int | None = None, profile_ids: bool = False, majority_share: float = 0.7,
                      **train_options) -> dict:
    """Build the task, train each method, score both splits; `train_options` are `TrainConfig` fields given to
    every trained method (threads, batch_size, lr, user_lr, user_tokens, mixed_precision, ...), over the bench's
    defaults (TINY_TRAIN_DEFAULTS for `tiny`, else PRETRAINED_TRAIN_DEFAULTS).

    `majority_share` is each dimension's expected share of users at its first pole. A model that ignores the user
    (vanilla DPO) can score up to the mean realised majority share on split pairs by serving the majority: about
    0.7 at 0.7, about 0.5 at 0.5.

    `profile_ids` is a diagnostic: seen users who share a profile share one user id in training (each id then
    has all its profile's pairs), and each user is scored with its profile's embedding. It shows what implicit
    embeddings can learn when every id has many pairs; the figures stay per real user."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    options = bench_train_options(model, train_options, device)
    torch.set_num_threads(options["threads"])
    size = QUICK if quick else (FULL_TINY if model == "tiny" else FULL_PRETRAINED)
    if n_users:
        size = replace(size, n_seen=n_users, n_unseen=max(1, n_users // 4))
    if epochs:
        size = replace(size, epochs=epochs)
    if statements_per_pole:
        size = replace(size, statements_per_pole=statements_per_pole)
    if train_pairs_per_user:
        size = replace(size, train_pairs_per_user=train_pairs_per_user)
    if curve_points:
        size = replace(size, evals=curve_points)
    dims = dimensions or ["politics", "risk", "time"]
    task = build_persona_task(n_seen_users=size.n_seen, n_unseen_users=size.n_unseen, dimensions=dims,
                              statements_per_pole=size.statements_per_pole,
                              train_pairs_per_user=size.train_pairs_per_user,
                              test_pairs_per_user=size.test_pairs_per_user, majority_share=majority_share,
                              seed=seed, data_dir=data_dir)
    with results_folder(out, "persona", OUTPUTS):
        work = out / "work"
        data = work / "data"
        shutil.rmtree(work, ignore_errors=True)
        as_trained = to_profile_ids(task) if profile_ids else (lambda records: records)
        replace(task, train=as_trained(task.train)).write(data)
        test_sets = {"pairs": task.extra["test_pairs"], "statements": task.test}
        rng = random.Random(seed)
        curve_files = []
        for split, records in test_sets.items():  # a few pairs per user: learning curves at a bearable cost
            by_user = defaultdict(list)
            for r in records:
                by_user[r.user_id].append(r)
            subset = [r for u in sorted(by_user) for r in rng.sample(by_user[u], min(size.curve_pairs_per_user,
                                                                                     len(by_user[u])))]
            write_jsonl(data / f"curve_{split}.jsonl", as_trained(subset))
            curve_files.append(str(data / f"curve_{split}.jsonl"))

        profiles = {info["profile_id"] for info in task.users.values() if info["seen"]}
        all_methods = method_overrides(len(profiles))
        chosen = methods or [m for m in all_methods if m not in OPT_IN_METHODS]
        unknown = [m for m in chosen if m not in all_methods]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(all_methods)}")
        steps_per_epoch = math.ceil(math.ceil(len(task.train) / options["batch_size"]) / options.get("grad_accum", 1))
        total_steps = math.ceil(size.epochs * steps_per_epoch)
        base_cfg = TrainConfig(data=str(data / "train.jsonl"), out="", model=model, epochs=size.epochs, seed=seed,
                               eval_data=",".join(curve_files), eval_steps=math.ceil(total_steps / size.evals),
                               report_to="none", max_length=160, max_prompt_length=128, log_steps=4, **options)
        settings = run_settings(task, size, base_cfg, dims, profiles, total_steps, quick, profile_ids)

        seen = set(task.seen_users)
        results: dict[str, dict] = {split: {} for split in SPLITS}
        curves: dict[str, list] = {}
        first_run: Path | None = None
        trained = [m for m in chosen if all_methods[m] is not None]
        # prompting reuses the first trained run's base, so it goes right after it (not last: a cut-off run keeps it)
        order = trained[:1] + [m for m in chosen if all_methods[m] is None] + trained[1:]
        for name in order:
            overrides = all_methods[name]
            start = time.time()
            if overrides is None:
                if first_run is None:  # prompting scores a base; for tiny, that base is built and warmed up by a run
                    first_run = work / "runs" / "base_only"
                    train(replace(base_cfg, out=str(first_run), user_model="uniform", max_steps=1, eval_data=""),
                          show_progress=False)
                run = load_run(first_run, device=device)
                train_seconds = 0.0
            else:
                run_dir = work / "runs" / name
                done = train_method(name, base_cfg, overrides, run_dir, show_progress=not quick, device=device)
                run, train_seconds = done.run, done.summary["train_seconds"]
                first_run = first_run or run_dir
                curves[name] = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
            wall = time.time() - start
            for split, file_stem in SPLITS.items():
                records = test_sets[split]
                cfg = run.config
                with_text = cfg.use_user_text or overrides is None  # prompting: the profile text before the prompt
                pairs = encode_records(as_trained(records), run.tokenizer, cfg.max_length, cfg.max_prompt_length,
                                       with_text)
                # the base is shared across methods (same seed): its log-probs come from the on-disk cache after the
                # first method that saw these tokens
                reference = cached_reference_logps(run.model, pairs, run.tokenizer.pad_token_id,
                                                   reference_cache_dir(cfg.reference_cache))
                if overrides is None:  # the untrained base's own preference
                    margins = reference[0] - reference[1]
                else:
                    margins = implicit_reward_margins(run.model, pairs, run.registry, run.tokenizer.pad_token_id,
                                                      reference=reference)
                # 'seen' = has training pairs (the trained registry holds the same ids, renamed under profile_ids)
                ev = per_user_accuracy(records, margins, seen)
                results[split][name] = {
                    "mean_user_accuracy": ev["mean_user_accuracy"], "worst_user_accuracy": ev["worst_user_accuracy"],
                    "unseen_accuracy": ev["unseen_accuracy"], "train_seconds": round(train_seconds, 1),
                    "wall_seconds": round(wall, 1),
                    "per_dimension_accuracy": per_dimension(records, task.record_dimensions[file_stem], margins, seen),
                    "config": overrides,
                }
            logger.info("%s: pairs %.3f / statements %.3f", name, results["pairs"][name]["mean_user_accuracy"],
                        results["statements"][name]["mean_user_accuracy"])
            # after each method: a killed run keeps what finished
            write_outputs(out, results, curves, settings, plots=False)
            print(f"{name}: mean seen-user accuracy {results['pairs'][name]['mean_user_accuracy']:.3f} (pairs), "
                  f"{results['statements'][name]['mean_user_accuracy']:.3f} (statements); train {train_seconds:.0f} s",
                  flush=True)

        docs = write_outputs(out, results, curves, settings, plots=True)
        if not keep_runs:  # the data derived from the persona files stays out of the results folder too
            shutil.rmtree(work, ignore_errors=True)
        return docs


def to_profile_ids(task) -> Callable[[list], list]:
    """records -> the same records with each seen user's id replaced by its profile's ("profile-AAB")."""
    rename = {u: f"profile-{info['profile_id']}" for u, info in task.users.items() if info["seen"]}
    return lambda records: [replace(r, user_id=rename.get(r.user_id, r.user_id)) for r in records]


def run_settings(task, size: PersonaSize, cfg: TrainConfig, dims: list[str], profiles: set, total_steps: int,
                 quick: bool, profile_ids: bool) -> dict:
    """What every results file records besides the numbers."""
    return {"n_users": size.n_seen, "n_unseen_users": size.n_unseen, "model": cfg.model, "seed": cfg.seed,
            "dimensions": dims, "n_profiles": len(profiles), "n_train_pairs": len(task.train),
            "epochs": size.epochs, "steps": total_steps,
            "batch_size": cfg.batch_size * cfg.grad_accum, "grad_accum": cfg.grad_accum,  # pairs per step
            "user_tokens": cfg.user_tokens, "threads": cfg.threads,
            "mixed_precision": cfg.mixed_precision,
            "quick": quick, "profile_ids": profile_ids, "lr": cfg.resolved_lr(), "user_lr": cfg.resolved_user_lr(),
            "user_code_lr": cfg.resolved_user_code_lr(),
            "user_weight_decay": cfg.user_weight_decay, "gradient_checkpointing": cfg.gradient_checkpointing,
            "machine": machine_summary(),
            "data": {k: task.meta[k] for k in ("source", "n_train_statements", "n_test_statements",
                                               "train_pairs_per_user", "test_pairs_per_user", "majority_share")},
            "attribution": ATTRIBUTION}


def write_outputs(out: Path, results: dict, curves: dict, common: dict, plots: bool) -> dict:
    """results.json (split pairs), statements/results.json, curves.json, report.md (+ plots at the end)."""
    docs = {split: {"methods": results[split], **common, "split": split} for split in SPLITS}
    _atomic_write(out / "results.json", json.dumps(docs["pairs"], indent=1) + "\n")
    (out / "statements").mkdir(exist_ok=True)
    _atomic_write(out / "statements" / "results.json", json.dumps(docs["statements"], indent=1) + "\n")
    _atomic_write(out / "curves.json", json.dumps(curves, indent=1) + "\n")
    _atomic_write(out / "report.md", render_report(docs, curves))
    if plots:
        plot_results(docs, curves, out)
    return docs


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def render_report(docs: dict, curves: dict) -> str:
    any_doc = docs["pairs"]
    lines = [f"# Persona benchmark ({any_doc['model']})", "",
             f"{any_doc['n_users']} seen + {any_doc['n_unseen_users']} unseen users, dimensions "
             f"{', '.join(any_doc['dimensions'])} ({any_doc['n_profiles']} profiles among seen users), "
             f"{any_doc['n_train_pairs']} training pairs, {any_doc['epochs']} epoch(s) = {any_doc['steps']} steps of "
             f"{any_doc['batch_size']} pairs, learning rate {any_doc['lr']:g} (adapters) / "
             f"{any_doc['user_lr']:g} (user model, weight decay {any_doc['user_weight_decay']:g}; cluster logits / "
             f"low-rank vectors {any_doc['user_code_lr']:g}), "
             f"seed {any_doc['seed']}, {any_doc['threads']} threads, mixed precision {any_doc['mixed_precision']}."
             + (" Diagnostic: users who share a profile share one user id in training (--profile-ids)."
                if any_doc["profile_ids"] else ""), "",
             f"Data: {ATTRIBUTION}", ""]
    for split, doc in docs.items():
        dims = sorted({d for r in doc["methods"].values() for d in r["per_dimension_accuracy"]})
        lines += [f"## Split: {split}", "",
                  "| method | mean seen-user acc | worst seen user | unseen users | " + " | ".join(dims)
                  + " | train s |", "|---" * (5 + len(dims)) + "|"]
        for name, r in doc["methods"].items():
            lines.append(f"| {name} | {_f(r['mean_user_accuracy'])} | {_f(r['worst_user_accuracy'])} | "
                         f"{_f(r['unseen_accuracy'])} | "
                         + " | ".join(_f(r["per_dimension_accuracy"].get(d)) for d in dims)
                         + f" | {r['train_seconds']:.0f} |")
        lines.append("")
    if curves:
        lines += ["## Learning curves (mean seen-user accuracy on a per-user subset of each split)", "",
                  "| method | split | " + " | ".join(f"step {row['step']}" for row in next(iter(curves.values()))
                                                     if row["split"] == "curve_pairs") + " |"]
        n = sum(1 for row in next(iter(curves.values())) if row["split"] == "curve_pairs")
        lines.append("|---|---" + "|---" * n + "|")
        for name, rows in curves.items():
            for split in ("curve_pairs", "curve_statements"):
                vals = [_f(row["mean_user_accuracy"]) for row in rows if row["split"] == split]
                lines.append(f"| {name} | {split.removeprefix('curve_')} | " + " | ".join(vals) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_results(docs: dict, curves: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, (split, doc) in zip(axes, docs.items()):
        names = list(doc["methods"])
        for i, (key, label) in enumerate((("mean_user_accuracy", "mean seen user"),
                                          ("worst_user_accuracy", "worst seen user"),
                                          ("unseen_accuracy", "unseen users"))):
            ys = [doc["methods"][m][key] or 0.0 for m in names]
            ax.bar([x + (i - 1) * 0.27 for x in range(len(names))], ys, 0.27, label=label)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"split: {split}")
        ax.set_ylim(0, 1.05)
    axes[0].set_ylabel("held-out accuracy")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "accuracy.png", dpi=110)
    plt.close(fig)
    if curves:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
        for ax, split in zip(axes, ("curve_pairs", "curve_statements")):
            for name, rows in curves.items():
                pts = [(r["step"], r["mean_user_accuracy"]) for r in rows if r["split"] == split]
                ax.plot(*zip(*pts), marker="o", label=name)
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
            ax.set_title(f"learning curve, split {split.removeprefix('curve_')}")
            ax.set_xlabel("optimizer step")
        axes[0].set_ylabel("mean seen-user accuracy")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, out / "learning_curves.png", dpi=110)
        plt.close(fig)
