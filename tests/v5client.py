"""A /run (v5, Further IDE) websocket client for tests: raw frames kept, per-process views."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp
import pytest

from conftest import TIMEOUT, RunningServer


@dataclass
class ProcessResult:
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class V5Client:
    ws: aiohttp.ClientWebSocketResponse
    raw: list[str] = field(default_factory=list)
    # Received but not yet consumed by a per-process reader.
    backlog: list[dict[str, Any]] = field(default_factory=list)

    async def send(
        self, kind: str, process: str | None = None, data: dict[str, Any] | None = None
    ) -> None:
        message: dict[str, Any] = {"type": kind}
        if process is not None:
            message["process"] = process
        if data is not None:
            message["data"] = data
        await self.ws.send_str(json.dumps(message))

    async def receive(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next message (from the backlog first)."""
        if self.backlog:
            return self.backlog.pop(0)
        return await self._read(timeout)

    async def _read(self, timeout: float) -> dict[str, Any]:
        message = await asyncio.wait_for(self.ws.receive(), timeout)
        assert message.type == aiohttp.WSMsgType.TEXT, f"expected text, got {message!r}"
        self.raw.append(message.data)
        decoded: dict[str, Any] = json.loads(message.data)
        assert list(decoded) == ["type", "data", "client", "process"], message.data
        return decoded

    async def next_for(self, process: str | None, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next message about ``process``; others stay in the backlog, in order."""
        for index, message in enumerate(self.backlog):
            if message["process"] == process:
                return self.backlog.pop(index)
        while True:
            message = await self._read(timeout)
            if message["process"] == process:
                return message
            self.backlog.append(message)

    async def expect(self, process: str | None, kind: str) -> dict[str, Any]:
        message = await self.next_for(process)
        assert message["type"] == kind, message
        return message

    async def read_output(self, process: str, expected: str, stream: str = "stdout") -> None:
        """``stream`` messages of ``process`` until exactly ``expected`` has arrived."""
        text = ""
        while len(text) < len(expected):
            message = await self.next_for(process)
            assert message["type"] == stream, f"expected {stream}, got {message} after {text!r}"
            text += message["data"]["output"]
        assert text == expected

    async def collect(self, process: str) -> ProcessResult:
        """Everything about ``process`` until its ``stopped``."""
        result = ProcessResult()
        while True:
            message = await self.next_for(process)
            result.messages.append(message)
            assert message["type"] != "error", message
            if message["type"] == "stopped":
                result.exit_code = message["data"]["exitCode"]
                return result
            if message["type"] in ("stdout", "stderr"):
                kind = message["type"]
                setattr(result, kind, getattr(result, kind) + message["data"]["output"])

    async def run(
        self, process: str, data: dict[str, Any], stdin: tuple[str, ...] = ()
    ) -> ProcessResult:
        await self.send("start", process, data)
        await self.expect(process, "started")
        for text in stdin:
            await self.send("stdin", process, {"input": text})
        return await self.collect(process)


def run_url(server: RunningServer, query: str = "", token: bool = True) -> str:
    url = server.base_url.replace("http", "ws", 1) + "/run"
    parts = [f"token={server.token}"] if token else []
    if query:
        parts.append(query)
    return url + ("?" + "&".join(parts) if parts else "")


V5Connect = Callable[..., Awaitable[V5Client]]


@pytest.fixture
async def connect_run(
    server: RunningServer, http: aiohttp.ClientSession
) -> AsyncIterator[V5Connect]:
    """Factory: ``await connect_run("pty=true&client=abc")``; all closed afterwards."""
    sockets: list[aiohttp.ClientWebSocketResponse] = []

    async def open_client(
        query: str = "", target: RunningServer | None = None, token: bool = True, **kwargs: Any
    ) -> V5Client:
        target = target or server
        ws = await http.ws_connect(
            run_url(target, query, token), ssl=target.ssl_client or True, **kwargs
        )
        sockets.append(ws)
        return V5Client(ws)

    yield open_client
    for ws in sockets:
        await ws.close()
