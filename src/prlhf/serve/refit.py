"""Live onboarding and refits of users' rows from the comparisons the store collects.

- A user the served table does not hold, once they have `after` comparisons with a winner (ties and both-bad
  teach nothing): their row is fitted with everything else frozen (prlhf.train.adapt, what `prlhf adapt` runs).
- A user it holds, after every `after` further such comparisons (at `after`, 2 x `after`, ... collected ones):
  their row is fitted again on everything they chose here, starting from the row they have (prlhf.train.adapt's
  fit_rows, the same steps and rate).

Each fit is committed as a new version of the served run, under the run's lock and only if the run has not moved
since the fit began (else fitted again on the run as it now is, up to COMMIT_ATTEMPTS times), then swapped into
the server; the user's next request gets the new row. One fit runs at a time; users who become due while it
runs are fitted together in the next one (each row learns from its own user's pairs only). The server keeps
answering meanwhile (the fit shares its CPU), except during the fit's reference pass, which turns the shared
LM's adapters off and so borrows the LM from the engine (`lm_gate`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import torch

from prlhf.config import ONBOARD_STEPS
from prlhf.data.store import ComparisonStore
from prlhf.model.personalized import PersonalizedLM
from prlhf.runs.directory import LoadedRun, RunError
from prlhf.runs.users import UserTable, changing_run, commit_user_table, table_from_module, table_without
from prlhf.users.registry import UserRegistry

logger = logging.getLogger(__name__)

COMMIT_ATTEMPTS = 3  # fits of one batch of users whose commit loses a race; after that, their next comparison
RETRY_PAUSE_S = 0.5  # x the attempt number, before fitting again


class Onboarding:
    def __init__(self, server, store: ComparisonStore, after: int = 10, steps: int = ONBOARD_STEPS):
        self.server, self.store, self.after, self.steps = server, store, after, steps
        self._queue: queue.Queue[str] = queue.Queue()
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.fitted: dict[str, dict] = {}  # user -> {"seconds", "pairs", "fitted_with", "version", "refit"}
        self._forgotten: set[str] = set()  # deleted while a fit may be running: never committed
        self._thread = threading.Thread(target=self._work, name="prlhf-onboarding", daemon=True)

    def start(self) -> None:
        if not self.server.users.follows:
            logger.warning("onboarding is off: the server does not follow a run directory's versions")
            return
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._queue.put("")  # wake the worker

    def forget(self, user_id: str) -> None:
        with self._lock:
            self._forgotten.add(user_id)

    def status(self, user_id: str) -> str:
        """"fitting" (a fit of theirs is queued or running), "active" (the served table holds them) or
        "generic"."""
        with self._lock:
            if user_id in self._pending:
                return "fitting"
        return "active" if user_id in self.server.users.snapshot().registry else "generic"

    def notify(self, user_id: str, winners: int) -> str:
        """After a decided comparison of `user_id` (`winners`: their comparisons with a winner): queue a fit when
        one is due; returns their status."""
        known = user_id in self.server.users.snapshot().registry
        due = winners >= self.after if not known else winners > 0 and winners % self.after == 0
        if due:
            with self._lock:
                self._forgotten.discard(user_id)  # a deleted user who comes back starts over
                if user_id not in self._pending:
                    self._pending.add(user_id)
                    self._queue.put(user_id)
        return self.status(user_id)

    def _work(self) -> None:
        while not self._stop.is_set():
            users = [self._queue.get()]
            while True:  # everyone queued meanwhile is fitted in the same pass
                try:
                    users.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            users = sorted({u for u in users if u})
            if not users:
                continue
            try:
                # A fit whose commit lost a race (another server on this run committed first, or `prlhf users`
                # held the run) is fitted again on the run as it is now: the user's 10th comparison may be
                # their last for a while, and they must not wait for another one.
                for attempt in range(COMMIT_ATTEMPTS):
                    if self._fit(users) or self._stop.is_set():
                        break
                    self._stop.wait(RETRY_PAUSE_S * (attempt + 1))
            except Exception:  # a failed fit must not stop onboarding; the next comparison queues it again
                logger.exception("fitting %s failed", users)
            finally:
                with self._lock:
                    self._pending.difference_update(users)

    def _fit(self, users: list[str]) -> bool:
        """Fit and commit `users`' rows; False when the commit did not happen (the run moved, or was held)."""
        started = time.perf_counter()
        snapshot = self.server.users.snapshot()
        records = {u: [r for c in self.store.of_user(u, limit=100_000) if (r := c.record()) is not None
                       and r.chosen != r.rejected] for u in users}
        records = {u: rs for u, rs in records.items() if len(rs) >= self.after}
        new = [u for u in records if u not in snapshot.registry]
        known = [u for u in records if u in snapshot.registry]
        table = table_from_module(snapshot.model, UserRegistry(snapshot.registry.user_ids))
        if known:
            table = self._refit_known(table, {u: records[u] for u in known})
        if new:
            table = self._fit_new(table, [r for u in new for r in records[u]])
        with self._lock:
            deleted = [u for u in records if u in self._forgotten]  # deleted while the fit ran: never committed
        for user in deleted:
            table = table_without(table, user)
        fitted = [u for u in records if u not in deleted]
        if not fitted:
            return True  # nothing left to commit
        if not self._commit(table, snapshot.version, fitted):
            return False
        seconds, version = time.perf_counter() - started, self.server.users.snapshot().version
        for user in fitted:  # seconds: of the fit that was committed
            self.fitted[user] = {"seconds": seconds, "pairs": len(records[user]), "fitted_with": len(fitted),
                                 "version": version, "refit": user in known}
            self.server.metrics.onboarding.observe(seconds)
        logger.info("fitted %s (new: %s) in %.1f s (version %s)", fitted, new, seconds, version)
        return True

    def _view(self, table: UserTable) -> LoadedRun:
        """The served LM with the user table being fitted (the run's own may have been replaced by reloads)."""
        run = self.server.run
        user_model = table.to_module().to(run.model.lm.get_input_embeddings().weight.device)
        return LoadedRun(PersonalizedLM(run.model.lm, user_model, run.model.prefix_len), run.tokenizer,
                         table.registry, run.config, run.path)

    def _fit_new(self, table: UserTable, records: list) -> UserTable:
        from prlhf.train.adapt import adapt_users

        view = self._view(table)  # the table as it is now: known users' refits included
        adapted, _ = adapt_users(view, records, steps=self.steps, show_progress=False,
                                 reference_guard=self.server.engine.lm_gate.borrow())
        return table_from_module(adapted.model.user_model, adapted.registry)

    def _refit_known(self, table: UserTable, records: dict[str, list]) -> UserTable:
        """Fit the rows of users the table holds again, each from their current row, on their own pairs."""
        from prlhf.train.adapt import default_adapt_lr, fit_rows

        view = self._view(table)
        users = list(records)
        flat = [r for u in users for r in records[u]]
        local = torch.tensor([users.index(r.user_id) for r in flat], dtype=torch.long)
        index = [table.registry.index(u) for u in users]
        config = self.server.run.config
        rows, _ = fit_rows(view.model, table.rows[index].float(), view.encode(flat), local,
                           self.server.run.tokenizer.pad_token_id, config.beta, self.steps,
                           default_adapt_lr(config, table.kind), show_progress=False, user_ids=users,
                           reference_guard=self.server.engine.lm_gate.borrow())
        new_rows = table.rows.clone()
        new_rows[index] = rows.to(new_rows.dtype)
        return table.with_rows(new_rows, table.registry)

    def _commit(self, table: UserTable, based_on: str | None, users: list[str]) -> bool:
        try:
            with changing_run(self.server.run.path, "serve onboarding") as current:
                # Another writer (another server on this run, `prlhf users ...`) committed during the fit: the
                # table fitted here lacks its change, so committing it would undo that. Fit again on the new one.
                if current.version != based_on:
                    logger.info("fitting %s: the run moved to %s during the fit; fitting again", users,
                                current.version)
                    self.server.users.reload_if_changed()
                    return False
                commit_user_table(current, table, "serve onboarding")
        except RunError as exc:  # e.g. `prlhf users ...` holds the run's lock right now
            logger.warning("fitting %s: could not commit (%s); trying again shortly", users, exc)
            return False
        self.server.users.reload_if_changed()
        return True
