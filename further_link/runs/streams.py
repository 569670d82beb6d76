"""Server side of a run's side channel: a unix socket that carries images, plots, keys
and the program's buttons and sliders.

One ``SideChannel`` per run. It owns its socket file and the connection
handlers; ``close`` ends them and removes the file. Each received frame is
passed to an async callback before it is acknowledged, so a program that sent
a frame knows it is queued ahead of anything it prints next. A connection
that subscribes to key events (``KeyboardButton``) then receives them as
frames from the server; so does one that subscribes to control events
(``further_link.button`` / ``slider``), whose declarations the channel keeps
in ``controls``.

With a run cgroup (``peer_group``), a connection is served only when the
connecting process is in it (SO_PEERCRED's pid, checked against the cgroup's
member list): a program of another run under the same account can find the
socket, but cannot feed frames into a connection it does not belong to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable
from pathlib import Path
from typing import Callable

from further_link.channel import (
    ACK,
    HEADER,
    KIND_CONTROL,
    KIND_CONTROL_EVENT,
    KIND_CONTROL_SUBSCRIBE,
    KIND_JPEG,
    KIND_KEY_EVENT,
    KIND_KEY_SUBSCRIBE,
    KIND_KEYLISTEN,
    KIND_PLOT,
    encode_control_event,
    encode_frame,
    encode_key_event,
)
from further_link.runs.claims import RunClaims
from further_link.runs.containment import RunGroup
from further_link.runs.controls import ControlSet
from further_link.sharing import (
    KIND_CLAIM,
    KIND_GRANTED,
    KIND_QUEUED,
    KIND_REFUSED,
    KIND_TIMED_OUT,
    MAX_RESOURCE_CHARS,
)

log = logging.getLogger(__name__)

FrameHandler = Callable[[bytes, bytes], Awaitable[None]]
# Frames already written by a program that has exited are read for this long.
CLOSE_DRAIN_TIMEOUT = 1.0
# Key events a program has not read yet; beyond this it is not listening, and
# events are dropped rather than let it hold up its connection's messages.
KEY_BACKLOG_BYTES = 64 * 1024
MAX_CLAIM_TIMEOUT = 365 * 24 * 3600.0
PROGRAM_KINDS = (
    KIND_JPEG,
    KIND_KEYLISTEN,
    KIND_KEY_SUBSCRIBE,
    KIND_PLOT,
    KIND_CONTROL,
    KIND_CONTROL_SUBSCRIBE,
    KIND_CLAIM,
)
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_pid(writer: asyncio.StreamWriter) -> int | None:
    """The pid of the process that connected a unix socket (SO_PEERCRED)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, _, _ = _PEERCRED.unpack(raw)
    return int(pid) if pid > 0 else None


class SideChannel:
    """Listens at ``path``; ``listener``, when given, is a socket already bound
    and listening there, with its owner and mode set (see rundirs.py)."""

    def __init__(
        self,
        path: Path,
        on_frame: FrameHandler,
        max_frame_bytes: int,
        listener: socket.socket | None = None,
        peer_group: RunGroup | None = None,
        claims: RunClaims | None = None,
    ) -> None:
        self.path = path
        self._claims = claims
        self._listener = listener
        self._peer_group = peer_group
        self._on_frame = on_frame
        self._max_frame_bytes = max_frame_bytes
        self._server: asyncio.AbstractServer | None = None
        self._opening: asyncio.Future[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._key_listeners: set[asyncio.StreamWriter] = set()
        self._control_listeners: set[asyncio.StreamWriter] = set()
        self.controls = ControlSet()

    async def start(self) -> None:
        """Take over the listener, or listen at ``path``.

        With a listener, connections are accepted only from ``begin`` on: it
        already listens, so a program's connections wait in its backlog, and
        starting costs the run no loop turn before ``started``.
        """
        if self._listener is not None:
            self._server = await asyncio.start_unix_server(
                self._accept, sock=self._listener, start_serving=False
            )
            return
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.path))
        try:
            os.chmod(self.path, 0o600)
        except OSError:
            # The caller never gets a started channel to close: do it here.
            await self.close()
            raise

    def begin(self) -> None:
        """Start accepting connections (called once the run is announced)."""
        if self._server is not None and not self._server.is_serving():
            # `close` cancels this should it come first.
            self._opening = asyncio.ensure_future(self._server.start_serving())

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            if not self._peer_allowed(writer):
                return
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            log.debug("side channel connection ended mid-frame")
        finally:
            self._handlers.discard(task)
            self._key_listeners.discard(writer)
            self._control_listeners.discard(writer)
            writer.close()

    def _peer_allowed(self, writer: asyncio.StreamWriter) -> bool:
        if self._peer_group is None:
            return True
        pid = peer_pid(writer)
        if pid is not None and pid in self._peer_group.pids():
            return True
        log.warning("side channel: refused a connection from pid %s, not of this run", pid)
        return False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                header = await reader.readexactly(HEADER.size)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    log.warning("side channel closed inside a frame header")
                return
            kind, length = HEADER.unpack(header)
            if kind not in PROGRAM_KINDS or length > self._max_frame_bytes:
                log.warning("side channel: refusing frame kind=%r length=%d", kind, length)
                return
            payload = await reader.readexactly(length)
            if kind == KIND_CLAIM:
                # The connection now stands for the claim: it ends with it.
                await self._serve_claim(reader, writer, payload)
                return
            if kind == KIND_KEY_SUBSCRIBE:
                self._key_listeners.add(writer)
            elif kind == KIND_CONTROL_SUBSCRIBE:
                self._control_listeners.add(writer)
            else:
                if kind == KIND_CONTROL:
                    try:
                        self.controls.declare(payload)
                    except ValueError as exc:
                        log.warning("side channel: refusing a control declaration: %s", exc)
                        return
                await self._on_frame(kind, payload)
            writer.write(ACK)
            await writer.drain()

    async def _serve_claim(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes
    ) -> None:
        """Wait for the claim, hold it while the connection lives, release on its end.

        The program sends nothing while it waits, so anything read then (or
        the end of the connection) means it gave up, e.g. it was stopped.
        """
        claims = self._claims
        request = _parse_claim(payload)
        if claims is None or isinstance(request, str):
            reason = request if isinstance(request, str) else "claims are not available here"
            writer.write(encode_frame(KIND_REFUSED, reason.encode("utf-8")))
            await writer.drain()
            return
        name, timeout = request

        def tell_program(position: int, held_by: str) -> None:
            notice = json.dumps({"position": position, "heldBy": held_by}).encode("utf-8")
            writer.write(encode_frame(KIND_QUEUED, notice))

        acquire = asyncio.ensure_future(claims.acquire(name, tell_program, timeout))
        gone = asyncio.ensure_future(reader.read(1))
        held = False
        try:
            await asyncio.wait({acquire, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not acquire.done():
                return
            if not acquire.result():
                writer.write(encode_frame(KIND_TIMED_OUT, b""))
                await writer.drain()
                return
            held = True
            writer.write(encode_frame(KIND_GRANTED, b""))
            await writer.drain()
            if await gone:  # the release frame's first byte; EOF releases as well
                claims.release(name)
                held = False
                writer.write(ACK)
                await writer.drain()
        finally:
            for task in (acquire, gone):
                task.cancel()
            await asyncio.gather(acquire, gone, return_exceptions=True)
            if held:
                claims.release(name)

    def push_key(self, key: str, event: str) -> None:
        """Send a browser key event to the program's key listeners (none: ignored)."""
        frame = encode_frame(KIND_KEY_EVENT, encode_key_event(key, event))
        self._push(self._key_listeners, frame, "key")

    def use_control(self, control_id: str, value: float | None) -> None:
        """Pass the learner's use of a declared control to the program.

        Raises ``ControlError`` for an id the program never declared or a value
        the control cannot take.
        """
        checked = self.controls.use(control_id, value)
        frame = encode_frame(KIND_CONTROL_EVENT, encode_control_event(control_id, checked))
        self._push(self._control_listeners, frame, "control")

    @staticmethod
    def _push(listeners: set[asyncio.StreamWriter], frame: bytes, what: str) -> None:
        for writer in list(listeners):
            if writer.transport.get_write_buffer_size() > KEY_BACKLOG_BYTES:
                log.warning("a program is not reading its %s events; dropping one", what)
                continue
            writer.write(frame)

    async def close(self) -> None:
        """Stop listening, let pending frames through briefly, then end."""
        server, self._server = self._server, None
        if self._opening is not None:
            self._opening.cancel()
        if server is not None:
            server.close()
        handlers = list(self._handlers)
        if handlers:
            _, pending = await asyncio.wait(handlers, timeout=CLOSE_DRAIN_TIMEOUT)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if server is not None:
            # On 3.12+ this also waits for connections, which are all ended now.
            await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _parse_claim(payload: bytes) -> tuple[str, float | None] | str:
    """A claim request's name and timeout, or why it is refused."""
    try:
        request = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "the claim request is not JSON"
    if not isinstance(request, dict):
        return "the claim request is not a JSON object"
    name = request.get("resource")
    timeout = request.get("timeout")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_RESOURCE_CHARS:
        return f"a resource name is text of 1 to {MAX_RESOURCE_CHARS} characters"
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0
    ):
        return "timeout is a number of seconds, 0 or more"
    # Beyond a year is forever, and the event loop's timers stay finite.
    return name, None if timeout is None or timeout > MAX_CLAIM_TIMEOUT else float(timeout)
