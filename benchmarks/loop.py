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
(median and worst; target <= 10 s on 2 cores).

    python benchmarks/loop.py --out benchmarks/results/loop

`--seed` builds the style task of another seed (to try settings on users no report uses) and `--sft-steps`
warms the served run up first (the probes in benchmarks/results/loop_probes).
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
from prlhf.evaluate.run_eval import evaluate_run
from prlhf.runs.directory import load_run
from prlhf.serve.app import Limits, PersonalizedServer
from prlhf.serve.background import serving

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


def simulate(port: int, user: str, profile: dict, prompts: list[str], after: int, max_pairs: int) -> dict:
    """One new user: pairs until `after` winning choices, then wait for their own row."""
    client, wins, pairs, started = Client(port), 0, 0, None
    while wins < after and pairs < max_pairs:
        pair = client.post("/v1/completions", {"model": "loop", "prompt": prompts[pairs % len(prompts)],
                                               "user": user, "max_tokens": 48, "temperature": 1.0,
                                               "seed": pairs, "compare": True})
        a, b = (score(c["text"], profile) for c in pair["choices"])
        choice = "a" if a > b else "b" if b > a else "tie"
        answer = client.post("/v1/feedback", {"comparison_id": pair["prlhf"]["comparison_id"], "choice": choice})
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
    return {"user": user, "pairs": pairs, "wins": wins, "seconds_to_own_row": waited}


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
    store = ComparisonStore(f"sqlite:///{out}/work/feedback.db")
    server = PersonalizedServer(load_run(served), "loop", Limits(max_prompt_tokens=128, max_tokens=64),
                                reload_interval=None, store=store, onboard_after=args.after,
                                onboard_steps=args.fit_steps)
    new_users = task.unseen_users
    prompts = sorted({r.prompt for r in task.train})
    started = time.perf_counter()
    with serving(server) as url:
        port = int(url.rsplit(":", 1)[1])
        with ThreadPoolExecutor(args.clients) as pool:
            runs = list(pool.map(lambda i: simulate(port, new_users[i], task.users[new_users[i]],
                                                    prompts[i * 7:] + prompts[:i * 7], args.after, args.max_pairs),
                                 range(len(new_users))))
    wall = time.perf_counter() - started
    fitted = dict(server.onboarding.fitted)
    store.close()
    final = evaluate_run(load_run(served), test)
    per_user = final["per_user"]
    seen = [per_user[u]["accuracy"] for u in task.seen_users]
    onboarded = [r["user"] for r in runs if r["seconds_to_own_row"] is not None]
    new_acc = [per_user[u]["accuracy"] for u in onboarded]
    waits = sorted(r["seconds_to_own_row"] for r in runs if r["seconds_to_own_row"] is not None)
    result = {"task": spec, "sft_steps": args.sft_steps, "clients": args.clients, "after": args.after,
              "fit_steps": args.fit_steps,
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
              "pairs_median": statistics.median(r["pairs"] for r in runs)}
    if new_acc:
        result["new_over_seen"] = result["new_mean"] / result["seen_mean"]
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# The loop, simulated: 20 new users onboarded live", "",
        f"Command: `python benchmarks/loop.py {' '.join(sys.argv[1:])}`", "",
        f"Style task (seed {args.seed}, 16 seen users, P-DPO individual, `prlhf train --model tiny`, "
        f"{'default settings' if args.sft_steps < 0 else f'--sft-steps {args.sft_steps}'}); 20 new users "
        f"with hidden profiles, {args.clients} concurrent HTTP clients, a pair per request (`compare`), the choice "
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
        f"Pairs requested per user (ties included): median {result['pairs_median']:.0f}.", ""]
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
