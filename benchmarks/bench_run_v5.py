"""The v5 ``/run`` API (Further IDE) measured like ``/run-py``.

* latency: ``print('hi')`` from ``start`` to ``stopped`` on one connection
  (pipes), against a bare spawn, interleaved: at a learner's pace (the
  target) and back to back, as the ``latency`` benchmark explains;
* pipe-mode stdout throughput against the bare websocket server pushing the
  same bytes, every byte checked in order;
* pty-mode stdout throughput (the terminal turns ``\\n`` into ``\\r\\n``, so
  bytes are counted, not checked) and its ratio to pipe mode;
* 20 processes started at once on one socket, against 20 bare spawns at once.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable

import aiohttp
from _client import (
    MAX_EVENTS,
    RUN_TIMEOUT,
    BenchClientError,
    within,
)
from _context import BenchContext
from _patterns import BLOCK_BYTES, StreamChecker
from _programs import HELLO_SOURCE, throughput_source
from _report import BenchResult, MiB, Target, percentile, summarise
from bench_latency import LEARNER_PAUSE
from bench_throughput import receive_stream

WARMUP_RUNS = 3
P50_ALLOWANCE_MS = 2.0
TARGET_FRACTION = 0.8
CONCURRENT = 20


def v5_url(run_py_url: str, pty: bool = False) -> str:
    url = run_py_url.replace("/run-py", "/run", 1)
    return url + ("&" if "?" in url else "?") + "pty=true" if pty else url


async def run_v5(
    ws: aiohttp.ClientWebSocketResponse,
    processes: dict[str, str],
    on_stdout: Callable[[str, str], None],
) -> dict[str, float]:
    """Start every ``id -> source`` at once; seconds from the first start to each ``stopped``."""
    began = time.perf_counter()
    for process, source in processes.items():
        message = {
            "type": "start",
            "process": process,
            "data": {"runner": "python3", "code": source},
        }
        await ws.send_str(json.dumps(message))
    done: dict[str, float] = {}
    deadline = time.monotonic() + RUN_TIMEOUT
    for _ in range(MAX_EVENTS):
        try:
            message = await within(ws.receive(), max(0.001, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise BenchClientError(f"/run: no message within {RUN_TIMEOUT:.0f} s") from None
        if message.type is not aiohttp.WSMsgType.TEXT:
            raise BenchClientError(f"/run: the connection ended ({message.type.name})")
        event = json.loads(message.data)
        kind, process = event["type"], event["process"]
        if kind == "stdout":
            on_stdout(process, event["data"]["output"])
        elif kind == "stopped":
            if event["data"]["exitCode"] != 0:
                raise BenchClientError(f"/run: {process} exited with {event['data']['exitCode']}")
            done[process] = time.perf_counter() - began
            if len(done) == len(processes):
                return done
        elif kind == "error":
            raise BenchClientError(f"/run refused: {event['data']['message']}")
    raise BenchClientError(f"more than {MAX_EVENTS} events")


async def hello_v5(ws: aiohttp.ClientWebSocketResponse, count: int = 1) -> float:
    """Run ``count`` print('hi') at once; seconds until the last ``stopped``."""
    outputs: dict[str, str] = {}

    def on_stdout(process: str, text: str) -> None:
        outputs[process] = outputs.get(process, "") + text

    ids = {f"h{index}": HELLO_SOURCE for index in range(count)}
    seconds = max((await run_v5(ws, ids, on_stdout)).values())
    if any(outputs.get(process) != "hi\n" for process in ids):
        raise BenchClientError(f"/run print('hi') gave {outputs!r}")
    return seconds


async def stream_v5(
    ws: aiohttp.ClientWebSocketResponse, source: str, check: bool
) -> tuple[float, int, bool]:
    checker = StreamChecker()
    received = 0

    def on_stdout(process: str, text: str) -> None:
        nonlocal received
        received += len(text)
        if check:
            checker.feed(text)

    seconds = (await run_v5(ws, {"t": source}, on_stdout))["t"]
    return seconds, received, checker.ok


async def bench_run_v5(ctx: BenchContext) -> BenchResult:
    result = BenchResult("run-v5")
    bare: list[float] = []
    latency: list[float] = []
    bare_back_to_back: list[float] = []
    back_to_back: list[float] = []
    paced_runs = max(10, ctx.scale.latency_runs // 2)
    blocks = ctx.scale.throughput_mib * MiB // BLOCK_BYTES
    expected = blocks * BLOCK_BYTES
    source = throughput_source(blocks)
    pipe_rates: list[float] = []
    pty_rates: list[float] = []
    bare_rates: list[float] = []
    pipe_in_order: list[bool] = []
    concurrent: list[float] = []
    bare_concurrent: list[float] = []
    async with (
        ctx.serve(result, bare=True) as served,
        served.client(v5_url(served.server.run_url)) as ws,
    ):
        for iteration in range(WARMUP_RUNS + paced_runs):
            await asyncio.sleep(LEARNER_PAUSE)
            bare_seconds = await ctx.spawn_hello()
            await asyncio.sleep(LEARNER_PAUSE)
            seconds = await hello_v5(ws)
            if iteration >= WARMUP_RUNS:
                bare.append(bare_seconds)
                latency.append(seconds)
        for iteration in range(WARMUP_RUNS + ctx.scale.latency_runs):
            bare_seconds = await ctx.spawn_hello()
            seconds = await hello_v5(ws)
            if iteration >= WARMUP_RUNS:
                bare_back_to_back.append(bare_seconds)
                back_to_back.append(seconds)
        for _ in range(ctx.scale.throughput_rounds):
            await asyncio.sleep(LEARNER_PAUSE)
            async with served.client(served.bare_server.url("/push", blocks=blocks)) as bare_client:
                bare_rates.append(
                    (await receive_stream(bare_client, source, expected)).mib_per_second
                )
            await asyncio.sleep(LEARNER_PAUSE)
            seconds, received, ok = await stream_v5(ws, source, check=True)
            pipe_rates.append(received / MiB / seconds)
            pipe_in_order.append(ok and received == expected)
            # A socket of its own per round: one left unread through the other phases
            # would miss the server's heartbeat pings on a loaded machine and be closed.
            await asyncio.sleep(LEARNER_PAUSE)
            async with served.client(v5_url(served.server.run_url, pty=True)) as pty_ws:
                seconds, received, _ = await stream_v5(pty_ws, source, check=False)
            pty_rates.append(received / MiB / seconds)
        for _ in range(ctx.scale.concurrency_rounds):
            began = time.perf_counter()
            await asyncio.gather(*(ctx.spawn_hello() for _ in range(CONCURRENT)))
            bare_concurrent.append(time.perf_counter() - began)
            concurrent.append(await hello_v5(ws, CONCURRENT))

    result.add_percentiles(
        "/run latency, one connection, paced",
        latency,
        bare,
        "bare spawn",
        target=Target(
            "p50", "<= limit + 2 ms", lambda value, limit: value <= limit + P50_ALLOWANCE_MS
        ),
    )
    result.add(
        "/run latency, back to back p50",
        percentile(back_to_back, 0.5) * 1000,
        "ms",
        percentile(bare_back_to_back, 0.5) * 1000,
        "bare spawn",
    )
    pipe = statistics.median(pipe_rates)
    limit = statistics.median(bare_rates)
    result.add(
        f"/run pipe stdout {ctx.scale.throughput_mib} MiB",
        pipe,
        "MiB/s",
        limit,
        "bare aiohttp ws",
        target=f">= {TARGET_FRACTION} x limit",
        met=pipe >= TARGET_FRACTION * limit and all(pipe_in_order),
    )
    result.add(
        f"/run pty stdout {ctx.scale.throughput_mib} MiB",
        statistics.median(pty_rates),
        "MiB/s",
        pipe,
        "/run pipe stdout",
    )
    result.add(
        f"{CONCURRENT} processes at once on one socket",
        statistics.median(concurrent) * 1000,
        "ms",
        statistics.median(bare_concurrent) * 1000,
        f"{CONCURRENT} bare spawns at once",
    )
    result.details.update(
        latency=summarise(latency),
        bare_spawn=summarise(bare),
        latency_back_to_back=summarise(back_to_back),
        bare_spawn_back_to_back=summarise(bare_back_to_back),
        latency_p50_ms=percentile(latency, 0.5) * 1000,
        pipe_mib_per_second=pipe_rates,
        pty_mib_per_second=pty_rates,
        bare_mib_per_second=bare_rates,
        pipe_in_order=pipe_in_order,
        concurrent_seconds=concurrent,
        bare_concurrent_seconds=bare_concurrent,
    )
    return result
