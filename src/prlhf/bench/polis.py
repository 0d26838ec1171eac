"""`prlhf bench polis`: the paper's baselines on real Polis participants, scored on statements never in training.

Every trained method goes through `prlhf.train.train` and is scored by per-participant implicit-reward accuracy on
the held-out statements (`prlhf eval`'s numbers):
- `vanilla_dpo`: one model for everybody (uniform user model, alpha 0): the consensus;
- `p_dpo_individual`, `p_dpo_cluster`, `p_dpo_lowrank`: P-DPO with each participant's own user id;
- `opinion_groups`: P-DPO individual trained with Polis's own opinion group as the user id (the labels' own
  clustering: an upper reference for a cluster model); each seen participant is scored with their group's row,
  unseen participants with the generic user. Polis computed the groups from all of a participant's votes, the
  held-out ones included, so the baseline has seen a summary of the test labels.
New participants: unseen participants fitted from `adapt_k` pairs on training statements (`adapt_users`, LM and
known users frozen) and scored on their held-out pairs, against the seen participants' mean.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from prlhf.bench.experiment import train_method
from prlhf.bench.machine import machine_summary
from prlhf.bench.methods import pick
from prlhf.bench.options import bench_train_options
from prlhf.config import TrainConfig
from prlhf.data.schema import PreferenceRecord
from prlhf.data.tasks.common import _atomic_write, write_jsonl
from prlhf.data.tasks.polis import ATTRIBUTION, build_polis_task, to_group_ids
from prlhf.evaluate.report import save_figure
from prlhf.model.scoring import implicit_reward_margins, per_user_accuracy
from prlhf.runs.directory import load_run
from prlhf.safe_io import results_folder
from prlhf.train.adapt import adapt_users
from prlhf.train.reference import cached_reference_logps, reference_cache_dir

logger = logging.getLogger(__name__)
# The statements of the default conversation are at most 69 tokens with the tiny tokenizer (other conversations'
# up to about 130); the prompt (topic and question) about 20.
MAX_PROMPT_LENGTH = 64
MAX_LENGTH = 192
DEFAULT_CONVERSATIONS = ("american-assembly.bowling-green",)  # 1,053 seen participants at the full size
CLUSTERS = 10  # K of the authors' runs on real users (PRISM)
BOOTSTRAP_SAMPLES = 2000

# what the benchmark writes into --out (anything else there is refused: prlhf.safe_io.results_folder)
OUTPUTS = ("results.json", "report.md", "accuracy.png", "experiment.yaml", "work")


@dataclass(frozen=True)
class PolisSize:
    train_pairs_per_user: int
    test_pairs_per_user: int
    epochs: float
    adapt_users: int  # new participants fitted, drawn from the unseen ones that have adapt_k pairs
    adapt_k: int  # pairs each new participant is fitted from


QUICK = PolisSize(train_pairs_per_user=6, test_pairs_per_user=3, epochs=2, adapt_users=4, adapt_k=4)
# --quick checks the pipeline on a toy folder: a shorter warm-up keeps it to seconds per method
QUICK_TINY_TRAIN_DEFAULTS = {"sft_steps": 20}
FULL = PolisSize(train_pairs_per_user=8, test_pairs_per_user=4, epochs=1, adapt_users=32, adapt_k=10)

# name -> (TrainConfig overrides, train with Polis's group ids as user ids)
_SHARED = pick(["vanilla_dpo", "p_dpo_individual", "p_dpo_cluster", "p_dpo_lowrank"], clusters=CLUSTERS)
# The opinion groups are a fixed reference (the labels' own clustering): a --user-start given to the bench is for
# the participants' user models, not for the few group rows.
METHODS: dict[str, tuple[dict, bool]] = {**{name: (o, False) for name, o in _SHARED.items()},
                                         "opinion_groups": ({**_SHARED["p_dpo_individual"], "user_start": "random"},
                                                            True)}
ADAPTED_METHOD = "p_dpo_individual"


def bench_size(quick: bool, **given) -> PolisSize:
    """QUICK or FULL with the sizes the caller gave (None = the preset's; 0 is a size: no new participants)."""
    return replace(QUICK if quick else FULL, **{k: v for k, v in given.items() if v is not None})


def run_polis_bench(out: Path, model: str = "tiny", source: str | None = None,
                    conversations: Sequence[str] | None = None, quick: bool = False, seed: int = 0,
                    methods: Sequence[str] | None = None, epochs: float | None = None,
                    train_pairs_per_user: int | None = None, test_pairs_per_user: int | None = None,
                    adapt_users_n: int | None = None, adapt_k: int | None = None, adapt_steps: int | None = None,
                    adapt_start: str = "none", split: str = "test", held_out: str = "statements",
                    keep_runs: bool = False, reuse_runs: bool = False, **train_options) -> dict:
    """Build the task, train each method, score the held-out statements, fit new participants; writes
    results.json, report.md and accuracy.png into `out` and returns the results document.

    `adapt_start`: where the new participants' rows start before fitting, `adapt_users`' warm_start ("none": the
    generic user; "covotes": the row their votes predict from the training records).
    `conversations`: folder names under `source` (None: DEFAULT_CONVERSATIONS, or every folder with `quick`).
    `split="validation"` scores a validation split carved from the training statements instead of the test one
    (for tuning; see prlhf.data.tasks.polis). `held_out="votes"`: each participant's held-out statements are ones
    they did not vote on in training (others' training may use them), instead of statements in no training record.
    `train_options` are TrainConfig fields given to every trained
    method, over bench persona's defaults for the model. `reuse_runs` keeps OUT/work and takes each method that
    finished there (its scores saved) instead of training it again: a killed benchmark continues."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if quick and model == "tiny":
        train_options = {**QUICK_TINY_TRAIN_DEFAULTS, **{k: v for k, v in train_options.items() if v is not None}}
    options = bench_train_options(model, train_options, device)
    torch.set_num_threads(options["threads"])
    size = bench_size(quick, epochs=epochs, train_pairs_per_user=train_pairs_per_user,
                      test_pairs_per_user=test_pairs_per_user, adapt_users=adapt_users_n, adapt_k=adapt_k)
    chosen = list(methods or METHODS)
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if conversations is None and not quick:
        conversations = DEFAULT_CONVERSATIONS
    task = build_polis_task(source=source, conversations=conversations,
                            train_pairs_per_user=size.train_pairs_per_user,
                            test_pairs_per_user=size.test_pairs_per_user,
                            adapt_pairs_per_user=max(size.adapt_k, size.train_pairs_per_user), split=split,
                            held_out=held_out, seed=seed)
    seen = set(task.seen_users)
    if not seen or not task.test:
        raise ValueError("no participant has enough votes on both sides of the statement split")
    as_groups = to_group_ids(task)

    with results_folder(out, "polis", OUTPUTS):
        work = out / "work"
        if not reuse_runs:
            shutil.rmtree(work, ignore_errors=True)
        data = {False: work / "data" / "train.jsonl", True: work / "data_groups" / "train.jsonl"}
        for by_group, path in data.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(path, as_groups(task.train) if by_group else task.train)
        base_cfg = TrainConfig(data="", out="", model=model, epochs=size.epochs, seed=seed, report_to="none",
                               max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH, log_steps=20, **options)
        settings = run_settings(task, size, base_cfg, split, quick)

        results: dict[str, dict] = {}
        seen_accuracies: dict[str, dict[str, float]] = {}
        unseen_correct: dict[str, dict[str, list[int]]] = {}
        new_participants = None
        for name in chosen:
            overrides, by_group = METHODS[name]
            method_base = replace(base_cfg, data=str(data[by_group]))
            cfg = replace(method_base, out=str(work / "runs" / name), **overrides)
            key = {"train_config": asdict(cfg), "n_test_pairs": len(task.test)}  # what a saved score must match
            scored = load_saved(work / "scores" / f"{name}.json", key) if reuse_runs else None
            run = None
            if scored is None:
                start = time.time()
                done = train_method(name, method_base, overrides, Path(cfg.out), show_progress=not quick, device=device,
                                    reuse=reuse_runs)
                run, summary, reused = done.run, done.summary, done.reused
                margins = score_margins(run, task.test, as_groups if by_group else (lambda records: records))
                # a reused run's wall time is its scoring only; its training time is in the summary
                scored = {**key, "margins": margins.tolist(), "summary": summary, "reused_run": reused,
                          "wall_seconds": round(time.time() - start, 1)}
                save(work / "scores" / f"{name}.json", scored)
            if name == ADAPTED_METHOD and size.adapt_users > 0:
                adapt_key = {**key, "size": asdict(size), "adapt_steps": adapt_steps, "seed": seed,
                             "adapt_start": adapt_start}
                saved = work / "scores" / "new_participants.json"
                fitted = load_saved(saved, adapt_key) if reuse_runs else None
                if fitted is None:
                    run = run or load_run(cfg.out, device=device)
                    fitted = {**adapt_key, "result": fit_new_participants(run, task, size, seed, adapt_steps,
                                                                                      adapt_start)}
                    save(saved, fitted)
                new_participants = fitted["result"]
            margins, summary = torch.tensor(scored["margins"]), scored["summary"]
            ev = per_user_accuracy(task.test, margins, seen)
            per_user = ev.pop("per_user")
            seen_accuracies[name] = {u: v["accuracy"] for u, v in per_user.items() if v["seen"]}
            unseen_correct[name] = {"correct": [int(m > 0) for r, m in zip(task.test, margins.tolist())
                                                if r.user_id not in seen]}
            results[name] = {**ev, "n_seen_users": len(seen_accuracies[name]),
                             "n_unseen_users": sum(1 for v in per_user.values() if not v["seen"]),
                             "per_conversation_accuracy": per_conversation(seen_accuracies[name]),
                             "train_seconds": round(summary["train_seconds"], 1), "steps": summary.get("steps"),
                             "wall_seconds": scored["wall_seconds"], "reused_run": scored.get("reused_run", False),
                             "config": {**overrides, "user_ids": "opinion group" if by_group else "participant"}}
            print(f"{name}: mean seen-participant accuracy {ev['mean_user_accuracy']:.3f}, unseen "
                  f"{_f(ev['unseen_accuracy'])}; train {summary['train_seconds']:.0f} s", flush=True)
            doc = results_document(results, settings, seen_accuracies, unseen_correct, new_participants, seed)
            write_outputs(out, doc, plots=False)  # after each method: a killed run keeps what finished
        doc = results_document(results, settings, seen_accuracies, unseen_correct, new_participants, seed)
        write_outputs(out, doc, plots=True)
        if not keep_runs:  # data derived from the Polis files stays out of the results folder
            shutil.rmtree(work, ignore_errors=True)
        return doc


def load_saved(path: Path, key: dict) -> dict | None:
    """A result a killed benchmark left in OUT/work/scores, if it was computed with the same settings (`key`)."""
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    if any(doc.get(k) != v for k, v in json.loads(json.dumps(key)).items()):  # compared as JSON: tuples are lists
        return None
    logger.info("reusing %s", path)
    return doc


def save(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps(doc) + "\n")


def score_margins(run, records: Sequence[PreferenceRecord],
                  as_trained: Callable[[list[PreferenceRecord]], list[PreferenceRecord]]) -> torch.Tensor:
    """(N,) implicit-reward margins of `records`, each under the user id the run was trained with (`as_trained`);
    the base is shared across methods (same data and seed), so its log-probs come from the on-disk cache after the
    first method."""
    cfg = run.config
    pairs = run.encode(as_trained(list(records)))
    reference = cached_reference_logps(run.model, pairs, run.tokenizer.pad_token_id,
                                       reference_cache_dir(cfg.reference_cache), show_progress=False)
    return implicit_reward_margins(run.model, pairs, run.registry, run.tokenizer.pad_token_id, reference=reference)


def per_conversation(accuracies: dict[str, float]) -> dict[str, float]:
    """Mean participant accuracy per conversation (user ids are `<conversation>/<participant>`)."""
    by_conv = defaultdict(list)
    for uid, acc in accuracies.items():
        by_conv[uid.rsplit("/", 1)[0]].append(acc)
    return {c: statistics.mean(v) for c, v in sorted(by_conv.items())}


def fit_new_participants(run, task, size: PolisSize, seed: int, steps: int | None,
                         warm_start: str = "none") -> dict:
    """Fit `size.adapt_users` unseen participants from `size.adapt_k` of their pairs on training statements each;
    score them on their held-out pairs (before: the generic user; start: where `warm_start` puts them before any
    step; after: their fitted row)."""
    by_user = defaultdict(list)
    for r in task.extra["adapt"]:
        by_user[r.user_id].append(r)
    candidates = sorted(u for u, recs in by_user.items() if len(recs) >= size.adapt_k)
    rng = random.Random(f"{seed}:new-participants")
    rng.shuffle(candidates)
    picked = sorted(candidates[:size.adapt_users])
    if not picked:
        return {"n_users": 0, "k": size.adapt_k, "note": f"no unseen participant has {size.adapt_k} pairs"}
    fit = [r for u in picked for r in rng.sample(by_user[u], size.adapt_k)]
    held = [r for r in task.test if r.user_id in set(picked)]
    kwargs = {"steps": steps} if steps is not None else {}
    start = time.time()
    _, report = adapt_users(run, fit, eval_records=held, show_progress=False, warm_start=warm_start,
                            known_records=task.train, **kwargs)
    return {"n_users": len(picked), "k": size.adapt_k, "n_candidates": len(candidates),
            "n_eval_pairs": len(held), "steps": report["steps"], "lr": report["lr"], "start": warm_start,
            "mean_before": report["mean_before"],
            "mean_start": statistics.mean(s for u in picked if (s := report["users"][u]["start"]) is not None),
            "mean_after": report["mean_after"],
            "before_per_user": {u: report["users"][u]["before"] for u in picked},
            "start_per_user": {u: report["users"][u]["start"] for u in picked},
            "after_per_user": {u: report["users"][u]["after"] for u in picked},
            "seconds": round(time.time() - start, 1), "seconds_per_user": report["seconds_per_user"]}


def bootstrap_mean_diff(a: Sequence[float], b: Sequence[float], seed: int,
                        samples: int = BOOTSTRAP_SAMPLES) -> tuple[float, float, float]:
    """(mean of a - b, its 2.5% and 97.5% bootstrap quantiles), paired: a[i] and b[i] are one item (a participant,
    a pair) under two methods, and items are resampled with replacement."""
    x = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)  # (N,)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(x), (samples, len(x)), generator=gen)  # (S, N)
    means = x[idx].mean(1)
    return float(x.mean()), float(means.quantile(0.025)), float(means.quantile(0.975))


# The per-participant user models the targets are measured for: the issue names the individual one; the cluster and
# low-rank models are held to the same comparisons
PERSONAL = {"individual": "p_dpo_individual", "cluster": "p_dpo_cluster", "lowrank": "p_dpo_lowrank"}


def targets(results: dict, seen_accuracies: dict, unseen_correct: dict, new_participants: dict | None,
            seed: int) -> dict:
    """The issue's targets, each with the measured figure (and a bootstrap 95% interval where it is a difference):
    individual >= vanilla + 0.03 and >= opinion groups (paired over seen participants), unseen no worse than
    vanilla (paired over unseen pairs), new participants from k pairs >= 0.9 x the seen mean. The first three
    also for the cluster and low-rank models, where they ran (`cluster_minus_vanilla`, ...)."""
    out = {}
    for short, method in PERSONAL.items():
        out.update(_paired_targets(short, method, seen_accuracies, unseen_correct, seed))
    if new_participants and new_participants.get("n_users") and "p_dpo_individual" in seen_accuracies:
        seen_mean = results["p_dpo_individual"]["mean_user_accuracy"]
        ratio = new_participants["mean_after"] / seen_mean
        out["new_participants_over_seen_mean"] = {"value": ratio, "k": new_participants["k"],
                                                  "target": ">= 0.9", "met": ratio >= 0.9}
    return out


def _paired_targets(short: str, method: str, seen_accuracies: dict, unseen_correct: dict, seed: int) -> dict:
    out = {}
    mine = seen_accuracies.get(method)
    for other, label, bar in (("vanilla_dpo", "vanilla", 0.03), ("opinion_groups", "opinion_groups", 0.0)):
        if mine is None or other not in seen_accuracies:
            continue
        users = sorted(mine)
        d = bootstrap_mean_diff([mine[u] for u in users], [seen_accuracies[other][u] for u in users], seed)
        out[f"{short}_minus_{label}"] = {"value": d[0], "ci95": [d[1], d[2]], "target": f">= {bar:g}",
                                         "met": d[0] >= bar}
    if method in unseen_correct and "vanilla_dpo" in unseen_correct and unseen_correct[method]["correct"]:
        d = bootstrap_mean_diff(unseen_correct[method]["correct"], unseen_correct["vanilla_dpo"]["correct"], seed)
        out[f"unseen_{short}_minus_vanilla"] = {"value": d[0], "ci95": [d[1], d[2]], "target": ">= 0 (no worse)",
                                                "met": d[0] >= 0}
    return out


def results_document(results: dict, settings: dict, seen_accuracies: dict, unseen_correct: dict,
                     new_participants: dict | None, seed: int) -> dict:
    return {"task": "polis", "model": settings["model"], "methods": results, **settings,
            "new_participants": new_participants,
            "targets": targets(results, seen_accuracies, unseen_correct, new_participants, seed),
            "accuracy_histograms": {m: histogram(list(a.values())) for m, a in seen_accuracies.items()}}


def histogram(values: Sequence[float], bins: int = 10) -> list[int]:
    """Counts of per-participant accuracies in [0, 0.1), ..., [0.9, 1.0] (1.0 in the last bin)."""
    counts = [0] * bins
    for v in values:
        counts[min(int(v * bins), bins - 1)] += 1
    return counts


def run_settings(task, size: PolisSize, cfg: TrainConfig, split: str, quick: bool) -> dict:
    """What every results file records besides the numbers."""
    m = task.meta
    held = {"statements": "statements", "votes": "each participant's unvoted statements"}[m["held_out"]]
    return {"split": held if split == "test" else f"validation {held}", "held_out": m["held_out"],
            "n_users": m["n_seen"], "n_unseen_users": m["n_unseen"], "n_train_pairs": len(task.train),
            "n_test_pairs": len(task.test), "epochs": size.epochs, "batch_size": cfg.batch_size * cfg.grad_accum,
            "grad_accum": cfg.grad_accum, "user_tokens": cfg.user_tokens, "user_init": cfg.user_init,
            "user_start": cfg.user_start, "covote_rank": cfg.covote_rank, "user_rank": cfg.user_rank,
            "threads": cfg.threads,
            "lr": cfg.resolved_lr(), "user_lr": cfg.resolved_user_lr(), "user_code_lr": cfg.resolved_user_code_lr(),
            "sft_steps": cfg.resolved_sft_steps(), "beta": cfg.beta, "alpha": cfg.alpha, "seed": cfg.seed,
            "model": cfg.model, "mixed_precision": cfg.mixed_precision, "max_length": cfg.max_length,
            "max_prompt_length": cfg.max_prompt_length, "quick": quick, "machine": machine_summary(),
            "data": {k: m[k] for k in ("source", "conversations", "train_pairs_per_user", "test_pairs_per_user",
                                       "min_train_votes", "min_test_votes", "test_statement_fraction",
                                       "unseen_fraction", "split", "held_out", "per_conversation")},
            "attribution": ATTRIBUTION}


def write_outputs(out: Path, doc: dict, plots: bool) -> None:
    _atomic_write(out / "results.json", json.dumps(doc, indent=1) + "\n")
    _atomic_write(out / "report.md", render_report(doc))
    if plots:
        plot_results(doc, out / "accuracy.png")


HELD_OUT_WORDS = {"statements": "statements that occur in no training record",
                  "votes": "statements the participant did not vote on in training (other participants' training "
                           "records may use them: not content-disjoint)"}


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _start_words(doc: dict) -> str:
    """', users started from their co-votes (2 factors)' where the run used --user-start covotes."""
    if doc.get("user_start") != "covotes":
        return ""
    return f", users started from their co-votes ({doc['covote_rank']} factors; low-rank r = {doc['user_rank']})"


def _start_of_new(new: dict) -> str:
    """'0.790 at the rows their votes predict (before any step), ' where the new participants had a warm start."""
    if new.get("start", "none") == "none":
        return ""
    return f"{new['mean_start']:.3f} at the rows their votes predict (before any step), "


def render_report(doc: dict) -> str:
    convs = doc["data"]["per_conversation"]
    lines = [f"# Polis benchmark ({doc['model']}, split: {doc['split']})", "",
             f"{doc['n_users']} seen + {doc['n_unseen_users']} unseen participants in {len(convs)} conversation(s) "
             f"({', '.join(convs)}); {doc['n_train_pairs']} training pairs (at most "
             f"{doc['data']['train_pairs_per_user']} per participant), {doc['n_test_pairs']} held-out pairs (at most "
             f"{doc['data']['test_pairs_per_user']} per participant) on "
             f"{HELD_OUT_WORDS[doc.get('held_out', 'statements')]}. "
             f"{doc['epochs']} epoch(s) of {doc['batch_size']} pairs per step, learning rate {doc['lr']:g} (adapters) "
             f"/ {doc['user_lr']:g} (user model; cluster logits / low-rank vectors {doc['user_code_lr']:g}), "
             f"{doc['user_tokens']} user tokens{_start_words(doc)}, supervised warm-up {doc['sft_steps']} steps, "
             f"seed {doc['seed']}, "
             f"{doc['threads']} thread(s). Machine: {doc['machine']}.", "",
             "| method | mean seen-participant acc | worst seen | unseen participants (pooled) | pooled acc | "
             "train s |", "|---|---|---|---|---|---|"]
    for name, r in doc["methods"].items():
        lines.append(f"| {name} | {_f(r['mean_user_accuracy'])} | {_f(r['worst_user_accuracy'])} | "
                     f"{_f(r['unseen_accuracy'])} | {_f(r['accuracy'])} | {r['train_seconds']:.0f} |")
    lines.append("")
    new = doc.get("new_participants")
    if new and new.get("n_users"):
        lines += [f"New participants ({ADAPTED_METHOD} run): {new['n_users']} unseen participants fitted from "
                  f"{new['k']} pairs each on training statements ({new['steps']} steps, lr {new['lr']:g}), scored on "
                  f"their {new['n_eval_pairs']} held-out pairs: mean {new['mean_before']:.3f} with the generic user, "
                  f"{_start_of_new(new)}{new['mean_after']:.3f} fitted ({new['seconds_per_user']:.2f} s per "
                  "participant).", ""]
    if doc["targets"]:
        lines += ["| target | measured | 95% bootstrap interval | met |", "|---|---|---|---|"]
        for name, t in doc["targets"].items():
            ci = f"[{t['ci95'][0]:+.3f}, {t['ci95'][1]:+.3f}]" if "ci95" in t else "-"
            lines.append(f"| {name} {t['target']} | {t['value']:+.3f} | {ci} | {'yes' if t['met'] else 'no'} |")
        lines.append("")
    lines += [f"Data: {doc['attribution']}", ""]
    return "\n".join(lines)


def plot_results(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hx) = plt.subplots(1, 2, figsize=(12, 4))
    names = list(doc["methods"])
    for i, (key, label) in enumerate((("mean_user_accuracy", "mean seen participant"),
                                      ("unseen_accuracy", "unseen participants (generic user)"))):
        ys = [doc["methods"][m][key] or 0.0 for m in names]
        ax.bar([x + (i - 0.5) * 0.4 for x in range(len(names))], ys, 0.4, label=label)
    new = doc.get("new_participants")
    if new and new.get("n_users"):
        ax.axhline(new["mean_after"], color="C2", ls="--", lw=1,
                   label=f"new participants, {new['k']} pairs ({new['mean_after']:.3f})")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
    ax.set_ylim(0.3, 1.0)
    ax.set_ylabel("held-out accuracy (statements never in training)")
    ax.legend(fontsize=7)
    for name, counts in doc["accuracy_histograms"].items():  # a participant's accuracy takes few values: a CDF
        total, running, shares = sum(counts), 0, []
        for c in counts:
            running += c
            shares.append(running / total)
        hx.step([(i + 1) / len(counts) for i in range(len(counts))], shares, where="post", label=name)
    hx.set_xlabel("per-participant held-out accuracy (upper edge of a 0.1 bin)")
    hx.set_ylabel("share of seen participants at or below")
    hx.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
