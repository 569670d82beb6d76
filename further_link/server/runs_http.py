"""``GET /runs``: every run on the device, the exclusive queue and the hardware claims.

Only for paired clients: the answer names run ids, with which a client can
``attach`` to a run, so a request let in by its origin alone
(``FURTHER_LINK_AUTH=origin``) is refused here, as its ``attach`` would be.
"""

from __future__ import annotations

from aiohttp import web

from further_link.config import Config
from further_link.runs.services import Services
from further_link.server.access import (
    ACCESS_CONFIG,
    TOKENS,
    check_origin,
    cors_headers,
    preflight,
    presented_token,
)


def holds_token(request: web.Request) -> bool:
    """The request carries the device token (or pairing is off altogether)."""
    config: Config = request.app[ACCESS_CONFIG]
    return not config.auth or request.app[TOKENS].matches(presented_token(request))


def setup_runs_http(app: web.Application, services: web.AppKey[Services]) -> None:
    async def runs(request: web.Request) -> web.Response:
        check_origin(request)
        headers = cors_headers(request)
        if not holds_token(request):
            raise web.HTTPUnauthorized(
                text="GET /runs needs the device token: pair first (POST /pair)\n",
                headers=headers,
            )
        listing = request.app[services].runs.describe()
        return web.json_response(listing, headers={**headers, "Cache-Control": "no-store"})

    app.router.add_get("/runs", runs)
    app.router.add_route("OPTIONS", "/runs", preflight("GET", "Authorization"))
