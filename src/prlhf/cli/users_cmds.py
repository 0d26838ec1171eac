"""`prlhf adapt` (fit new users on a finished run) and `prlhf users list|delete|export|import|onboard-pairs`.

`register(subparsers)` adds both commands to the `prlhf` parser (prlhf.cli.main).
"""

from __future__ import annotations

import json
from pathlib import Path

from prlhf.cli.common import set_threads
from prlhf.config import ConfigError


def cmd_adapt(args) -> int:
    from prlhf.data.loading import load_records
    from prlhf.runs.directory import load_run
    from prlhf.runs.users import save_adapted_run
    from prlhf.train.adapt import adapt_users

    set_threads(args.threads)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # refuse before any work
        raise ConfigError(f"{out}: already exists and is not empty; choose another --out")
    records = load_records(args.data)
    known = load_records(args.known_data) if args.known_data else None
    run = load_run(args.run)
    new_run, report = adapt_users(run, records, steps=args.steps, lr=args.lr, holdout=args.holdout, seed=args.seed,
                                  user=args.user, warm_start=args.warm_start, known_records=known,
                                  show_progress=not args.quiet)
    save_adapted_run(args.run, new_run, out, report)
    print(format_adapt_report(report), end="")
    print(f"adapted {len(report['users'])} user(s) in {report['fit_seconds']:.1f} s ({report['steps']} steps at lr "
          f"{report['lr']:.3g}) -> {out}")
    return 0


def format_adapt_report(report: dict) -> str:
    users = report["users"]
    width = max([len("user_id")] + [len(u) for u in users])
    lines = [f"{'user_id':<{width}}  index  fit  eval  before  after  init"]
    for uid, r in users.items():
        acc = [("-" if r[k] is None else f"{r[k]:.2f}") for k in ("before", "after")]
        lines.append(f"{uid:<{width}}  {r['index']:>5}  {r['n_fit']:>3}  {r['n_eval']:>4}  {acc[0]:>6}  "
                     f"{acc[1]:>5}  {r['init']}")
    if "mean_after" in report:
        lines.append(f"mean held-out accuracy: before (generic) {report['mean_before']:.3f}, "
                     f"after {report['mean_after']:.3f}")
    return "\n".join(lines) + "\n"


def cmd_users_list(args) -> int:
    from prlhf.data.loading import load_records
    from prlhf.runs.users import format_user_list, list_users

    records = load_records(args.data) if args.data else None
    print(format_user_list(list_users(args.run, records)), end="")
    return 0


def cmd_users_delete(args) -> int:
    from prlhf.runs.users import delete_user

    delete_user(args.run, args.user)
    print(f"deleted {args.user!r} from {args.run}; it now maps to the generic user")
    return 0


def cmd_users_export(args) -> int:
    from prlhf.runs.users import export_users

    ids = [u for u in args.users.split(",") if u]
    paths = export_users(args.run, ids, args.out, overwrite=args.overwrite)
    print(f"exported {len(ids)} user(s) -> {', '.join(str(p) for p in paths)}")
    return 0


def cmd_users_import(args) -> int:
    from prlhf.runs.users import import_users

    result = import_users(args.run, getattr(args, "from"), overwrite=args.overwrite)
    print(json.dumps(result))
    return 0


def cmd_users_onboard_pairs(args) -> int:
    from prlhf.data.loading import load_records
    from prlhf.runs.directory import load_run
    from prlhf.train.onboard_pairs import choose_onboarding_pairs, write_onboard_pairs

    from prlhf.safe_io import output_file_problem

    set_threads(args.threads)
    out = Path(args.out)
    # before any work; an existing file is never taken for an earlier output of this command
    if problem := output_file_problem(out, args.overwrite, ours=lambda _: False):
        raise ConfigError(f"{out}: {problem}")
    if args.pairs < 1 or args.pool < 1:
        raise ConfigError("users onboard-pairs: --pairs and --pool must be positive")
    records = load_records(args.data)
    run = load_run(args.run)
    try:
        pairs = choose_onboarding_pairs(run, records, args.pairs, pool=args.pool, seed=args.seed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not pairs:
        raise ConfigError(f"{args.run}: the run predicts every known user to answer each of the {args.pool} candidate "
                          "pairs alike; no pair would tell a newcomer's taste apart")
    write_onboard_pairs(out, pairs)
    splits = ", ".join(f"{p.split:.2f}" for p in pairs)
    print(f"{len(pairs)} pair(s) -> {out} (share of known users predicted to prefer response_a: {splits}); read "
          "them before serving: they are training texts, shown to every new user")
    return 0


def _times(factor: float) -> str:
    return "" if factor == 1 else f"{factor:g}x "


def register(subparsers) -> None:
    """Add `adapt` and `users` to the `prlhf` subcommands (the action returned by add_subparsers)."""
    from prlhf.config import ADAPT_LR_FACTOR, DEFAULT_STEPS, WARM_STARTS

    a = subparsers.add_parser(
        "adapt", help="fit embeddings for new users on a finished run (LM, adapters, other users frozen)",
        description="Fit the users in --data that the run does not know (P-DPO with alpha=1, their rows only) and "
                    "write a new run directory: a copy of --run with the extended user model and registry.")
    a.add_argument("--run", required=True, help="finished run directory (individual, cluster or lowrank user model)")
    a.add_argument("--data", required=True, help="preference pairs of the new users (known users are ignored)")
    a.add_argument("--out", required=True, help="new run directory to write (must not exist or be empty)")
    a.add_argument("--user", help="adapt only this user id")
    a.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"optimizer steps (default {DEFAULT_STEPS}; 0 keeps the --warm-start rows as they are)")
    a.add_argument("--lr", type=float, default=None,
                   help=f"AdamW rate of the new rows (default: {_times(ADAPT_LR_FACTOR)}the rate the run trained its "
                        "users' rows with, i.e. its user_lr for an individual model, its user_code_lr for cluster "
                        "and lowrank; the last line printed shows the rate used)")
    a.add_argument("--holdout", type=float, default=0.0,
                   help="share of each new user's pairs kept out of fitting, for before/after accuracy (default 0)")
    a.add_argument("--seed", type=int, default=0, help="seed of the holdout split")
    a.add_argument("--warm-start", choices=WARM_STARTS, default="none",
                   help="text: start from the mean embedding of known users with the same/most similar "
                        "user_text; covotes: from the row the new user's votes predict, where they judged responses "
                        "the known users judged (users x responses co-vote factors mapped to the known users' rows)")
    a.add_argument("--known-data", metavar="TRAIN_FILE",
                   help="the run's training data (known users' user_text or votes), for --warm-start")
    a.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.set_defaults(func=cmd_adapt)

    u = subparsers.add_parser("users", help="list, delete, export or import users of a run; pick pairs to onboard "
                                            "new ones with")
    usub = u.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    ls = usub.add_parser("list", help="id, index, norm of the user's row and training pairs")
    ls.add_argument("--run", required=True, help="run directory written by `prlhf train`")
    ls.add_argument("--data", help="training data, to count each user's pairs")
    ls.set_defaults(func=cmd_users_list)
    d = usub.add_parser("delete", help="remove a user's row (the id then maps to the generic user)")
    d.add_argument("--run", required=True, help="run directory written by `prlhf train`")
    d.add_argument("--user", required=True, help="user id to delete")
    d.set_defaults(func=cmd_users_delete)
    e = usub.add_parser("export", help="write users' rows to FILE_PREFIX.safetensors + FILE_PREFIX.json")
    e.add_argument("--run", required=True, help="run directory written by `prlhf train`")
    e.add_argument("--users", required=True, help="comma-separated user ids")
    e.add_argument("--out", required=True, metavar="FILE_PREFIX", help="writes FILE_PREFIX.safetensors and .json "
                   "(new files, or an earlier export's; never a run directory's own files)")
    e.add_argument("--overwrite", action="store_true", help="replace files at FILE_PREFIX that are not an export")
    e.set_defaults(func=cmd_users_export)
    i = usub.add_parser("import", help="add users exported from a run on the same base model")
    i.add_argument("--run", required=True, help="run directory written by `prlhf train`")
    i.add_argument("--from", required=True, metavar="FILE_PREFIX", help="what `prlhf users export` wrote")
    i.add_argument("--overwrite", action="store_true", help="replace users that already exist")
    i.set_defaults(func=cmd_users_import)
    o = usub.add_parser("onboard-pairs",
                        help="pick the training pairs its known users disagree on, for `prlhf serve --onboard-pairs`",
                        description="Score candidate pairs of the training data under every known user's row and "
                                    "keep those that split the users, each in a new way (docs/serve.md). Writes "
                                    "JSONL: prompt, response_a, response_b, and the predicted split.")
    o.add_argument("--run", required=True, help="a personalized run directory written by `prlhf train`")
    o.add_argument("--data", required=True, help="the run's training data (or other pairs to choose from)")
    o.add_argument("--out", required=True, metavar="FILE", help="JSONL file to write")
    o.add_argument("--pairs", type=int, default=20, help="pairs to keep at most (default 20: some are ties for a "
                   "given user, and the server fits after --onboard-after winners)")
    o.add_argument("--pool", type=int, default=400, help="candidate pairs drawn from --data and scored (default 400)")
    o.add_argument("--seed", type=int, default=0, help="seed of the candidate draw and of the a/b order")
    o.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    o.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    o.set_defaults(func=cmd_users_onboard_pairs)
