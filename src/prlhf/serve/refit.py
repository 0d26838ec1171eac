"""Live onboarding: once a user the served table does not hold has `after` decided comparisons in the store, a
background worker fits their row with everything else frozen (prlhf.train.adapt, what `prlhf adapt` runs),
commits it as a new version of the served run (prlhf.runs.users.write_user_table: atomic) and swaps it into the
server; their next request gets their own soft tokens. One fit at a time, one queued fit per user; the server
keeps answering meanwhile (the fit shares its CPU).

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
from prlhf.runs.users import table_from_module, write_user_table
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
        self._thread = threading.Thread(target=self._work, name="prlhf-onboarding", daemon=True)

    def start(self) -> None:
        if not self.server.users.follows:
            logger.warning("onboarding is off: the server does not follow a run directory's versions")
            return
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._queue.put("")  # wake the worker

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
                if user_id not in self._pending:
                    self._pending.add(user_id)
                    self._queue.put(user_id)
            return "fitting"
        return state

    def _work(self) -> None:
        while not self._stop.is_set():
            user = self._queue.get()
            if not user:
                continue
            try:
                self._fit(user)
            except Exception:  # a failed fit must not stop onboarding; the next comparison queues it again
                logger.exception("onboarding %r failed", user)
            finally:
                with self._lock:
                    self._pending.discard(user)

    def _fit(self, user: str) -> None:
        from prlhf.train.adapt import adapt_users

        started = time.perf_counter()
        records = [r for c in self.store.of_user(user, limit=100_000) if (r := c.record()) is not None
                   and r.chosen != r.rejected]
        run, snapshot = self.server.run, self.server.users.snapshot()
        if user in snapshot.registry or len(records) < self.after:
            return
        # the served LM with the table being served now (a reload may have replaced the one the run loaded with)
        view = LoadedRun(PersonalizedLM(run.model.lm, snapshot.model, run.model.prefix_len), run.tokenizer,
                         UserRegistry(snapshot.registry.user_ids), run.config, run.path)
        adapted, report = adapt_users(view, records, user=user, steps=self.steps, show_progress=False)
        try:
            write_user_table(run.path, table_from_module(adapted.model.user_model, adapted.registry),
                             written_by="serve onboarding")
        except RunError as exc:  # e.g. `prlhf users ...` holds the run's lock right now
            logger.warning("onboarding %r: could not commit (%s); the next comparison retries", user, exc)
            return
        self.server.users.reload_if_changed()
        seconds = time.perf_counter() - started
        self.fitted[user] = {"seconds": seconds, "pairs": len(records),
                             "version": self.server.users.snapshot().version}
        self.server.metrics.onboarding.observe(seconds)
        logger.info("onboarded %r from %d comparisons in %.1f s (version %s)", user, len(records), seconds,
                    self.fitted[user]["version"])
