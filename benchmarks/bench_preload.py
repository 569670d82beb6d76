"""Preloaded pool: start to ``started``, and start to first output of heavy imports.

Three ways of running ``import numpy; print(1)`` and ``from PIL import Image;
print(1)``: a server whose waiting interpreters preloaded numpy and Pillow, a
server with a plain pool, and a bare ``python3 -c`` spawn of the same program.
Runs are far enough apart that a pool of 2 is full when each starts. Also start to
``started`` with a waiting interpreter, and the memory a preloaded waiting
interpreter holds over a plain one.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import psutil
from _bare import ProgramAccount
from _client import collect_until_stopped, send, wait_for_event
from _context import SCRIPT_CWD, BenchContext
from _report import BenchResult, percentile, summarise
from _server import RunningServer

PROGRAMS = {
    "numpy": "import numpy; print(1)",
    "Pillow": "from PIL import Image; print(1)",
    "no import": "print(1)",  # what preloading costs a program that does not use it
}
PRELOAD = "numpy,PIL.Image"
# Between runs, so that the pool is full again: a plain interpreter starts in
# ~20 ms, one that preloads numpy and Pillow takes ~0.3 s of CPU here.
PAUSE = {"preloaded": 0.8, "plain pool": 0.05}
WARMUP_RUNS = 2
RUN_TIMEOUT = 60.0
BARE_TIMEOUT = 60.0
MiB = 1024 * 1024


async def timed_run(ws: aiohttp.ClientWebSocketResponse, source: str) -> tuple[float, float, float]:
    """Seconds from sending ``start`` to ``started``, to the first stdout, and to ``stopped``."""
    began = time.perf_counter()
    await send(ws, "start", sourceScript=source)
    await wait_for_event(ws, "started", RUN_TIMEOUT)
    started = time.perf_counter() - began
    await wait_for_event(ws, "stdout", RUN_TIMEOUT)
    first_output = time.perf_counter() - began
    await collect_until_stopped(ws, time.monotonic() + RUN_TIMEOUT)
    return started, first_output, time.perf_counter() - began


async def bare_first_output(python: str, source: str, account: ProgramAccount | None) -> float:
    """Seconds from spawning ``python -u -c source`` to its first output."""
    switch = account.spawn_arguments() if account is not None else {}
    began = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        python,
        "-u",
        "-c",
        source,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=str(SCRIPT_CWD),
        **switch,  # type: ignore[arg-type]
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), BARE_TIMEOUT)
    seconds = time.perf_counter() - began
    await asyncio.wait_for(process.wait(), BARE_TIMEOUT)
    if line != b"1\n":
        raise OSError(f"bare {source!r} printed {line!r}")
    return seconds


def waiting_rss(server: RunningServer) -> list[int]:
    """RSS of the server's waiting interpreters (children still running the bootstrap)."""
    sizes = []
    for child in psutil.Process(server.pid).children():
        try:
            if "-c" in child.cmdline()[:3]:
                sizes.append(child.memory_info().rss)
        except psutil.Error:
            continue
    return sizes


async def settle(server: RunningServer, count: int = 2) -> None:
    """Wait (bounded) until ``count`` interpreters wait, preloading included."""
    for _ in range(300):
        if len(waiting_rss(server)) >= count:
            await asyncio.sleep(1.0)  # let the last one finish importing
            return
        await asyncio.sleep(0.1)


async def bench_preload(ctx: BenchContext) -> BenchResult:
    result = BenchResult("preload")
    runs = max(10, ctx.scale.latency_runs // 6)
    started: list[float] = []
    first: dict[tuple[str, str], list[float]] = {}
    stopped: dict[str, list[float]] = {}
    rss: dict[str, list[int]] = {}
    for kind, preload in (("preloaded", PRELOAD), ("plain pool", "none")):
        settings = {"FURTHER_LINK_POOL_PRELOAD": preload}
        async with ctx.serve(result, settings=settings) as served:
            server = served.server
            await settle(server)
            rss[kind] = waiting_rss(server)
            async with served.client() as ws:
                for name, source in PROGRAMS.items():
                    samples = first.setdefault((kind, name), [])
                    for iteration in range(WARMUP_RUNS + runs):
                        await asyncio.sleep(PAUSE[kind])
                        to_started, to_output, to_stopped = await timed_run(ws, source)
                        if iteration >= WARMUP_RUNS:
                            samples.append(to_output)
                            if name == "no import":
                                stopped.setdefault(kind, []).append(to_stopped)
                            if kind == "preloaded":
                                started.append(to_started)
    for name, source in PROGRAMS.items():
        bare = first[("bare", name)] = []
        for _ in range(runs):
            bare.append(await bare_first_output(ctx.program_python, source, ctx.account))

    result.add(
        "start->started p50, warm interpreter",
        percentile(started, 0.5) * 1000,
        "ms",
        target="<= 2 ms",
        met=percentile(started, 0.5) <= 0.002,
    )
    for name in PROGRAMS:
        bare_p50 = percentile(first[("bare", name)], 0.5) * 1000
        for kind in ("preloaded", "plain pool"):
            value = percentile(first[(kind, name)], 0.5) * 1000
            row = result.add(
                f"{name}: start->first output p50, {kind}",
                value,
                "ms",
                bare_p50,
                "bare python3 -c",
            )
            if kind == "preloaded" and name == "numpy":
                row.target, row.met = "<= 0.1 x bare", value <= 0.1 * bare_p50
    result.add(
        "no import: start->stopped p50, preloaded",
        percentile(stopped["preloaded"], 0.5) * 1000,
        "ms",
        percentile(stopped["plain pool"], 0.5) * 1000,
        "plain pool",
    )
    extra = (sum(rss["preloaded"]) / max(1, len(rss["preloaded"]))) / MiB
    plain = (sum(rss["plain pool"]) / max(1, len(rss["plain pool"]))) / MiB
    result.add("RSS per waiting interpreter, numpy+Pillow preloaded", extra, "MiB", plain, "plain")
    result.details.update(
        runs=runs,
        started=summarise(started),
        first_output={f"{kind}/{name}": summarise(v) for (kind, name), v in first.items()},
        waiting_rss_bytes=rss,
    )
    return result
