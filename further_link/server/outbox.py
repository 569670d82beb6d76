"""A connection's outgoing events: ordered, bounded in bytes, coalesced.

Program output waits for room (that wait is what pauses reading the program's
pipe); control events such as ``started``, ``stopped`` and ``error`` never
wait, so a flood cannot hold up an answer. Every event counts against the
byte cap, and the connection reads the client's next message only when there
is room (``wait_room``), so a client that sends but does not read cannot grow
the queue: it is cut off once the queue has been full for the stall timeout.
When the client is slower than the program, adjacent output of one stream is
merged into fewer, larger messages; when it keeps up, each chunk goes out as soon as it is read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from typing import Callable

from further_link.protocol.events import ErrorEvent, Event, Output, Plot, ProgramOutput
from further_link.protocol.runpy import encode_event
from further_link.runs.sink import SinkClosed
from further_link.system.memory import OUTPUT_PIECE_BYTES

MERGE_LIMIT = OUTPUT_PIECE_BYTES  # below malloc's mmap threshold (see memory.py)
# What a small control event (started, pong, ...) counts for, in bytes.
CONTROL_EVENT_BYTES = 64


class OutboxClosed(SinkClosed):
    """The connection has gone; nothing more will be sent."""


class Outbox:
    """A connection's ``EventSink`` (runs/sink.py); ``get`` gives the encoded text."""

    def __init__(self, limit_bytes: int, encode: Callable[[Event], str] = encode_event) -> None:
        self._limit = max(1, limit_bytes)
        self._encode = encode
        self._events: deque[tuple[Event, int]] = deque()
        self._queued_bytes = 0
        self._readable = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._closed = False
        self._full_since: float | None = None

    @property
    def full(self) -> bool:
        return self._queued_bytes >= self._limit

    def put(self, event: Event) -> None:
        """Queue a control event; never waits, but counts against the cap."""
        if self._closed:
            return
        size = CONTROL_EVENT_BYTES
        if isinstance(event, ErrorEvent):
            size += len(event.message)
        self._append(event, size)

    async def wait_room(self) -> None:
        """Return once the queue is under its cap (or closed)."""
        while self.full and not self._closed:
            self._room.clear()
            await self._room.wait()

    def stalled_for(self) -> float:
        """Seconds the queue has been full without interruption (0 when not full)."""
        if self._full_since is None:
            return 0.0
        return time.monotonic() - self._full_since

    async def put_output(self, event: ProgramOutput) -> None:
        """Queue program output, waiting while the backlog is over the limit."""
        while self._queued_bytes >= self._limit and not self._closed:
            self._room.clear()
            await self._room.wait()
        if self._closed:
            raise OutboxClosed
        self._append(event, len(event.png) if isinstance(event, Plot) else len(event.output))

    def _append(self, event: Event, size: int) -> None:
        self._events.append((event, size))
        self._queued_bytes += size
        if self._full_since is None and self.full:
            self._full_since = time.monotonic()
        self._readable.set()

    async def get(self) -> str:
        """The next message to send, as JSON text (merged output when backed up)."""
        while not self._events:
            if self._closed:
                raise OutboxClosed
            self._readable.clear()
            await self._readable.wait()
        event, size = self._events.popleft()
        if isinstance(event, Output):
            parts = [event.output]
            while self._events:
                following, following_size = self._events[0]
                if not (
                    isinstance(following, Output)
                    and following.stream == event.stream
                    and following.process == event.process
                    and size + following_size <= MERGE_LIMIT
                ):
                    break
                self._events.popleft()
                parts.append(following.output)
                size += following_size
            if len(parts) > 1:
                event = dataclasses.replace(event, output="".join(parts))
        self._release(size)
        return self._encode(event)

    def _release(self, size: int) -> None:
        self._queued_bytes -= size
        if self._queued_bytes < self._limit:
            self._full_since = None
            self._room.set()

    def close(self) -> None:
        """Wake every waiter; later puts are dropped, gets raise ``OutboxClosed``."""
        self._closed = True
        self._room.set()
        self._readable.set()
