"""The whole loop, simulated (issue 23): new users talk to a live `prlhf serve --db` over HTTP, ask for pairs to
compare, answer by a hidden style profile, and get onboarded while the server keeps serving.

Trains a P-DPO individual run on the style task's 16 seen users (`prlhf train --model tiny`, default settings).
Then 20 users the run has never seen, each with a hidden profile (formality, layout, tone) from the same task,
use the server through 4 concurrent clients: each asks for a pair (`"compare": true`, a training-topic prompt),
scores both responses against their profile with the task's surface markers (prlhf.data.tasks.style), and posts
the better one, or a tie when both score the same, until 10 of their choices have a winner. The server fits
their row after those 10 (the adapt code, LM and other rows frozen) and swaps it in.

Reported: the held-out accuracy of each new user's fitted row on their test pairs (content-disjoint topics) next
to the seen users' (target >= 0.9x), the generic user's accuracy on the same pairs (before onboarding), how many
pairs each user needed, and the seconds from a user's 10th winning choice to a response with their own row
(median and worst; target <= 10 s on 2 cores). Afterwards, offline: the new users' accuracy with rows fitted on
their first 0, 2, ..., 10 collected winners (the same fit), and the style of their generations (samples on
test prompts scored by their profile) with their own row against the generic user.

    python benchmarks/loop.py --out benchmarks/results/loop

`--seed` builds the style task of another seed (to try settings on users no report uses) and `--sft-steps`
warms the served run up first (the probes in benchmarks/results/loop_probes). `--onboard-pairs K` has the server
show each new user K pairs from the training data first, chosen by `prlhf users onboard-pairs`:

    python benchmarks/loop.py --out benchmarks/results/loop_onboard_pairs --onboard-pairs 20
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from prlhf.bench.serve import Client
from prlhf.config import ONBOARD_STEPS
from prlhf.data.loading import load_records
from prlhf.data.store import ComparisonStore
from prlhf.data.tasks import build_style_task
from prlhf.data.tasks.style import (CASUAL_OPENERS, FORMAL_BLUNT_CLOSES, FORMAL_OPENERS, FORMAL_WARM_CLOSES,
                                    FORMAL_WARM_OPENS)
from prlhf.demo import DEMO_SFT_STEPS
from prlhf.evaluate.generation import generate_texts
from prlhf.evaluate.run_eval import evaluate_run
from prlhf.runs.directory import load_run
from prlhf.serve.app import Limits, PersonalizedServer
from prlhf.serve.background import serving
from prlhf.train.adapt import adapt_users
from prlhf.train.onboard_pairs import choose_onboarding_pairs

TASK = dict(n_seen_users=16, n_unseen_users=20, train_pairs_per_user=100, test_pairs_per_user=25, seed=0)
WARM = ("hope", "great", "thank", "awesome", "best", "love", "pleasure", "appreciate")
BLUNT = tuple(c.lower().rstrip(".") for c in FORMAL_BLUNT_CLOSES) + ("that's it", "done", "whatever")


def style_votes(text: str) -> dict[str, str | None]:
    """Each dimension's pole as the surface shows it, or None when the text shows neither (or both)."""
    first, low = text.strip().split("\n", 1)[0], text.lower()
    formal = any(first.startswith(o) for o in FORMAL_OPENERS) or any(p in text for p in FORMAL_WARM_OPENS
                                                                     + FORMAL_WARM_CLOSES)
    casual = any(first.lower().startswith(o) for o in CASUAL_OPENERS)
    bullets = any(line.strip().startswith("- ") for line in text.split("\n"))
    warm, blunt = any(w in low for w in WARM), any(b in low for b in BLUNT)
    return {"formality": "formal" if formal and not casual else "casual" if casual and not formal else None,
            "layout": "bullets" if bullets else "prose" if text.strip() else None,
            "tone": "warm" if warm and not blunt else "blunt" if blunt and not warm else None}


def score(text: str, profile: dict) -> int:
    """+1 per dimension the text shows in the user's pole, -1 per dimension it shows in the other."""
    votes = style_votes(text)
    return sum((v == profile[d]) - (v is not None and v != profile[d]) for d, v in votes.items())


def simulate(port: int, user: str, profile: dict, prompts: list[str], after: int, max_pairs: int,
             onboarding: bool) -> dict:
    """One new user: the server's onboarding pairs first (when it has them), then pairs of the served model's
    samples, until `after` winning choices; then wait for their own row."""
    client, wins, pairs, started, asked = Client(port), 0, 0, None, 0
    while wins < after and pairs < max_pairs:
        pair = client.post("/v1/onboarding/next", {"user": user}) if onboarding else {"done": True}
        onboarding = not pair["done"]
        if onboarding:
            texts, cid = [c["text"] for c in pair["choices"]], pair["comparison_id"]
        else:
            pair = client.post("/v1/completions", {"model": "loop", "prompt": prompts[asked % len(prompts)],
                                                   "user": user, "max_tokens": 48, "temperature": 1.0,
                                                   "seed": asked, "compare": True})
            texts, cid = [c["text"] for c in pair["choices"]], pair["prlhf"]["comparison_id"]
            asked += 1
        a, b = (score(t, profile) for t in texts)
        choice = "a" if a > b else "b" if b > a else "tie"
        answer = client.post("/v1/feedback", {"comparison_id": cid, "choice": choice})
        pairs += 1
        wins += choice != "tie"
        if wins == after:
            started = time.perf_counter()
            assert answer["user_model"] == "fitting", answer
    waited = None
    if started is not None:
        while True:  # a normal request, until it is answered with the user's own row
            reply = client.post("/v1/completions", {"model": "loop", "prompt": prompts[0], "user": user,
                                                    "max_tokens": 8, "temperature": 0})
            if reply["prlhf"]["user_known"]:
                waited = time.perf_counter() - started
                break
            time.sleep(0.05)
    return {"user": user, "pairs": pairs, "sampled_pairs": asked, "wins": wins, "seconds_to_own_row": waited}


def accuracy_by_comparisons(run_dir: Path, collected, test, new_users, steps: int) -> dict[str, float]:
    """k -> the new users' mean held-out accuracy with rows fitted on their first k winning choices, for k =
    0, 2, ..., 10: the unserved run (it knows no new user) and the onboarding's fit, offline."""
    run = load_run(run_dir)
    scored = [r for r in test if r.user_id in set(new_users)]
    curve = {"0": statistics.mean(v["accuracy"] for v in evaluate_run(run, scored)["per_user"].values())}
    winners: dict[str, list] = {}
    for c in sorted(collected, key=lambda c: c.decided_at):
        if c.record() is not None:
            winners.setdefault(c.user_id, []).append(c.record())
    for k in (2, 4, 6, 8, 10):
        fit = [r for u in new_users for r in winners.get(u, [])[:k]]
        fitted, _ = adapt_users(load_run(run_dir), fit, steps=steps, show_progress=False)
        per_user = evaluate_run(fitted, scored)["per_user"]
        curve[str(k)] = statistics.mean(per_user[u]["accuracy"] for u in new_users)
    return curve


def generation_styles(served, task, users: list[str], samples: int = 4) -> dict:
    """The mean profile score (score(), -3 to +3) of each onboarded user's samples on test prompts, with their own
    row and with the generic user: whether the row moves what the model writes (the default tiny run, which
    has no warm-up, writes little styled text)."""
    prompts = sorted({r.prompt for r in task.test})[:samples]
    rows = [(u, p) for u in users for p in prompts]
    own = generate_texts(served, [p for _, p in rows], [u for u, _ in rows], max_new_tokens=48, do_sample=True,
                         seed=1)
    generic = generate_texts(served, [p for _, p in rows], ["__generic__"] * len(rows), max_new_tokens=48,
                             do_sample=True, seed=1)
    mean = lambda texts: statistics.mean(score(t, task.users[u]) for (u, _), t in zip(rows, texts))  # noqa: E731
    return {"samples_per_user": samples, "own_row": mean(own) if rows else None,
            "generic": mean(generic) if rows else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--after", type=int, default=10)
    parser.add_argument("--max-pairs", type=int, default=60, help="give up on a user after this many pairs")
    parser.add_argument("--sft-steps", type=int, default=-1,
                        help="warm-up steps of the served run (-1: `prlhf train`'s default, none for the tiny "
                             f"model; `prlhf demo` takes {DEMO_SFT_STEPS} so that its model writes)")
    parser.add_argument("--seed", type=int, default=0, help="the style task's seed (0 is the one reported)")
    parser.add_argument("--onboard-pairs", type=int, default=0, metavar="K",
                        help="serve K onboarding pairs chosen from the training data (`prlhf users onboard-pairs`) "
                             "before the model's own samples (0: none, the server's default)")
    parser.add_argument("--fit-steps", type=int, default=ONBOARD_STEPS,
                        help=f"optimizer steps of each onboarding fit (the server's default, {ONBOARD_STEPS})")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    spec = {**TASK, "seed": args.seed}
    task = build_style_task(**spec)
    data, run_dir = out / "work" / "data", out / "work" / f"run_seed{args.seed}_sft{args.sft_steps}"
    task.write(data, overwrite=True)
    if not (run_dir / "run.json").is_file():
        started = time.time()
        subprocess.run(["prlhf", "train", "--data", str(data / "train.jsonl"), "--out", str(run_dir), "--model",
                        "tiny", "--sft-steps", str(args.sft_steps), "--threads", str(args.threads),
                        "--quiet"], check=True, stdout=subprocess.DEVNULL)
        print(f"trained in {time.time() - started:.0f} s")
    (out / "work" / "feedback.db").unlink(missing_ok=True)
    served = out / "work" / "served"
    subprocess.run(["rm", "-rf", str(served)], check=True)
    subprocess.run(["cp", "-r", str(run_dir), str(served)], check=True)
    test = load_records(data / "test.jsonl")
    generic = evaluate_run(load_run(served), test)  # every new user on e_0
    # from the run and its training data only: nothing of the new users or the test topics
    onboard = choose_onboarding_pairs(load_run(served), task.train, args.onboard_pairs, seed=args.seed) \
        if args.onboard_pairs else []
    store = ComparisonStore(f"sqlite:///{out}/work/feedback.db")
    server = PersonalizedServer(load_run(served), "loop", Limits(max_prompt_tokens=128, max_tokens=64),
                                reload_interval=None, store=store, onboard_after=args.after,
                                onboard_steps=args.fit_steps, onboard_pairs=onboard)
    new_users = task.unseen_users
    prompts = sorted({r.prompt for r in task.train})
    started = time.perf_counter()
    with serving(server) as url:
        port = int(url.rsplit(":", 1)[1])
        with ThreadPoolExecutor(args.clients) as pool:
            runs = list(pool.map(lambda i: simulate(port, new_users[i], task.users[new_users[i]],
                                                    prompts[i * 7:] + prompts[:i * 7], args.after, args.max_pairs,
                                                    bool(onboard)),
                                 range(len(new_users))))
    wall = time.perf_counter() - started
    fitted = dict(server.onboarding.fitted)
    collected = [c for c in store.all() if c.status == "decided" and c.user_id in set(new_users)]
    store.close()
    final = evaluate_run(load_run(served), test)
    curve = accuracy_by_comparisons(run_dir, collected, test, new_users, args.fit_steps)
    styles = generation_styles(load_run(served), task, [r["user"] for r in runs if r["seconds_to_own_row"]])
    per_user = final["per_user"]
    seen = [per_user[u]["accuracy"] for u in task.seen_users]
    onboarded = [r["user"] for r in runs if r["seconds_to_own_row"] is not None]
    new_acc = [per_user[u]["accuracy"] for u in onboarded]
    waits = sorted(r["seconds_to_own_row"] for r in runs if r["seconds_to_own_row"] is not None)
    result = {"task": spec, "sft_steps": args.sft_steps, "clients": args.clients, "after": args.after,
              "fit_steps": args.fit_steps, "onboard_pairs": len(onboard),
              "onboard_pair_splits": [round(p.split, 3) for p in onboard],
              "threads": args.threads,
              "machine": f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}",
              "wall_seconds": wall, "users": runs, "fits": fitted,
              "seen_mean": statistics.mean(seen), "seen_worst": min(seen),
              "onboarded": len(onboarded), "new_mean": statistics.mean(new_acc) if new_acc else None,
              "new_worst": min(new_acc) if new_acc else None,
              "generic_mean_on_new": statistics.mean(generic["per_user"][u]["accuracy"] for u in new_users),
              "new_per_user": {u: per_user[u]["accuracy"] for u in onboarded},
              "seconds_to_own_row_median": statistics.median(waits) if waits else None,
              "seconds_to_own_row_worst": waits[-1] if waits else None,
              "pairs_median": statistics.median(r["pairs"] for r in runs),
              "new_mean_by_comparisons": curve, "generation_style": styles}
    if new_acc:
        result["new_over_seen"] = result["new_mean"] / result["seen_mean"]
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# The loop, simulated: 20 new users onboarded live", "",
        f"Command: `python benchmarks/loop.py {' '.join(sys.argv[1:])}`", "",
        f"Style task (seed {args.seed}, 16 seen users, P-DPO individual, `prlhf train --model tiny`, "
        f"{'default settings' if args.sft_steps < 0 else f'--sft-steps {args.sft_steps}'}); 20 new users "
        f"with hidden profiles, {args.clients} concurrent HTTP clients, "
        + (f"first the server's {len(onboard)} onboarding pairs (training pairs that split the seen users, "
           "`prlhf users onboard-pairs`), then " if onboard else "")
        + "a pair per request (`compare`), the choice "
        f"by the profile's surface markers, onboarding after {args.after} winning choices ({args.fit_steps} fit steps). "
        f"{result['machine']}, "
        f"{args.threads} threads, whole loop {wall:.0f} s.", "",
        "| | held-out accuracy (test topics) |", "|---|---|",
        f"| seen users (trained) | mean {result['seen_mean']:.3f}, worst {result['seen_worst']:.3f} |",
        f"| new users on the generic user (before) | mean {result['generic_mean_on_new']:.3f} |",
        (f"| new users, own row after {args.after} choices ({len(onboarded)} of {len(new_users)} onboarded) | mean "
         f"{result['new_mean']:.3f}, worst {result['new_worst']:.3f} |") if new_acc else "| new users | none onboarded |",
        "",
        (f"New / seen: **{result['new_over_seen']:.2f}x** (target >= 0.9x). " if new_acc else "")
        + (f"Seconds from the {args.after}th winning choice to a response with the user's own row: median "
           f"**{result['seconds_to_own_row_median']:.1f} s**, worst **{result['seconds_to_own_row_worst']:.1f} s** "
           "(target <= 10 s)." if waits else ""),
        f"Pairs requested per user (ties included): median {result['pairs_median']:.0f}.", "",
        "New users' mean held-out accuracy by how many of their collected winning choices their row is fitted on "
        f"(offline, the same fit: {args.fit_steps} steps from the generic row; 0 = the generic user):", "",
        "| winning choices | " + " | ".join(curve) + " |", "|---|" + "---|" * len(curve),
        "| new users' mean | " + " | ".join(f"{v:.3f}" for v in curve.values()) + " |", "",
        (f"Style of their generations ({styles['samples_per_user']} samples per user on test prompts, scored by "
         "their hidden profile, -3 to +3): own row "
         f"{styles['own_row']:.2f}, generic user {styles['generic']:.2f}." if styles["own_row"] is not None
         else "No user was onboarded: no generation to check."), ""]
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
