"""The Polis parts of the command line: `prlhf data build polis` flags and `prlhf bench polis`."""

from __future__ import annotations

import argparse

from prlhf.bench.options import default_notes
from prlhf.cli.common import add_dataclass_flags
from prlhf.config import ConfigError, TrainConfig

# `bench polis` flags that are TrainConfig fields, passed through to every trained method
TRAIN_FLAGS = ("threads", "lr", "user_lr", "user_code_lr", "user_tokens", "batch_size", "grad_accum",
               "mixed_precision", "sft_steps", "user_weight_decay", "user_init", "user_rank", "lowrank_vector_std",
               "user_start", "covote_rank")


def _names(value: str | None) -> list[str] | None:
    """'a,b' -> ['a', 'b']; None or 'all' -> None (every conversation folder)."""
    if not value or value == "all":
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def add_build_flags(b: argparse.ArgumentParser) -> None:
    """The `data build` flags only polis reads (`--source`, `--train-pairs-per-user`, `--test-pairs-per-user`
    and `--seed` are shared with the other tasks)."""
    b.add_argument("--conversations", help="polis: comma-separated conversation folders under --source (default: all)")
    b.add_argument("--user-id-from", choices=["participant", "group"],
                   help="polis: user id of the seen participants' records: their own (default) or their Polis "
                        "opinion group's, `<conversation>/group-<g>` (the opinion-group baseline)")
    b.add_argument("--split", choices=["test", "validation"],
                   help="polis: test.jsonl holds the test statements (default), or a validation split carved from "
                        "the training statements (the test statements then appear nowhere)")
    b.add_argument("--held-out", choices=HELD_OUT, help="polis: " + HELD_OUT_HELP)


POLIS_ONLY_FLAGS = ("--conversations", "--user-id-from", "--split", "--held-out")
# prlhf.data.tasks.polis.HELD_OUT, written out: importing the builders would add 0.2 s to every CLI start
HELD_OUT = ("statements", "votes")
HELD_OUT_HELP = ("test pairs on statements no training record uses (default; content-disjoint), or on statements "
                 "each participant did not vote on in training, which others' training records may use "
                 "(collaborative filtering)")


def refuse_polis_flags(args) -> None:
    """`data build` of another task: the polis flags would be ignored, so they are refused."""
    given = [flag for flag in POLIS_ONLY_FLAGS if getattr(args, flag[2:].replace("-", "_"), None) is not None]
    if given:
        raise ConfigError(f"data build {args.task}: {', '.join(given)} only apply to polis")


def polis_build_kwargs(args) -> dict:
    """`data build polis`: real participants have no poles or profiles, so the synthetic tasks' flags are refused."""
    given = [flag for flag, value in (("--users", args.users), ("--unseen", args.unseen),
                                      ("--majority-share", args.majority_share),
                                      ("--with-user-text", args.with_user_text), ("--persona-dir", args.persona_dir),
                                      ("--dimensions", args.dimensions),
                                      ("--statements-per-pole", args.statements_per_pole))
             if value not in (None, False)]
    if given:
        raise ConfigError(f"data build polis: not for real participants: {', '.join(given)}")
    return {"source": args.source, "conversations": _names(args.conversations),
            "train_pairs_per_user": args.train_pairs_per_user, "test_pairs_per_user": args.test_pairs_per_user,
            "user_id_from": args.user_id_from, "split": args.split, "held_out": args.held_out, "seed": args.seed}


def build_summary(task) -> str:
    m = task.meta
    return (f"polis: {m['n_seen']} seen + {m['n_unseen']} unseen participants in {len(m['conversations'])} "
            f"conversation(s) from {m['source']}; {len(task.extra['adapt'])} pairs of unseen participants on training "
            f"statements in adapt.jsonl; user ids: {m['user_id_from']}")


def bench_polis_arguments(args) -> dict:
    return dict(model=args.model, source=args.source, conversations=_names(args.conversations), quick=args.quick,
                seed=args.seed, methods=args.methods.split(",") if args.methods else None, epochs=args.epochs,
                train_pairs_per_user=args.train_pairs_per_user, test_pairs_per_user=args.test_pairs_per_user,
                adapt_users_n=args.new_participants, adapt_k=args.new_participant_pairs, adapt_steps=args.adapt_steps,
                adapt_start=args.new_participant_start, split=args.split, held_out=args.held_out,
                keep_runs=args.keep_runs, reuse_runs=args.reuse_runs,
                **{k: getattr(args, k) for k in TRAIN_FLAGS})


def register_bench(bsub, run_bench) -> None:
    """`run_bench(name, args, arguments)` runs it and writes its experiment record (prlhf.cli.main)."""
    po = bsub.add_parser("polis", help="real Polis participants: vanilla DPO, P-DPO individual / cluster / low-rank, "
                                       "opinion groups as user ids, new participants from 10 pairs",
                         description="Builds the Polis task from --source (CC BY 4.0; statements split so that no "
                                     "test statement occurs in training), trains each method on the tiny model, "
                                     "scores seen and unseen participants, fits new participants, and writes "
                                     "results.json, report.md and accuracy.png.")
    po.add_argument("--out", required=True, help="results folder")
    po.add_argument("--model", default="tiny", help="tiny | smollm2-135m | any hub id or folder (default tiny)")
    po.add_argument("--source", help="folder of Polis conversation folders (default ../shared/data/polis or "
                                     "$PRLHF_POLIS_DIR)")
    po.add_argument("--conversations", help="comma-separated conversation folders, or 'all' (default "
                                            "american-assembly.bowling-green: 1,053 seen participants; --quick: all)")
    po.add_argument("--quick", action="store_true", help="small sizes: checks the pipeline end to end")
    po.add_argument("--methods", help="comma-separated subset of: vanilla_dpo, p_dpo_individual, p_dpo_cluster, "
                                      "p_dpo_lowrank, opinion_groups (default: all)")
    po.add_argument("--epochs", type=float, help="passes over the training pairs (default 1)")
    po.add_argument("--train-pairs-per-user", type=int, help="cap on each participant's training pairs (default 8)")
    po.add_argument("--test-pairs-per-user", type=int, help="cap on each participant's held-out pairs (default 4)")
    po.add_argument("--new-participants", type=int, help="unseen participants fitted as new users (default 32; 0 = "
                                                         "none)")
    po.add_argument("--new-participant-pairs", type=int, help="pairs each new participant is fitted from (default 10)")
    po.add_argument("--adapt-steps", type=int, help="AdamW steps fitting the new participants (default: adapt's)")
    po.add_argument("--new-participant-start", choices=["none", "covotes"], default="none",
                    help="where new participants' rows start before fitting: the generic user (default), or the row "
                         "their votes predict from the training participants' co-votes (`adapt --warm-start covotes`)")
    po.add_argument("--split", default="test", choices=["test", "validation"],
                    help="score the test statements (default) or a validation split carved from the training "
                         "statements (for tuning)")
    po.add_argument("--held-out", default=HELD_OUT[0], choices=HELD_OUT, help=HELD_OUT_HELP)
    po.add_argument("--seed", type=int, default=0, help="seed of the splits, the unseen participants and every run")
    po.add_argument("--keep-runs", action="store_true", help="keep the data and runs under OUT/work")
    po.add_argument("--reuse-runs", action="store_true",
                    help="keep OUT/work and take the methods that finished there with the same settings (after a "
                         "killed run) instead of training them again")
    add_dataclass_flags(po, TrainConfig, only=TRAIN_FLAGS, defaults=default_notes(TRAIN_FLAGS))
    po.set_defaults(func=lambda args: run_bench("polis", args, bench_polis_arguments(args)))
