"""`prlhf bench tldr`: personalized vs user-blind models on real labelers (OpenAI's TL;DR comparisons).

Trains vanilla DPO, P-DPO individual and cluster, P-RM individual and the uniform reward model on the seen
labelers' training posts, scores every labeler's held-out posts (content-disjoint: no test post is in training),
fits new labelers' embeddings from k of their comparisons (`adapt_users` on the P-DPO individual run), and compares
each labeler's observed rate of choosing the longer summary with the rate each model predicts for them.

Figures: `prlhf eval`'s JSON per method; the mean over seen labelers of personalized minus user-blind accuracy
with a bootstrap 95% interval (test comparisons resampled within each labeler, the same draws for both models);
the Spearman correlation across labelers of observed vs predicted long-summary rates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import resource
import shutil
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from prlhf.bench.experiment import train_method
from prlhf.bench.machine import machine_summary
from prlhf.bench.methods import pick
from prlhf.bench.options import bench_train_options
from prlhf.config import TrainConfig
from prlhf.data.schema import PreferenceRecord
from prlhf.data.tasks.common import _atomic_write
from prlhf.data.tasks.tldr import ATTRIBUTION, build_tldr_task
from prlhf.evaluate.report import save_figure
from prlhf.model.scoring import implicit_reward_margins, per_user_accuracy
from prlhf.runs.directory import load_run
from prlhf.safe_io import results_folder
from prlhf.train.adapt import adapt_users
from prlhf.train.reference import cached_reference_logps, reference_cache_dir

logger = logging.getLogger(__name__)

# name -> TrainConfig overrides, in the order they run: each personalized model right after its user-blind
# counterpart, so that a run cut short still has a comparison (the clusters come from the size: base config)
METHODS: dict[str, dict] = pick(["vanilla_dpo", "p_dpo_individual", "rm_uniform", "p_rm_individual", "p_dpo_cluster"])
# personalized method -> its user-blind counterpart
COUNTERPARTS = {"p_dpo_individual": "vanilla_dpo", "p_dpo_cluster": "vanilla_dpo", "p_rm_individual": "rm_uniform"}
ADAPTED_METHOD = "p_dpo_individual"  # adapt_users fits P-DPO runs (reward-model runs are not supported)
BOOTSTRAP_DRAWS = 2000
MIN_RATE_PAIRS = 5  # a labeler's long rate enters the correlation only with this many held-out pairs

# what the benchmark writes into --out (anything else there is refused: prlhf.safe_io.results_folder)
OUTPUTS = ("results.json", "report.md", "labelers.png", "experiment.yaml", "work")


@dataclass(frozen=True)
class TldrSize:
    n_seen: int | None  # None: every labeler that is not unseen
    n_unseen: int
    min_comparisons: int  # labelers with fewer are left out
    max_train_pairs_per_user: int | None
    max_test_pairs_per_user: int | None
    epochs: float
    max_prompt_length: int  # tokens kept from the prompt's end, so "TL;DR:" stays
    max_length: int
    adapt_ks: tuple[int, ...]  # comparisons per new labeler (0 = the generic user)
    adapt_steps: int
    clusters: int


# tiny: the pipeline end to end on small data; pretrained: SmolLM2-135M on 2 CPU cores (see COMMAND.md)
QUICK = TldrSize(n_seen=None, n_unseen=2, min_comparisons=0, max_train_pairs_per_user=None,
                 max_test_pairs_per_user=None, epochs=2, max_prompt_length=96, max_length=128, adapt_ks=(0, 2),
                 adapt_steps=4, clusters=2)
FULL_TINY = replace(QUICK, n_unseen=6, epochs=3, max_prompt_length=192, max_length=256, adapt_ks=(0, 5, 10),
                    adapt_steps=40, clusters=4)
PRETRAINED = replace(FULL_TINY, min_comparisons=20, max_train_pairs_per_user=40, max_test_pairs_per_user=30,
                     epochs=2, adapt_steps=20)


# --quick on the tiny model checks the pipeline: a short warm-up is enough for that
QUICK_TINY_TRAIN_DEFAULTS = {"sft_steps": 30}
# Over bench persona's pretrained defaults: TL;DR's prompts are long, and one 16-pair SmolLM2 micro-batch with
# 192-token prompts grew past 19 GB in bf16 on the CPU (killed out of memory), so 4 pairs per micro-batch; 16 pairs
# per step (not 64) give more updates from the few epochs a CPU affords.
PRETRAINED_TLDR_DEFAULTS = {"batch_size": 4, "grad_accum": 4}


def size_for(model: str, quick: bool, **overrides) -> TldrSize:
    size = QUICK if quick else (FULL_TINY if model == "tiny" else PRETRAINED)
    return replace(size, **{k: v for k, v in overrides.items() if v is not None})


# ------------------------------------------------------------------------------------------------ statistics


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties given their mean rank (what Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rho: Pearson's correlation of the ranks; None when either side is constant or n < 3."""
    if len(xs) != len(ys):
        raise ValueError("spearman needs two sequences of the same length")
    if len(xs) < 3:
        return None
    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def bootstrap_mean_difference(correct_a: dict[str, list[bool]], correct_b: dict[str, list[bool]],
                              draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> dict:
    """Mean over users of accuracy(a) - accuracy(b) and its bootstrap 95% interval: each draw resamples every
    user's test comparisons with replacement, the same comparisons for both models (a paired bootstrap)."""
    users = sorted(correct_a)
    if not users:
        return {"mean_difference": None, "ci95": None, "draws": draws, "n_users": 0}
    diffs = {u: [float(a) - float(b) for a, b in zip(correct_a[u], correct_b[u])] for u in users}
    point = sum(sum(d) / len(d) for d in diffs.values()) / len(users)
    rng = random.Random(seed)
    means = []
    for _ in range(draws):
        total = 0.0
        for u in users:
            d = diffs[u]
            total += sum(d[rng.randrange(len(d))] for _ in range(len(d))) / len(d)
        means.append(total / len(users))
    means.sort()
    lo, hi = means[int(0.025 * draws)], means[min(draws - 1, int(0.975 * draws))]
    return {"mean_difference": point, "ci95": [lo, hi], "draws": draws, "n_users": len(users),
            "n_comparisons": sum(len(d) for d in diffs.values())}


def chosen_is_longer(record: PreferenceRecord) -> bool | None:
    """Whether the chosen summary is the longer one, in characters (None for equal lengths)."""
    a, b = len(record.chosen), len(record.rejected)
    return None if a == b else a > b


def long_rates(records: Sequence[PreferenceRecord], margins: Sequence[float] | None = None) -> dict[str, dict]:
    """user -> {"n", "observed", "predicted"}: the share of the user's pairs (of unequal lengths) where the labeler
    chose the longer summary, and where the model (margins > 0: it prefers chosen) prefers the longer one."""
    obs, pred, n = defaultdict(int), defaultdict(int), defaultdict(int)
    for i, r in enumerate(records):
        longer = chosen_is_longer(r)
        if longer is None:
            continue
        n[r.user_id] += 1
        obs[r.user_id] += longer
        if margins is not None:
            pred[r.user_id] += (margins[i] > 0) == longer
    return {u: {"n": n[u], "observed": obs[u] / n[u], "predicted": pred[u] / n[u] if margins is not None else None}
            for u in sorted(n)}


def rate_correlation(rates: dict[str, dict], users: set[str]) -> dict:
    """Spearman's rho of observed vs predicted long rates over `users` with >= MIN_RATE_PAIRS pairs."""
    pick = [u for u in sorted(rates) if u in users and rates[u]["n"] >= MIN_RATE_PAIRS]
    rho = spearman([rates[u]["observed"] for u in pick], [rates[u]["predicted"] for u in pick])
    return {"spearman": rho, "n_users": len(pick)}


# --------------------------------------------------------------------------------------------------- running


def score(run, records: Sequence[PreferenceRecord], device: str) -> list[float]:
    """(N,) margins: P-DPO's implicit reward margin (reference log-probs from the shared on-disk cache) or the
    reward model's r(chosen) - r(rejected), each pair under its labeler's embedding (the generic one if unseen)."""
    cfg = run.config
    pairs = run.encode(records)
    reference = None
    if not getattr(run.model, "is_reward_model", False):
        reference = cached_reference_logps(run.model, pairs, run.tokenizer.pad_token_id,
                                           reference_cache_dir(cfg.reference_cache))
    return implicit_reward_margins(run.model, pairs, run.registry, run.tokenizer.pad_token_id,
                                   reference=reference).tolist()


def method_result(records, margins: list[float], seen: set[str], overrides: dict, seconds: dict) -> dict:
    """`prlhf eval`'s JSON plus per-labeler long rates and timings (`seen`: the labelers with training pairs,
    which are the ids a run's registry holds)."""
    result = per_user_accuracy(records, torch.tensor(margins), seen)
    rates = long_rates(records, margins)
    for uid, info in result["per_user"].items():
        info["long_rate"] = rates.get(uid)
    result.update(config=overrides, long_rate_correlation={"seen": rate_correlation(rates, seen),
                                                           "unseen": rate_correlation(rates, set(rates) - seen)},
                  **seconds)
    return result


def adapt_split(records: Sequence[PreferenceRecord], k_max: int, seed: int
                ) -> tuple[dict[str, list], dict[str, list]]:
    """Per unseen labeler: (fit pool of k_max comparisons, evaluation comparisons), split by post so that no
    evaluated post is fitted; labelers with fewer than k_max + MIN_RATE_PAIRS comparisons are left out."""
    by_user = defaultdict(list)
    for r in records:
        by_user[r.user_id].append(r)
    pools, evals = {}, {}
    for uid, recs in sorted(by_user.items()):
        posts = sorted({r.prompt for r in recs})
        random.Random(f"{seed}:{uid}").shuffle(posts)
        pool_posts: set[str] = set()
        for p in posts:  # whole posts into the pool until it holds k_max comparisons
            if sum(r.prompt in pool_posts for r in recs) >= k_max:
                break
            pool_posts.add(p)
        pool = [r for r in recs if r.prompt in pool_posts][:k_max]
        held = [r for r in recs if r.prompt not in pool_posts]
        if len(pool) >= k_max and len(held) >= MIN_RATE_PAIRS:
            pools[uid], evals[uid] = pool, held
    return pools, evals


def adapt_new_labelers(run, unseen_test: Sequence[PreferenceRecord], size: TldrSize, seed: int, device: str,
                       bf16: bool, batch_pairs: int) -> dict:
    """Mean held-out accuracy of new labelers after fitting their embeddings on k comparisons each
    (`batch_pairs` per forward pass: the training micro-batch, which is known to fit in memory)."""
    k_max = max(size.adapt_ks)
    pools, evals = adapt_split(unseen_test, k_max, seed)
    if not pools:
        return {"note": f"no unseen labeler has {k_max} + {MIN_RATE_PAIRS} comparisons", "ks": {}}
    eval_records = [r for uid in sorted(evals) for r in evals[uid]]
    out = {"labelers": sorted(pools), "n_eval": {u: len(v) for u, v in evals.items()}, "steps": size.adapt_steps,
           "ks": {}}
    for k in size.adapt_ks:
        start = time.time()
        adapted = run
        if k > 0:
            fit = [r for uid in sorted(pools) for r in pools[uid][:k]]
            # bf16 as in training; the fitted rows are then scored in fp32 below, as every method is
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 and device == "cpu" else nullcontext()
            with autocast:
                adapted, _ = adapt_users(run, fit, steps=size.adapt_steps, seed=seed, eval_records=[],
                                         batch_pairs=batch_pairs, show_progress=False)
        margins = score(adapted, eval_records, device)
        ev = per_user_accuracy(eval_records, torch.tensor(margins), set(pools) if k > 0 else set())
        per_user = {u: v["accuracy"] for u, v in ev["per_user"].items()}
        out["ks"][str(k)] = {"mean_user_accuracy": sum(per_user.values()) / len(per_user), "per_user": per_user,
                             "seconds": round(time.time() - start, 1)}
        print(f"new labelers, k={k}: mean accuracy {out['ks'][str(k)]['mean_user_accuracy']:.3f}", flush=True)
    return out


def run_tldr_bench(out: Path, model: str = "tiny", source: str | None = None, quick: bool = False, seed: int = 0,
                   methods: list[str] | None = None, keep_runs: bool = False, reuse_runs: bool = False,
                   size_overrides: dict | None = None, **train_options) -> dict:
    """Build the task, train and score each method, fit new labelers; writes results.json, report.md and plots
    after every method (a killed run keeps what finished; `reuse_runs` loads finished runs from OUT/work)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    given = {k: v for k, v in train_options.items() if v is not None}
    if quick and model == "tiny":
        train_options = {**QUICK_TINY_TRAIN_DEFAULTS, **given}
    elif model != "tiny" and "batch_size" not in given and "grad_accum" not in given:
        train_options = {**PRETRAINED_TLDR_DEFAULTS, **given}
    options = bench_train_options(model, train_options, device)
    torch.set_num_threads(options["threads"])
    size = size_for(model, quick, **(size_overrides or {}))
    chosen = methods or list(METHODS)
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    task = build_tldr_task(source=source, n_unseen_users=size.n_unseen, n_seen_users=size.n_seen,
                           min_comparisons=size.min_comparisons,
                           max_train_pairs_per_user=size.max_train_pairs_per_user,
                           max_test_pairs_per_user=size.max_test_pairs_per_user, seed=seed)
    with results_folder(out, "tldr", OUTPUTS):
        work = out / "work"
        data = work / "data"
        if not reuse_runs:
            shutil.rmtree(work, ignore_errors=True)
        task.write(data)
        seen = set(task.seen_users)
        steps_per_epoch = math.ceil(math.ceil(len(task.train) / options["batch_size"]) / options.get("grad_accum", 1))
        base_cfg = TrainConfig(data=str(data / "train.jsonl"), out="", model=model, epochs=size.epochs, seed=seed,
                               report_to="none", max_length=size.max_length, max_prompt_length=size.max_prompt_length,
                               clusters=size.clusters, log_steps=4, **options)
        settings = {"task": "tldr", "model": model, "seed": seed, "quick": quick, "size": size.__dict__,
                    "steps": math.ceil(size.epochs * steps_per_epoch), "n_train_pairs": len(task.train),
                    "n_test_pairs": len(task.test), "n_seen_users": len(seen), "n_unseen_users": len(task.unseen_users),
                    "batch_size": base_cfg.batch_size * base_cfg.grad_accum, "grad_accum": base_cfg.grad_accum,
                    "lr": base_cfg.resolved_lr(), "user_lr": base_cfg.resolved_user_lr(),
                    "user_code_lr": base_cfg.resolved_user_code_lr(), "user_tokens": base_cfg.user_tokens,
                    "threads": base_cfg.threads, "mixed_precision": base_cfg.mixed_precision,
                    "machine": machine_summary(), "users": task.users,
                    "data": {k: v for k, v in task.meta.items() if k != "attribution"}, "attribution": ATTRIBUTION,
                    "observed_long_rate": long_rates(task.test)}
        # a reused run's scores count only for the same held-out pairs (same data, seed and sizes)
        test_digest = hashlib.sha256(json.dumps([[r.user_id, r.prompt, r.chosen, r.rejected] for r in task.test]
                                                ).encode()).hexdigest()
        results: dict[str, dict] = {}
        margins_by_method: dict[str, list[float]] = {}
        doc = {**settings, "methods": results}
        for name in chosen:
            run_dir = work / "runs" / name
            start = time.time()
            cached = run_dir / "tldr_scores.json"
            saved = json.loads(cached.read_text()) if reuse_runs and cached.is_file() else {}
            recipe = json.loads(json.dumps({"method": METHODS[name], "size": size.__dict__, "options": options,
                                            "model": model, "seed": seed}))  # what the run was trained with
            if saved.get("test_digest") == test_digest and saved.get("recipe") == recipe:
                margins, seconds = saved["margins"], saved["seconds"]
                run = load_run(run_dir, device=device) if name == ADAPTED_METHOD else None
            else:
                cpu_start = process_cpu_seconds()
                done = train_method(name, base_cfg, METHODS[name], run_dir, show_progress=not quick, device=device)
                run, summary = done.run, done.summary
                margins = score(run, task.test, device)
                seconds = {"train_seconds": round(summary["train_seconds"], 1),
                           "wall_seconds": round(time.time() - start, 1),
                           "cpu_seconds": round(process_cpu_seconds() - cpu_start, 1)}
                _atomic_write(cached, json.dumps({"margins": margins, "seconds": seconds, "test_digest": test_digest,
                                                  "recipe": recipe}) + "\n")
            margins_by_method[name] = margins
            results[name] = method_result(task.test, margins, seen, METHODS[name], seconds)
            doc["personalization"] = personalization(margins_by_method, task.test, seen, seed)
            if name == ADAPTED_METHOD and size.adapt_ks:
                unseen_test = [r for r in task.test if r.user_id not in seen]
                doc["new_labelers"] = adapt_new_labelers(run, unseen_test, size, seed, device,
                                                         base_cfg.mixed_precision == "bf16", base_cfg.batch_size)
                doc["new_labelers"]["seen_mean_user_accuracy"] = results[name]["mean_user_accuracy"]
            write_outputs(out, doc, plots=False)
            r = results[name]
            print(f"{name}: seen labelers {r['mean_user_accuracy']:.3f} (mean), unseen {r['unseen_accuracy']}; "
                  f"wall {seconds['wall_seconds']:.0f} s", flush=True)
        write_outputs(out, doc, plots=True)
        if not keep_runs:  # the data derived from the comparisons stays out of the results folder
            shutil.rmtree(work, ignore_errors=True)
        return doc


def process_cpu_seconds() -> float:
    """CPU time of this process (all threads): on a shared machine it says what a method costs better than wall."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def personalization(margins: dict[str, list[float]], records, seen: set[str], seed: int) -> dict:
    """"personalized - user-blind" -> the mean over seen labelers of the accuracy gain, with a bootstrap CI."""
    out = {}
    for method, blind in COUNTERPARTS.items():
        if method in margins and blind in margins:
            a, b = correct_by_user(records, margins[method], seen), correct_by_user(records, margins[blind], seen)
            out[f"{method} - {blind}"] = bootstrap_mean_difference(a, b, seed=seed)
    return out


def correct_by_user(records, margins: Sequence[float], users: set[str]) -> dict[str, list[bool]]:
    out = defaultdict(list)
    for r, m in zip(records, margins):
        if r.user_id in users:
            out[r.user_id].append(m > 0)
    return dict(out)


# --------------------------------------------------------------------------------------------------- outputs


def write_outputs(out: Path, doc: dict, plots: bool) -> None:
    _atomic_write(out / "results.json", json.dumps(doc, indent=1) + "\n")
    _atomic_write(out / "report.md", render_report(doc))
    if plots and doc["methods"]:
        plot_results(doc, out)


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def short_id(uid: str) -> str:
    return uid[:8]


def render_report(doc: dict) -> str:
    s = doc["size"]
    lines = [f"# TL;DR labelers ({doc['model']})", "",
             f"{doc['n_seen_users']} seen + {doc['n_unseen_users']} unseen labelers, {doc['n_train_pairs']} training "
             f"and {doc['n_test_pairs']} held-out comparisons (held-out posts never occur in training), "
             f"{s['epochs']} epoch(s) = {doc['steps']} steps of {doc['batch_size']} pairs, prompts cut to their last "
             f"{s['max_prompt_length']} tokens, learning rate {doc['lr']:g} (adapters) / {doc['user_lr']:g} (user "
             f"model), {doc['user_tokens']} user tokens, seed {doc['seed']}, {doc['threads']} threads, mixed "
             f"precision {doc['mixed_precision']}. Machine: {doc['machine']}.", "",
             f"Data: {doc['attribution']}", "",
             "| method | pooled acc | mean seen labeler | worst seen | unseen (pooled) | rho(long rate), seen | "
             "train s | wall s |", "|---|---|---|---|---|---|---|---|"]
    for name, r in doc["methods"].items():
        lines.append(f"| {name} | {_f(r['accuracy'])} | {_f(r['mean_user_accuracy'])} | "
                     f"{_f(r['worst_user_accuracy'])} | {_f(r['unseen_accuracy'])} | "
                     f"{_f(r['long_rate_correlation']['seen']['spearman'])} | {r['train_seconds']:.0f} | "
                     f"{r['wall_seconds']:.0f} |")
    if doc.get("personalization"):
        lines += ["", "## Personalized minus user-blind (mean over seen labelers, bootstrap 95% interval)", "",
                  "| comparison | difference | 95% interval | labelers | comparisons |", "|---|---|---|---|---|"]
        for name, p in doc["personalization"].items():
            ci = p["ci95"]
            lines.append(f"| {name} | {p['mean_difference']:+.3f} | [{ci[0]:+.3f}, {ci[1]:+.3f}] | "
                         f"{p['n_users']} | {p['n_comparisons']} |")
    nl = doc.get("new_labelers")
    if nl and nl.get("ks"):
        lines += ["", f"## New labelers fitted from k comparisons ({ADAPTED_METHOD}, {nl['steps']} steps; "
                      f"{len(nl['labelers'])} labelers; seen labelers' mean "
                      f"{_f(nl['seen_mean_user_accuracy'])})", "",
                  "| k | mean held-out accuracy | seconds |", "|---|---|---|"]
        for k, v in nl["ks"].items():
            lines.append(f"| {k}{' (generic user)' if k == '0' else ''} | {_f(v['mean_user_accuracy'])} | "
                         f"{v['seconds']:.0f} |")
    names = list(doc["methods"])
    lines += ["", "## Per labeler (held-out accuracy; long rate: observed / predicted by each method)", "",
              "| labeler | seen | n test | observed long rate | " + " | ".join(names) + " | "
              + " | ".join(f"{n} long" for n in names) + " |", "|---" * (4 + 2 * len(names)) + "|"]
    for uid, info in sorted(doc["users"].items(), key=lambda x: (not x[1]["seen"], -x[1]["n_comparisons"])):
        obs = doc["observed_long_rate"].get(uid, {}).get("observed")
        accs, preds = [], []
        for n in names:
            pu = doc["methods"][n]["per_user"].get(uid)
            accs.append(_f(pu["accuracy"]) if pu else "-")
            preds.append(_f((pu.get("long_rate") or {}).get("predicted")) if pu else "-")
        lines.append(f"| {short_id(uid)} | {'yes' if info['seen'] else 'no'} | {info['n_test']} | {_f(obs)} | "
                     + " | ".join(accs) + " | " + " | ".join(preds) + " |")
    lines.append("")
    return "\n".join(lines)


def plot_results(doc: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["methods"])
    users = [u for u, i in sorted(doc["users"].items(), key=lambda x: (not x[1]["seen"], -x[1]["n_comparisons"]))
             if i["n_test"]]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [1, 2]})
    ax = axes[0]
    for name in names:
        per_user = doc["methods"][name]["per_user"]
        pts = [(per_user[u]["long_rate"]["observed"], per_user[u]["long_rate"]["predicted"]) for u in per_user
               if per_user[u].get("long_rate") and per_user[u]["long_rate"]["n"] >= MIN_RATE_PAIRS
               and per_user[u]["seen"]]
        if pts:
            rho = doc["methods"][name]["long_rate_correlation"]["seen"]["spearman"]
            ax.scatter(*zip(*pts), s=18, label=f"{name} (rho {_f(rho)})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("observed rate of choosing the longer summary (held-out)")
    ax.set_ylabel("rate at which the model prefers the longer one")
    ax.set_title("seen labelers")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    ax = axes[1]
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        per_user = doc["methods"][name]["per_user"]
        ys = [per_user[u]["accuracy"] if u in per_user else 0.0 for u in users]
        ax.bar([x + (i - (len(names) - 1) / 2) * width for x in range(len(users))], ys, width, label=name)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    n_seen = sum(doc["users"][u]["seen"] for u in users)
    ax.axvline(n_seen - 0.5, color="black", lw=0.8)
    ax.set_xticks(range(len(users)), [short_id(u) for u in users], rotation=70, fontsize=6)
    ax.set_ylabel("held-out accuracy")
    ax.set_title("per labeler (left of the line: seen; right: unseen, generic user)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, out / "labelers.png", dpi=110)
    plt.close(fig)
