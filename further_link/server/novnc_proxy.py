"""``GET /novnc/{key}``: a GUI run's display, as RFB over a websocket, on the device's own port.

noVNC in the page connects here (the path comes in the run's ``novnc``
event). The route is authenticated as ``/run`` is (origin, then token or
cookie), the key in the path is unguessable and lives only as long as its run,
and the bytes go to the run's x11vnc over its unix socket: no VNC port, no
second TLS certificate, and no password that could leak. What RFB says is
x11vnc's business; this is a byte pipe with bounded buffers both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
from aiohttp import web

from further_link.runs.services import Services
from further_link.server.access import check_origin, check_token

log = logging.getLogger(__name__)

# Several tabs (or a reconnecting noVNC) may watch one run; this bounds a runaway page.
MAX_VIEWERS = 4
# RFB client messages are small (keys, pointer, update requests; clipboard text the largest).
MAX_CLIENT_MESSAGE = 1024 * 1024
READ_CHUNK = 64 * 1024


def setup_novnc_proxy(app: web.Application, services: web.AppKey[Services]) -> None:
    async def novnc(request: web.Request) -> web.WebSocketResponse:
        return await _proxy(request, request.app[services])

    app.router.add_get("/novnc/{key}", novnc)


async def _proxy(request: web.Request, services: Services) -> web.WebSocketResponse:
    check_origin(request)
    check_token(request)
    display = services.displays.find(request.match_info["key"])
    if display is None:
        raise web.HTTPNotFound(
            text="no GUI window is shown at this address: its program has ended\n"
        )
    if display.viewers >= MAX_VIEWERS:
        raise web.HTTPTooManyRequests(
            text=f"{MAX_VIEWERS} viewers already watch this program's window; close one\n"
        )
    display.viewers += 1
    try:
        try:
            reader, writer = await display.open_vnc()
        except OSError:
            raise web.HTTPServiceUnavailable(
                text="the program's window cannot be shown: its display does not answer\n"
            ) from None
        try:
            ws = web.WebSocketResponse(protocols=("binary",), max_msg_size=MAX_CLIENT_MESSAGE)
            await ws.prepare(request)
            log.debug("a viewer connected to display :%s", display.number)
            await _pipe(ws, reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    finally:
        display.viewers -= 1
    return ws


async def _pipe(
    ws: web.WebSocketResponse, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Copy both ways until either side ends; then end the other."""

    async def to_browser() -> None:
        while True:
            data = await reader.read(READ_CHUNK)
            if not data:
                return
            await ws.send_bytes(data)

    async def to_display() -> None:
        async for message in ws:
            if message.type == aiohttp.WSMsgType.BINARY:
                writer.write(message.data)
                await writer.drain()
            elif message.type == aiohttp.WSMsgType.TEXT:
                await ws.close(message=b"RFB travels in binary messages")
                return

    tasks = [asyncio.ensure_future(to_browser()), asyncio.ensure_future(to_display())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, (ConnectionError, OSError)):
                log.debug("viewer connection ended: %s", result)
            elif isinstance(result, BaseException) and not isinstance(
                result, asyncio.CancelledError
            ):
                raise result
        await ws.close()
