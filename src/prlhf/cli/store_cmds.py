"""`prlhf data export --db URL --out FILE.jsonl`: the comparisons `prlhf serve --db` collected, as training records.

`register(data_subparsers)` adds the action to `prlhf data` (prlhf.cli.main).
"""

from __future__ import annotations

import json
from pathlib import Path

from prlhf.config import ConfigError


def open_store(url: str, command: str, must_exist: bool = False):
    """The ComparisonStore at `url`, or a one-line ConfigError naming the command (and never a password)."""
    import sqlite3

    from prlhf.data.store import ComparisonStore, StoreError, sqlite_path

    try:
        if must_exist and not url.startswith(("postgresql://", "postgres://")) and not sqlite_path(url).is_file():
            raise ConfigError(f"{command}: {sqlite_path(url)}: no such database")
        return ComparisonStore(url)
    except (StoreError, OSError, sqlite3.Error) as exc:  # e.g. a file that is not a database
        raise ConfigError(f"{command}: --db {store_label(url)}: {exc}") from None
    except Exception as exc:  # psycopg's errors (no server there), without importing psycopg here
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(f"{command}: --db {store_label(url)}: {exc.__class__.__name__}: {first}") from None


def cmd_data_export(args) -> int:
    from prlhf.safe_io import atomic_write_text

    for out in filter(None, (args.out, args.ties_out)):
        if Path(out).exists() and not args.overwrite:
            raise ConfigError(f"data export: {out} already exists (--overwrite replaces it)")
    store = open_store(args.db, "data export", must_exist=True)
    records, ties, counts = [], [], {"pending": 0, "same_text": 0}
    try:
        for c in store.all():
            if c.status != "decided":
                counts["pending"] += 1
            elif c.response_a == c.response_b:
                counts["same_text"] += 1  # not a comparison a loss can learn from
            elif (r := c.record()) is not None:
                records.append({"user_id": r.user_id, "prompt": r.prompt, "chosen": r.chosen,
                                "rejected": r.rejected, "comparison_id": c.id})
            else:
                ties.append({"user_id": c.user_id, "prompt": c.prompt, "response_a": c.response_a,
                             "response_b": c.response_b, "choice": c.choice, "comparison_id": c.id})
    finally:
        store.close()
    atomic_write_text(Path(args.out), "".join(json.dumps(r) + "\n" for r in records))
    if args.ties_out:
        atomic_write_text(Path(args.ties_out), "".join(json.dumps(t) + "\n" for t in ties))
    users = len({r["user_id"] for r in records})
    print(f"exported {len(records)} comparison(s) of {users} user(s) -> {args.out}; left out: {len(ties)} tie or "
          f"both-bad" + (f" (-> {args.ties_out})" if args.ties_out else "") + f", {counts['pending']} without a "
          f"choice yet, {counts['same_text']} with the same text twice")
    return 0


def store_label(url: str) -> str:
    """A store URL fit for a message: no password."""
    return url.split("://", 1)[0] + "://" + url.split("@")[-1] if "@" in url else url


def register(dsub) -> None:
    e = dsub.add_parser("export", help="write the comparisons a `prlhf serve --db` store holds as training records",
                        description="Write every decided comparison of the store as a (user_id, prompt, chosen, "
                                    "rejected) JSONL record that `prlhf train` and `prlhf adapt` read. Ties, both-bad "
                                    "and undecided pairs are left out (--ties-out writes the ties and both-bad ones "
                                    "to a file of their own, with their choice).")
    e.add_argument("--db", required=True, help="the store, as given to prlhf serve --db: sqlite:///PATH or "
                                               "postgresql://...")
    e.add_argument("--out", required=True, help="JSONL file to write")
    e.add_argument("--ties-out", help="also write ties and both-bad comparisons here (not training records)")
    e.add_argument("--overwrite", action="store_true", help="replace existing output files")
    e.set_defaults(func=cmd_data_export)
