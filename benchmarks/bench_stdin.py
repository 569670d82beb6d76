"""Stdin round trip: send one line, wait for the program to print it back.

An echo program reads and prints lines one at a time; each line's time is
from sending ``stdin`` to having the whole line back as ``stdout``. The limit
is the bare websocket server echoing the same messages to the same client.
"""

from __future__ import annotations

import time

import aiohttp
from _client import (
    BenchClientError,
    collect_until_stopped,
    receive_event,
    send,
    wait_for_event,
)
from _context import BenchContext
from _programs import echo_source
from _report import BenchResult, Target, summarise

LINE_TIMEOUT = 30.0
TARGET_FACTOR = 1.5


def line_text(number: int) -> str:
    return f"line {number:06d} the quick brown fox jumps over the lazy dog\n"


async def round_trips(ws: aiohttp.ClientWebSocketResponse, lines: int) -> list[float]:
    """Start the echo program, time each line's round trip, wait for ``stopped``."""
    await send(ws, "start", sourceScript=echo_source(lines))
    await wait_for_event(ws, "started", LINE_TIMEOUT)
    samples: list[float] = []
    for number in range(lines):
        text = line_text(number)
        began = time.perf_counter()
        await send(ws, "stdin", input=text)
        echoed = ""
        # The echo may arrive split, one message per character at worst.
        for _ in range(len(text)):
            kind, data = await receive_event(ws, LINE_TIMEOUT)
            if kind != "stdout":
                raise BenchClientError(f"expected the echo of line {number}, got {kind!r} {data}")
            echoed += data["output"]
            if len(echoed) >= len(text):
                break
        samples.append(time.perf_counter() - began)
        if echoed != text:
            raise BenchClientError(f"line {number} came back as {echoed!r}")
    collected = await collect_until_stopped(ws, time.monotonic() + LINE_TIMEOUT)
    if collected.exit_code != 0 or collected.stdout:
        raise BenchClientError(
            f"echo program ended with {collected.exit_code}, extra output {collected.stdout!r}"
        )
    return samples


async def bench_stdin(ctx: BenchContext) -> BenchResult:
    result = BenchResult("stdin")
    lines = ctx.scale.stdin_lines
    server_samples: list[float] = []
    bare_samples: list[float] = []
    async with ctx.serve(result, bare=True) as served:
        for _ in range(ctx.scale.stdin_rounds):
            async with served.client(served.bare_server.url("/echo", lines=lines)) as bare_ws:
                bare_samples += await round_trips(bare_ws, lines)
            async with served.client() as ws:
                server_samples += await round_trips(ws, lines)

    result.add_percentiles(
        f"{lines} lines x {ctx.scale.stdin_rounds},",
        server_samples,
        bare_samples,
        "bare aiohttp echo",
        target=Target(
            "p50",
            f"<= {TARGET_FACTOR} x limit",
            lambda value, limit: value <= TARGET_FACTOR * limit,
        ),
    )
    result.details.update(server=summarise(server_samples), bare=summarise(bare_samples))
    return result
