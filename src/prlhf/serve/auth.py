"""Who a request acts for: an API key holder (any user, and admin calls), a personal token's user (that user
only), or anyone on a server started without keys."""

from __future__ import annotations

from dataclasses import dataclass

from prlhf.serve.protocol import APIError


@dataclass(frozen=True)
class Caller:
    user: str | None  # set for a personal token: the caller acts as this user only
    admin: bool       # holds an API key


def act_as(caller: Caller, user: str | None) -> str | None:
    """The user a request acts for: the token's own, whatever the body says (another user's id is a 403)."""
    if caller.user is None:
        return user
    if user not in (None, caller.user):
        raise APIError(403, f"this token acts as user {caller.user!r} only", param="user", code="forbidden")
    return caller.user
