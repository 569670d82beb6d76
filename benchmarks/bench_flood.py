"""Flood: one client's program prints flat out while that client reads nothing.

The flooding client has a small socket receive buffer and does not call
``receive`` for the whole stall. aiohttp's client stops reading the socket
once about 128 KiB of messages wait in its queue, so TCP backpressure reaches
the server, whose outbox is bounded (FURTHER_LINK_OUTPUT_QUEUE_BYTES) and
which then stops reading the program's pipe. Meanwhile another client keeps
running ``print('hi')``; its latency is compared with its idle figures, and
the server's RSS is sampled from /proc. Finally the flooding client sends
``stop`` and reads everything: the stream must be complete and in order, and
as long as the program says it wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import aiohttp
from _client import (
    BenchClientError,
    check_hello,
    collect_until_stopped,
    run_program,
    send,
    wait_for_event,
)
from _context import BenchContext
from _patterns import StreamChecker
from _programs import FLOOD_TOTAL_PREFIX, HELLO_SOURCE, flood_source, sleep_source
from _report import BenchResult, MiB, Target, percentile, summarise
from _server import RunningServer

RECEIVE_BUFFER = 16 * 1024
SAMPLE_INTERVAL = 0.05
DRAIN_TIMEOUT = 60.0
STOP_LIMIT_RUNS = 3
MAX_FLOOD_BLOCKS = 10_000_000  # 640 GB: the program never gets there
MAX_RUNS_DURING_FLOOD = 100_000
P99_FACTOR = 2.0
RSS_GROWTH_LIMIT = 8 * MiB


@dataclass
class RssSampler:
    server: RunningServer
    samples: list[int] = field(default_factory=list)

    async def sample_until(self, done: asyncio.Event, max_seconds: float) -> None:
        for _ in range(int(max_seconds / SAMPLE_INTERVAL) + 1):
            self.samples.append(self.server.footprint().rss_bytes)
            if done.is_set():
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), SAMPLE_INTERVAL)


async def stop_to_stopped_idle(ws: aiohttp.ClientWebSocketResponse) -> float:
    """The limit for the drain: stopping a program that has nothing to send."""
    await send(ws, "start", sourceScript=sleep_source(60))
    await wait_for_event(ws, "started", 30)
    began = time.perf_counter()
    await send(ws, "stop")
    await collect_until_stopped(ws, time.monotonic() + DRAIN_TIMEOUT)
    return time.perf_counter() - began


async def hello_runs_until(ws: aiohttp.ClientWebSocketResponse, deadline: float) -> list[float]:
    samples: list[float] = []
    for _ in range(MAX_RUNS_DURING_FLOOD):
        if time.monotonic() >= deadline:
            break
        outcome = await run_program(ws, HELLO_SOURCE)
        check_hello(outcome)
        samples.append(outcome.seconds)
    return samples


def written_by_program(stderr: str) -> int | None:
    for line in stderr.splitlines():
        if line.startswith(FLOOD_TOTAL_PREFIX):
            return int(line[len(FLOOD_TOTAL_PREFIX) :])
    return None


async def bench_flood(ctx: BenchContext) -> BenchResult:
    result = BenchResult("flood")
    stall = ctx.scale.flood_seconds
    # The flooder reads nothing, pings included, for the whole stall: the server's
    # heartbeat would rightly drop it (FURTHER_LINK_HEARTBEAT), ending the flood early.
    async with (
        ctx.serve(result, settings={"FURTHER_LINK_HEARTBEAT": "0"}) as served,
        served.client() as other,
        served.client(receive_buffer=RECEIVE_BUFFER) as flooder,
    ):
        server = served.server
        stop_idle = [await stop_to_stopped_idle(flooder) for _ in range(STOP_LIMIT_RUNS)]
        idle: list[float] = []
        for _ in range(ctx.scale.flood_idle_runs):
            outcome = await run_program(other, HELLO_SOURCE)
            check_hello(outcome)
            idle.append(outcome.seconds)
        rss_before = server.footprint().rss_bytes

        sampler = RssSampler(server)
        done = asyncio.Event()
        sampling = asyncio.ensure_future(sampler.sample_until(done, stall + DRAIN_TIMEOUT * 2))
        try:
            await send(flooder, "start", sourceScript=flood_source(MAX_FLOOD_BLOCKS))
            deadline = time.monotonic() + stall
            during = await hello_runs_until(other, deadline)
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            rss_stalled = server.footprint().rss_bytes

            checker = StreamChecker()
            began = time.perf_counter()
            await send(flooder, "stop")
            collected = await collect_until_stopped(
                flooder, time.monotonic() + DRAIN_TIMEOUT, on_stdout=checker.feed
            )
            stop_seconds = time.perf_counter() - began
        finally:
            done.set()
            await sampling
        rss_after = server.footprint().rss_bytes

    written = written_by_program("".join(collected.stderr))
    if not during:
        raise BenchClientError("the other client finished no run during the flood")
    result.add_percentiles(
        "other client during flood,",
        during,
        idle,
        "same client idle",
        labels=("p50", "p99", "max"),
        target=Target(
            "p99", f"<= {P99_FACTOR:g} x limit", lambda value, limit: value <= P99_FACTOR * limit
        ),
    )
    growth = max(sampler.samples) - rss_before
    result.add(
        "server RSS growth (peak)",
        growth / MiB,
        "MiB",
        target=f"<= {RSS_GROWTH_LIMIT // MiB} MiB",
        met=growth <= RSS_GROWTH_LIMIT,
    )
    result.add(
        "output received in order",
        checker.received / MiB,
        "MiB",
        None if written is None else written / MiB,
        "written by program",
        target="nothing dropped",
        met=checker.ok and written is not None and checker.received == written,
    )
    result.add(
        "stop->stopped, draining the backlog",
        stop_seconds * 1000,
        "ms",
        percentile(stop_idle, 0.5) * 1000,
        "stop of idle program",
    )
    result.details.update(
        stall_seconds=stall,
        other_client_idle=summarise(idle),
        other_client_during_flood=summarise(during),
        rss_before_bytes=rss_before,
        rss_peak_bytes=max(sampler.samples),
        rss_stalled_bytes=rss_stalled,
        rss_after_bytes=rss_after,
        rss_samples=len(sampler.samples),
        received_bytes=checker.received,
        written_bytes=written,
        first_mismatch_at=checker.mismatch_at,
        exit_code=collected.exit_code,
        stop_to_stopped_idle_ms=[s * 1000 for s in stop_idle],
    )
    return result
