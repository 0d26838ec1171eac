"""What a Polis participant's own row does, in training and on held-out statements (issue 19's Polis gap).

Takes a run that `prlhf bench polis --keep-runs` left under OUT/work/runs/METHOD, rebuilds the same task, and
scores a sample of seen participants' training pairs and held-out pairs twice: under each participant's own row
and under the generic user. A row that fits its training pairs but does not carry to held-out statements shows as
"own > generic" in training and "own <= generic" held out.

    python benchmarks/polis_rows.py --run OUT/work/runs/p_dpo_individual --train-pairs-per-user 32 \
        --held-out votes --split validation --out OUT_ROWS
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys

import torch

from prlhf.bench.polis import DEFAULT_CONVERSATIONS, FULL, score_margins
from prlhf.data.tasks.polis import build_polis_task
from prlhf.model.scoring import per_user_accuracy
from prlhf.runs.directory import load_run
from script_results import measure_into_out

NOBODY = "__not_a_participant__"  # an unknown id: scored under the generic user


def measure(args) -> tuple[dict, list[str]]:
    torch.set_num_threads(args.threads)
    task = build_polis_task(conversations=DEFAULT_CONVERSATIONS, train_pairs_per_user=args.train_pairs_per_user,
                            test_pairs_per_user=FULL.test_pairs_per_user,
                            adapt_pairs_per_user=max(FULL.adapt_k, args.train_pairs_per_user), split=args.split,
                            held_out=args.held_out, seed=args.seed)
    run = load_run(args.run)
    users = sorted(task.seen_users)
    random.Random(args.seed).shuffle(users)
    sample = set(users[:args.participants])
    result = {"run": args.run, "split": args.split, "held_out": args.held_out, "seed": args.seed,
              "train_pairs_per_user": args.train_pairs_per_user, "participants": len(sample)}
    for name, records in (("train", task.train), ("held_out", task.test)):
        records = [r for r in records if r.user_id in sample]
        own = score_margins(run, records, lambda rs: rs)
        generic = score_margins(run, [dataclasses.replace(r, user_id=NOBODY) for r in records], lambda rs: rs)
        result[name] = {"pairs": len(records),
                        "own_row": per_user_accuracy(records, own, sample)["mean_user_accuracy"],
                        "generic_user": per_user_accuracy(records, generic, sample)["mean_user_accuracy"],
                        "mean_abs_margin_change": float((own - generic).abs().mean()),
                        "mean_abs_margin": float(generic.abs().mean())}
    lines = [f"# Own row vs generic user: `{args.run}`", "",
             f"{len(sample)} seen participants drawn by seed {args.seed}; split `{args.held_out}`, scored on "
             f"`{args.split}`; mean participant accuracy.", "",
             "| pairs | n | own row | generic user | mean abs margin change | mean abs margin |",
             "|---|---|---|---|---|---|"]
    for name in ("train", "held_out"):
        r = result[name]
        lines.append(f"| {name} | {r['pairs']} | {r['own_row']:.3f} | {r['generic_user']:.3f} | "
                     f"{r['mean_abs_margin_change']:.3f} | {r['mean_abs_margin']:.3f} |")
    return result, lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a run kept by prlhf bench polis --keep-runs")
    parser.add_argument("--out", required=True, help="results folder: rows.json, rows.md")
    parser.add_argument("--train-pairs-per-user", type=int, default=FULL.train_pairs_per_user)
    parser.add_argument("--held-out", choices=["statements", "votes"], default="statements")
    parser.add_argument("--split", choices=["test", "validation"], default="test")
    parser.add_argument("--participants", type=int, default=300, help="seen participants scored")
    parser.add_argument("--seed", type=int, default=0, help="the bench's seed (task) and the sample's")
    parser.add_argument("--threads", type=int, default=2)
    measure_into_out(parser, parser.parse_args(argv), "polis_rows", ("rows.json", "rows.md"), measure)


if __name__ == "__main__":
    sys.exit(main())
