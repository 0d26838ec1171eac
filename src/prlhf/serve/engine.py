"""Batched decoding across users: one worker thread takes requests from a bounded queue, decodes them together
with per-row soft tokens and the KV cache, and hands text back to the server's event loop.

Continuous batching: an idle engine starts a batch with the oldest waiting request and whatever else arrives within
`batch_wait` seconds, up to `max_batch` rows. While it decodes, rows that finish leave (their cache rows are
dropped) and waiting requests join at a step boundary (their prompts prefilled, their cache joined to the running
one: prlhf.serve.kv). Each row keeps its own user, sampling settings and random stream.

    prefill:  [pad ...] [BOS] [u_1 ... u_T] [prompt ...]      one forward for the joining rows, left-aligned
    decode:   one token per row per step, fed as embeddings with the cache; positions count each row's own tokens
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from prlhf.model.personalized import PersonalizedLM
from prlhf.serve.kv import PrefixCache, join, joinable, rows_of, stack_rows, trim
from prlhf.serve.sampling import Sampling, next_tokens
from prlhf.serve.users import ServedUsers

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The bounded queue holds `max_queue` requests already."""


class RequestQueue:
    """A bounded FIFO of requests (each a list of rows). A request whose client gave up (every row cancelled)
    frees its place at once instead of when the worker reaches it."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._items: deque[list[Row]] = deque()
        self._ready = threading.Condition()

    def qsize(self) -> int:
        return len(self._items)

    def put_nowait(self, rows: list[Row]) -> None:
        with self._ready:
            if len(self._items) >= self.maxsize:
                self._items = deque(r for r in self._items if not all(row.cancelled for row in r))
            if len(self._items) >= self.maxsize:
                raise QueueFull()
            self._items.append(rows)
            self._ready.notify()

    def get(self, timeout: float) -> list[Row]:
        with self._ready:
            if not self._items:
                self._ready.wait(timeout)
            if not self._items:
                raise queue.Empty()
            return self._items.popleft()

    def get_nowait(self) -> list[Row]:
        with self._ready:
            if not self._items:
                raise queue.Empty()
            return self._items.popleft()


class EngineStopped(Exception):
    """The worker is not running (shutting down, or it died)."""


class LMGate:
    """The engine uses the LM step by step; a borrower (a fit's reference pass) waits for the current step, then
    has it alone. Borrowers go first: a plain lock would let the engine's tight loop take it back every time."""

    def __init__(self):
        self._ready = threading.Condition()
        self._in_use = self._borrowed = False
        self._waiting = 0

    @contextlib.contextmanager
    def use(self) -> Iterator[None]:
        with self._ready:
            while self._borrowed or self._waiting:
                self._ready.wait()
            self._in_use = True
        try:
            yield
        finally:
            with self._ready:
                self._in_use = False
                self._ready.notify_all()

    @contextlib.contextmanager
    def borrow(self) -> Iterator[None]:
        with self._ready:
            self._waiting += 1
            while self._in_use or self._borrowed:
                self._ready.wait()
            self._waiting -= 1
            self._borrowed = True
        try:
            yield
        finally:
            with self._ready:
                self._borrowed = False
                self._ready.notify_all()


@dataclass
class Row:
    """One completion being decoded. The worker fills tokens/text/finish_reason and calls `sink(event)` with
    ("delta", text) while streaming and ("done", None) or ("error", message) at the end."""

    prompt_ids: list[int]
    user_id: str | None
    sampling: Sampling
    generator: torch.Generator
    sink: Callable[[tuple], None]
    stream: bool = False
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    user_known: bool | None = None
    version: str | None = None
    cancelled: bool = False
    _emitted: int = 0  # characters of `text` already streamed


@dataclass
class BatchStats:
    """One decoding step: the rows in it (one new token each) and its wall time."""

    rows: int
    seconds: float


@dataclass
class Batch:
    rows: list[Row]
    cache: object           # the LM's KV cache, rows in the order of `rows`
    mask: torch.Tensor      # (B, L) attention mask of the cached positions
    logits: torch.Tensor    # (B, V) next-token logits

    @property
    def can_drop(self) -> bool:
        return self.cache is not None and hasattr(self.cache, "reorder_cache")


def _cache_of(out, previous):
    """The KV cache a forward returned: `cache` in transformers 5, `past_key_values` before."""
    if "cache" in out:
        return out["cache"]
    return out.get("past_key_values", previous)


class Engine:
    def __init__(self, model: PersonalizedLM, tokenizer, users: ServedUsers, max_batch: int = 32,
                 batch_wait: float = 0.002, max_queue: int = 256, prefix_cache_bytes: int = 256 << 20,
                 on_batch: Callable[[BatchStats], None] | None = None):
        self.model, self.tokenizer, self.users = model, tokenizer, users
        self.max_batch, self.batch_wait = max_batch, batch_wait
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        self.on_batch = on_batch or (lambda stats: None)
        self.prefixes = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self._queue = RequestQueue(max_queue)
        self._carry: list[Row] | None = None  # a request that did not fit the last batch: first in the next
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._running = False
        self.busy_rows = 0
        self._in_flight: list[Row] = []  # every row the running batch has taken (for errors)
        # entered around every forward; a fit of a user's row (prlhf.serve.refit) borrows the LM while its
        # reference pass has the adapters off, so that no request is decoded by pi_ref meanwhile
        self.lm_gate = LMGate()

    # ------------------------------------------------------------------------------------------ control

    def start(self) -> None:
        """Run the worker in a thread of its own (tests, embedding). `prlhf serve` calls `run` on the main thread
        instead: torch's CPU kernels ran about 1.5x slower per step from a secondary thread here (SmolLM2-135M, 2
        threads, batch 32: 0.15 s vs 0.10 s)."""
        self._stop.clear()
        self._running = True
        self._thread = threading.Thread(target=self.run, name="prlhf-engine", daemon=True)
        self._thread.start()

    def run(self, keep_going: Callable[[], bool] = lambda: True) -> None:
        """The worker loop, in the calling thread, until `stop()` or until `keep_going()` turns false."""
        torch.set_grad_enabled(False)
        self._running = True
        try:
            while not self._stop.is_set() and keep_going():
                self._work_once()
        finally:
            self._running = False

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        for rows in self._drain():
            for row in rows:
                row.sink(("error", "the server is shutting down"))

    @property
    def running(self) -> bool:
        return self._running and not self._stop.is_set()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() + (self._carry is not None)

    def submit(self, rows: list[Row]) -> None:
        """Queue one request's rows (decoded in the same batch); QueueFull / EngineStopped instead of waiting."""
        if not self.running:
            raise EngineStopped()
        self._queue.put_nowait(rows)

    # ------------------------------------------------------------------------------------------ worker

    def _work_once(self) -> None:
        rows = self._next_batch()
        if rows:
            self.busy_rows = len(rows)
            self._in_flight = []
            try:
                self.decode(rows)
            except Exception as exc:  # one bad batch must not stop the server; its rows get an error
                logger.exception("decoding a batch failed")
                for row in self._in_flight or rows:
                    if row.finish_reason is None:
                        row.finish_reason = "error"
                        row.sink(("error", f"generation failed ({exc.__class__.__name__})"))
            finally:
                self.busy_rows = 0

    def _next_batch(self) -> list[Row]:
        """Wait for a first request, then for `batch_wait` seconds for others to join it."""
        if self._carry is None:
            try:
                self._carry = list(self._queue.get(timeout=0.1))  # a copy: the request keeps its own list
            except queue.Empty:
                return []
        batch = self._take_waiting(self.max_batch)
        deadline = time.monotonic() + self.batch_wait
        while len(batch) < self.max_batch and self._carry is None and time.monotonic() < deadline:
            try:
                self._carry = list(self._queue.get(timeout=max(deadline - time.monotonic(), 1e-4)))
            except queue.Empty:
                break
            batch += self._take_waiting(self.max_batch - len(batch))
        return batch

    def _take_waiting(self, room: int) -> list[Row]:
        """Whole requests from the queue (the carried one first) while their rows fit in `room`."""
        taken: list[Row] = []
        while room > len(taken):
            if self._carry is None:
                try:
                    self._carry = list(self._queue.get_nowait())
                except queue.Empty:
                    break
            rows = [row for row in self._carry if not row.cancelled]
            if len(taken) + len(rows) > room:
                break  # stays carried: first in line next time
            taken += rows
            self._carry = None
        return taken

    def _drain(self) -> list[list[Row]]:
        out = [self._carry] if self._carry else []
        self._carry = None
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    # ------------------------------------------------------------------------------------------ decoding

    @torch.no_grad()
    def decode(self, rows: list[Row]) -> None:
        """Decode `rows` to the end. Requests that arrive meanwhile join at a step boundary while there is room
        (continuous batching), on caches that allow it (prlhf.serve.kv)."""
        batch = self._prefill(rows)
        embed = self.model.lm.get_input_embeddings()
        while batch.rows:
            started = time.perf_counter()
            tokens = next_tokens(batch.logits, [r.sampling for r in batch.rows], [r.generator for r in batch.rows])
            keep = [i for i, (row, token) in enumerate(zip(batch.rows, tokens.tolist())) if self._advance(row, token)]
            stepped = len(batch.rows)
            if keep and len(keep) < len(batch.rows) and batch.can_drop:
                index = torch.tensor(keep, device=tokens.device)
                batch.cache.reorder_cache(index)
                batch.mask, tokens = batch.mask[index], tokens[index]
                batch.rows = [batch.rows[i] for i in keep]
                if joinable(batch.cache):
                    batch.mask = trim(batch.cache, batch.mask)
            elif not keep:
                batch.rows = []
            if batch.rows and not all(row.finish_reason is not None for row in batch.rows):
                batch.mask = torch.cat([batch.mask, batch.mask.new_ones(batch.mask.shape[0], 1)], dim=1)
                out = self._forward(inputs_embeds=embed(tokens[:, None]), attention_mask=batch.mask,
                                    position_ids=batch.mask.sum(-1, keepdim=True) - 1, use_cache=True,
                                    **{self.model.cache_kwarg(): batch.cache})
                batch.cache = _cache_of(out, batch.cache)
                batch.logits = out.logits[:, -1]
                joiners = self._take_waiting(self.max_batch - len(batch.rows)) if joinable(batch.cache) else []
                if joiners:
                    new = self._prefill(joiners)
                    batch.mask = join(batch.cache, batch.mask, new.cache, new.mask)
                    batch.logits = torch.cat([batch.logits, new.logits])
                    batch.rows += new.rows
            else:
                batch.rows = []
            self.busy_rows = len(batch.rows)
            self.on_batch(BatchStats(stepped, time.perf_counter() - started))

    def _prefill(self, rows: list[Row]) -> Batch:
        """One forward over the rows' prompts, each with its user's soft tokens from the current user table; with
        the prefix cache, over the prompts only, after each user's cached [BOS] [u_1 ... u_T]."""
        self._in_flight += rows
        users = self.users.snapshot()  # the version these rows run on, whatever is swapped in meanwhile
        indices = []
        for row in rows:
            index, row.user_known = users.index(row.user_id)
            row.version = users.version
            indices.append(index)
        if self.prefixes is not None and self._prefixable(rows):
            batch = self._prefill_after_prefixes(rows, indices, users)
            if batch is not None:
                return batch
        embeds, mask = self.model.prompt_embeddings([r.prompt_ids for r in rows], torch.tensor(indices), self.pad,
                                                    user_model=users.model)
        out = self._forward(inputs_embeds=embeds, attention_mask=mask,
                            position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
        return Batch(list(rows), _cache_of(out, None), mask, out.logits[:, -1])

    def _forward(self, **inputs):
        """One forward of the LM, logits at the last position only (all that decoding reads)."""
        if self.model.supports_logits_to_keep():
            inputs["logits_to_keep"] = 1
        with self.lm_gate.use():
            return self.model.lm(**inputs)

    def _prefixable(self, rows: list[Row]) -> bool:
        """Every prompt starts with the model's prefix (BOS where it has one) and has tokens after it."""
        b = self.model.prefix_len
        head = [self.tokenizer.bos_token_id] * b
        return all(len(r.prompt_ids) > b and r.prompt_ids[:b] == head for r in rows)

    def _prefill_after_prefixes(self, rows: list[Row], indices: list[int], users) -> Batch | None:
        """(rows) -> Batch, reusing each user's cached prefix KV; None when the model's cache cannot be split
        this way (the prefix cache is then switched off)."""
        lm, model, cache = self.model.lm, self.model, self.prefixes
        embed = lm.get_input_embeddings()
        device, b = embed.weight.device, model.prefix_len
        cache.keep_version(users.version)
        keys = [(users.version, i) for i in indices]
        missing = sorted({i for k, i in zip(keys, indices) if k not in cache})
        misses = sum(1 for k in keys if k not in cache)
        cache.hits, cache.misses = cache.hits + len(keys) - misses, cache.misses + misses
        computed = {}
        if missing:
            idx = torch.tensor(missing, device=device)
            head = torch.full((len(missing), b), self.tokenizer.bos_token_id or 0, dtype=torch.long, device=device)
            embeds = torch.cat([embed(head), users.model(idx).to(embed.weight.dtype)], dim=1)  # (M, P, d)
            ones = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
            out = self._forward(inputs_embeds=embeds, attention_mask=ones, position_ids=ones.cumsum(-1) - 1,
                                use_cache=True)
            if not joinable(_cache_of(out, None)):
                self.prefixes = None
                return None
            computed = dict(zip(missing, rows_of(_cache_of(out, None))))
            for i, layers in computed.items():
                cache.put((users.version, i), layers)
        entries = [computed[i] if i in computed else cache.get(k) for k, i in zip(keys, indices)]
        kv = stack_rows(entries)  # (B, H, P, D) per layer
        prefix = entries[0][0][0].shape[-2]
        tails = [r.prompt_ids[b:] for r in rows]
        width = max(len(t) for t in tails)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long, device=device)
        tail_mask = torch.zeros_like(ids)
        for i, tail in enumerate(tails):  # left-padded: every row ends at the last column
            ids[i, width - len(tail):] = torch.tensor(tail, device=device)
            tail_mask[i, width - len(tail):] = 1
        mask = torch.cat([tail_mask.new_ones(len(rows), prefix), tail_mask], dim=1)
        positions = prefix + (tail_mask.cumsum(-1) - 1).clamp(min=0)
        out = self._forward(inputs_embeds=embed(ids), attention_mask=mask, position_ids=positions, use_cache=True,
                            **{model.cache_kwarg(): kv})
        return Batch(list(rows), _cache_of(out, kv), mask, out.logits[:, -1])

    def _advance(self, row: Row, token: int) -> bool:
        """Append `token` to the row; False when the row is done (and its sink has been told)."""
        if row.finish_reason is not None:  # done, kept in a cache that cannot drop rows
            return False
        if row.cancelled:
            row.finish_reason = "cancelled"
            return False
        s = row.sampling
        eos = token == self.eos and not s.ignore_eos
        if not eos:
            row.tokens.append(token)
        finished = "stop" if eos else "length" if len(row.tokens) >= s.max_tokens else None
        if s.stop or row.stream or finished:
            row.text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        if s.stop:
            cut = min((i for i in (row.text.find(stop) for stop in s.stop) if i >= 0), default=-1)
            if cut >= 0:
                row.text, finished = row.text[:cut], "stop"
        if row.stream:
            self._stream(row, final=finished is not None)
        if finished is None:
            return True
        row.finish_reason = finished
        row.sink(("done", None))
        return False

    @staticmethod
    def _stream(row: Row, final: bool) -> None:
        """Send the text not sent yet, holding back what might still become a stop string or a split character."""
        text = row.text
        if not final:
            hold = max((len(stop) - 1 for stop in row.sampling.stop), default=0)
            end = len(text) - hold
            while end > row._emitted and text[end - 1] == "\ufffd":  # half of a multi-byte character
                end -= 1
        else:
            end = len(text)
        if end > row._emitted:
            row.sink(("delta", text[row._emitted:end]))
            row._emitted = end
