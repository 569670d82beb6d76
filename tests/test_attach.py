"""Detach and re-attach: a run with keepAlive outlives its connection, end to end.

Connections go through a loopback relay (blip.py) that the tests cut as a
Wi-Fi drop would: no close handshake, the server just loses its client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import aiohttp
from blip import Blip, blip_to, blips
from test_sharing import holder_script, read_line

from conftest import TIMEOUT, Client, RunningServer, alive, write_pid_code
from v5client import V5Client, V5Connect, connect_run, run_url

__all__ = ["blips", "connect_run"]


def server_port(server: RunningServer) -> int:
    return urlsplit(server.base_url).port or 0


StartServer = Callable[..., Awaitable[RunningServer]]


def wait_for_file_code(path: Path) -> str:
    """Program lines that wait (bounded) until the test creates ``path``."""
    return (
        "import os, time\n"
        f"for _ in range(int({TIMEOUT} / 0.02)):\n"
        f"    if os.path.exists({str(path)!r}):\n"
        "        break\n"
        "    time.sleep(0.02)\n"
    )


async def wait_for_file(path: Path) -> str:
    for _ in range(int(TIMEOUT / 0.02)):
        if path.exists():
            return path.read_text()
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} did not appear within {TIMEOUT} s")


async def wait_until_dead(pid: int) -> None:
    for _ in range(int(TIMEOUT / 0.05)):
        if not alive(pid):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"process {pid} still runs after {TIMEOUT} s")


def mark(path: Path) -> str:
    """A program line that creates ``path`` atomically once what came before is done."""
    part = str(path) + ".part"
    return f"open({part!r}, 'w').close()\nos.replace({part!r}, {str(path)!r})\n"


async def connect_via(
    http: aiohttp.ClientSession, server: RunningServer, blip: Blip | None = None
) -> Client:
    url = server.ws_url()
    if blip is not None:
        url = url.replace(f":{urlsplit(server.base_url).port}/", f":{blip.port}/", 1)
    return Client(await http.ws_connect(url, ssl=server.ssl_client or True))


async def output_until_stopped(client: Client) -> tuple[str, list[dict[str, Any]]]:
    """All stdout (with stderr) text up to ``stopped``, and every message, in order."""
    text = ""
    messages: list[dict[str, Any]] = []
    while True:
        message = await client.receive()
        messages.append(message)
        if message["type"] in ("stdout", "stderr"):
            text += message["data"]["output"]
        if message["type"] == "stopped":
            return text, messages


async def read_text(client: Client, expected: str) -> None:
    """Output messages until exactly ``expected`` has arrived (any stream)."""
    text = ""
    while len(text) < len(expected):
        message = await client.receive()
        assert message["type"] in ("stdout", "stderr"), message
        text += message["data"]["output"]
    assert text == expected


async def start_then_drop(
    http: aiohttp.ClientSession,
    server: RunningServer,
    blips: list[Blip],
    script: str,
    first_output: str,
) -> str:
    """Start ``script`` with keepAlive 60 through a relay, read ``first_output``, cut the
    connection as a Wi-Fi drop would; returns the run's id from ``started``."""
    blip = await blip_to(server_port(server), blips)
    first = await connect_via(http, server, blip)
    await first.send("start", {"sourceScript": script, "keepAlive": 60})
    started = await first.receive()
    assert started["type"] == "started", started
    await read_text(first, first_output)
    blip.cut()
    return str(started["data"]["runId"])


async def test_a_kept_run_survives_a_drop_and_attach_gets_everything_once_in_order(
    server: RunningServer, http: aiohttp.ClientSession, shared: Path, blips: list[Blip]
) -> None:
    go, printed = shared / "go", shared / "printed"
    script = (
        "import os\n"
        "print('before the drop')\n"
        + wait_for_file_code(go)
        + "print('while detached')\n"
        + mark(printed)
        + "line = input()\n"
        "print('after attach:', line)\n"
    )
    run_id = await start_then_drop(http, server, blips, script, "before the drop\n")
    go.touch()
    await wait_for_file(printed)  # printed while nobody was attached

    second = await connect_via(http, server)
    await second.send("attach", {"runId": run_id})
    await read_text(second, "before the drop\nwhile detached\n")
    await second.send("stdin", {"input": "hello\n"})
    text, messages = await output_until_stopped(second)
    assert text == "after attach: hello\n"
    assert messages[-1] == {"type": "stopped", "data": {"exitCode": 0}}
    # Nothing more: `stopped` came exactly once.
    await second.send("ping")
    assert await second.receive() == {"type": "pong", "data": {}}


async def test_a_run_that_ended_while_detached_is_attached_with_its_end(
    server: RunningServer, http: aiohttp.ClientSession, shared: Path, blips: list[Blip]
) -> None:
    go = shared / "go"
    script = (
        "import os\nprint('one')\n" + wait_for_file_code(go) + "print('two')\nraise SystemExit(4)\n"
    )
    run_id = await start_then_drop(http, server, blips, script, "one\n")
    go.touch()
    second = await connect_via(http, server)
    # The program may end before or after the attach: the client sees the same.
    await second.send("attach", {"runId": run_id})
    text, messages = await output_until_stopped(second)
    assert text == "one\ntwo\n"
    assert messages[-1] == {"type": "stopped", "data": {"exitCode": 4}}


async def test_without_keep_alive_a_dropped_connection_ends_its_program(
    server: RunningServer, http: aiohttp.ClientSession, shared: Path, blips: list[Blip]
) -> None:
    marker = shared / "pid"
    blip = await blip_to(server_port(server), blips)
    first = await connect_via(http, server, blip)
    await first.send(
        "start",
        {"sourceScript": write_pid_code(marker) + "print('up')\nimport time\ntime.sleep(120)\n"},
    )
    run_id = (await first.receive())["data"]["runId"]
    await read_text(first, "up\n")
    pid = int(marker.read_text())
    blip.cut()
    await wait_until_dead(pid)
    second = await connect_via(http, server)
    await second.send("attach", {"runId": run_id})
    error = await second.receive()
    assert error["type"] == "error"
    assert "no run with this runId" in error["data"]["message"]


async def test_a_detached_run_ends_after_its_keep_alive_and_with_the_server(
    start_server: StartServer, http: aiohttp.ClientSession, shared: Path, blips: list[Blip]
) -> None:
    server = await start_server()
    blip = await blip_to(server_port(server), blips)
    pids = []
    clients = []  # referenced until the cut: a collected client would close its socket early
    for keep_alive, name in ((1, "short"), (600, "long")):
        client = await connect_via(http, server, blip)
        clients.append(client)
        marker = shared / name
        script = write_pid_code(marker) + "print('up')\nimport time\ntime.sleep(300)\n"
        await client.send("start", {"sourceScript": script, "keepAlive": keep_alive})
        assert (await client.receive())["type"] == "started"
        await read_text(client, "up\n")
        pids.append(int(marker.read_text()))
    cut_at = time.monotonic()
    blip.cut()
    del clients
    await wait_until_dead(pids[0])
    assert time.monotonic() - cut_at >= 0.9, "ended before its keepAlive"
    assert alive(pids[1])
    await server.stop()
    await wait_until_dead(pids[1])


async def test_kept_output_stays_bounded_while_a_detached_program_floods(
    start_server: StartServer, http: aiohttp.ClientSession, shared: Path, blips: list[Blip]
) -> None:
    limit = 64 * 1024
    server = await start_server(environ={"FURTHER_LINK_KEPT_OUTPUT_BYTES": str(limit)})
    go, flooded = shared / "go", shared / "flooded"
    lines = 200_000  # about 2.3 MB, 36 times the limit
    script = (
        "import os, sys\n"
        "print('start')\n" + wait_for_file_code(go) + f"for i in range({lines}):\n"
        "    sys.stdout.write(f'{i:010d}\\n')\n"
        "sys.stdout.flush()\n" + mark(flooded) + "input()\n"
    )
    run_id = await start_then_drop(http, server, blips, script, "start\n")
    go.touch()
    await wait_for_file(flooded)
    second = await connect_via(http, server)
    await second.send("attach", {"runId": run_id})
    total = len("start\n") + lines * 11
    kept = ""
    while True:
        message = await second.receive()
        assert message["type"] == "stdout", message
        kept += message["data"]["output"]
        head, notice, rest = kept.partition(" bytes not kept \u2026\n")
        if notice and len(rest) >= limit:
            break
    assert head.startswith("\u2026 ")
    dropped = int(head[2:])
    # The notice, then exactly the newest `limit` bytes: nothing else was kept.
    assert len(rest) == limit and dropped == total - limit
    assert rest.endswith(f"{lines - 1:010d}\n")
    await second.send("stdin", {"input": "\n"})
    text, messages = await output_until_stopped(second)
    assert text == "" and messages[-1]["data"] == {"exitCode": 0}


async def test_runs_are_listed_for_token_holders_only(
    server: RunningServer, http: aiohttp.ClientSession, blips: list[Blip]
) -> None:
    blip = await blip_to(server_port(server), blips)
    first = await connect_via(http, server, blip)
    await first.send("start", {"sourceScript": "print('up')\ninput()\n", "keepAlive": 60})
    run_id = (await first.receive())["data"]["runId"]
    await read_text(first, "up\n")
    url = server.base_url + "/runs"
    async with http.get(url, ssl=server.ssl_client or True) as response:
        assert response.status == 401
    headers = {"Authorization": f"Bearer {server.token}"}

    async def listed() -> dict[str, Any]:
        async with http.get(url, headers=headers, ssl=server.ssl_client or True) as response:
            assert response.status == 200
            runs = (await response.json())["runs"]
        (entry,) = [run for run in runs if run["runId"] == run_id]
        return dict(entry)

    entry = await listed()
    assert entry["state"] == "running" and entry["attached"] == 1
    assert abs(entry["startedAt"] - time.time()) < TIMEOUT
    blip.cut()
    for _ in range(int(TIMEOUT / 0.05)):
        entry = await listed()
        if entry["state"] == "detached":
            break
        await asyncio.sleep(0.05)
    assert entry["state"] == "detached" and entry["attached"] == 0


async def test_v5_run_is_attached_under_the_new_process_id(
    server: RunningServer,
    http: aiohttp.ClientSession,
    connect_run: V5Connect,
    shared: Path,
    blips: list[Blip],
) -> None:
    go = shared / "go"
    blip = await blip_to(server_port(server), blips)
    first = V5Client(
        await http.ws_connect(run_url(server).replace(f":{server_port(server)}/", f":{blip.port}/"))
    )
    code = "import os\nprint('one')\n" + wait_for_file_code(go) + "print('two')\n"
    await first.send("start", "1", {"runner": "python3", "code": code, "keepAlive": 60})
    run_id = (await first.expect("1", "started"))["data"]["runId"]
    await first.read_output("1", "one\n")
    blip.cut()
    second = await connect_run()
    await second.send("attach", "9", {"runId": run_id})
    await second.read_output("9", "one\n")
    go.touch()
    result = await second.collect("9")
    assert result.stdout == "two\n" and result.exit_code == 0


async def test_a_second_attach_takes_the_run_over(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    first = await connect_via(http, server)
    await first.send("start", {"sourceScript": "print('up')\nprint(input())\n", "keepAlive": 60})
    run_id = (await first.receive())["data"]["runId"]
    await read_text(first, "up\n")
    second = await connect_via(http, server)
    await second.send("attach", {"runId": run_id})
    await read_text(second, "up\n")
    error = await first.receive()
    assert error == {
        "type": "error",
        "data": {"message": "this program was attached from another connection"},
    }
    # The first connection has no program any more; the second drives it.
    await first.send("stop")
    assert "no program is running" in (await first.receive())["data"]["message"]
    await second.send("stdin", {"input": "mine\n"})
    text, messages = await output_until_stopped(second)
    assert text == "mine\n" and messages[-1]["data"] == {"exitCode": 0}


async def test_a_connection_let_in_by_origin_alone_cannot_attach_or_list(
    start_server: StartServer, http: aiohttp.ClientSession
) -> None:
    further = "https://further.pi-top.com"
    server = await start_server(environ={"FURTHER_LINK_AUTH": "origin"})
    owner = await connect_via(http, server)
    await owner.send("start", {"sourceScript": "input()\n", "keepAlive": 60})
    run_id = (await owner.receive())["data"]["runId"]
    page = V5Client(
        await http.ws_connect(run_url(server, token=False), headers={"Origin": further})
    )
    await page.send("attach", "1", {"runId": run_id})
    refusal = await page.expect("1", "error")
    assert "attach needs a connection with the device token" in refusal["data"]["message"]
    async with http.get(server.base_url + "/runs", headers={"Origin": further}) as response:
        assert response.status == 401
    await owner.send("stop")
    assert (await owner.receive_type("stopped"))["data"]["exitCode"] == -15


async def test_claims_and_the_queue_are_listed_in_runs_and_device(
    start_server: StartServer, http: aiohttp.ClientSession
) -> None:
    server = await start_server(environ={"FURTHER_LINK_EXCLUSIVE": "1"})
    holder = await connect_via(http, server)
    await holder.send("start", {"sourceScript": holder_script()})
    holder_id = (await holder.receive())["data"]["runId"]
    assert (await read_line(holder)).startswith("in ")
    waiting = await connect_via(http, server)
    await waiting.send("start", {"sourceScript": "print('my turn')\n"})
    assert await waiting.receive() == {"type": "queued", "data": {"position": 1}}
    headers = {"Authorization": f"Bearer {server.token}"}
    async with http.get(server.base_url + "/runs", headers=headers) as response:
        runs = await response.json()
    async with http.get(server.base_url + "/device", headers=headers) as response:
        device = await response.json()
    assert runs["exclusive"] is True
    assert runs["claims"] == {"motors": {"heldBy": holder_id, "waiting": []}}
    (queued_id,) = runs["queue"]
    states = {run["runId"]: (run["state"], run["claims"]) for run in runs["runs"]}
    assert states == {holder_id: ("running", ["motors"]), queued_id: ("queued", [])}
    assert device["claims"] == runs["claims"] and device["queue"] == [queued_id]
    await holder.send("stdin", {"input": "\n"})
    await holder.receive_type("stopped")
    started = await waiting.receive()
    assert started == {"type": "started", "data": {"runId": queued_id}}
    await read_text(waiting, "my turn\n")
