"""What an unauthenticated peer may hold: connections, descriptors and time.

aiohttp's protocol is wrapped per connection (``GuardedProtocol``) so that,
before aiohttp sees a byte, the server can refuse a peer over the total or
per-address connection cap with a short ``503``/``429`` and close any
connection that has not finished its request headers within
``header_timeout`` seconds (the TLS handshake is bounded by the same number
through asyncio). A connection's clock stops while a request is being
handled (a websocket can stay open for hours) and restarts when it ends,
which also bounds idle keep-alive. At the total cap a new connection takes
the place of the one that has waited longest with its clock running (no
request head yet, or idle keep-alive): peers that hold connections without
using them are the first to go, and a connection serving a request (a
paired websocket above all) is never closed to make room; only when every
connection is busy is the newcomer refused. Running out of file descriptors gives one
log line at most every ``EMFILE_LOG_INTERVAL`` seconds, not a traceback per
failed ``accept``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
import ssl
import time
from collections.abc import Awaitable
from typing import Any, Callable

from aiohttp import web

from further_link.config import Config

log = logging.getLogger(__name__)

EMFILE_LOG_INTERVAL = 10.0
# What aiohttp is handed at once. A batch of tiny websocket messages becomes
# Python objects about ten times its size before aiohttp can pause reading, so
# the batch is kept small; the rest waits in the kernel or, under TLS on
# Python 3.11+, still encrypted in the TLS layer (3.9 and 3.10 decrypt all
# they read, up to 256 KiB, and hand it on without pausing in between).
# One TLS record holds at most 16 KiB.
READ_BYTES = 16 * 1024


def raise_fd_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
            return soft
        return hard
    return soft


def _refusal(status: str, reason: str) -> bytes:
    body = (reason + "\n").encode()
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


class ConnectionGuard:
    """Counts connections (all, and per peer address) and owns their header clocks."""

    def __init__(self, config: Config) -> None:
        self.max_total = config.max_connections
        self.max_per_address = config.max_connections_per_address
        self.header_timeout = config.header_timeout
        self.total = 0
        self._per_address: dict[str, int] = {}
        # Connections whose clock runs, oldest first: the ones that make room at the cap.
        self._idle: dict[GuardedProtocol, None] = {}
        self._refusals = CountedLog("refused %d connection(s) over the %s connection limit")
        self._evictions = CountedLog("closed %d idle connection(s) at the %s connection limit")
        # Every connection reads into this one buffer: a transport fills it and hands
        # it on in one synchronous step, and nothing keeps it after. A memoryview,
        # not the bytearray: the TLS layer reads into slices of it, which must not copy.
        self.read_buffer = memoryview(bytearray(READ_BYTES))

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.BaseProtocol]:
        """The protocol factory to give ``create_server`` in place of aiohttp's."""
        return lambda: GuardedProtocol(self, inner)

    def admit(self, address: str) -> bytes | None:
        """Count a new connection; or the answer that refuses it (nothing counted).

        At the total cap the longest idle connection is closed to make room.
        """
        held = self._per_address.get(address, 0)
        if held >= self.max_per_address:
            self._note_refusal("per-address")
            return _refusal(
                "429 Too Many Requests",
                f"your address has {held} connections to this device, its limit "
                "(FURTHER_LINK_MAX_CONNECTIONS_PER_ADDRESS); close some first",
            )
        if self.total >= self.max_total and not self._make_room():
            self._note_refusal("total")
            return _refusal(
                "503 Service Unavailable",
                f"this device has {self.total} connections, its limit "
                "(FURTHER_LINK_MAX_CONNECTIONS), all of them busy; try again shortly",
            )
        held = self._per_address.get(address, 0)  # the connection closed may have been its own
        self.total += 1
        self._per_address[address] = held + 1
        return None

    def _make_room(self) -> bool:
        """Close the connection idle the longest; False when every connection is busy."""
        victim = next(iter(self._idle), None)
        if victim is None:
            return False
        victim.evict()
        self._evictions.note("total")
        return True

    def clock_started(self, protocol: GuardedProtocol) -> None:
        self._idle[protocol] = None

    def clock_stopped(self, protocol: GuardedProtocol) -> None:
        self._idle.pop(protocol, None)

    def release(self, address: str) -> None:
        self.total -= 1
        left = self._per_address[address] - 1
        if left:
            self._per_address[address] = left
        else:
            del self._per_address[address]

    def _note_refusal(self, which: str) -> None:
        self._refusals.note(which)


class CountedLog:
    """One warning per ``EMFILE_LOG_INTERVAL`` however often it happens, with the count.

    ``text`` takes the count since the last line, then the ``which`` of ``note``.
    """

    def __init__(self, text: str) -> None:
        self._text = text
        self._last = -EMFILE_LOG_INTERVAL
        self._since = 0

    def note(self, which: str) -> None:
        self._since += 1
        now = time.monotonic()
        if now - self._last >= EMFILE_LOG_INTERVAL:
            log.warning(self._text, self._since, which)
            self._last = now
            self._since = 0


class GuardedProtocol(asyncio.BufferedProtocol):
    """aiohttp's protocol for one connection, behind the caps and the header clock.

    Data reaches aiohttp in pieces of at most ``READ_BYTES``, read straight
    into the guard's buffer (on Python 3.11+ no object per TLS record), so
    pausing aiohttp's reading takes effect after one small piece, not after
    everything the transport had (for TLS, on 3.11+ only).
    """

    def __init__(self, guard: ConnectionGuard, inner: Callable[[], asyncio.Protocol]) -> None:
        self._guard = guard
        self._make_inner = inner
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._address = ""
        self._clock: asyncio.TimerHandle | None = None
        self._busy = 0
        self._served = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._address = str(peer[0]) if peer else "unknown"
        refusal = self._guard.admit(self._address)
        if refusal is not None:
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(refusal)
            transport.close()
            return
        self._inner = self._make_inner()
        self._start_clock()
        self._inner.connection_made(transport)

    def _start_clock(self) -> None:
        loop = asyncio.get_running_loop()
        self._clock = loop.call_later(self._guard.header_timeout, self._expire)
        self._guard.clock_started(self)

    def _stop_clock(self) -> None:
        if self._clock is not None:
            self._clock.cancel()
            self._clock = None
        self._guard.clock_stopped(self)

    def evict(self) -> None:
        """Close this idle connection now, for a newcomer; its place is free at once."""
        self._stop_clock()
        inner, self._inner = self._inner, None
        if inner is None:
            return
        self._guard.release(self._address)
        transport = self._transport
        if isinstance(transport, asyncio.Transport):
            if self._served:
                transport.close()
            else:
                transport.abort()
        inner.connection_lost(None)

    def _expire(self) -> None:
        self._clock = None
        self._guard.clock_stopped(self)
        transport = self._transport
        if not isinstance(transport, asyncio.Transport) or self._busy:
            return
        if self._served:
            transport.close()  # an idle keep-alive connection: a polite goodbye
        else:
            transport.abort()  # never finished a request head: nothing to flush

    def request_started(self) -> None:
        """A whole request head arrived: its handler takes over the connection's time."""
        self._busy += 1
        self._served = True
        self._stop_clock()

    def request_ended(self) -> None:
        """The next request (or a keep-alive wait) has ``header_timeout`` again."""
        self._busy -= 1
        if not self._busy and self._inner is not None and self._clock is None:
            self._start_clock()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._guard.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self._guard.read_buffer[:nbytes]))

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_clock()
        inner, self._inner = self._inner, None
        if inner is not None:
            self._guard.release(self._address)
            inner.connection_lost(exc)
        self._transport = None


@web.middleware
async def hold_clock(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Stop the connection's header clock while its request is handled."""
    transport = request.transport
    protocol = transport.get_protocol() if transport is not None else None
    if not isinstance(protocol, GuardedProtocol):
        return await handler(request)
    protocol.request_started()
    try:
        return await handler(request)
    finally:
        protocol.request_ended()


class GuardedSite(web.BaseSite):
    """``web.TCPSite`` with the connection guard, TLS handshake timeout and fd limits."""

    def __init__(
        self,
        runner: web.BaseRunner,
        config: Config,
        ssl_context: ssl.SSLContext | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        """``sock``: a listening socket bound earlier (by a server before it dropped root);
        without it the site binds ``config.host``/``config.port`` itself."""
        super().__init__(runner, ssl_context=ssl_context, backlog=1024)
        self._config = config
        self._sock = sock
        self.guard = ConnectionGuard(config)

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._config.host}:{self._config.port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        install_emfile_handler(loop)
        server = self._runner.server
        assert server is not None
        extra: dict[str, Any] = {}
        if self._ssl_context is not None:
            extra["ssl_handshake_timeout"] = self._config.header_timeout
        where: dict[str, Any] = (
            {"sock": self._sock}
            if self._sock is not None
            else {"host": self._config.host, "port": self._config.port}
        )
        self._server = await loop.create_server(
            self.guard.factory(server),  # type: ignore[arg-type]
            ssl=self._ssl_context,
            backlog=self._backlog,
            **where,
            **extra,
        )


def install_emfile_handler(loop: asyncio.AbstractEventLoop) -> None:
    """Out of descriptors (or sockets): one line per interval instead of a traceback each."""
    previous = loop.get_exception_handler()
    last = [-EMFILE_LOG_INTERVAL]

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS):
            now = time.monotonic()
            if now - last[0] >= EMFILE_LOG_INTERVAL:
                last[0] = now
                log.error("out of file descriptors (%s): new connections wait", exc.strerror)
            return
        if isinstance(exc, (ssl.SSLError, ConnectionError)):
            return  # a peer's failed handshake or reset is its own business
        if isinstance(exc, ValueError) and "_start_serving" in repr(context.get("handle")):
            # asyncio retries accepting after EMFILE on a timer that can outlive the
            # listening socket at shutdown; nothing is left to serve then.
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)
