"""A bare aiohttp websocket server: the limit for the real server's websocket path.

It speaks just enough of the /run-py protocol for the benchmark's client and
does no other work: ``/push?blocks=N`` answers ``start`` by sending the
pattern stream as N ``stdout`` messages of 64 KiB, then ``stopped``;
``/echo?lines=N`` answers each ``stdin`` with the same text as ``stdout`` and
sends ``stopped`` after N lines. Started by ``_bare.py`` as its own process,
so that, like the real server, it does not share a CPU core's event loop with
the client; it prints ``listening on 127.0.0.1:PORT`` once ready.
"""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

from _patterns import pattern_text
from aiohttp import WSMsgType, web

RECEIVE_TIMEOUT = 120.0
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def encode(kind: str, **data: Any) -> str:
    return json.dumps({"type": kind, "data": data}, ensure_ascii=False)


async def expect(ws: web.WebSocketResponse, kind: str) -> dict[str, Any]:
    message = await ws.receive(timeout=RECEIVE_TIMEOUT)
    if message.type is not WSMsgType.TEXT:
        raise ConnectionError(f"client went away waiting for {kind!r}")
    event = json.loads(message.data)
    if event.get("type") != kind:
        raise ValueError(f"expected {kind!r}, got {event.get('type')!r}")
    data: dict[str, Any] = event.get("data") or {}
    return data


async def accept_start(request: web.Request) -> web.WebSocketResponse:
    """Open the websocket and answer the client's ``start`` with ``started``."""
    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES)
    await ws.prepare(request)
    await expect(ws, "start")
    await ws.send_str(encode("started"))
    return ws


async def wait_until_closed(ws: web.WebSocketResponse) -> None:
    """Leave closing to the client, as the real server does."""
    message = await ws.receive(timeout=RECEIVE_TIMEOUT)
    if message.type is WSMsgType.TEXT:
        raise ValueError("unexpected message after stopped")


async def push(request: web.Request) -> web.WebSocketResponse:
    blocks = int(request.query["blocks"])
    ws = await accept_start(request)
    for index in range(blocks):
        await ws.send_str(encode("stdout", output=pattern_text(index)))
    await ws.send_str(encode("stopped", exitCode=0))
    await wait_until_closed(ws)
    return ws


async def echo(request: web.Request) -> web.WebSocketResponse:
    lines = int(request.query["lines"])
    ws = await accept_start(request)
    for _ in range(lines):
        data = await expect(ws, "stdin")
        await ws.send_str(encode("stdout", output=data["input"]))
    await ws.send_str(encode("stopped", exitCode=0))
    await wait_until_closed(ws)
    return ws


async def serve() -> None:
    app = web.Application()
    app.router.add_get("/push", push)
    app.router.add_get("/echo", echo)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        print(f"listening on {host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(serve())
