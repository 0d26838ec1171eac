"""`prlhf` command line: train, eval, generate, score, data validate|build, demo, adapt, users, serve, export, bench."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import traceback
from pathlib import Path

from prlhf import __version__
from prlhf.bench.options import TRAIN_FLAGS, default_notes
from prlhf.cli.checks import check_flags
from prlhf.cli.common import add_dataclass_flags, config_from_args, set_threads, setup_logging
from prlhf.cli.errors import command_name, describe, own_error_types
from prlhf.cli.polis_cmds import add_build_flags as add_polis_build_flags
from prlhf.cli.polis_cmds import build_summary as polis_build_summary
from prlhf.cli.polis_cmds import polis_build_kwargs, refuse_polis_flags
from prlhf.cli.polis_cmds import register_bench as register_polis_bench
from prlhf.cli.export_cmd import register as register_export_command
from prlhf.cli.serve_cmd import register as register_serve_command
from prlhf.cli.store_cmds import register as register_data_export
from prlhf.cli.users_cmds import register as register_user_commands
from prlhf.config import ConfigError, TrainConfig

DESCRIPTION = """Personalized language models from personalized human feedback (P-DPO, Li, Lipton & Leqi 2024).
Data: JSONL/JSON/CSV/Parquet/datasets folder with user_id, prompt, chosen, rejected[, user_text]."""


def cmd_train(args) -> int:
    from accelerate import PartialState

    from prlhf.train.loop import train

    summary = train(config_from_args(TrainConfig, args), show_progress=not args.quiet)
    if PartialState().is_main_process:  # under `accelerate launch`, one summary line, not one per process
        print(json.dumps(summary))
    return 0


def cmd_eval(args) -> int:
    from prlhf.data.loading import load_records
    from prlhf.evaluate.report import accuracy_plot, accuracy_table, is_png
    from prlhf.evaluate.run_eval import evaluate_run
    from prlhf.runs.directory import is_eval_result, load_run, write_json_atomic
    from prlhf.safe_io import output_file_problem

    set_threads(args.threads)
    if args.out and (problem := output_file_problem(Path(args.out), args.overwrite, is_eval_result)):
        raise ConfigError(f"eval: --out {args.out} {problem}")  # before any work
    if args.plot and args.out and os.path.abspath(args.plot) == os.path.abspath(args.out):
        raise ConfigError(f"eval: --plot and --out are the same file {args.out}")
    if args.plot and (problem := output_file_problem(Path(args.plot), args.overwrite, is_png)):
        raise ConfigError(f"eval: --plot {args.plot} {problem}")
    records = load_records(args.data)
    run = load_run(args.run)
    result = evaluate_run(run, records, show_progress=True)
    print(accuracy_table({Path(args.run).name: result}), end="")
    if args.out:
        write_json_atomic(Path(args.out), result)
    if args.plot:
        accuracy_plot({Path(args.run).name: result}, args.plot)
    return 0


def cmd_generate(args) -> int:
    from prlhf.evaluate.generation import generate_texts
    from prlhf.runs.directory import RunError, load_run

    set_threads(args.threads)
    run = load_run(args.run)
    if getattr(run.model, "is_reward_model", False):
        raise RunError(f"{args.run}: a reward-model run does not generate; pass it as --rerank to a policy run")
    if args.user not in run.registry:
        print(f"prlhf: note: user {args.user!r} was not seen in training: using the generic user", file=sys.stderr)
    if args.rerank:
        from prlhf.evaluate.scoring import best_of_n, require_reward_run

        reward = require_reward_run(load_run(args.rerank))
        ranked = best_of_n(run, reward, args.user, args.prompt, args.n, max_new_tokens=args.max_new_tokens,
                           seed=args.seed, user_text=args.user_text)
        print(json.dumps({"user": args.user, "best": ranked.best, "best_reward": ranked.best_reward,
                          "candidates": [{"text": t, "reward": r} for t, r in ranked.candidates]}, indent=1))
        return 0
    texts = generate_texts(run, [args.prompt] * args.n, [args.user] * args.n, max_new_tokens=args.max_new_tokens,
                           do_sample=args.sample or args.n > 1, seed=args.seed,
                           user_texts=[args.user_text] * args.n if args.user_text else None)
    for text in texts:
        print(text)
    return 0


def cmd_score(args) -> int:
    from prlhf.evaluate.scoring import require_reward_run, score_responses
    from prlhf.runs.directory import load_run

    set_threads(args.threads)
    run = require_reward_run(load_run(args.run))
    if args.user not in run.registry:
        print(f"prlhf: note: user {args.user!r} was not seen in training: using the generic user", file=sys.stderr)
    n = len(args.response)
    rewards = score_responses(run, [args.user] * n, [args.prompt] * n, args.response,
                              [args.user_text] * n if args.user_text else None)
    for reward in rewards:
        print(f"{reward:.6f}")
    return 0


def cmd_data_validate(args) -> int:
    from prlhf.data.loading import load_records
    from prlhf.data.summary import format_summary, summarize

    print(format_summary(summarize(load_records(args.file)), args.file))
    return 0


def cmd_data_build(args) -> int:
    from prlhf.data.tasks import TASKS
    from prlhf.data.tasks.common import check_data_target

    check_data_target(Path(args.out), args.overwrite)  # before building
    kwargs = {"n_seen_users": args.users, "n_unseen_users": args.unseen, "majority_share": args.majority_share,
              "train_pairs_per_user": args.train_pairs_per_user, "test_pairs_per_user": args.test_pairs_per_user,
              "seed": args.seed}
    if args.task == "style":
        kwargs["with_user_text"] = args.with_user_text
    if args.task == "persona":
        kwargs.update(with_user_text=True, data_dir=args.persona_dir, statements_per_pole=args.statements_per_pole,
                      dimensions=args.dimensions.split(",") if args.dimensions else None)
    if args.task == "tldr":
        kwargs = tldr_build_kwargs(args)
    if args.task == "polis":
        kwargs = polis_build_kwargs(args)
    else:
        refuse_polis_flags(args)
    try:
        task = TASKS[args.task](**{k: v for k, v in kwargs.items() if v is not None})
    except ValueError as exc:  # the builders check their sizes and shares
        raise ConfigError(f"data build {args.task}: {exc}") from None
    paths = task.write(args.out, overwrite=args.overwrite)
    print(f"{args.task}: {len(task.train)} train pairs, {len(task.test)} test pairs, {len(task.users)} users -> "
          + ", ".join(str(p) for p in paths.values()))
    if args.task == "polis":
        print(polis_build_summary(task))
    if args.task == "tldr":
        m = task.meta
        print(f"tldr: read {m['n_read']} comparisons from {len(m['files'])} file(s) in {m['source']}; dropped "
              f"{m['n_duplicates']} exact duplicates and {m['n_without_post']} without a Reddit post; "
              f"{m['n_seen_users']} seen + {m['n_unseen_users']} unseen labelers")
    return 0


def tldr_build_kwargs(args) -> dict:
    """`data build tldr`: real labelers have no poles or profiles, so the synthetic tasks' flags are refused."""
    given = [flag for flag, value in (("--majority-share", args.majority_share), ("--with-user-text",
             args.with_user_text), ("--persona-dir", args.persona_dir), ("--dimensions", args.dimensions),
             ("--statements-per-pole", args.statements_per_pole)) if value not in (None, False)]
    if given:
        raise ConfigError(f"data build tldr: not for real labelers: {', '.join(given)}")
    return {"source": args.source, "n_seen_users": args.users, "n_unseen_users": args.unseen,
            "max_train_pairs_per_user": args.train_pairs_per_user,
            "max_test_pairs_per_user": args.test_pairs_per_user, "seed": args.seed}


def cmd_demo(args) -> int:
    from prlhf.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, threads=args.threads, nll_weight=args.nll_weight)
    return 0


def cmd_bench_persona(args) -> int:
    split = lambda v: v.split(",") if v else None  # noqa: E731
    return run_bench("persona", args, dict(
        model=args.model, n_users=args.users, quick=args.quick, seed=args.seed, methods=split(args.methods),
        dimensions=split(args.dimensions), epochs=args.epochs, data_dir=args.persona_dir, keep_runs=args.keep_runs,
        statements_per_pole=args.statements_per_pole, train_pairs_per_user=args.train_pairs_per_user,
        curve_points=args.curve_points, profile_ids=args.profile_ids, majority_share=args.majority_share,
        **{k: getattr(args, k) for k in TRAIN_FLAGS}))


# benchmark -> (module, function(out, **arguments)), imported when it runs: --help stays free of torch
BENCHES = {"persona": ("prlhf.bench.persona", "run_persona_bench"), "tldr": ("prlhf.bench.tldr", "run_tldr_bench"),
           "polis": ("prlhf.bench.polis", "run_polis_bench"), "length": ("prlhf.bench.length", "run_length_bench"), "serve": ("prlhf.bench.serve", "run_serve_bench")}


def bench_function(bench: str):
    import importlib

    module, name = BENCHES[bench]
    return getattr(importlib.import_module(module), name)


def run_bench(bench: str, args, arguments: dict) -> int:
    """Run a benchmark into args.out, then leave its experiment record there (OUT/experiment.yaml: the command,
    the benchmark and these arguments), which `prlhf bench rerun` takes."""
    from prlhf.bench.experiment import EXPERIMENT_FILE, experiment_yaml
    from prlhf.safe_io import atomic_write_text

    try:
        bench_function(bench)(Path(args.out), **arguments)
    except ValueError as exc:
        raise ConfigError(f"bench {bench}: {exc}") from None
    atomic_write_text(Path(args.out) / EXPERIMENT_FILE, experiment_yaml(bench, arguments, args.command_line,
                                                                        __version__))
    return 0


def cmd_bench_rerun(args) -> int:
    import inspect

    from prlhf.bench.experiment import read_experiment

    try:
        bench, arguments = read_experiment(Path(args.record))
    except ValueError as exc:
        raise ConfigError(f"bench rerun: {exc}") from None
    if bench not in BENCHES:
        raise ConfigError(f"bench rerun: {args.record}: unknown benchmark {bench!r} (one of {', '.join(BENCHES)})")
    accepted = inspect.signature(bench_function(bench)).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = sorted(k for k in arguments if k == "out" or (k not in accepted and not takes_any))
    if unknown:
        raise ConfigError(f"bench rerun: {args.record}: bench {bench} takes no argument(s) {', '.join(unknown)}")
    return run_bench(bench, args, arguments)


# `bench tldr` flags that are TrainConfig fields (the same as bench persona's) and those that size the benchmark
TLDR_SIZE_FLAGS = ("epochs", "max_prompt_length", "min_comparisons", "max_train_pairs_per_user",
                   "max_test_pairs_per_user", "adapt_steps")


def cmd_bench_tldr(args) -> int:
    sizes = {k: getattr(args, k) for k in TLDR_SIZE_FLAGS}
    sizes.update(n_seen=args.users, n_unseen=args.unseen,
                 adapt_ks=tuple(int(k) for k in args.adapt_ks.split(",")) if args.adapt_ks else None)
    if args.max_prompt_length is not None:
        sizes["max_length"] = args.max_prompt_length + 64  # the summaries are at most about 60 tokens
    return run_bench("tldr", args, dict(
        model=args.model, source=args.source, quick=args.quick, seed=args.seed,
        methods=args.methods.split(",") if args.methods else None, keep_runs=args.keep_runs,
        reuse_runs=args.reuse_runs, size_overrides=sizes, **{k: getattr(args, k) for k in TRAIN_FLAGS}))


def cmd_bench_length(args) -> int:
    shares = tuple(float(x) for x in args.shares.split(","))
    if not all(0.5 <= x < 1.0 for x in shares):
        raise ConfigError("bench length: --shares must lie in [0.5, 1)")
    return run_bench("length", args, dict(shares=shares, quick=args.quick, threads=args.threads, seed=args.seed))


def cmd_bench_serve(args) -> int:
    if args.many_users < 11:
        raise ConfigError("bench serve: --many-users must be at least 11 (the comparison is against 10 users)")
    return run_bench("serve", args, dict(model=args.model, quick=args.quick, threads=args.threads, seed=args.seed,
                                         many_users=args.many_users))


def cmd_bench_speed(args) -> int:
    from prlhf.bench.speed import run_speed_bench

    try:
        dtypes = tuple(d.strip() for d in args.dtype.split(",") if d.strip()) if args.dtype else None
        run_speed_bench(Path(args.out), quick=args.quick, threads=args.threads, model=args.model, dtypes=dtypes,
                        lora_dropout=args.lora_dropout)
    except ValueError as exc:
        raise ConfigError(f"bench speed: {exc}") from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prlhf", description=DESCRIPTION)
    p.add_argument("--version", action="version", version=f"prlhf {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and an error's full traceback")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a personalized (or vanilla) DPO run, or a reward model (--objective rm)",
                       description="Train P-DPO: LoRA on the LM and a user model, jointly. Flags override --config.")
    t.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of the keys below (flags win)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    add_dataclass_flags(t, TrainConfig)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="per-user implicit-reward accuracy of a run on held-out pairs")
    e.add_argument("--run", required=True, help="run directory written by `prlhf train`")
    e.add_argument("--data", required=True, help="held-out pairs (users absent from training are 'unseen')")
    e.add_argument("--out", help="write the metrics JSON here (a new file, or one eval wrote before)")
    e.add_argument("--overwrite", action="store_true", help="let --out and --plot replace a file eval did not write")
    e.add_argument("--plot", metavar="PNG", help="also draw per-user accuracy as a bar chart")
    e.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate a response for a user (unseen users get the generic user)")
    g.add_argument("--run", required=True, help="run directory written by `prlhf train` (or `prlhf adapt --out`)")
    g.add_argument("--user", required=True, help="user id as in the training data")
    g.add_argument("--prompt", required=True, help="the prompt text, as in the training data")
    g.add_argument("--user-text", help="explicit preferences put before the prompt (if the run used user_text)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="longest response, in tokens (default 128)")
    g.add_argument("--n", type=int, default=1, help="number of samples (n > 1 implies --sample)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--rerank", metavar="RM_RUN", help="best-of-n: score the --n samples with this reward-model run "
                                                     "(train --objective rm) for --user; print JSON with the best")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    g.set_defaults(func=cmd_generate)

    sc = sub.add_parser("score", help="a reward-model run's reward of a response for a user",
                        description="Prints r(prompt, response, user) from a run trained with --objective rm.")
    sc.add_argument("--run", required=True, help="reward-model run directory")
    sc.add_argument("--user", required=True, help="user id (unseen ids get the generic user)")
    sc.add_argument("--prompt", required=True, help="the prompt text, as in the training data")
    sc.add_argument("--response", required=True, action="append",
                    help="response to score (repeat the flag to score several)")
    sc.add_argument("--user-text", help="explicit preferences put before the prompt (if the run used user_text)")
    sc.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    sc.set_defaults(func=cmd_score)

    d = sub.add_parser("data", help="check or build preference data")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    v = dsub.add_parser("validate", help="check a data file; print a summary or the first error")
    v.add_argument("file", help=".jsonl/.json/.csv/.parquet file or `datasets` folder (DIR or DIR::SPLIT)")
    v.set_defaults(func=cmd_data_validate)
    b = dsub.add_parser("build", help="write a built-in synthetic multi-user task (train/test/users)")
    b.add_argument("task", choices=["length", "style", "persona", "tldr", "polis"],
                   help="length / style: synthetic, test on new stories / topics; persona: real persona-trait "
                        "statements (Anthropic, CC-BY-4.0) with users holding opposing traits (test.jsonl: new "
                        "statements; test_pairs.jsonl: the paper's split pairs); tldr: real "
                        "labelers' comparisons of Reddit summaries (OpenAI), split by post; polis: real participants' "
                        "votes on each other's statements (Polis open data, CC BY 4.0), split by statement")
    b.add_argument("--out", required=True, help="output folder (new, empty, or one data build wrote before)")
    b.add_argument("--overwrite", action="store_true",
                   help="write into a folder that holds other files (never into a run directory)")
    b.add_argument("--users", type=int, help="number of seen users")
    b.add_argument("--unseen", type=int, help="number of unseen (test-only) users")
    b.add_argument("--majority-share", type=float, help="share of users holding the majority pole (default 0.7)")
    b.add_argument("--train-pairs-per-user", type=int, help="training pairs of each seen user (default: the task's)")
    b.add_argument("--test-pairs-per-user", type=int, help="held-out pairs of each user (default: the task's)")
    b.add_argument("--with-user-text", action="store_true", help="style: fill user_text with the profile")
    b.add_argument("--persona-dir", help="persona: folder of <trait>.jsonl files (default "
                                         "../shared/data/anthropic-persona or $PRLHF_PERSONA_DIR)")
    b.add_argument("--dimensions", help="persona: comma-separated dimensions (politics,risk,time,religion or "
                                        "trait-a/trait-b; default all four)")
    b.add_argument("--statements-per-pole", type=int, help="persona: statements drawn per trait file (default 200)")
    b.add_argument("--source", help="tldr: folder of comparison files in OpenAI's schema (*.json / *.jsonl; default "
                                    "../shared/data/summarize-from-feedback or $PRLHF_TLDR_DIR); polis: folder of "
                                    "Polis conversation folders (default ../shared/data/polis or $PRLHF_POLIS_DIR)")
    b.add_argument("--seed", type=int, default=0, help="random seed of users, profiles and pairs (default 0)")
    add_polis_build_flags(b)
    b.set_defaults(func=cmd_data_build)
    register_data_export(dsub)

    m = sub.add_parser("demo", help="the paper's length experiment on the built-in tiny model, end to end",
                       description="Builds the conflicting-length task, trains vanilla DPO, P-DPO individual and "
                                   "P-DPO cluster on the tiny model, evaluates them per user and shows generations.")
    m.add_argument("--quick", action="store_true", help="smaller data and fewer steps (about a minute)")
    m.add_argument("--out", default="demo_out", help="artifacts folder (default: demo_out)")
    m.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    m.add_argument("--nll-weight", type=float, default=0.5,
                   help="NLL term on chosen responses for all three methods (RPO); 0 = the paper's pure objective, "
                        "whose generations on the tiny model lose fluency (default 0.5)")
    m.set_defaults(func=cmd_demo)
    register_user_commands(sub)
    register_serve_command(sub)
    register_export_command(sub)

    bench = sub.add_parser("bench", help="benchmarks (results as JSON + Markdown)")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    sp = bsub.add_parser("speed", help="TRL DPOTrainer (reference in-step and precomputed) vs prlhf DPO / P-DPO "
                                       "throughput per step and end to end, share of the measured matmul peak; on "
                                       "tiny also step time vs number of users and personalized vs plain generation "
                                       "(needs `pip install trl`)")
    sp.add_argument("--model", default="tiny", help="tiny (the length task) | smollm2-135m | gemma3-270m (TL;DR posts, "
                                                    "prompts of 128-256 tokens) (default tiny)")
    sp.add_argument("--dtype", default=None, help="comma-separated, the first is the headline: fp32 | bf16 "
                                                  "(default fp32 on tiny, bf16,fp32 on a preset)")
    sp.add_argument("--quick", action="store_true", help="fewer steps and one repeat (a few minutes)")
    sp.add_argument("--out", required=True, help="folder for speed.json and speed.md")
    sp.add_argument("--threads", type=int, default=2, help="torch CPU threads per measured process (default 2)")
    sp.add_argument("--lora-dropout", type=float, default=0.0,
                    help="LoRA dropout of both sides (default 0: TRL's DPOTrainer zeroes it unless told otherwise; "
                         "0.05 is prlhf train's default and costs its dropout masks)")
    sp.set_defaults(func=cmd_bench_speed)
    sv = bsub.add_parser("serve", help="`prlhf serve` tokens/s and latency with 1, 8 and 32 concurrent users vs "
                                       "plain batched generate; latency and memory with 1,000,000 users")
    sv.add_argument("--model", default="tiny", help="tiny | smollm2-135m | any hub id or folder (default tiny)")
    sv.add_argument("--quick", action="store_true", help="fewer rounds and latency samples")
    sv.add_argument("--out", required=True, help="folder for serve.json and serve.md")
    sv.add_argument("--threads", type=int, default=2, help="torch CPU threads of the server and of generate")
    sv.add_argument("--seed", type=int, default=0)
    sv.add_argument("--many-users", type=int, default=1_000_000,
                    help="users in the large low-rank table, compared with 10 (default 1,000,000)")
    sv.set_defaults(func=cmd_bench_serve)
    pe = bsub.add_parser("persona", help="the paper's baselines on persona-trait users (real statements), splits "
                                         "'pairs' and 'statements'",
                         description="Builds persona-trait users from ../shared/data/anthropic-persona (CC-BY-4.0), "
                                     "trains vanilla DPO, text-conditioned DPO, P-DPO individual / cluster / "
                                     "individual+text, scores prompting, and writes results.json (split pairs), "
                                     "statements/results.json, report.md and plots.")
    pe.add_argument("--model", default="tiny", help="tiny | smollm2-135m | any hub id or folder (default tiny)")
    pe.add_argument("--users", type=int, help="seen users (unseen: a quarter of it)")
    pe.add_argument("--quick", action="store_true", help="small data, tiny model: a few minutes")
    pe.add_argument("--out", required=True, help="results folder")
    pe.add_argument("--methods", help="comma-separated subset of: vanilla_dpo, prompting, text_dpo, "
                                      "p_dpo_individual, p_dpo_cluster, p_dpo_cluster_small, p_dpo_individual_text "
                                      "(default: all of these), p_dpo_lowrank")
    pe.add_argument("--dimensions", help="comma-separated (default politics,risk,time)")
    pe.add_argument("--epochs", type=float,
                    help="override the size preset's epochs (4 tiny; 12 pretrained: 576 steps per trained method, "
                         "about 4 min each on one H100/H200 GPU, about 2.5 h on a 2-core CPU in bf16)")
    pe.add_argument("--persona-dir", help="folder of <trait>.jsonl files (default ../shared/data/anthropic-persona)")
    pe.add_argument("--statements-per-pole", type=int, help="statements drawn per trait file (fewer = each is rated by "
                                                            "more users; default 30 quick, 100 tiny, 12 pretrained)")
    pe.add_argument("--train-pairs-per-user", type=int,
                    help="training pairs of each seen user (default 40 quick, 60 tiny, 48 pretrained)")
    pe.add_argument("--majority-share", type=float, default=0.7,
                    help="expected share of users at each dimension's first pole (default 0.7: a model that ignores "
                         "the user can score up to about 0.7 on split pairs; 0.5 makes that about 0.5)")
    pe.add_argument("--curve-points", type=int,
                    help="learning-curve evaluations per trained method (default 4; 6 at the full tiny size)")
    pe.add_argument("--profile-ids", action="store_true",
                    help="diagnostic: seen users who share a profile share one user id in training (what implicit "
                         "embeddings learn when each id has many pairs); users are still scored one by one")
    pe.add_argument("--seed", type=int, default=0, help="seed of the data and of every run (default 0)")
    pe.add_argument("--keep-runs", action="store_true",
                    help="keep the data and trained runs under OUT/work (removed by default)")
    add_dataclass_flags(pe, TrainConfig, only=TRAIN_FLAGS, defaults=default_notes(TRAIN_FLAGS))
    pe.set_defaults(func=cmd_bench_persona)
    tl = bsub.add_parser("tldr", help="real labelers (OpenAI's TL;DR comparisons): vanilla DPO, P-DPO individual "
                                      "/ cluster, P-RM individual, uniform RM, new labelers from k comparisons",
                         description="Builds the TL;DR labelers task from --source (split by post), trains each "
                                     "method, scores seen and unseen labelers, fits new labelers, and writes "
                                     "results.json, report.md and labelers.png.")
    tl.add_argument("--model", default="tiny", help="tiny | smollm2-135m | any hub id or folder (default tiny)")
    tl.add_argument("--source", help="folder of comparison files (default ../shared/data/summarize-from-feedback)")
    tl.add_argument("--out", required=True, help="results folder")
    tl.add_argument("--quick", action="store_true", help="small sizes: checks the pipeline end to end")
    tl.add_argument("--methods", help="comma-separated subset of: vanilla_dpo, p_dpo_individual, rm_uniform, "
                                      "p_rm_individual, p_dpo_cluster (default: all, in this order)")
    tl.add_argument("--users", type=int, help="seen labelers, drawn by seed (default: all that are not unseen)")
    tl.add_argument("--unseen", type=int, help="unseen labelers, drawn from the half with fewest comparisons "
                                               "(default 6)")
    tl.add_argument("--min-comparisons", type=int,
                    help="leave out labelers with fewer comparisons (default 20 pretrained, 0 tiny)")
    tl.add_argument("--max-train-pairs-per-user", type=int,
                    help="cap each seen labeler's training comparisons (default 40 pretrained, none tiny)")
    tl.add_argument("--max-test-pairs-per-user", type=int,
                    help="cap each labeler's held-out comparisons (default 30 pretrained, none tiny)")
    tl.add_argument("--epochs", type=float, help="passes over the training pairs (default 2 pretrained, 3 tiny)")
    tl.add_argument("--max-prompt-length", type=int,
                    help="prompt tokens kept from the end, so 'TL;DR:' stays (default 192; max length is 64 more)")
    tl.add_argument("--adapt-ks", help="comparisons per new labeler, comma-separated (default 0,5,10; 0 = generic)")
    tl.add_argument("--adapt-steps", type=int, help="AdamW steps fitting the new labelers (default 20 pretrained)")
    tl.add_argument("--seed", type=int, default=0, help="seed of the split, the unseen labelers and every run")
    tl.add_argument("--keep-runs", action="store_true", help="keep the data and runs under OUT/work")
    tl.add_argument("--reuse-runs", action="store_true",
                    help="load the methods already finished under OUT/work (after a killed run) instead of "
                         "training them again")
    add_dataclass_flags(tl, TrainConfig, only=TRAIN_FLAGS, defaults=default_notes(TRAIN_FLAGS))
    tl.set_defaults(func=cmd_bench_tldr)
    register_polis_bench(bsub, run_bench)
    rr = bsub.add_parser("rerun", help="run a benchmark again from the experiment record it left "
                                       "(OUT/experiment.yaml)",
                         description="Reads the benchmark and its arguments from an experiment record and runs it "
                                     "into --out, which gets a new record of its own.")
    rr.add_argument("record", help="an experiment.yaml that `prlhf bench persona|tldr|polis|length` wrote")
    rr.add_argument("--out", required=True, help="results folder for the new run")
    rr.set_defaults(func=cmd_bench_rerun)
    le = bsub.add_parser("length", help="the paper's experiment 1: majority vs minority accuracy per method, for "
                                        "majority shares p = 0.5, 0.7, 0.9 (tiny model)")
    le.add_argument("--out", required=True, help="results folder (results.json, report.md, plot)")
    le.add_argument("--shares", default="0.5,0.7,0.9", help="comma-separated majority shares (default 0.5,0.7,0.9)")
    le.add_argument("--quick", action="store_true", help="fewer pairs per user")
    le.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    le.add_argument("--seed", type=int, default=0, help="seed of the data and of every run (default 0)")
    le.set_defaults(func=cmd_bench_length)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = "prlhf " + shlex.join(sys.argv[1:] if argv is None else argv)  # for experiment records
    setup_logging(args.verbose)
    own = own_error_types()
    try:
        check_flags(args, command_name(args))  # before any work
        return args.func(args)
    except KeyboardInterrupt:
        print("prlhf: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the one boundary: one line, whatever library raised it; the traceback with -v
        if args.verbose:
            traceback.print_exc()
        print(f"prlhf: error: {describe(exc, args, own)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
