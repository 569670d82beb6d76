"""The benchmark's websocket client, used alike for the real and the bare servers.

Every wait has a deadline and every receive loop a bound, so a server that
misbehaves ends the benchmark with a message instead of hanging it. The
deadlines are enforced here, not by aiohttp: its ``receive(timeout=...)``
restarts the clock on every ping, and its ``close()`` keeps reading until a
close frame comes, so a server whose handler hangs while its heartbeat still
pings would hold either forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

RUN_TIMEOUT = 120.0
CONNECT_TIMEOUT = 30.0
CLOSE_TIMEOUT = 15.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# No run in these benchmarks produces more messages than this.
MAX_EVENTS = 10_000_000

Sink = Callable[[str], None]
T = TypeVar("T")


class BenchClientError(RuntimeError):
    """The server answered something a benchmark did not expect."""


@dataclass
class RunOutcome:
    stdout: str
    stderr: str
    exit_code: int
    seconds: float  # from sending ``start`` to receiving ``stopped``


async def within(awaitable: Awaitable[T], seconds: float) -> T:
    """``await awaitable``, cancelled after ``seconds`` (asyncio.TimeoutError)."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):  # no extra task: cheap per message
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


def http_session() -> aiohttp.ClientSession:
    # No pool limit: the concurrency benchmark holds 100 websockets at once.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


async def connect(
    http: aiohttp.ClientSession, url: str, receive_buffer: int | None = None
) -> aiohttp.ClientWebSocketResponse:
    try:
        ws = await within(
            http.ws_connect(url, max_msg_size=MAX_MESSAGE_BYTES, autoping=True), CONNECT_TIMEOUT
        )
    except asyncio.TimeoutError:
        raise BenchClientError(f"no websocket handshake within {CONNECT_TIMEOUT:.0f} s") from None
    if receive_buffer is not None:
        sock = ws.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    return ws


async def close_ws(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Close politely; if the server does not answer in time, aiohttp drops the connection."""
    with contextlib.suppress(asyncio.TimeoutError):
        await within(ws.close(), CLOSE_TIMEOUT)


@contextlib.asynccontextmanager
async def open_ws(
    http: aiohttp.ClientSession, url: str, receive_buffer: int | None = None
) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """A websocket for the body of an ``async with``, closed (within a bound) after it."""
    ws = await connect(http, url, receive_buffer)
    try:
        yield ws
    finally:
        await close_ws(ws)


@contextlib.asynccontextmanager
async def open_many(
    http: aiohttp.ClientSession, url: str, count: int
) -> AsyncIterator[list[aiohttp.ClientWebSocketResponse]]:
    """``count`` websockets opened at once, all closed after the body."""
    sockets = list(await asyncio.gather(*(connect(http, url) for _ in range(count))))
    try:
        yield sockets
    finally:
        await asyncio.gather(*(close_ws(ws) for ws in sockets))


async def send(ws: aiohttp.ClientWebSocketResponse, kind: str, **data: Any) -> None:
    await ws.send_str(json.dumps({"type": kind, "data": data}))


async def receive_event(
    ws: aiohttp.ClientWebSocketResponse, timeout: float
) -> tuple[str, dict[str, Any]]:
    try:
        message = await within(ws.receive(), max(timeout, 0.001))
    except asyncio.TimeoutError:
        raise BenchClientError(f"no message from the server within {timeout:.1f} s") from None
    if message.type is not aiohttp.WSMsgType.TEXT:
        raise BenchClientError(
            f"the connection ended ({message.type.name}, {message.data!r}, {message.extra!r})"
        )
    event = json.loads(message.data)
    return event["type"], event.get("data") or {}


@dataclass
class Collected:
    stdout: list[str]
    stderr: list[str]
    exit_code: int


async def collect_until_stopped(
    ws: aiohttp.ClientWebSocketResponse,
    deadline: float,
    on_stdout: Sink | None = None,
) -> Collected:
    """Read events until ``stopped``; stdout goes to ``on_stdout`` when given.

    ``deadline`` is on the ``time.monotonic`` clock.
    """
    stdout: list[str] = []
    stderr: list[str] = []
    for _ in range(MAX_EVENTS):
        kind, data = await receive_event(ws, deadline - time.monotonic())
        if kind == "stdout":
            if on_stdout is None:
                stdout.append(data["output"])
            else:
                on_stdout(data["output"])
        elif kind == "stderr":
            stderr.append(data["output"])
        elif kind == "stopped":
            return Collected(stdout, stderr, int(data["exitCode"]))
        elif kind == "error":
            raise BenchClientError(f"the server refused: {data.get('message')}")
        elif kind != "started":
            raise BenchClientError(f"unexpected {kind!r} event during a run")
    raise BenchClientError(f"more than {MAX_EVENTS} events in one run")


async def run_program(
    ws: aiohttp.ClientWebSocketResponse,
    source: str,
    on_stdout: Sink | None = None,
    timeout: float = RUN_TIMEOUT,
) -> RunOutcome:
    """Start ``source``, read until ``stopped``; time from start sent to stopped."""
    began = time.perf_counter()
    await send(ws, "start", sourceScript=source)
    collected = await collect_until_stopped(ws, time.monotonic() + timeout, on_stdout)
    seconds = time.perf_counter() - began
    return RunOutcome(
        "".join(collected.stdout), "".join(collected.stderr), collected.exit_code, seconds
    )


async def wait_for_event(ws: aiohttp.ClientWebSocketResponse, wanted: str, timeout: float) -> None:
    """Skip events until ``wanted`` arrives (e.g. ``started``)."""
    deadline = time.monotonic() + timeout
    for _ in range(MAX_EVENTS):
        kind, data = await receive_event(ws, deadline - time.monotonic())
        if kind == wanted:
            return
        if kind == "error":
            raise BenchClientError(f"the server refused: {data.get('message')}")
    raise BenchClientError(f"no {wanted!r} event among {MAX_EVENTS} events")


def check_hello(outcome: RunOutcome) -> None:
    """The short program every latency benchmark runs must have worked."""
    if outcome.stdout != "hi\n" or outcome.exit_code != 0:
        raise BenchClientError(
            f"print('hi') gave stdout {outcome.stdout!r}, stderr {outcome.stderr[-300:]!r}, "
            f"exit code {outcome.exit_code}"
        )
