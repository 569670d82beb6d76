"""A client that behaves like Further's page goes through a whole lesson."""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp

from conftest import RunningServer
from v5client import V5Client, run_url

FURTHER = "https://further.pi-top.com"
PING_INTERVAL = 3.0  # Further pings 3 s after each pong

ROBOT = """
import threading
from further_link import KeyboardButton
name = input('name? ')
print('hello', name)
stop = threading.Event()
forward = KeyboardButton('ArrowUp')
forward.when_pressed = lambda: print('forward')
forward.when_released = lambda: print('halt')
brake = KeyboardButton(' ')
brake.when_pressed = lambda: print('brake')
print('drive with the arrow keys')
stop.wait(120)
"""


async def pinger(client: V5Client) -> None:
    """Further's keep-alive."""
    while True:
        await client.send("ping")
        await asyncio.sleep(PING_INTERVAL)


async def test_a_whole_lesson_as_further_does_it(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    headers = {"Origin": FURTHER}
    async with http.get(server.base_url + "/version", headers=headers) as r:
        version = tuple(int(p) for p in (await r.json())["version"].split("."))
        assert version >= (5, 3, 3) and version >= (4, 4, 0)
    async with http.get(server.base_url + "/version/apt/python3-pitop", headers=headers) as r:
        assert r.status == 200 and "version" in await r.json()

    project = {"name": "rover", "files": {"robot.py": {"type": "text", "content": {"text": ROBOT}}}}
    async with http.post(
        f"{server.base_url}/upload?token={server.token}",
        data=json.dumps(project),
        headers=headers,
        skip_auto_headers=("Content-Type",),
    ) as r:
        answer = await r.json()
        assert isinstance(answer.pop("version"), str)
        assert (r.status, answer) == (200, {"success": True, "fetched_urls": True})

    ws = await http.ws_connect(run_url(server, "pty=true"), headers=headers)
    client = V5Client(ws)
    keepalive = asyncio.ensure_future(pinger(client))
    try:
        await client.send("start", "main", {"runner": "python3", "path": "rover/robot.py"})
        await client.send("resize", "main", {"rows": 24, "cols": 80})
        await client.expect("main", "started")
        await client.read_output("main", "name? ")
        await client.send("stdin", "main", {"input": "Ada\r"})
        await client.read_output("main", "Ada\r\nhello Ada\r\n")
        assert await client.next_for("main") == {
            "type": "keylisten",
            "data": {"output": "ArrowUp"},
            "client": "",
            "process": "main",
        }
        assert (await client.expect("main", "keylisten"))["data"] == {"output": " "}
        await client.read_output("main", "drive with the arrow keys\r\n")
        for key, event, said in (
            ("ArrowUp", "keydown", "forward"),
            ("ArrowUp", "keyup", "halt"),
            (" ", "keydown", "brake"),
        ):
            await client.send("keyevent", "main", {"key": key, "event": event})
            await client.read_output("main", said + "\r\n")
        await asyncio.sleep(PING_INTERVAL + 0.5)  # a keep-alive round trip during the run
        await client.send("stop", "main")
        # A stop may be a Ctrl-C first: the program's KeyboardInterrupt can print before it ends.
        assert (await client.collect("main")).exit_code == -15
        pongs_seen = [m for m in client.backlog if m["type"] == "pong"]
        assert len(pongs_seen) >= 2
        assert all(m["process"] is None and m["data"] is None for m in pongs_seen)
    finally:
        keepalive.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keepalive
        await ws.close()
