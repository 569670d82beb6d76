"""aiohttp glue for the v5 ``GET /run`` websocket (today's Further IDE).

The same checks as ``/run-py`` (origin, then token, before the upgrade) and
the same message loop (server.serve_connection), with one ``RunSession`` and
one ``Outbox`` per socket; what messages mean is protocol_run.py and
run_session.py.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Callable

from aiohttp import web

from further_link.config import Config
from further_link.protocol.run import encode_run_event, parse_options, parse_run_command
from further_link.runs.run_session import RunSession
from further_link.runs.services import Services
from further_link.server.access import check_origin, check_token
from further_link.server.outbox import Outbox
from further_link.server.runs_http import holds_token

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Wiring:
    """What server.py shares with this route: its app keys, websocket class and message loop."""

    config: web.AppKey[Config]
    services: web.AppKey[Services]
    websocket: Callable[..., Any]
    serve: Callable[[web.Request, Any, RunSession, Outbox, Callable[[str], Any]], Awaitable[None]]


def setup_run_api(app: web.Application, wiring: Wiring) -> None:
    async def run(request: web.Request) -> web.WebSocketResponse:
        return await _serve_run(request, wiring)

    app.router.add_get("/run", run)


async def _serve_run(request: web.Request, wiring: Wiring) -> web.WebSocketResponse:
    check_origin(request)
    check_token(request)
    app = request.app
    config = app[wiring.config]
    options = parse_options(request.query)
    ws: web.WebSocketResponse = wiring.websocket(
        max_msg_size=config.max_message_bytes, heartbeat=config.heartbeat or None
    )
    await ws.prepare(request)
    outbox = Outbox(
        config.output_queue_bytes, encode=lambda event: encode_run_event(event, options.client)
    )
    log.debug("/run options: pty=%s, client id of %d characters", options.pty, len(options.client))
    # GUI runs name this very port in `novnc`: the page reaches the device as it does now.
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    port = sockname[1] if isinstance(sockname, tuple) and len(sockname) >= 2 else None
    session = RunSession(app[wiring.services], outbox, options, gui_port=port)
    session.may_attach = holds_token(request)
    await wiring.serve(request, ws, session, outbox, parse_run_command)
    return ws
