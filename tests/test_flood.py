"""A program that floods output to a client that has stopped reading.

The server must neither buffer without limit nor drop output: it stops
reading the program's pipe (so the program blocks on write), keeps answering
other clients, and still delivers every byte, in order, once the client reads.
Runs against a server subprocess so its RSS is the server's alone.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from test_cli import ServerProcess, plain_server

from conftest import peak_rss, reset_peak_rss

FLOOD = "import sys\ni = 0\nwhile True:\n    sys.stdout.write(f'{i:09d}\\n')\n    i += 1\n"
STALL_SECONDS = 4.0


@pytest.fixture
def flood_server(sandbox: Path) -> Iterator[tuple[ServerProcess, str]]:
    server = plain_server(sandbox)
    token = (sandbox / "cfg" / "token").read_text().strip()
    yield server, f"http://127.0.0.1:{server.port}/run-py?token={token}"
    if server.proc.poll() is None:
        server.stop()


async def run_latency(ws: aiohttp.ClientWebSocketResponse) -> float:
    began = time.monotonic()
    await ws.send_json({"type": "start", "data": {"sourceScript": "print('hi')"}})
    while (await ws.receive_json(timeout=60))["type"] != "stopped":
        pass
    return time.monotonic() - began


async def test_stalled_reader_is_bounded_lossless_and_does_not_slow_others(
    flood_server: tuple[ServerProcess, str],
) -> None:
    server, url = flood_server
    pid = server.proc.pid
    async with aiohttp.ClientSession() as http:
        other = await http.ws_connect(url)
        idle = [await run_latency(other) for _ in range(10)]
        rss_before = reset_peak_rss(pid)

        flooder = await http.ws_connect(url, max_msg_size=0)
        await flooder.send_json({"type": "start", "data": {"sourceScript": FLOOD}})
        # Stop reading: the flooding client's socket fills, then the server's queue.
        busy: list[float] = []
        deadline = time.monotonic() + STALL_SECONDS
        while time.monotonic() < deadline:
            busy.append(await run_latency(other))
            await asyncio.sleep(0.05)

        growth_mib = (peak_rss(pid) - rss_before) / 2**20
        stop_sent = time.monotonic()
        await flooder.send_json({"type": "stop"})
        text_parts: list[str] = []
        kinds: list[str] = []
        while True:
            message = json.loads((await flooder.receive(timeout=60)).data)
            kinds.append(message["type"])
            if message["type"] == "stdout":
                text_parts.append(message["data"]["output"])
            elif message["type"] == "stopped":
                assert message["data"]["exitCode"] == -15
                break
        stop_to_stopped = time.monotonic() - stop_sent
        await flooder.close()
        await other.close()

    text = "".join(text_parts)
    lines = text.split("\n")
    assert lines[-1] == "", "every write was a whole line"
    numbers = [int(line) for line in lines[:-1]]
    assert numbers == list(range(len(numbers))), "output was dropped or reordered"
    assert kinds[0] == "started" and kinds.count("stopped") == 1

    print(
        f"\nflood: {len(numbers)} lines ({len(text) / 2**20:.1f} MiB) delivered in order; "
        f"server RSS growth {growth_mib:.1f} MiB; other client's run latency idle "
        f"p50 {statistics.median(idle) * 1000:.0f} ms / max {max(idle) * 1000:.0f} ms, "
        f"during flood p50 {statistics.median(busy) * 1000:.0f} ms / "
        f"max {max(busy) * 1000:.0f} ms over {len(busy)} runs; stop->stopped "
        f"{stop_to_stopped * 1000:.0f} ms"
    )
    # Bounded: the backlog is capped at 1 MiB of queue plus socket buffers,
    # so RSS must not grow with the amount the program tried to write.
    assert growth_mib < 24
    assert len(busy) >= 3, "other client's runs were starved during the flood"
