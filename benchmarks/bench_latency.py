"""Run latency: ``print('hi')`` from sending ``start`` to receiving ``stopped``.

Measured on one long-lived connection and on a fresh connection per run,
against a bare spawn of the same interpreter. The three are interleaved, one
of each per iteration, so drift on a shared machine hits them alike.
"""

from __future__ import annotations

import time

from _client import check_hello, run_program
from _context import BenchContext
from _programs import HELLO_SOURCE
from _report import BenchResult, Target, percentile, summarise

WARMUP_RUNS = 3
P50_ALLOWANCE = 0.002  # target: p50 at most 2 ms over the bare spawn


async def bench_latency(ctx: BenchContext) -> BenchResult:
    result = BenchResult("latency")
    bare: list[float] = []
    one_connection: list[float] = []
    fresh: list[float] = []
    fresh_with_connect: list[float] = []
    async with ctx.serve(result) as served, served.client() as ws:
        for iteration in range(WARMUP_RUNS + ctx.scale.latency_runs):
            bare_seconds = await ctx.spawn_hello()

            outcome = await run_program(ws, HELLO_SOURCE)
            check_hello(outcome)
            one_seconds = outcome.seconds

            connect_began = time.perf_counter()
            async with served.client() as fresh_ws:
                outcome = await run_program(fresh_ws, HELLO_SOURCE)
                with_connect = time.perf_counter() - connect_began
            check_hello(outcome)

            if iteration >= WARMUP_RUNS:
                bare.append(bare_seconds)
                one_connection.append(one_seconds)
                fresh.append(outcome.seconds)
                fresh_with_connect.append(with_connect)

    target = Target(
        "p50", "<= limit + 2 ms", lambda value, limit: value <= limit + P50_ALLOWANCE * 1000
    )
    result.add_percentiles("one connection", one_connection, bare, "bare spawn", target=target)
    result.add_percentiles("fresh connections", fresh, bare, "bare spawn", target=target)
    result.add(
        "fresh, connect->stopped p50",
        percentile(fresh_with_connect, 0.5) * 1000,
        "ms",
        percentile(bare, 0.5) * 1000,
        "bare spawn",
    )
    result.details.update(
        runs=len(bare),
        bare_spawn=summarise(bare),
        one_connection=summarise(one_connection),
        fresh_connections=summarise(fresh),
        fresh_connect_to_stopped=summarise(fresh_with_connect),
    )
    return result
