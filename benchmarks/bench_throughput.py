"""Stdout throughput: a program writes the pattern stream in 64 KiB blocks.

MiB/s from sending ``start`` to receiving ``stopped``, every byte checked in
order. The limit is the bare websocket server pushing the same bytes as the
same ``stdout`` messages to the same client, which does the same checking.
Rounds alternate between the two, each after ``LEARNER_PAUSE`` of quiet
(the server's warm pool refills after a run ends: that is not the next
round's cost); the median is reported.
"""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import dataclass

import aiohttp
from _client import BenchClientError, run_program
from _context import BenchContext
from _patterns import BLOCK_BYTES, StreamChecker
from _programs import throughput_source
from _report import BenchResult, MiB
from bench_latency import LEARNER_PAUSE

TARGET_FRACTION = 0.8


@dataclass
class Transfer:
    mib_per_second: float
    received: int
    in_order: bool
    messages: int


async def receive_stream(
    ws: aiohttp.ClientWebSocketResponse, source: str, expected_bytes: int
) -> Transfer:
    checker = StreamChecker()
    messages = 0

    def on_stdout(text: str) -> None:
        nonlocal messages
        messages += 1
        checker.feed(text)

    outcome = await run_program(ws, source, on_stdout=on_stdout)
    if outcome.exit_code != 0:
        raise BenchClientError(
            f"throughput program exited with {outcome.exit_code}: {outcome.stderr[-300:]!r}"
        )
    in_order = checker.ok and checker.received == expected_bytes
    return Transfer(checker.received / MiB / outcome.seconds, checker.received, in_order, messages)


async def bench_throughput(ctx: BenchContext) -> BenchResult:
    result = BenchResult("throughput")
    blocks = ctx.scale.throughput_mib * MiB // BLOCK_BYTES
    expected = blocks * BLOCK_BYTES
    source = throughput_source(blocks)
    server_runs: list[Transfer] = []
    bare_runs: list[Transfer] = []
    async with ctx.serve(result, bare=True) as served, served.client() as ws:
        for _ in range(ctx.scale.throughput_rounds):
            await asyncio.sleep(LEARNER_PAUSE)
            async with served.client(served.bare_server.url("/push", blocks=blocks)) as bare_ws:
                bare_runs.append(await receive_stream(bare_ws, source, expected))
            await asyncio.sleep(LEARNER_PAUSE)
            server_runs.append(await receive_stream(ws, source, expected))

    rate = statistics.median(run.mib_per_second for run in server_runs)
    limit = statistics.median(run.mib_per_second for run in bare_runs)
    rounds = len(server_runs)
    result.add(
        f"{ctx.scale.throughput_mib} MiB stdout, median of {rounds}",
        rate,
        "MiB/s",
        limit,
        "bare aiohttp ws",
        target=f">= {TARGET_FRACTION} x limit",
        met=rate >= TARGET_FRACTION * limit,
    )
    result.add(
        "bytes checked in order (all rounds)",
        sum(run.received for run in server_runs) / MiB,
        "MiB",
        expected * rounds / MiB,
        "bytes written",
        target="all, in order",
        met=all(run.in_order for run in server_runs + bare_runs),
    )
    result.details.update(
        bytes_per_round=expected,
        server_mib_per_second=[run.mib_per_second for run in server_runs],
        bare_mib_per_second=[run.mib_per_second for run in bare_runs],
        server_messages_per_round=[run.messages for run in server_runs],
        bare_messages_per_round=[run.messages for run in bare_runs],
        all_in_order=[run.in_order for run in server_runs + bare_runs],
    )
    return result
