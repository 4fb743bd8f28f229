"""API keys: when `api_key` is set, mutating routes require it (and every route, with api_key_all_routes).

The key comes as `Authorization: Bearer <key>` or `X-API-Key: <key>`; missing -> 401, wrong -> 403.
The checks are coroutines (FastAPI runs a plain function dependency in a worker thread).
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from .errors import ApiError


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def _check(request: Request) -> None:
    expected = request.app.state.settings.api_key
    if expected is None:
        return
    presented = _presented_key(request)
    if not presented:
        raise ApiError(401, "unauthorized", "this route needs an API key (Authorization: Bearer <key>)",
                       headers={"WWW-Authenticate": "Bearer"})
    if not secrets.compare_digest(presented.encode(), expected.get_secret_value().encode()):
        raise ApiError(403, "forbidden", "the API key is not valid")


async def require_key(request: Request) -> None:
    """For mutating routes: /adapt, DELETE /tasks/{name}, export."""
    _check(request)


async def require_key_if_all(request: Request) -> None:
    """For reading routes: only when api_key_all_routes is set."""
    if request.app.state.settings.api_key_all_routes:
        _check(request)


MutatingKey = Annotated[None, Depends(require_key)]
ReadingKey = [Depends(require_key_if_all)]
