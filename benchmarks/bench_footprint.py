"""Footprint: the server's memory, open files and threads, idle and after many runs.

Idle figures are taken from a fresh server next to a bare aiohttp server
process. Then one run (which starts any lazily created worker threads), then
N runs over a few parallel connections; after each phase the connections are
closed and the server gets a moment to settle before it is measured again.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict

from _client import check_hello, run_program
from _context import BenchContext, Served
from _programs import HELLO_SOURCE
from _report import BenchResult, MiB
from _server import ProcessFootprint, RunningServer

IDLE_RSS_TARGET = 45_000_000  # bytes: the target says 45 MB
RSS_GROWTH_TARGET = 5_000_000
SETTLE_SECONDS = 0.5
SETTLE_TIMEOUT = 2.0
SETTLE_POLL = 0.1


async def settled_footprint(server: RunningServer, idle: ProcessFootprint) -> ProcessFootprint:
    """Wait briefly for fds and threads to come back down, then measure."""
    await asyncio.sleep(SETTLE_SECONDS)
    footprint = server.footprint()
    for _ in range(int(SETTLE_TIMEOUT / SETTLE_POLL)):
        if footprint.fds <= idle.fds and footprint.threads <= idle.threads:
            break
        await asyncio.sleep(SETTLE_POLL)
        footprint = server.footprint()
    return footprint


async def hello_runs(served: Served, runs: int, connections: int) -> float:
    """``runs`` runs of ``print('hi')`` spread over parallel connections; seconds taken."""
    shares = [
        runs // connections + (1 if i < runs % connections else 0) for i in range(connections)
    ]
    async with served.clients(connections) as sockets:

        async def run_share(index: int) -> None:
            for _ in range(shares[index]):
                check_hello(await run_program(sockets[index], HELLO_SOURCE))

        began = time.perf_counter()
        await asyncio.gather(*(run_share(i) for i in range(connections)))
        return time.perf_counter() - began


async def bench_footprint(ctx: BenchContext) -> BenchResult:
    result = BenchResult("footprint")
    runs = ctx.scale.footprint_runs
    connections = ctx.scale.footprint_connections
    async with ctx.serve(result, bare=True) as served:
        server = served.server
        await asyncio.sleep(SETTLE_SECONDS)
        bare_idle = served.bare_server.footprint()
        idle = server.footprint()
        await hello_runs(served, 1, 1)
        after_one = await settled_footprint(server, idle)
        seconds = await hello_runs(served, runs, connections)
        after_many = await settled_footprint(server, idle)

    result.add(
        "idle RSS",
        idle.rss_bytes / MiB,
        "MiB",
        bare_idle.rss_bytes / MiB,
        "bare aiohttp server",
        target=f"<= 45 MB ({IDLE_RSS_TARGET / MiB:.1f} MiB)",
        met=idle.rss_bytes <= IDLE_RSS_TARGET,
    )
    result.add("idle open fds", idle.fds, "count", bare_idle.fds, "bare aiohttp server")
    result.add("idle threads", idle.threads, "count", bare_idle.threads, "bare aiohttp server")
    result.add("RSS after 1 run", after_one.rss_bytes / MiB, "MiB", idle.rss_bytes / MiB, "idle")
    result.add("open fds after 1 run", after_one.fds, "count", idle.fds, "idle")
    result.add("threads after 1 run", after_one.threads, "count", idle.threads, "idle")
    label = f"after {runs} runs ({connections} conns)"
    result.add(
        f"RSS {label}",
        after_many.rss_bytes / MiB,
        "MiB",
        idle.rss_bytes / MiB,
        "idle",
        target="<= limit + 5 MB",
        met=after_many.rss_bytes <= idle.rss_bytes + RSS_GROWTH_TARGET,
    )
    result.add(
        f"open fds {label}",
        after_many.fds,
        "count",
        idle.fds,
        "idle",
        target="back to limit",
        met=after_many.fds <= idle.fds,
    )
    result.add(
        f"threads {label}",
        after_many.threads,
        "count",
        idle.threads,
        "idle",
        target="back to limit",
        met=after_many.threads <= idle.threads,
    )
    result.details.update(
        runs=runs,
        connections=connections,
        seconds_for_runs=seconds,
        runs_per_second=runs / seconds,
        bare_idle=asdict(bare_idle),
        idle=asdict(idle),
        after_one_run=asdict(after_one),
        after_runs=asdict(after_many),
    )
    return result
