"""`further-link run` through a network blip: it reconnects, attaches, and shows each
line of output once. The blip is a loopback relay the test cuts (blip.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import urlsplit

from blip import Blip, blip_to, blips
from test_attach import mark, wait_for_file, wait_for_file_code
from test_client import client_env, device_args, program, read_line, start_client

from conftest import TIMEOUT, RunningServer

__all__ = ["blips", "client_env"]


async def test_run_reattaches_after_a_blip_and_shows_each_line_once(
    server: RunningServer,
    sandbox: Path,
    shared: Path,
    client_env: dict[str, str],
    blips: list[Blip],
) -> None:
    go, printed = shared / "go", shared / "printed"
    script = program(
        sandbox,
        "import os\n"
        "for i in range(3):\n"
        "    print('before', i)\n"
        + wait_for_file_code(go)
        + "print('during the blip')\n"
        + mark(printed)
        + "print('after:', input())\n",
    )
    blip = await blip_to(urlsplit(server.base_url).port or 0, blips)
    args = device_args(server)
    args[args.index("--port") + 1] = str(blip.port)
    client = await start_client("run", script, *args, env=client_env)
    for i in range(3):
        assert await read_line(client) == f"before {i}\n"
    blip.cut()
    go.touch()
    await wait_for_file(printed)
    assert await read_line(client) == "during the blip\n"
    assert blip.connections == 2, "it reconnected once"
    assert client.stdin is not None
    client.stdin.write(b"typed after\n")
    await client.stdin.drain()
    assert await read_line(client) == "after: typed after\n"
    assert await asyncio.wait_for(client.wait(), TIMEOUT) == 0
    assert client.stdout is not None and client.stderr is not None
    assert await client.stdout.read() == b""
    said = (await client.stderr.read()).decode()
    assert "reconnecting" in said and "following the program again" in said
