"""A loopback TCP relay between a client and a server that a test can cut, as Wi-Fi drops.

``cut()`` aborts every relayed connection on both sides at once (RST, no
websocket close): the server sees its client vanish, the client its server.
The relay keeps listening, so a client that reconnects gets through again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

CHUNK = 64 * 1024


class Blip:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.connections = 0  # accepted so far
        self._server: asyncio.AbstractServer | None = None
        self._transports: set[asyncio.BaseTransport] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._transports.update({writer.transport, up_writer.transport})
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            self._tasks.discard(task)
            for side in (writer, up_writer):
                self._transports.discard(side.transport)
                side.transport.abort()

    def cut(self) -> None:
        """Drop every connection now, without a word to either side."""
        for transport in list(self._transports):
            transport.abort()  # type: ignore[attr-defined]
        self._transports.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    writer.transport.abort()


@pytest.fixture
async def blips() -> AsyncIterator[list[Blip]]:
    """Relays made by a test (``Blip(port)`` then ``await blip.start()``), closed afterwards."""
    made: list[Blip] = []
    yield made
    for blip in made:
        await blip.close()


async def blip_to(port: int, made: list[Blip]) -> Blip:
    blip = Blip(port)
    await blip.start()
    made.append(blip)
    return blip
