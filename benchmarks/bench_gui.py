"""GUI runs (``novncOptions``): how soon a learner's window can be shown.

Per run, on one /run connection, from sending ``start``:

* ``novnc``: the virtual display (Xvfb + x11vnc) is up and named;
* the first RFB bytes (``RFB 003.008``) read through the server's
  ``/novnc/<key>`` proxy: what noVNC in the page waits for.

The limit is the bare stack: Xvfb started until it announces its display
number, then x11vnc until its unix socket greets, both without the server.
Target (issue 12): the display ready within 1.5 s of ``start``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import aiohttp
from _client import BenchClientError, within
from _context import BenchContext
from _report import BenchResult, Target, summarise

READY_TARGET_MS = 1500.0
TIMEOUT = 30.0
RUNS_QUICK, RUNS_FULL = 5, 20
SIZE = {"enabled": True, "width": 640, "height": 480}


async def gui_run(
    http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse, base: str, token: str | None
) -> tuple[float, float]:
    """One GUI run: seconds from ``start`` to ``novnc`` and to the first RFB bytes."""
    began = time.perf_counter()
    start = {"runner": "python3", "code": "import time; time.sleep(60)", "novncOptions": SIZE}
    await ws.send_str(json.dumps({"type": "start", "process": "g", "data": start}))
    message = await within(ws.receive(), TIMEOUT)
    event = json.loads(message.data)
    if event["type"] != "novnc":
        raise BenchClientError(f"expected novnc first, got {message.data[:200]}")
    to_novnc = time.perf_counter() - began
    query = f"?token={token}" if token else ""
    async with http.ws_connect(f"{base}{event['data']['path']}{query}") as viewer:
        greeting = b""
        while len(greeting) < 12:
            frame = await within(viewer.receive(), TIMEOUT)
            if frame.type is not aiohttp.WSMsgType.BINARY:
                raise BenchClientError(f"the display proxy ended: {frame.type.name}")
            greeting += frame.data
        to_rfb = time.perf_counter() - began
        if not greeting.startswith(b"RFB 003."):
            raise BenchClientError(f"not an RFB server: {greeting[:12]!r}")
    await ws.send_str(json.dumps({"type": "stop", "process": "g"}))
    for _ in range(100):
        event = json.loads((await within(ws.receive(), TIMEOUT)).data)
        if event["type"] == "stopped":
            return to_novnc, to_rfb
    raise BenchClientError("no stopped after stop")


async def bare_display() -> float:
    """Seconds for Xvfb + x11vnc alone, until x11vnc greets on its unix socket."""
    with tempfile.TemporaryDirectory(prefix="bench-gui-") as directory:
        sock = Path(directory) / "vnc.sock"
        began = time.perf_counter()
        read_end, write_end = os.pipe()
        xvfb = await asyncio.create_subprocess_exec(
            *("Xvfb", "-displayfd", str(write_end), "-nolisten", "tcp"),
            *("-screen", "0", "640x480x24"),
            pass_fds=(write_end,),
            stderr=asyncio.subprocess.DEVNULL,
        )
        os.close(write_end)
        x11vnc = None
        try:
            with os.fdopen(read_end, "rb") as announced:
                number = (
                    await asyncio.get_running_loop().run_in_executor(None, announced.readline)
                ).strip()
            x11vnc = await asyncio.create_subprocess_exec(
                *("x11vnc", "-display", f":{number.decode()}", "-unixsock", str(sock)),
                *("-rfbport", "0", "-rfbportv6", "-1", "-norc", "-nopw", "-quiet"),
                stderr=asyncio.subprocess.DEVNULL,
            )
            deadline = time.perf_counter() + TIMEOUT
            while time.perf_counter() < deadline:
                with contextlib.suppress(OSError):
                    reader, writer = await asyncio.open_unix_connection(str(sock))
                    await within(reader.readexactly(12), TIMEOUT)
                    writer.close()
                    return time.perf_counter() - began
                await asyncio.sleep(0.005)
            raise BenchClientError("bare x11vnc did not answer")
        finally:
            for process in (x11vnc, xvfb):
                if process is not None and process.returncode is None:
                    process.terminate()
                    await process.wait()


async def bench_gui(ctx: BenchContext) -> BenchResult:
    result = BenchResult("gui")
    runs = RUNS_QUICK if ctx.scale.latency_runs < 100 else RUNS_FULL
    novnc: list[float] = []
    rfb: list[float] = []
    bare: list[float] = []
    async with ctx.serve(result) as served:
        server = served.server
        base = f"ws://127.0.0.1:{server.port}"
        async with served.client(server.run_url.replace("/run-py", "/run", 1)) as ws:
            for _ in range(runs):
                bare.append(await bare_display())
                to_novnc, to_rfb = await gui_run(served.http, ws, base, server.token)
                novnc.append(to_novnc)
                rfb.append(to_rfb)
    result.add_percentiles("start -> novnc", novnc, bare, "bare Xvfb+x11vnc", labels=("p50", "max"))
    result.add_percentiles(
        "start -> RFB through proxy",
        rfb,
        bare,
        "bare Xvfb+x11vnc",
        labels=("p50", "max"),
        target=Target("max", "<= 1500 ms", lambda value, _: value <= READY_TARGET_MS),
    )
    result.details.update(
        runs=runs, novnc=summarise(novnc), rfb=summarise(rfb), bare=summarise(bare)
    )
    return result
