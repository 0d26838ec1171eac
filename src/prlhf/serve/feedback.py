"""Feedback routes of `prlhf serve --db URL`: users' comparisons into the store (prlhf.data.store).

    POST /v1/feedback    {"comparison_id", "choice": "a"|"b"|"tie"|"both_bad"}   the choice for a pair the server
                         showed (a completion request with "compare": true returns the pair and its id), or
                         {"user", "prompt", "chosen", "rejected"[, "id"]}            a comparison made elsewhere
    GET  /v1/feedback?user=U[&limit=N]                                               the user's comparisons
    POST /v1/onboarding/next {"user"?}  the next of the server's onboarding pairs (--onboard-pairs) this user has
                         not answered, as a pending comparison to answer with POST /v1/feedback; "done" when none
    GET  /v1/me                      the token's user: comparisons so far, and whether their own row is served
    GET  /ui?token=TOKEN             the comparison page (prlhf.serve.page)
    POST /v1/admin/invite {"user"}   a personal token (API key needed); DELETE /v1/admin/users/U forgets U

A 200 means the comparison is committed to the database. Writes run on a worker thread, so the event loop keeps
serving while SQLite syncs.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from prlhf.data.store import ComparisonStore, StoreError
from prlhf.serve.auth import act_as
from prlhf.serve.page import PAGE
from prlhf.serve.protocol import APIError, Message, parse
from prlhf.train.onboard_pairs import OnboardPair


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    comparison_id: str | None = Field(None, min_length=1, max_length=200)
    choice: Literal["a", "b", "tie", "both_bad"] | None = None
    user: str | None = Field(None, min_length=1, max_length=200)
    prompt: str | list[Message] | None = None
    chosen: str | None = None
    rejected: str | None = None
    id: str | None = Field(None, min_length=1, max_length=200)  # idempotency key of a full record


def add_routes(app: FastAPI, server, store: ComparisonStore) -> None:
    """`server` is the PersonalizedServer (for its key check, body reader and metrics)."""

    @app.post("/v1/feedback")
    async def post_feedback(request: Request):
        caller = server.authorize(request)
        body = parse(FeedbackRequest, await server.body(request))
        body.user = act_as(caller, body.user)
        try:
            comparison = await asyncio.to_thread(record, store, body)
        except StoreError as exc:
            raise APIError(404 if "no comparison" in str(exc) else 409, str(exc), param="comparison_id") from None
        server.metrics.feedback.labels(comparison.choice or "none").inc()
        count = await asyncio.to_thread(store.decided_count, comparison.user_id)
        answer = {"object": "feedback", "id": comparison.id, "user": comparison.user_id, "choice": comparison.choice,
                  "status": comparison.status, "user_comparisons": count}
        if server.onboarding is not None:  # "generic", "fitting" (their row is being fitted) or "active"
            usable = await asyncio.to_thread(store.preference_count, comparison.user_id)  # ties teach nothing
            answer["user_model"] = server.onboarding.notify(comparison.user_id, usable)
        return JSONResponse(answer)

    add_onboarding_route(app, server, store)

    @app.get("/ui")
    async def page():
        return HTMLResponse(PAGE)  # holds no data: everything it shows comes through the token's own calls

    @app.get("/v1/me")
    async def me(request: Request, user: str = ""):
        user = act_as(server.authorize(request), user or None)
        if not user:
            raise APIError(400, "user: the query needs ?user=ID (a personal token gives it)", param="user")
        count = await asyncio.to_thread(store.decided_count, user)
        state = server.onboarding.status(user) if server.onboarding is not None else (
            "active" if user in server.users.snapshot().registry else "generic")
        left = len(await asyncio.to_thread(onboarding_left, store, user, server.onboard_pairs)) \
            if server.onboard_pairs else 0
        return JSONResponse({"user": user, "comparisons": count, "user_model": state,
                             "max_tokens": server.limits.max_tokens, "onboard_pairs_left": left})

    @app.get("/v1/feedback")
    async def list_feedback(request: Request, user: str = "", limit: int = 100):
        user = act_as(server.authorize(request), user or None) or ""
        if not user:
            raise APIError(400, "user: the query needs ?user=ID", param="user")
        if not 1 <= limit <= 1000:
            raise APIError(400, "limit must be between 1 and 1000", param="limit")
        found = await asyncio.to_thread(store.of_user, user, limit)
        return JSONResponse({"object": "list", "data": [c.to_dict() for c in found]})


class OnboardingRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    user: str | None = Field(None, min_length=1, max_length=200)


def _key(prompt, a: str, b: str) -> str:
    return json.dumps([prompt, a, b])


def onboarding_left(store: ComparisonStore, user: str, pairs: tuple[OnboardPair, ...]) -> list[int]:
    """Indices of the onboarding pairs `user` has not answered yet (a pair shown but not answered stays)."""
    answered = {_key(c.prompt, c.response_a, c.response_b) for c in store.of_user(user, 10 ** 9)
                if c.status == "decided" and (c.sampling or {}).get("onboard_pair") is not None}
    return [i for i, p in enumerate(pairs) if _key(p.prompt, p.response_a, p.response_b) not in answered]


def add_onboarding_route(app: FastAPI, server, store: ComparisonStore) -> None:
    @app.post("/v1/onboarding/next")
    async def next_pair(request: Request):
        body = parse(OnboardingRequest, await server.body(request))
        user = act_as(server.authorize(request), body.user)
        if not user:
            raise APIError(400, "user: the body needs a user (a personal token gives it)", param="user")
        pairs = server.onboard_pairs
        if not pairs:
            raise APIError(404, "this server has no onboarding pairs: start it with --onboard-pairs FILE")
        left = await asyncio.to_thread(onboarding_left, store, user, pairs)
        if not left:
            return JSONResponse({"object": "onboarding.pair", "done": True, "total": len(pairs)})
        index = left[0]
        pair, shown_left = pairs[index], secrets.choice("ab")
        shown = await asyncio.to_thread(store.add_pair, user, pair.prompt, pair.response_a, pair.response_b,
                                        str(server.run.path), None, {"onboard_pair": index}, shown_left=shown_left)
        return JSONResponse({"object": "onboarding.pair", "done": False, "comparison_id": shown.id,
                             "prompt": pair.prompt, "choices": [{"index": 0, "text": pair.response_a},
                                                                {"index": 1, "text": pair.response_b}],
                             "shown_left": shown_left, "number": len(pairs) - len(left) + 1, "total": len(pairs)})


class InviteRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    user: str = Field(min_length=1, max_length=200)


def add_admin_routes(app: FastAPI, server, store: ComparisonStore) -> None:
    """Admin calls (an API key, never a user's token): personal links, and forgetting a user."""

    @app.post("/v1/admin/invite")
    async def invite(request: Request):
        server.require_admin(server.authorize(request))
        body = parse(InviteRequest, await server.body(request))
        token = await asyncio.to_thread(store.invite, body.user)
        return JSONResponse({"user": body.user, "token": token, "link": f"/ui?token={token}"})

    @app.delete("/v1/admin/users/{user_id:path}")
    async def delete_user(user_id: str, request: Request, export: bool = False):
        """Remove the user's row from the served table (a new version: they get the generic user from then on),
        then their comparisons and tokens; `?export=true` returns the comparisons first."""
        server.require_admin(server.authorize(request))
        saved = [c.to_dict() for c in await asyncio.to_thread(store.of_user, user_id, 10 ** 9)] if export else None
        row = await asyncio.to_thread(server.forget_user, user_id)
        removed = await asyncio.to_thread(store.delete_user, user_id)
        return JSONResponse({"user": user_id, "table_row_deleted": row, "comparisons_deleted": removed,
                             "export": saved})


def record(store: ComparisonStore, body: FeedbackRequest):
    """Store what the body says: a choice for a shown pair, or a full comparison."""
    if body.comparison_id is not None:
        if body.choice is None or any(v is not None for v in (body.prompt, body.chosen, body.rejected, body.id)):
            raise APIError(400, "a choice for a shown pair takes comparison_id and choice (and optionally user) "
                                "only", param="choice")
        return store.decide(body.comparison_id, body.choice, user_id=body.user)
    missing = [name for name in ("user", "prompt", "chosen", "rejected") if getattr(body, name) is None]
    if missing:
        raise APIError(400, f"{missing[0]}: a full comparison needs user, prompt, chosen and rejected (or send "
                            "comparison_id and choice)", param=missing[0])
    if body.choice is not None:
        raise APIError(400, "choice: a full comparison is chosen over rejected; send no choice", param="choice")
    if body.chosen == body.rejected:
        raise APIError(400, "rejected: chosen and rejected are the same text", param="rejected")
    prompt = body.prompt if isinstance(body.prompt, str) else [{"role": m.role, "content": m.text()}
                                                                for m in body.prompt]
    return store.add_record(body.user, prompt, body.chosen, body.rejected, id=body.id)
