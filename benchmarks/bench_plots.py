"""Plots and controls: how fast figures reach the client, how soon a control reaches the program.

*Animation:* a program redraws a 640 x 480 line plot with ``plt.pause`` in a
loop; the figure is frames per second as the client receives ``plot`` events
(first to last). The limit is the same loop rendering the same PNGs with Agg
and no further-link (in-program time): the cost of drawing, not of sending.

*Control round trip:* from sending ``control`` (a slider) to having the
program's callback's print back; the limit is the same round trip through
``stdin`` to an ``input()`` loop on the same server.
"""

from __future__ import annotations

import asyncio
import subprocess
import time

import aiohttp
from _client import BenchClientError, receive_event, send
from _context import BenchContext
from _report import BenchResult, summarise

TIMEOUT = 60.0
FRAMES = 60
ROUND_TRIPS = 100

ANIMATION = f"""\
import io, sys, time
import matplotlib
if sys.argv[1:] == ["bare"]:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
fig = plt.figure(figsize=(6.4, 4.8), dpi=100)
(line,) = plt.plot(range(100), [0] * 100)
plt.ylim(0, {FRAMES})
began = time.perf_counter()
for frame in range({FRAMES}):
    line.set_ydata([frame] * 100)
    if sys.argv[1:] == ["bare"]:
        fig.canvas.print_png(io.BytesIO())
    else:
        plt.pause(0.001)
print(time.perf_counter() - began)
"""

SLIDER = f"""\
import threading, further_link
done = threading.Event()
def moved(value):
    print(value, flush=True)
    if value == {ROUND_TRIPS - 1}:
        done.set()
further_link.slider("x", 0, {ROUND_TRIPS}, on_change=moved)
print("ready", flush=True)
done.wait(120)
"""

ECHO = f"""\
for _ in range({ROUND_TRIPS}):
    print(input(), flush=True)
"""


async def next_of(ws: aiohttp.ClientWebSocketResponse, kinds: tuple[str, ...]) -> dict[str, object]:
    for _ in range(1000):
        kind, data = await receive_event(ws, TIMEOUT)
        if kind in kinds:
            return data
        if kind in ("error", "stopped"):
            raise BenchClientError(f"{kind} while waiting for {kinds}: {data}")
    raise BenchClientError(f"no {kinds} among 1000 events")


async def read_line(ws: aiohttp.ClientWebSocketResponse) -> str:
    text = ""
    while not text.endswith("\n"):
        text += str((await next_of(ws, ("stdout",)))["output"])
    return text


async def animation_rate(ws: aiohttp.ClientWebSocketResponse) -> float:
    await send(ws, "start", sourceScript=ANIMATION)
    await next_of(ws, ("started",))
    times = []
    for _ in range(FRAMES):
        await next_of(ws, ("plot",))
        times.append(time.perf_counter())
    await next_of(ws, ("stopped",))
    return (FRAMES - 1) / (times[-1] - times[0])


async def round_trips(
    ws: aiohttp.ClientWebSocketResponse, source: str, message: str
) -> list[float]:
    await send(ws, "start", sourceScript=source)
    if message == "control":
        await next_of(ws, ("controls",))
        if await read_line(ws) != "ready\n":
            raise BenchClientError("the slider program did not start")
    samples = []
    for value in range(ROUND_TRIPS):
        began = time.perf_counter()
        if message == "control":
            await send(ws, "control", id="x", value=value)
        else:
            await send(ws, "stdin", input=f"{value}\n")
        if await read_line(ws) != f"{value}\n":
            raise BenchClientError(f"{message} {value} did not come back")
        samples.append(time.perf_counter() - began)
    await next_of(ws, ("stopped",))
    return samples


def bare_animation_rate(python: str) -> float:
    done = subprocess.run(
        [python, "-c", ANIMATION, "bare"], capture_output=True, text=True, timeout=TIMEOUT
    )
    if done.returncode != 0:
        raise BenchClientError(f"the bare animation failed: {done.stderr[-300:]}")
    return FRAMES / float(done.stdout)


async def bench_plots(ctx: BenchContext) -> BenchResult:
    result = BenchResult("plots")
    async with ctx.serve(result) as served, served.client() as ws:
        rate = await animation_rate(ws)
        control = await round_trips(ws, SLIDER, "control")
        stdin = await round_trips(ws, ECHO, "stdin")
    bare = await asyncio.get_running_loop().run_in_executor(
        None, bare_animation_rate, ctx.program_python
    )
    result.add(f"plt.pause animation, {FRAMES} frames 640x480", rate, "frames/s", bare, "Agg alone")
    result.add_percentiles(f"control round trip, {ROUND_TRIPS}", control, stdin, "stdin echo")
    result.details.update(control=summarise(control), stdin=summarise(stdin), bare_fps=bare)
    return result
