"""What a new user's 10 choices teach their row, by where the two candidates come from (issue 23's accuracy gap).

The loop (`benchmarks/loop.py`) fits a new user's row on pairs the served model wrote; its new users reach about
0.66x the seen users' held-out accuracy, while the same fit on 10 of the style task's own pairs reaches about
1.0x. This script asks whether other candidates would do better, offline and with the loop's pieces (its hidden
profiles and scoring, the adapt code with the server's step count): for each of the task's unseen users, it
takes the first 10 pairs with a winner from 40 sampled pairs, fits the user's row on them, and scores the row on
the user's held-out test pairs (content-disjoint topics). Candidate sources:

- task:         10 of the user's own task pairs (same content, opposite styles), scored on the other 15
- generic:      both candidates sampled under the generic user (what the server does today)
- generic_seen: one under the generic user, one under a random seen user's row
- seen_pairs:   each under a different random seen user's row
- divisive:     the 20 training pairs that split the run's seen users most (prlhf.train.onboard_pairs), the
                same 20 for every new user, who answers them in order

    python benchmarks/loop_pairs.py --run RUN_DIR --seed 2 --out OUT
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys

import torch

from loop import TASK, score
from prlhf.config import ONBOARD_STEPS
from prlhf.data.schema import PreferenceRecord
from prlhf.data.tasks import build_style_task
from prlhf.evaluate.generation import generate_texts
from prlhf.evaluate.run_eval import evaluate_run
from prlhf.runs.directory import load_run
from prlhf.train.adapt import adapt_users
from prlhf.train.onboard_pairs import choose_onboarding_pairs
from script_results import measure_into_out

SOURCES = ("task", "generic", "generic_seen", "seen_pairs", "divisive")
GENERIC = "__generic__"  # an id no run knows: the generic user
CANDIDATE_PAIRS = 40
CHOICES = 10
DIVISIVE = 2 * CHOICES  # pairs chosen: some are ties for a given user
OUTPUTS = ("results.json", "results.md")


def sampled_choices(run, task, source: str, seed: int) -> tuple[list[PreferenceRecord], int]:
    """Every unseen user's first CHOICES winners among CANDIDATE_PAIRS sampled pairs, and the number of ties."""
    rng = random.Random(seed)
    prompts = sorted({r.prompt for r in task.train})
    rows = {"generic": lambda: (GENERIC, GENERIC), "generic_seen": lambda: (GENERIC, rng.choice(task.seen_users)),
            "seen_pairs": lambda: tuple(rng.sample(task.seen_users, 2))}[source]
    left, right = zip(*(rows() for _ in range(CANDIDATE_PAIRS)))
    asked = [prompts[k % len(prompts)] for k in range(CANDIDATE_PAIRS)]
    a = generate_texts(run, asked, left, max_new_tokens=48, do_sample=True, seed=seed + 1)
    b = generate_texts(run, asked, right, max_new_tokens=48, do_sample=True, seed=seed + 2)
    return first_winners(task, list(zip(asked, a, b)), prefix=" ")


def divisive_choices(run, task, seed: int) -> tuple[list[PreferenceRecord], int]:
    """Every unseen user's first CHOICES winners among the DIVISIVE pairs chosen from the training data."""
    pairs = choose_onboarding_pairs(run, task.train, DIVISIVE, seed=seed)
    return first_winners(task, [(p.prompt, p.response_a, p.response_b) for p in pairs])


def first_winners(task, candidates: list[tuple], prefix: str = "") -> tuple[list[PreferenceRecord], int]:
    """Each unseen user's first CHOICES winners among (prompt, text, text) candidates, by their profile's score,
    and the number of ties passed over; `prefix` goes before both texts of a record (sampled continuations)."""
    records, ties = [], 0
    for user in task.unseen_users:
        wins = 0
        for prompt, x, y in candidates:
            sx, sy = score(x, task.users[user]), score(y, task.users[user])
            if sx == sy:
                ties += 1
                continue
            chosen, rejected = (x, y) if sx > sy else (y, x)
            records.append(PreferenceRecord(user_id=user, prompt=prompt, chosen=prefix + chosen,
                                            rejected=prefix + rejected))
            wins += 1
            if wins == CHOICES:
                break
    return records, ties


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run trained on the style task of --seed (loop.py's)")
    parser.add_argument("--seed", type=int, default=2, help="the style task's seed (2: not a reported one)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sources", default=",".join(SOURCES), help="comma-separated, of " + ", ".join(SOURCES))
    args = parser.parse_args()
    measure_into_out(parser, args, "loop_pairs", OUTPUTS, measure)


def measure(args) -> tuple[dict, list[str]]:
    """Every source's fit and scores, and the report's lines."""
    torch.set_num_threads(args.threads)
    task = build_style_task(**{**TASK, "seed": args.seed})
    run = load_run(args.run)
    unseen = set(task.unseen_users)
    by_user = {u: [r for r in task.test if r.user_id == u] for u in task.unseen_users}
    scored = [r for u in task.unseen_users for r in by_user[u][CHOICES:]]  # the same pairs for every source
    seen = evaluate_run(run, [r for r in task.test if r.user_id not in unseen])["per_user"]
    result = {"run": args.run, "seed": args.seed, "fit_steps": ONBOARD_STEPS, "candidate_pairs": CANDIDATE_PAIRS,
              "seen_mean": statistics.mean(v["accuracy"] for v in seen.values()),
              "generic_mean": statistics.mean(v["accuracy"] for v in evaluate_run(run, scored)["per_user"].values()),
              "sources": {}}
    for source in args.sources.split(","):
        if source == "task":
            fit, ties = [r for u in task.unseen_users for r in by_user[u][:CHOICES]], 0
        elif source == "divisive":
            fit, ties = divisive_choices(run, task, args.seed)
        else:
            fit, ties = sampled_choices(run, task, source, args.seed)
        fitted, _ = adapt_users(run, fit, steps=ONBOARD_STEPS, show_progress=False)
        per_user = evaluate_run(fitted, scored)["per_user"]
        result["sources"][source] = {"new_mean": statistics.mean(per_user[u]["accuracy"] for u in unseen),
                                     "new_worst": min(per_user[u]["accuracy"] for u in unseen),
                                     "ties": ties, "pairs_fitted": len(fit)}
    lines = [f"# A new user's {CHOICES} choices, by where the candidates come from", "",
             f"Command: `python benchmarks/loop_pairs.py {' '.join(sys.argv[1:])}`", "",
             f"Style task seed {args.seed}, {len(unseen)} unseen users, {ONBOARD_STEPS} fit steps; accuracy on each "
             f"unseen user's last {len(by_user[task.unseen_users[0]]) - CHOICES} test pairs (content-disjoint topics). "
             f"Seen users (trained) on their test pairs: {result['seen_mean']:.3f}; unseen users on the generic "
             f"user: {result['generic_mean']:.3f}.", "",
             "| candidates | new users' mean / worst accuracy | / seen mean | ties among the pairs looked at |",
             "|---|---|---|---|"]
    for source, r in result["sources"].items():
        lines.append(f"| {source} | {r['new_mean']:.3f} / {r['new_worst']:.3f} | "
                     f"{r['new_mean'] / result['seen_mean']:.2f}x | {r['ties']} |")
    return result, lines


if __name__ == "__main__":
    main()
