"""Run latency: ``print('hi')`` from sending ``start`` to receiving ``stopped``.

Measured on one long-lived connection and on a fresh connection per run,
against a bare spawn of the same interpreter, in two phases:

* **at a learner's pace** (the target): each run and each bare spawn starts
  after ``LEARNER_PAUSE`` of quiet, as a learner's next Run follows the last
  ``stopped`` by at least that much, so the warm pool has refilled;
* **back to back**: the next starts the moment the last ended, so the pool
  is refilling (starting interpreters, importing its preload modules) while
  the measured run and the bare spawn share the machine's cores with it.
  Reported, not a target: it shows what refilling costs on this machine.

In both, the three are interleaved, one of each per iteration, so drift on a
shared machine hits them alike.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
from _client import check_hello, run_program
from _context import BenchContext, Served
from _programs import HELLO_SOURCE
from _report import BenchResult, Target, percentile, summarise

WARMUP_RUNS = 3
P50_ALLOWANCE = 0.002  # target: p50 at most 2 ms over the bare spawn
# Refilling the pool of two with numpy and PIL.Image preloaded takes ~0.25 s
# of CPU here; a learner does not press Run again sooner than this (s).
LEARNER_PAUSE = 0.4
# Each paced iteration waits three pauses: fewer of them keeps the phase short.
PACED_SHARE = 3


class Samples:
    """Seconds per kind of run, warm-up runs left out."""

    def __init__(self) -> None:
        self.bare: list[float] = []
        self.one_connection: list[float] = []
        self.fresh: list[float] = []
        self.fresh_with_connect: list[float] = []


async def measure(
    ctx: BenchContext,
    served: Served,
    ws: aiohttp.ClientWebSocketResponse,
    iterations: int,
    pause: float,
) -> Samples:
    samples = Samples()
    for iteration in range(WARMUP_RUNS + iterations):
        await asyncio.sleep(pause)
        bare_seconds = await ctx.spawn_hello()

        await asyncio.sleep(pause)
        outcome = await run_program(ws, HELLO_SOURCE)
        check_hello(outcome)
        one_seconds = outcome.seconds

        await asyncio.sleep(pause)
        connect_began = time.perf_counter()
        async with served.client() as fresh_ws:
            outcome = await run_program(fresh_ws, HELLO_SOURCE)
            with_connect = time.perf_counter() - connect_began
        check_hello(outcome)

        if iteration >= WARMUP_RUNS:
            samples.bare.append(bare_seconds)
            samples.one_connection.append(one_seconds)
            samples.fresh.append(outcome.seconds)
            samples.fresh_with_connect.append(with_connect)
    return samples


def report(result: BenchResult, phase: str, samples: Samples, target: Target | None) -> None:
    result.add_percentiles(
        f"{phase}: one connection",
        samples.one_connection,
        samples.bare,
        "bare spawn",
        target=target,
    )
    result.add_percentiles(
        f"{phase}: fresh connections", samples.fresh, samples.bare, "bare spawn", target=target
    )
    result.add(
        f"{phase}: fresh, connect->stopped p50",
        percentile(samples.fresh_with_connect, 0.5) * 1000,
        "ms",
        percentile(samples.bare, 0.5) * 1000,
        "bare spawn",
    )


async def bench_latency(ctx: BenchContext) -> BenchResult:
    result = BenchResult("latency")
    paced_runs = max(10, ctx.scale.latency_runs // PACED_SHARE)
    async with ctx.serve(result) as served, served.client() as ws:
        paced = await measure(ctx, served, ws, paced_runs, LEARNER_PAUSE)
        back_to_back = await measure(ctx, served, ws, ctx.scale.latency_runs, 0.0)

    target = Target(
        "p50", "<= limit + 2 ms", lambda value, limit: value <= limit + P50_ALLOWANCE * 1000
    )
    report(result, "paced", paced, target)
    report(result, "back to back", back_to_back, None)
    result.details.update(
        learner_pause_seconds=LEARNER_PAUSE,
        **{
            f"{phase}_{kind}": summarise(getattr(samples, kind))
            for phase, samples in (("paced", paced), ("back_to_back", back_to_back))
            for kind in ("bare", "one_connection", "fresh", "fresh_with_connect")
        },
    )
    return result
