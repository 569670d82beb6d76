"""What every benchmark function gets: where things are, and how much to do."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from _bare import BareServer, ProgramAccount, bare_ws_server, spawn_hello
from _client import http_session, open_many, open_ws
from _report import BenchResult
from _server import RunningServer, running_server

# Where the short test program runs, as the server runs inline scripts.
SCRIPT_CWD = Path("/tmp")
MAX_LOG_PROBLEMS = 20


@dataclass(frozen=True)
class Scale:
    latency_runs: int
    throughput_mib: int
    throughput_rounds: int
    stdin_lines: int
    stdin_rounds: int
    concurrency: tuple[int, ...]
    concurrency_rounds: int
    flood_seconds: float
    flood_idle_runs: int
    footprint_runs: int
    footprint_connections: int


FULL = Scale(
    latency_runs=300,
    throughput_mib=64,
    throughput_rounds=5,
    stdin_lines=200,
    stdin_rounds=5,
    concurrency=(20, 100),
    concurrency_rounds=5,
    flood_seconds=8.0,
    flood_idle_runs=100,
    footprint_runs=1000,
    footprint_connections=4,
)

QUICK = Scale(
    latency_runs=20,
    throughput_mib=8,
    throughput_rounds=1,
    stdin_lines=50,
    stdin_rounds=1,
    concurrency=(5, 20),
    concurrency_rounds=1,
    flood_seconds=2.0,
    flood_idle_runs=20,
    footprint_runs=100,
    footprint_connections=4,
)


@dataclass(frozen=True)
class Served:
    """A benchmark's running server, its client session and, when asked for, the bare server."""

    server: RunningServer
    http: aiohttp.ClientSession
    bare: BareServer | None = None

    def client(
        self, url: str | None = None, receive_buffer: int | None = None
    ) -> contextlib.AbstractAsyncContextManager[aiohttp.ClientWebSocketResponse]:
        """A websocket to ``url`` (default: the server's /run-py), closed after the body."""
        return open_ws(self.http, url or self.server.run_url, receive_buffer)

    def clients(
        self, count: int
    ) -> contextlib.AbstractAsyncContextManager[list[aiohttp.ClientWebSocketResponse]]:
        """``count`` websockets to the server's /run-py, opened at once, closed after the body."""
        return open_many(self.http, self.server.run_url, count)

    @property
    def bare_server(self) -> BareServer:
        assert self.bare is not None, "serve(..., bare=True) starts the bare server"
        return self.bare


@dataclass(frozen=True)
class BenchContext:
    server_python: str  # runs the server and the bare websocket server
    program_python: str  # runs programs, for the server and the bare spawns alike
    account: ProgramAccount | None  # programs' account when the server switches to it
    server_settings: Mapping[str, str]  # FURTHER_LINK_* for the server process
    repo_root: Path
    hello_script: Path  # print('hi') for bare spawns
    scale: Scale

    @contextlib.asynccontextmanager
    async def serve(
        self, result: BenchResult, bare: bool = False, settings: Mapping[str, str] | None = None
    ) -> AsyncIterator[Served]:
        """A fresh server (``settings`` over the usual ones) and a client session; with
        ``bare``, the bare websocket server first. The server's warnings go into ``result``."""
        async with contextlib.AsyncExitStack() as stack:
            bare_server = None
            if bare:
                bare_server = await stack.enter_async_context(bare_ws_server(self.server_python))
            all_settings = {**self.server_settings, **(settings or {})}
            server = await stack.enter_async_context(
                running_server(self.server_python, self.repo_root, all_settings)
            )
            http = await stack.enter_async_context(http_session())
            yield Served(server, http, bare_server)
            record_server_log(result, server)

    async def spawn_hello(self) -> float:
        """One bare spawn of print('hi'): the limit for a run's latency."""
        return await spawn_hello(self.program_python, self.hello_script, SCRIPT_CWD, self.account)


def record_server_log(result: BenchResult, server: RunningServer) -> None:
    """Keep the server's warnings and errors with the figures they may explain."""
    problems = server.log_problems()
    result.details["server_log_problem_count"] = len(problems)
    result.details["server_log_problems"] = problems[:MAX_LOG_PROBLEMS]
