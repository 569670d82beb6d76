"""The web side of who may connect: origin and token checks, and ``POST /pair``.

The decisions themselves (token comparison, codes, rate limits, origin
matching) live in auth.py; this module only reads them off requests and
turns refusals into HTTP answers *before* any websocket upgrade.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable
from typing import Callable

from aiohttp import web

from .auth import (
    COOKIE_NAME,
    PairingLimiter,
    PairingLocked,
    TokenStore,
    code_is_valid,
    normalise_origin,
    origin_allowed,
    origin_listed,
)
from .config import Config

log = logging.getLogger(__name__)

TOKENS = web.AppKey("tokens", TokenStore)
LIMITER = web.AppKey("pairing_limiter", PairingLimiter)
ACCESS_CONFIG = web.AppKey("access_config", Config)


def own_origins(request: web.Request) -> list[str]:
    """The origin(s) of pages this server itself serves."""
    return [f"{request.scheme}://{request.host}"]


def check_origin(request: web.Request) -> None:
    """HTTP 403 when a browser page from an origin we don't know makes the request."""
    origin = request.headers.get("Origin")
    config = request.app[ACCESS_CONFIG]
    if not origin_allowed(origin, own_origins(request), config.origins):
        log.warning("refused a request from origin %s (%s)", origin, request.remote)
        raise web.HTTPForbidden(
            text=f"origin {origin} may not use this device; add it to FURTHER_LINK_ORIGINS\n"
        )


def presented_token(request: web.Request) -> str | None:
    """The token from ``?token=``, ``Authorization: Bearer`` or the pairing cookie."""
    if "token" in request.query:
        return request.query["token"]
    authorization = request.headers.get("Authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.cookies.get(COOKIE_NAME)


def check_token(request: web.Request) -> None:
    """HTTP 401 unless the request carries the device token (when auth is on).

    With ``FURTHER_LINK_AUTH=origin``, a request whose Origin is listed in
    FURTHER_LINK_ORIGINS needs no token (the unmodified Further site cannot send one).
    """
    config = request.app[ACCESS_CONFIG]
    if not config.auth:
        return
    if config.origin_auth and origin_listed(request.headers.get("Origin"), config.origins):
        return
    if not request.app[TOKENS].matches(presented_token(request)):
        log.info("refused a connection without a valid token from %s", request.remote)
        raise web.HTTPUnauthorized(
            text=(
                "this device needs its token: pair with the code shown on the device "
                "(POST /pair) or connect with ?token=...\n"
            )
        )


def cors_headers(request: web.Request) -> dict[str, str]:
    """Let an allowed cross-origin page read the answer (and send the cookie)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return {}
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Credentials": "true",
        "Vary": "Origin",
    }


def preflight(methods: str, headers: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A CORS preflight handler: allowed origins may send ``methods`` with ``headers``."""

    async def answer(request: web.Request) -> web.Response:
        check_origin(request)
        allowed = cors_headers(request)
        allowed.update(
            {
                "Access-Control-Allow-Methods": methods,
                "Access-Control-Allow-Headers": headers,
                "Access-Control-Max-Age": "600",
            }
        )
        return web.Response(status=204, headers=allowed)

    return answer


async def pair(request: web.Request) -> web.Response:
    """Exchange the pairing code shown on the device for the device token."""
    check_origin(request)
    headers = cors_headers(request)
    limiter = request.app[LIMITER]
    address = request.remote or "unknown"
    try:
        limiter.check(address)
    except PairingLocked as locked:
        seconds = max(1, round(locked.seconds_left))
        headers["Retry-After"] = str(seconds)
        return _error(429, f"too many wrong codes; try again in {seconds} s", headers)
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _error(400, 'send JSON like {"code": "123456"}', headers)
    code = body.get("code") if isinstance(body, dict) else None
    if isinstance(code, int):
        code = f"{code:06d}"
    if not isinstance(code, str) or not code.strip():
        return _error(400, 'send JSON like {"code": "123456"}', headers)
    tokens = request.app[TOKENS]
    token = tokens.current()
    if not code_is_valid(token, code.strip()):
        left = limiter.wrong(address)
        log.info("wrong pairing code from %s (%d tries left)", address, left)
        message = "wrong pairing code" + (
            f"; {left} tries left before a one-minute lock" if left else "; locked for a minute"
        )
        return _error(403, message, headers)
    limiter.succeeded(address)
    log.info("paired a client at %s", address)
    response = web.json_response({"token": token}, headers=headers)
    response.set_cookie(
        COOKIE_NAME,
        token,
        httponly=True,
        samesite="Strict",
        secure=request.secure,
        max_age=10 * 365 * 24 * 3600,
    )
    return response


async def unpair(request: web.Request) -> web.Response:
    """Forget this browser's pairing: the cookie is HttpOnly, so only we can clear it."""
    check_origin(request)
    response = web.Response(status=204, headers=cors_headers(request))
    response.del_cookie(COOKIE_NAME, path="/")
    return response


def _error(status: int, message: str, headers: dict[str, str]) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def setup_access(app: web.Application, config: Config, tokens: TokenStore) -> None:
    app[ACCESS_CONFIG] = config
    app[TOKENS] = tokens
    app[LIMITER] = PairingLimiter()
    app.router.add_post("/pair", pair)
    app.router.add_delete("/pair", unpair)
    app.router.add_route("OPTIONS", "/pair", preflight("POST, DELETE", "Content-Type"))


__all__ = ["check_origin", "check_token", "normalise_origin", "setup_access"]
