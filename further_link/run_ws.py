"""aiohttp glue for the v5 ``GET /run`` websocket (today's Further IDE).

The same checks as ``/run-py`` (origin, then token, before the upgrade), one
``RunSession`` and one ``Outbox`` per socket; what messages mean is
protocol_run.py and run_session.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Callable

from aiohttp import WSMsgType, web

from .access import check_origin, check_token
from .config import Config
from .outbox import Outbox
from .protocol_run import encode_run_event, parse_options
from .run_session import RunSession
from .session import Services

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Wiring:
    """What server.py shares with this route (its app keys and helpers)."""

    config: web.AppKey[Config]
    services: web.AppKey[Services]
    connections: web.AppKey[dict[Any, Any]]
    websocket: Callable[..., web.WebSocketResponse]
    send_events: Callable[[web.WebSocketResponse, Outbox], Awaitable[None]]


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
    ws = wiring.websocket(max_msg_size=config.max_message_bytes, heartbeat=config.heartbeat or None)
    await ws.prepare(request)
    outbox = Outbox(
        config.output_queue_bytes, encode=lambda event: encode_run_event(event, options.client)
    )
    session = RunSession(app[wiring.services], outbox, options)
    app[wiring.connections][session] = ws
    writer = asyncio.ensure_future(wiring.send_events(ws, outbox))
    log.debug("/run client connected from %s (pty=%s)", request.remote, options.pty)
    try:
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await session.receive(message.data)
            elif message.type is WSMsgType.BINARY:
                session.receive_binary()
            elif message.type is WSMsgType.ERROR:
                log.info("closed the connection from %s: %s", request.remote, message.data)
    finally:
        app[wiring.connections].pop(session, None)
        await session.close()
        outbox.close()
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        log.debug("/run client from %s disconnected", request.remote)
    return ws
