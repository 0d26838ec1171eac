"""The comparison store: the comparisons people make while a model is served. SQLite by default (one file,
nothing to install: `sqlite:///PATH` or a plain path); PostgreSQL by URL (`postgresql://...`, needs `psycopg`)
when several server processes share one store.

One row per comparison, after the conventions of Argilla and Chatbot Arena: its id, the user, the prompt (text or
chat messages, as JSON), both responses, which was shown on the left, the choice (a, b, tie, both_bad; empty
while pending), the run and user-table version that produced the responses, the sampling settings, timestamps
and a status. Beside them, the personal tokens users reach the server with (only their sha256).

A write is acknowledged only after its transaction commits (SQLite: WAL journal, synchronous=FULL; PostgreSQL:
its default synchronous commit), so a killed server loses nothing it acknowledged; a retried write with the same id
is not stored twice. The schema is created and migrated by `migrate()`, versioned (SQLite: `PRAGMA
user_version`; PostgreSQL: the table prlhf_schema, migrated under an advisory lock).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from prlhf.data.schema import PreferenceRecord

CHOICES = ("a", "b", "tie", "both_bad")
SCHEMA_VERSION = 2
MIGRATIONS = {  # version -> the statements that bring the schema from version - 1 to it
    1: ["""CREATE TABLE comparisons (
             id TEXT PRIMARY KEY,
             user_id TEXT NOT NULL,
             prompt TEXT NOT NULL,
             response_a TEXT NOT NULL,
             response_b TEXT NOT NULL,
             shown_left TEXT NOT NULL CHECK (shown_left IN ('a', 'b')),
             choice TEXT CHECK (choice IS NULL OR choice IN ('a', 'b', 'tie', 'both_bad')),
             run TEXT,
             version TEXT,
             sampling TEXT,
             created_at {float} NOT NULL,
             decided_at {float},
             status TEXT NOT NULL CHECK (status IN ('pending', 'decided')))""",
        "CREATE INDEX comparisons_by_user ON comparisons (user_id, status, created_at)"],
    # personal links: a token stands for one user; only its sha256 is stored
    2: ["CREATE TABLE tokens (token_sha256 TEXT PRIMARY KEY, user_id TEXT NOT NULL, created_at {float} NOT NULL)",
        "CREATE INDEX tokens_by_user ON tokens (user_id)"],
}
FIELDS = ("id", "user_id", "prompt", "response_a", "response_b", "shown_left", "choice", "run", "version",
          "sampling", "created_at", "decided_at", "status")


class StoreError(ValueError):
    """A request the store refuses (unknown id, another user's comparison, a conflicting retry); one line."""


@dataclass(frozen=True)
class Comparison:
    id: str
    user_id: str
    prompt: object          # text, or a list of chat messages
    response_a: str
    response_b: str
    shown_left: str         # "a" or "b"
    choice: str | None
    run: str | None
    version: str | None
    sampling: dict | None
    created_at: float
    decided_at: float | None
    status: str

    def to_dict(self) -> dict:
        return asdict(self)

    def record(self) -> PreferenceRecord | None:
        """The training record it makes: None for a tie, both bad, or no choice yet."""
        if self.choice == "a":
            return PreferenceRecord(self.user_id, self.prompt, self.response_a, self.response_b)
        if self.choice == "b":
            return PreferenceRecord(self.user_id, self.prompt, self.response_b, self.response_a)
        return None


def sqlite_path(url: str) -> Path:
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):])
    if "://" in url:
        raise StoreError(f"{url}: expected sqlite:///PATH or postgresql://...")
    return Path(url)


class SQLite:
    """One file; the connection is shared by the store's threads under its lock."""

    float_type, name = "REAL", "sqlite"

    def __init__(self, url: str):
        self.path = sqlite_path(url)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before it is acknowledged

    def execute(self, sql: str, params: tuple = ()):
        return self.db.execute(sql, params)

    def begin(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")  # the write lock now: no other writer between our read and write

    def version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def set_version(self, version: int) -> None:
        self.db.execute(f"PRAGMA user_version = {int(version)}")

    def lock_schema(self) -> None:
        pass  # BEGIN IMMEDIATE already excludes other writers

    def close(self) -> None:
        self.db.close()


class PostgreSQL:
    """A server several prlhf processes may share; rows are locked per write (SELECT ... FOR UPDATE)."""

    float_type, name = "DOUBLE PRECISION", "postgresql"

    def __init__(self, url: str):
        try:
            import psycopg
        except ImportError:
            raise StoreError("a postgresql:// store needs psycopg: pip install 'prlhf[postgres]'") from None
        self.path = url.split("@")[-1]  # for messages: never the password
        self.db = psycopg.connect(url, autocommit=True)

    def execute(self, sql: str, params: tuple = ()):
        return self.db.execute(sql.replace("?", "%s"), params)

    def begin(self) -> None:
        self.db.execute("BEGIN")

    def version(self) -> int:
        self.db.execute("CREATE TABLE IF NOT EXISTS prlhf_schema (version INTEGER NOT NULL)")
        row = self.db.execute("SELECT version FROM prlhf_schema").fetchone()
        return 0 if row is None else row[0]

    def set_version(self, version: int) -> None:
        self.db.execute("DELETE FROM prlhf_schema")
        self.db.execute("INSERT INTO prlhf_schema (version) VALUES (%s)", (version,))

    def lock_schema(self) -> None:
        self.db.execute("SELECT pg_advisory_xact_lock(72730)")  # two servers starting at once migrate once

    def close(self) -> None:
        self.db.close()


def connect(url: str):
    if url.startswith(("postgresql://", "postgres://")):
        return PostgreSQL(url)
    return SQLite(url)


class ComparisonStore:
    """Thread-safe: one connection, one writer at a time in this process."""

    def __init__(self, url: str):
        self.backend = connect(url)
        self.path = self.backend.path
        self._lock = threading.Lock()
        self.migrate()

    def close(self) -> None:
        with self._lock:
            self.backend.close()

    def migrate(self) -> None:
        db = self.backend
        with self._lock, self._transaction():
            db.lock_schema()
            current = db.version()
            if current > SCHEMA_VERSION:
                raise StoreError(f"{self.path}: schema version {current} is newer than this prlhf's "
                                 f"({SCHEMA_VERSION}); upgrade prlhf")
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version]:
                    db.execute(statement.format(float=db.float_type))
                db.set_version(version)

    def _transaction(self):
        return _Transaction(self.backend)

    # ------------------------------------------------------------------------------------------ writes

    def add_pair(self, user_id: str, prompt, response_a: str, response_b: str, run: str | None = None,
                 version: str | None = None, sampling: dict | None = None, shown_left: str = "a",
                 id: str | None = None) -> Comparison:
        """A pair shown to `user_id`, waiting for their choice."""
        return self._insert(Comparison(id or uuid.uuid4().hex, user_id, prompt, response_a, response_b, shown_left,
                                       None, run, version, sampling, time.time(), None, "pending"))

    def add_record(self, user_id: str, prompt, chosen: str, rejected: str, id: str | None = None) -> Comparison:
        """A full comparison the user made elsewhere: `chosen` is stored as response a, chosen."""
        now = time.time()
        return self._insert(Comparison(id or uuid.uuid4().hex, user_id, prompt, chosen, rejected, "a", "a", None,
                                       None, None, now, now, "decided"))

    def decide(self, id: str, choice: str, user_id: str | None = None) -> Comparison:
        """Record the choice for a pending comparison (of `user_id`, when given). Deciding again with the same
        choice is a no-op (a retry); with another choice it is refused."""
        if choice not in CHOICES:
            raise StoreError(f"choice must be one of {', '.join(CHOICES)}")
        with self._lock, self._transaction():
            found = self._get(id)
            if found is None or (user_id is not None and found.user_id != user_id):
                raise StoreError(f"no comparison {id!r}" + (f" of user {user_id!r}" if user_id else ""))
            if found.status == "decided":
                if found.choice != choice:
                    raise StoreError(f"comparison {id!r} was already decided ({found.choice})")
                return found
            self.backend.execute("UPDATE comparisons SET choice = ?, decided_at = ?, status = 'decided' WHERE id = ?",
                             (choice, time.time(), id))
            return self._get(id)

    def _insert(self, c: Comparison) -> Comparison:
        columns, marks = ", ".join(FIELDS), ", ".join("?" * len(FIELDS))
        with self._lock, self._transaction():
            added = self.backend.execute(f"INSERT INTO comparisons ({columns}) VALUES ({marks}) "
                                         "ON CONFLICT (id) DO NOTHING", _row(c)).rowcount
            if added:
                return c
            existing = self._get(c.id)  # a retry after a lost acknowledgement: the same content is the same write
            if _same_content(existing, c):
                return existing
            raise StoreError(f"comparison id {c.id!r} is taken by another comparison")

    def delete_user(self, user_id: str) -> int:
        """Remove the user's comparisons and tokens; returns how many comparisons there were."""
        with self._lock, self._transaction():
            self.backend.execute("DELETE FROM tokens WHERE user_id = ?", (user_id,))
            return self.backend.execute("DELETE FROM comparisons WHERE user_id = ?", (user_id,)).rowcount

    def invite(self, user_id: str) -> str:
        """A new personal token for `user_id` (shown once; the store keeps its sha256)."""
        token = secrets.token_urlsafe(24)
        with self._lock, self._transaction():
            self.backend.execute("INSERT INTO tokens (token_sha256, user_id, created_at) VALUES (?, ?, ?)",
                             (_sha256(token), user_id, time.time()))
        return token

    def user_of_token(self, token: str) -> str | None:
        with self._lock:
            row = self.backend.execute("SELECT user_id FROM tokens WHERE token_sha256 = ?", (_sha256(token),)).fetchone()
        return None if row is None else row[0]

    # ------------------------------------------------------------------------------------------ reads

    def get(self, id: str) -> Comparison | None:
        with self._lock:
            return self._get(id)

    def _get(self, id: str) -> Comparison | None:
        lock = " FOR UPDATE" if self.backend.name == "postgresql" else ""  # inside a write: hold the row
        row = self.backend.execute(f"SELECT {', '.join(FIELDS)} FROM comparisons WHERE id = ?{lock}",
                                   (id,)).fetchone()
        return None if row is None else _comparison(row)

    def of_user(self, user_id: str, limit: int = 100) -> list[Comparison]:
        """The user's comparisons, newest first."""
        with self._lock:
            rows = self.backend.execute(f"SELECT {', '.join(FIELDS)} FROM comparisons WHERE user_id = ? "
                                    "ORDER BY created_at DESC LIMIT ?", (user_id, limit)).fetchall()
        return [_comparison(r) for r in rows]

    def decided_count(self, user_id: str) -> int:
        with self._lock:
            return self.backend.execute("SELECT COUNT(*) FROM comparisons WHERE user_id = ? AND status = 'decided'",
                                    (user_id,)).fetchone()[0]

    def preference_count(self, user_id: str) -> int:
        """Decided comparisons with a winner (a or b): the ones that make training records."""
        with self._lock:
            return self.backend.execute("SELECT COUNT(*) FROM comparisons WHERE user_id = ? AND choice IN ('a', 'b')",
                                    (user_id,)).fetchone()[0]

    def all(self) -> Iterator[Comparison]:
        """Every comparison, oldest first."""
        with self._lock:
            rows = self.backend.execute(f"SELECT {', '.join(FIELDS)} FROM comparisons ORDER BY created_at, id").fetchall()
        return (_comparison(r) for r in rows)


class _Transaction:
    """BEGIN ... COMMIT (ROLLBACK on an error): the caller's statements land whole or not at all."""

    def __init__(self, backend):
        self.db = backend

    def __enter__(self):
        self.db.begin()
        return self

    def __exit__(self, kind, *_):
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
        return False


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _row(c: Comparison) -> tuple:
    values = asdict(c)
    values["prompt"] = json.dumps(c.prompt)
    values["sampling"] = None if c.sampling is None else json.dumps(c.sampling, sort_keys=True)
    return tuple(values[f] for f in FIELDS)


def _comparison(row: tuple) -> Comparison:
    values = dict(zip(FIELDS, row))
    values["prompt"] = json.loads(values["prompt"])
    values["sampling"] = None if values["sampling"] is None else json.loads(values["sampling"])
    return Comparison(**values)


def _same_content(a: Comparison, b: Comparison) -> bool:
    keys = ("user_id", "prompt", "response_a", "response_b", "choice")
    return all(getattr(a, k) == getattr(b, k) for k in keys)
