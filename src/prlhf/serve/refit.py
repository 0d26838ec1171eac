"""Live onboarding: once a user the served table does not hold has `after` comparisons with a winner in the store
(ties and both-bad teach nothing), a background worker fits their row with everything else frozen
(prlhf.train.adapt, what `prlhf adapt` runs), commits it as a new version of the served run
(prlhf.runs.users.write_user_table: atomic) and swaps it into the server; their next request gets their own soft
tokens. One fit runs at a time; users who reach their count while it runs are fitted together in the next one
(each new row learns from its own user's pairs only). The server keeps answering meanwhile; the fit shares its CPU.

Users the table already holds are not refitted here (adapt fits unknown users only).
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from prlhf.data.store import ComparisonStore
from prlhf.model.personalized import PersonalizedLM
from prlhf.runs.directory import LoadedRun, RunError
from prlhf.runs.users import registry_without, table_from_module, write_user_table
from prlhf.users.registry import UserRegistry

logger = logging.getLogger(__name__)


class Onboarding:
    def __init__(self, server, store: ComparisonStore, after: int = 10, steps: int = 40):
        self.server, self.store, self.after, self.steps = server, store, after, steps
        self._queue: queue.Queue[str] = queue.Queue()
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.fitted: dict[str, dict] = {}  # user -> {"seconds", "pairs", "version"} of their last fit
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
        """"active" (the served table holds the user), "fitting", or "generic"."""
        if user_id in self.server.users.snapshot().registry:
            return "active"
        with self._lock:
            return "fitting" if user_id in self._pending else "generic"

    def notify(self, user_id: str, decided: int) -> str:
        """After a decided comparison of `user_id` (their `decided` count): queue a fit when it is due."""
        state = self.status(user_id)
        if state == "generic" and decided >= self.after:
            with self._lock:
                self._forgotten.discard(user_id)  # a deleted user who comes back starts over
                if user_id not in self._pending:
                    self._pending.add(user_id)
                    self._queue.put(user_id)
            return "fitting"
        return state

    def _work(self) -> None:
        while not self._stop.is_set():
            users = [self._queue.get()]
            while True:  # everyone queued meanwhile is fitted in the same pass: their rows are independent
                try:
                    users.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            users = sorted({u for u in users if u})
            if not users:
                continue
            try:
                self._fit(users)
            except Exception:  # a failed fit must not stop onboarding; the next comparison queues it again
                logger.exception("onboarding %s failed", users)
            finally:
                with self._lock:
                    self._pending.difference_update(users)

    def _fit(self, users: list[str]) -> None:
        from prlhf.train.adapt import adapt_users

        started = time.perf_counter()
        run, snapshot = self.server.run, self.server.users.snapshot()
        records, counts = [], {}
        for user in users:
            mine = [r for c in self.store.of_user(user, limit=100_000) if (r := c.record()) is not None
                    and r.chosen != r.rejected]
            if user not in snapshot.registry and len(mine) >= self.after:
                records += mine
                counts[user] = len(mine)
        if not counts:
            return
        # the served LM with the table being served now (a reload may have replaced the one the run loaded with)
        view = LoadedRun(PersonalizedLM(run.model.lm, snapshot.model, run.model.prefix_len), run.tokenizer,
                         UserRegistry(snapshot.registry.user_ids), run.config, run.path)
        adapted, _ = adapt_users(view, records, steps=self.steps, show_progress=False)
        table = table_from_module(adapted.model.user_model, adapted.registry)
        with self._lock:
            deleted = [u for u in counts if u in self._forgotten]  # deleted while the fit ran: never committed
        for user in deleted:
            table = table.with_rows(table.rows[[i for i in range(len(table.rows))
                                                if i != table.registry.index(user)]],
                                    registry_without(table.registry, user))
            del counts[user]
        if not counts:
            return
        try:
            write_user_table(run.path, table, written_by="serve onboarding")
        except RunError as exc:  # e.g. `prlhf users ...` holds the run's lock right now
            logger.warning("onboarding %s: could not commit (%s); the next comparison retries", sorted(counts), exc)
            return
        self.server.users.reload_if_changed()
        seconds = time.perf_counter() - started
        version = self.server.users.snapshot().version
        for user, pairs in counts.items():
            self.fitted[user] = {"seconds": seconds, "pairs": pairs, "fitted_with": len(counts), "version": version}
            self.server.metrics.onboarding.observe(seconds)
        logger.info("onboarded %s in %.1f s (version %s)", sorted(counts), seconds, version)
