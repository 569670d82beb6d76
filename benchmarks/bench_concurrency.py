"""Concurrency: N connections each start ``print('hi')`` at the same moment.

Connections are opened first; the clock runs from the first ``start`` sent
until the last ``stopped``. The limit is N bare spawns at once. Rounds
alternate between the two; medians over rounds are reported.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import aiohttp
from _client import check_hello, run_program
from _context import BenchContext
from _programs import HELLO_SOURCE
from _report import BenchResult

TARGET_FACTOR = 1.3


async def all_at_once_bare(ctx: BenchContext, count: int) -> tuple[float, float]:
    """Wall time and slowest single spawn of ``count`` simultaneous bare spawns."""
    began = time.perf_counter()
    durations = await asyncio.gather(*(ctx.spawn_hello() for _ in range(count)))
    return time.perf_counter() - began, max(durations)


async def all_at_once_server(
    sockets: list[aiohttp.ClientWebSocketResponse],
) -> tuple[float, float]:
    began = time.perf_counter()
    outcomes = await asyncio.gather(*(run_program(ws, HELLO_SOURCE) for ws in sockets))
    wall = time.perf_counter() - began
    for outcome in outcomes:
        check_hello(outcome)
    return wall, max(outcome.seconds for outcome in outcomes)


async def bench_concurrency(ctx: BenchContext) -> BenchResult:
    result = BenchResult("concurrency")
    rounds = ctx.scale.concurrency_rounds
    largest = max(ctx.scale.concurrency)
    async with ctx.serve(result) as served:
        for count in ctx.scale.concurrency:
            server_walls: list[float] = []
            server_slowest: list[float] = []
            bare_walls: list[float] = []
            bare_slowest: list[float] = []
            async with served.clients(count) as sockets:
                for _ in range(rounds):
                    wall, slowest = await all_at_once_bare(ctx, count)
                    bare_walls.append(wall)
                    bare_slowest.append(slowest)
                    wall, slowest = await all_at_once_server(sockets)
                    server_walls.append(wall)
                    server_slowest.append(slowest)
            wall = statistics.median(server_walls) * 1000
            limit = statistics.median(bare_walls) * 1000
            suffix = f", median of {rounds}" if rounds > 1 else ""
            if count == largest:
                result.add(
                    f"{count} at once, wall{suffix}",
                    wall,
                    "ms",
                    limit,
                    f"{count} bare spawns",
                    target=f"<= {TARGET_FACTOR} x limit",
                    met=wall <= TARGET_FACTOR * limit,
                )
            else:
                result.add(
                    f"{count} at once, wall{suffix}", wall, "ms", limit, f"{count} bare spawns"
                )
            result.add(
                f"{count} at once, slowest run{suffix}",
                statistics.median(server_slowest) * 1000,
                "ms",
                statistics.median(bare_slowest) * 1000,
                f"{count} bare spawns",
            )
            result.details[f"connections_{count}"] = {
                "server_wall_ms": [s * 1000 for s in server_walls],
                "server_slowest_ms": [s * 1000 for s in server_slowest],
                "bare_wall_ms": [s * 1000 for s in bare_walls],
                "bare_slowest_ms": [s * 1000 for s in bare_slowest],
            }
    return result
