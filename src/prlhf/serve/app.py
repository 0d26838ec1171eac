"""`prlhf serve`: OpenAI's completions and chat completions API over a run, each request answered with the soft
tokens of its `user` (an id the run does not hold gets the generic user e_0, and the response says so).

    GET  /v1/models              the one model this server holds
    POST /v1/completions         prompt: str | [str]; n, max_tokens, temperature, top_p, seed, stop, stream
    POST /v1/chat/completions    messages rendered with the tokenizer's chat template; the same options
    GET  /health                 no key needed
    GET  /metrics                Prometheus text format

Every answer carries `prlhf: {user, user_known, version}`; every error is OpenAI's error object with a 4xx
status (5xx only when the server itself is full, stopping or timed out).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from prlhf.config import ONBOARD_STEPS
from prlhf.data.store import ComparisonStore
from prlhf.data.tokenize import adds_bos, encode_prompt, prompt_text_with_user
from prlhf.runs.directory import LoadedRun
from prlhf.serve.auth import Caller, act_as
from prlhf.serve.engine import Engine, EngineStopped, QueueFull, Row
from prlhf.serve.feedback import add_admin_routes
from prlhf.serve.feedback import add_routes as add_feedback_routes
from prlhf.serve.metrics import Metrics
from prlhf.serve.protocol import APIError, ChatRequest, Common, CompletionRequest, parse
from prlhf.serve.refit import Onboarding
from prlhf.serve.sampling import Sampling, row_generators
from prlhf.serve.users import ServedUsers, release_freed_memory, watch
from prlhf.train.onboard_pairs import OnboardPair

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int = 1024
    max_tokens: int = 512            # cap on a request's max_tokens
    default_max_tokens: int = 16     # completions without max_tokens (OpenAI's default); chat gets the cap
    request_timeout: float = 60.0    # seconds from arrival to the last token
    max_body_bytes: int = 1 << 20


@dataclass
class Prepared:
    """A validated request: one entry per prompt, `per_prompt` rows each (n, or best_of to rerank)."""

    request: Common
    prompts: list            # what the reward model scores: text, or the chat messages
    prompt_ids: list[list[int]]
    max_tokens: int
    per_prompt: int


class PersonalizedServer:
    def __init__(self, run: LoadedRun, model_name: str, limits: Limits = Limits(), reward: LoadedRun | None = None,
                 api_keys: Sequence[str] = (), max_batch: int = 32, batch_wait: float = 0.002,
                 max_queue: int = 256, reload_interval: float | None = 2.0, prefix_cache_bytes: int = 256 << 20,
                 store: ComparisonStore | None = None, onboard_after: int | None = None,
                 onboard_steps: int = ONBOARD_STEPS, onboard_pairs: Sequence[OnboardPair] = ()):
        self.run, self.model_name, self.limits, self.reward = run, model_name, limits, reward
        self.store = store  # where comparisons go (prlhf serve --db); None: no feedback routes
        if onboard_pairs and store is None:
            raise ValueError("onboarding pairs need a comparison store (--db): their answers are comparisons")
        self.onboard_pairs = tuple(onboard_pairs)  # shown to each user first (prlhf.train.onboard_pairs)
        self.api_keys = tuple(k.encode() for k in api_keys)
        self.metrics = Metrics()
        self.users = ServedUsers(run.path, run.model.user_model, run.registry,
                                 device=run.model.lm.get_input_embeddings().weight.device)
        run.registry = self.users.current.registry  # the compact copy: the dict of a large table is freed
        release_freed_memory()
        self.engine = Engine(run.model, run.tokenizer, self.users, max_batch=max_batch, batch_wait=batch_wait,
                             max_queue=max_queue, prefix_cache_bytes=prefix_cache_bytes,
                             on_batch=self.metrics.observe_batch)
        self.max_batch = max_batch
        self.reload_interval = reload_interval
        # fit a new user's row once they have `onboard_after` comparisons (prlhf.serve.refit)
        self.onboarding = (Onboarding(self, store, onboard_after, onboard_steps)
                           if store is not None and onboard_after else None)
        self.bos = adds_bos(run.tokenizer)
        self.created = int(time.time())
        self._reward_lock = asyncio.Lock()
        self._stop_watch = None
        self.metrics.queue_depth.set_function(lambda: self.engine.queue_depth)
        self.metrics.users.set_function(lambda: len(self.users.snapshot().registry))
        self.metrics.table_bytes.set_function(lambda: self.users.snapshot().nbytes)
        self.metrics.prefix_bytes.set_function(lambda: self.engine.prefixes.bytes if self.engine.prefixes else 0)
        self.metrics.prefix_hit_rate.set_function(self._prefix_hit_ratio)

    # ------------------------------------------------------------------------------------------ lifecycle

    def start(self, engine_thread: bool = True) -> None:
        """Start the reload watcher, and the engine in a thread unless the caller runs `engine.run()` itself."""
        if engine_thread:
            self.engine.start()
        if self.onboarding is not None:
            self.onboarding.start()
        if self.reload_interval:
            self._stop_watch = threading.Event()
            watch(self.users, self.reload_interval, self._stop_watch, on_reload=self.metrics.reloads.inc)

    def stop(self) -> None:
        if self._stop_watch is not None:
            self._stop_watch.set()
        if self.onboarding is not None:
            self.onboarding.stop()
        self.engine.stop()

    # ------------------------------------------------------------------------------------------ the app

    def app(self, engine_thread: bool = True) -> FastAPI:
        """The ASGI app; its lifespan starts and stops the engine (in a thread when `engine_thread`)."""
        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def lifespan(_app):
            self.start(engine_thread)
            try:
                yield
            finally:
                self.stop()

        app = FastAPI(title="prlhf", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
        app.add_exception_handler(APIError, _api_error)
        app.add_exception_handler(StarletteHTTPException, _http_error)
        app.add_exception_handler(Exception, _internal_error)
        app.add_middleware(CountRequests, metrics=self.metrics)

        @app.get("/health")
        async def health():
            snapshot = self.users.snapshot()
            body = {"status": "ok" if self.engine.running else "stopping", "model": self.model_name,
                    "version": snapshot.version, "users": len(snapshot.registry),
                    "queue_depth": self.engine.queue_depth, "busy_rows": self.engine.busy_rows,
                    "reward_model": self.reward is not None}
            return JSONResponse(body, status_code=200 if self.engine.running else 503)

        @app.get("/metrics")
        async def metrics(request: Request):
            self.authorize(request)
            return PlainTextResponse(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/models")
        async def models(request: Request):
            self.authorize(request)
            return {"object": "list", "data": [self.model_card()]}

        @app.get("/v1/models/{name:path}")
        async def model(name: str, request: Request):
            self.authorize(request)
            self.check_model(name)
            return self.model_card()

        @app.post("/v1/completions")
        async def completions(request: Request):
            caller = self.authorize(request)
            prepared = self.prepare_completion(await self.body(request), caller)
            return await self.answer(prepared, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            caller = self.authorize(request)
            prepared = self.prepare_chat(await self.body(request), caller)
            return await self.answer(prepared, chat=True)

        if self.store is not None:
            add_feedback_routes(app, self, self.store)
            add_admin_routes(app, self, self.store)

        return app

    def _prefix_hit_ratio(self) -> float:
        cache = self.engine.prefixes
        rows = cache.hits + cache.misses if cache else 0
        return cache.hits / rows if rows else 0.0

    def forget_user(self, user_id: str) -> bool:
        """Delete the user's row from the served run (a new version, swapped in); False when it has none."""
        from prlhf.runs.users import delete_user

        if user_id not in self.users.snapshot().registry:
            return False
        if not self.users.follows:
            raise APIError(409, "this server serves a fixed version (RUN/versions/vN): delete the user with "
                                "`prlhf users delete` on the run", code="conflict")
        if self.onboarding is not None:
            self.onboarding.forget(user_id)
        delete_user(self.users.root, user_id)
        self.users.reload_if_changed()
        return True

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "prlhf"}

    # ------------------------------------------------------------------------------------------ checks

    def authorize(self, request: Request) -> Caller:
        """Who is asking: an API key holder (any user, and admin calls), a personal token's user (that user
        only), or, on a server without keys, anyone (clients send some bearer value anyway). With keys, a bearer
        value that is neither a key nor a token gets a 401."""
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else ""
        ok = False
        for key in self.api_keys:  # every key compared, in constant time: no early exit
            ok |= hmac.compare_digest(given.encode(), key)
        if ok:
            return Caller(None, admin=True)
        if given and self.store is not None:
            user = self.store.user_of_token(given)
            if user is not None:
                return Caller(user, admin=False)
        if not self.api_keys:
            return Caller(None, admin=False)
        raise APIError(401, "missing or invalid API key or token: send Authorization: Bearer KEY",
                       code="invalid_api_key")

    def require_admin(self, caller: Caller) -> None:
        if not self.api_keys:
            raise APIError(403, "admin calls need a server started with --api-key-file", code="forbidden")
        if not caller.admin:
            raise APIError(403, "this call needs an API key, not a user's token", code="forbidden")

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    async def body(self, request: Request) -> object:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            raise APIError(413, f"the request body is over {self.limits.max_body_bytes} bytes")
        raw = await request.body()
        if len(raw) > self.limits.max_body_bytes:
            raise APIError(413, f"the request body is over {self.limits.max_body_bytes} bytes")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON ({exc.__class__.__name__})") from None

    def _common(self, request: Common, chat: bool) -> tuple[int, int]:
        """(max_tokens, rows per prompt) after the checks every endpoint shares."""
        self.check_model(request.model)
        max_tokens = request.max_completion_tokens or request.max_tokens
        if max_tokens is None:
            max_tokens = self.limits.max_tokens if chat else min(self.limits.default_max_tokens, self.limits.max_tokens)
        if max_tokens > self.limits.max_tokens:
            raise APIError(400, f"max_tokens is {max_tokens}, over this server's cap of {self.limits.max_tokens}",
                           param="max_tokens")
        per_prompt = request.n
        if request.compare:
            if self.store is None:
                raise APIError(400, "compare needs a comparison store: start the server with --db", param="compare")
            if request.user is None or request.stream or request.best_of is not None or request.n != 1:
                raise APIError(400, "compare takes a user, n = 1 and no stream or best_of", param="compare")
            return max_tokens, 2
        if request.best_of is not None:
            if self.reward is None:
                raise APIError(400, "best_of needs a reward model: start the server with --reward-run",
                               param="best_of")
            if request.best_of < request.n:
                raise APIError(400, "best_of must be at least n", param="best_of")
            if request.stream:
                raise APIError(400, "best_of cannot be streamed", param="stream")
            per_prompt = request.best_of
        return max_tokens, per_prompt

    def _encode(self, text: str, request: Common, param: str) -> list[int]:
        user_text = request.user_text if self.run.config.use_user_text else None
        ids = encode_prompt(self.run.tokenizer, prompt_text_with_user(text, user_text), self.bos)
        if len(ids) > self.limits.max_prompt_tokens:
            raise APIError(400, f"the prompt is {len(ids)} tokens, over this server's cap of "
                                f"{self.limits.max_prompt_tokens}", param=param, code="context_length_exceeded")
        return ids

    def prepare_completion(self, body, caller: Caller = Caller(None, True)) -> Prepared:
        request = parse(CompletionRequest, body)
        request.user = act_as(caller, request.user)
        max_tokens, per_prompt = self._common(request, chat=False)
        prompts = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)
        if request.compare and len(prompts) != 1:
            raise APIError(400, "compare takes one prompt", param="prompt")
        if len(prompts) * per_prompt > self.max_batch:
            raise APIError(400, f"{len(prompts)} prompts x {per_prompt} completions is over the batch size of "
                                f"{self.max_batch}", param="n")
        ids = [self._encode(p, request, "prompt") for p in prompts]
        return Prepared(request, prompts, ids, max_tokens, per_prompt)

    def prepare_chat(self, body, caller: Caller = Caller(None, True)) -> Prepared:
        request = parse(ChatRequest, body)
        request.user = act_as(caller, request.user)
        max_tokens, per_prompt = self._common(request, chat=True)
        if per_prompt > self.max_batch:
            raise APIError(400, f"{per_prompt} completions is over the batch size of {self.max_batch}", param="n")
        tok = self.run.tokenizer
        if not getattr(tok, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions",
                           param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template's own checks (e.g. roles that must alternate)
            raise APIError(400, f"messages: the chat template refused them ({str(exc)[:200]})",
                           param="messages") from None
        return Prepared(request, [messages], [self._encode(text, request, "messages")], max_tokens, per_prompt)

    # ------------------------------------------------------------------------------------------ answering

    async def answer(self, prepared: Prepared, chat: bool):
        request = prepared.request
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        sampling = Sampling(prepared.max_tokens, request.temperature, request.top_p, tuple(request.stop or ()),
                            request.ignore_eos)
        generators = row_generators(request.seed, len(prepared.prompt_ids) * prepared.per_prompt)
        rows = []
        for p, ids in enumerate(prepared.prompt_ids):
            for j in range(prepared.per_prompt):
                k = len(rows)
                rows.append(Row(ids, request.user, sampling, generators[k],
                                sink=lambda event, k=k: loop.call_soon_threadsafe(events.put_nowait, (k, event)),
                                stream=request.stream))
        try:
            self.engine.submit(rows)
        except QueueFull:
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(429, "the server is at capacity; retry shortly", type="rate_limit_error",
                           code="rate_limit_exceeded") from None
        except EngineStopped:
            self.metrics.rejected.labels("stopping").inc()
            raise APIError(503, "the server is not accepting requests (stopping)", type="server_error",
                           code="unavailable") from None
        started = time.perf_counter()
        meta = Meta(("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, int(time.time()), self.model_name)
        if request.stream:
            return StreamingResponse(self.stream(prepared, rows, events, meta, chat, started),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            await self.wait(rows, events, started)
        finally:
            for row in rows:
                row.cancelled = row.finish_reason is None
        self._count_user(rows)
        choices = [(i, row, None) for i, row in enumerate(rows)]
        if request.best_of is not None:
            choices = await self.rerank(prepared, rows)
        body = {"id": meta.id, "object": "chat.completion" if chat else "text_completion", "created": meta.created,
                "model": meta.model, "choices": [_choice(i, row, chat) for i, row, _ in choices],
                "usage": _usage(rows, prepared), "prlhf": _extension(request, rows)}
        if request.best_of is not None:
            body["prlhf"]["rewards"] = [reward for _, _, reward in choices]
        if request.compare:
            sampling = {"temperature": request.temperature, "top_p": request.top_p, "max_tokens": prepared.max_tokens,
                        "seed": request.seed}
            shown_left = secrets.choice("ab")  # the page shows them in this order: position bias averages out
            pair = await asyncio.to_thread(self.store.add_pair, request.user, prepared.prompts[0], rows[0].text,
                                           rows[1].text, str(self.run.path), rows[0].version, sampling,
                                           shown_left=shown_left)
            body["prlhf"].update(comparison_id=pair.id, shown_left=shown_left)
        return JSONResponse(body)

    async def wait(self, rows: list[Row], events: asyncio.Queue, started: float) -> None:
        """Until every row is done; a timeout or a failed batch becomes an error answer."""
        done = 0
        while done < len(rows):
            _, (kind, message) = await self.next_event(events, started)
            if kind == "error":
                raise APIError(503, message, type="server_error", code="unavailable")
            done += kind == "done"

    async def next_event(self, events: asyncio.Queue, started: float) -> tuple:
        """The next (row, event) of a request, or a 503 once it has taken `request_timeout` seconds."""
        remaining = self.limits.request_timeout - (time.perf_counter() - started)
        try:
            return await asyncio.wait_for(events.get(), max(remaining, 0.001))
        except TimeoutError:
            self.metrics.rejected.labels("timeout").inc()
            raise APIError(503, f"no answer within {self.limits.request_timeout:g} s; retry later",
                           type="server_error", code="timeout") from None

    async def stream(self, prepared: Prepared, rows: list[Row], events: asyncio.Queue, meta, chat: bool,
                     started: float) -> AsyncIterator[str]:
        request = prepared.request
        kind = "chat.completion.chunk" if chat else "text_completion"
        opened = [False] * len(rows)
        done = 0
        try:
            while done < len(rows):
                try:
                    k, (what, value) = await self.next_event(events, started)
                except APIError as timeout:  # the status line has gone out: the error goes in the stream
                    yield _sse(timeout.body())
                    return
                if what == "error":
                    yield _sse(APIError(503, value, type="server_error", code="unavailable").body())
                    return
                row = rows[k]
                if not any(opened):
                    self.metrics.first_token.observe(time.perf_counter() - started)
                if chat and not opened[k]:
                    yield _sse(_chunk(meta, kind, k, {"role": "assistant", "content": ""}, None, request, row, chat))
                opened[k] = True
                if what == "delta":
                    yield _sse(_chunk(meta, kind, k, {"content": value} if chat else value, None, request, row, chat))
                else:
                    done += 1
                    yield _sse(_chunk(meta, kind, k, {} if chat else "", row.finish_reason, request, row, chat))
            self._count_user(rows)
            if request.include_usage:
                yield _sse({"id": meta.id, "object": kind, "created": meta.created, "model": meta.model,
                            "choices": [], "usage": _usage(rows, prepared)})
            yield "data: [DONE]\n\n"
        finally:  # the client went away, or the stream ended: stop decoding what nobody reads
            for row in rows:
                row.cancelled = row.finish_reason is None

    async def rerank(self, prepared: Prepared, rows: list[Row]) -> list[tuple[int, Row, float]]:
        """Per prompt, the n of its best_of samples the user's reward model ranks highest, best first."""
        from prlhf.evaluate.scoring import score_responses

        request, k = prepared.request, prepared.per_prompt
        user = request.user if request.user is not None else ""
        prompts = [p for p in prepared.prompts for _ in range(k)]
        texts = [row.text for row in rows]
        user_texts = [request.user_text] * len(rows) if request.user_text else None
        async with self._reward_lock:  # one scoring pass at a time on the shared reward model
            rewards = await asyncio.to_thread(score_responses, self.reward, [user] * len(rows), prompts, texts,
                                              user_texts)
        out = []
        for p in range(len(prepared.prompts)):
            group = sorted(range(p * k, (p + 1) * k), key=lambda i: -rewards[i])[:request.n]
            out += [(p * request.n + j, rows[i], rewards[i]) for j, i in enumerate(group)]
        return out

    def _count_user(self, rows: list[Row]) -> None:
        if rows and rows[0].user_known is False:
            self.metrics.unknown_users.inc()


ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/feedback", "/v1/me", "/ui", "/health",
          "/metrics")


class CountRequests:
    """ASGI middleware: requests by route and status, and latency to the last byte (a plain ASGI wrapper: the
    decorator form of FastAPI middleware costs about a millisecond per request)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]
        endpoint = scope["path"] if scope["path"] in ROUTES else "other"

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


@dataclass(frozen=True)
class Meta:
    id: str
    created: int
    model: str


def _choice(index: int, row: Row, chat: bool) -> dict:
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": row.text},
                "finish_reason": row.finish_reason, "logprobs": None}
    return {"index": index, "text": row.text, "finish_reason": row.finish_reason, "logprobs": None}


def _chunk(meta: Meta, kind: str, index: int, content, finish_reason, request: Common, row: Row, chat: bool) -> dict:
    choice = {"index": index, "finish_reason": finish_reason, "logprobs": None}
    choice["delta" if chat else "text"] = content
    return {"id": meta.id, "object": kind, "created": meta.created, "model": meta.model, "choices": [choice],
            "prlhf": {"user": request.user, "user_known": row.user_known, "version": row.version}}


def _usage(rows: list[Row], prepared: Prepared) -> dict:
    prompt = sum(len(ids) for ids in prepared.prompt_ids)
    completion = sum(len(row.tokens) for row in rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _extension(request: Common, rows: list[Row]) -> dict:
    return {"user": request.user, "user_known": rows[0].user_known, "version": rows[0].version}


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = {404: "no such route", 405: "method not allowed on this route"}.get(exc.status_code, str(exc.detail))
    return JSONResponse(APIError(exc.status_code, message).body(), status_code=exc.status_code)


async def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error", exc_info=exc)
    return JSONResponse(APIError(500, "internal server error", type="server_error").body(), status_code=500)
