"""The web side of who may connect: origin and token checks, and ``POST /pair``.

The decisions themselves (token comparison, codes, rate limits, origin
matching) live in auth.py; this module only reads them off requests and
turns refusals into HTTP answers *before* any websocket upgrade.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Callable

from aiohttp import web

from further_link.compat import app_key
from further_link.config import Config
from further_link.errors import BodyError, excerpt, shorten
from further_link.server.bodies import read_json_object
from further_link.server.hostnames import OwnNames
from further_link.server.pairscreen import PAIR_SCREEN, setup_pair_screen, show_on_device
from further_link.trust.auth import (
    COOKIE_NAME,
    TokenStore,
    code_is_valid,
    normalise_origin,
    origin_allowed,
    origin_listed,
    pairing_code,
)
from further_link.trust.pairing import PairingGuard, PairingSpent

log = logging.getLogger(__name__)

TOKENS = app_key("tokens", TokenStore)
GUARD = app_key("pairing_guard", PairingGuard)
NAMES = app_key("own_names", OwnNames)
ACCESS_CONFIG = app_key("access_config", Config)
# Routes any page and any name may read: they say only that a server is here.
OPEN_PATHS = frozenset({"/status", "/version"})
MAX_PAIR_BODY = 4096


@web.middleware
async def check_host(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """421 before anything else unless ``Host`` is one of this device's own names."""
    if request.path not in OPEN_PATHS and not request.app[NAMES].allows(request.host):
        log.info("refused a request for host %s from %s", excerpt(request.host), request.remote)
        raise web.HTTPMisdirectedRequest(
            text=(
                f"this device does not answer to the name {excerpt(request.host)}; use its own "
                "name or address, or add the name to FURTHER_LINK_HOSTS\n"
            )
        )
    return await handler(request)


def own_origins(request: web.Request) -> list[str]:
    """The origins of pages this server itself serves: its own names, never ``Host`` as sent."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    port = sockname[1] if sockname else None
    suffix = f":{port}" if port else ""
    return [
        f"{request.scheme}://{f'[{name}]' if ':' in name else name}{suffix}"
        for name in request.app[NAMES].current()
    ]


def origin_is_allowed(request: web.Request) -> bool:
    """True unless a browser page from an origin we don't know makes the request."""
    config = request.app[ACCESS_CONFIG]
    return origin_allowed(request.headers.get("Origin"), own_origins(request), config.origins)


def check_origin(request: web.Request) -> None:
    """HTTP 403 when a browser page from an origin we don't know makes the request."""
    origin = request.headers.get("Origin")
    if not origin_is_allowed(request):
        log.warning("refused a request from origin %s (%s)", excerpt(origin), request.remote)
        raise web.HTTPForbidden(
            text=(
                f"origin {shorten(origin or '')} may not use this device; "
                "add it to FURTHER_LINK_ORIGINS\n"
            )
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
        show_pairing_code(request)  # a page shows its pairing form now
        raise web.HTTPUnauthorized(
            text=(
                "this device needs its token: pair with the code shown on the device "
                "(POST /pair) or connect with ?token=...\n"
            )
        )


def cors_headers(request: web.Request) -> dict[str, str]:
    """Let an allowed cross-origin page read the answer (and send the cookie)."""
    origin = request.headers.get("Origin")
    if not origin:
        return {}
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Credentials": "true",
        "Vary": "Origin",
    }


def check_paired(request: web.Request) -> dict[str, str]:
    """Origin and token checks for a paired-only GET; the CORS headers for its answer.

    A 401 carries them too, so an allowed page can tell "pair first" from "down".
    """
    check_origin(request)
    headers = cors_headers(request)
    try:
        check_token(request)
    except web.HTTPUnauthorized as refusal:
        refusal.headers.update(headers)
        raise
    return headers


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
    """Exchange the pairing code shown on the device (or the token itself) for the cookie.

    Wrong codes spend a device-wide budget (pairing.py): a code is judged
    only once its whole body has arrived, one at a time, whoever sends it.
    """
    check_origin(request)
    show_pairing_code(request)
    headers = cors_headers(request)
    try:
        body = await read_json_object(
            request, MAX_PAIR_BODY, request.app[ACCESS_CONFIG].header_timeout, PAIR_USAGE
        )
    except BodyError as refused:
        return _error(refused.status, refused.message, headers)
    tokens = request.app[TOKENS]
    token = tokens.current()
    if "token" in body:
        # The person at the device may always pair with `further-link token`'s token;
        # a guess has no chance (2**192), so it spends nothing.
        if not isinstance(body["token"], str) or not tokens.matches(body["token"].strip()):
            log.info("wrong token sent to /pair from %s", request.remote)
            return _error(403, "wrong token; `further-link token` on the device shows it", headers)
        return _paired(request, token, headers)
    code = body.get("code")
    if isinstance(code, int) and not isinstance(code, bool) and 0 <= code < 10**9:
        code = f"{code:09d}"
    if not isinstance(code, str) or not code.strip():
        return _error(400, PAIR_USAGE, headers)
    guard = request.app[GUARD]
    try:
        async with guard.judging():
            if code_is_valid(token, code, generation=guard.generation):
                guard.succeeded()
                return _paired(request, token, headers)
            changed = await guard.wrong()
    except PairingSpent as spent:
        seconds = max(1, round(spent.seconds_left))
        headers["Retry-After"] = str(seconds)
        return _error(
            429,
            f"too many wrong codes on this device; try again in {seconds} s, or pair with the "
            "token that `further-link token` shows on the device",
            headers,
        )
    log.info("wrong pairing code from %s", request.remote)
    if changed:
        new = pairing_code(token, generation=guard.generation)
        log.warning(
            "too many wrong pairing codes: the pairing code is now %s (valid for %d s)",
            new.shown,
            new.seconds_left(),
        )
        show_pairing_code(request)
        return _error(403, "wrong pairing code; the device now shows a new code", headers)
    return _error(403, "wrong pairing code", headers)


PAIR_USAGE = 'send JSON like {"code": "123456789"}'


def _paired(request: web.Request, token: str, headers: dict[str, str]) -> web.Response:
    log.info("paired a client at %s", request.remote)
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


def show_pairing_code(request: web.Request) -> None:
    """Put the current pairing code on the device's own screen, where it has one."""
    if PAIR_SCREEN not in request.app:
        return
    code = pairing_code(request.app[TOKENS].current(), generation=request.app[GUARD].generation)
    show_on_device(request, code.code)


def _error(status: int, message: str, headers: dict[str, str]) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def setup_access(
    app: web.Application, config: Config, tokens: TokenStore, dropped: bool = False
) -> None:
    """Host, origin and token checks, and /pair; ``dropped``: the server gave up root
    and cannot write the config dir, so the pairing generation stays in memory."""
    app[ACCESS_CONFIG] = config
    app[TOKENS] = tokens
    app[GUARD] = PairingGuard(None if dropped else config.config_dir)
    app[NAMES] = OwnNames(config.hosts)
    app.middlewares.append(check_host)
    setup_pair_screen(app)
    app.router.add_post("/pair", pair)
    app.router.add_delete("/pair", unpair)
    app.router.add_route("OPTIONS", "/pair", preflight("POST, DELETE", "Content-Type"))


__all__ = ["check_origin", "check_token", "normalise_origin", "setup_access"]
