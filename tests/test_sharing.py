"""Safe hardware sharing: ``further_link.claim`` queues programs for a resource device-wide.

Each test runs real programs on a real server from separate connections; the
programs print monotonic timestamps inside their claims, which is what proves
they never overlapped.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Callable

from conftest import Client, RunningServer
from v5client import V5Connect, connect_run

__all__ = ["connect_run"]

Connect = Callable[..., Awaitable[Client]]
StartServer = Callable[..., Awaitable[RunningServer]]


def holder_script(name: str = "motors") -> str:
    """Claims ``name``, says so with a timestamp, holds it until a line of input arrives."""
    return (
        "import time, further_link\n"
        f"with further_link.claim({name!r}):\n"
        "    print('in', time.monotonic(), flush=True)\n"
        "    input()\n"
        "    print('out', time.monotonic(), flush=True)\n"
    )


def stamps(stdout: str) -> dict[str, float]:
    return {word: float(value) for word, value in (line.split() for line in stdout.splitlines())}


async def started_run_id(client: Client) -> str:
    started = await client.receive_type("started")
    run_id = started["data"]["runId"]
    assert isinstance(run_id, str) and len(run_id) == 32
    return str(run_id)


async def read_line(client: Client) -> str:
    """The next line on stdout; a waiting program's own words on stderr may come between."""
    text = ""
    while not text.endswith("\n"):
        message = await client.receive()
        if message["type"] in ("stderr", "queued"):
            continue
        assert message["type"] == "stdout", message
        text += message["data"]["output"]
    return text


async def next_queued(client: Client) -> dict[str, Any]:
    """The next ``queued`` event; only stderr (the program's own words) may come before it."""
    while True:
        message = await client.receive()
        if message["type"] == "queued":
            return dict(message["data"])
        assert message["type"] == "stderr", message


async def test_two_runs_claiming_motors_never_overlap(connect: Connect) -> None:
    first, second, third = await connect(), await connect(), await connect()
    await first.send("start", {"sourceScript": holder_script()})
    first_id = await started_run_id(first)
    first_in = await read_line(first)
    assert first_in.startswith("in ")

    await second.send("start", {"sourceScript": holder_script()})
    second_id = await started_run_id(second)
    assert second_id != first_id
    assert await next_queued(second) == {"resource": "motors", "position": 1, "heldBy": first_id}
    await third.send("start", {"sourceScript": holder_script()})
    await started_run_id(third)
    assert await next_queued(third) == {"resource": "motors", "position": 2, "heldBy": first_id}

    await first.send("stdin", {"input": "\n"})
    first_result = await first.collect()
    assert first_result.exit_code == 0, first_result.stderr
    # The first let go: the second holds it, the third moves up.
    assert await next_queued(third) == {"resource": "motors", "position": 1, "heldBy": second_id}

    await second.send("stdin", {"input": "\n"})
    second_result = await second.collect()
    await third.send("stdin", {"input": "\n"})
    third_result = await third.collect()
    for result in (second_result, third_result):
        assert result.exit_code == 0, result.stderr
    a = stamps(first_in + first_result.stdout)
    b = stamps(second_result.stdout)
    c = stamps(third_result.stdout)
    assert a["in"] < a["out"] <= b["in"] < b["out"] <= c["in"] < c["out"]
    # The waiting program said so once, in words, on its own stderr.
    waiting = [m["data"]["output"] for m in second.received if m["type"] == "stderr"]
    assert "".join(waiting).count("waiting for 'motors'") == 1
    assert "number 1 in the queue" in "".join(waiting)


async def test_a_stopped_holder_releases_its_claim(connect: Connect) -> None:
    first, second = await connect(), await connect()
    await first.send("start", {"sourceScript": holder_script()})
    first_id = await started_run_id(first)
    await read_line(first)
    await second.send("start", {"sourceScript": holder_script()})
    await started_run_id(second)
    assert (await next_queued(second))["heldBy"] == first_id

    await first.send("stop")
    await first.receive_type("stopped")
    assert (await read_line(second)).startswith("in ")
    await second.send("stdin", {"input": "\n"})
    assert (await second.collect()).exit_code == 0


async def test_claim_timeout_and_decorator(connect: Connect) -> None:
    holder, waiter = await connect(), await connect()
    await holder.send("start", {"sourceScript": holder_script("arm")})
    await started_run_id(holder)
    await read_line(holder)
    script = (
        "import further_link\n"
        "try:\n"
        "    with further_link.claim('arm', timeout=0.5):\n"
        "        print('got it')\n"
        "except further_link.ClaimTimeout as exc:\n"
        "    print('gave up:', exc)\n"
        "@further_link.claim('wheels')\n"
        "def drive():\n"
        "    return 'drove'\n"
        "print(drive(), drive())\n"
    )
    result = await waiter.run({"sourceScript": script})
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("gave up: claim('arm'): another program still held it")
    assert result.stdout.endswith("drove drove\n")
    assert [m["data"]["position"] for m in result.messages if m["type"] == "queued"] == [1]
    # The timed-out wait left the queue: the holder's release hands it to nobody stale.
    await holder.send("stdin", {"input": "\n"})
    assert (await holder.collect()).exit_code == 0
    again = await waiter.run(
        {
            "sourceScript": "import further_link\nwith further_link.claim('arm', timeout=5):\n"
            "    print('free')\n"
        }
    )
    assert again.stdout == "free\n" and not [m for m in again.messages if m["type"] == "queued"]


async def test_refused_claims_say_why(client: Client) -> None:
    script = (
        "import json, os, socket, struct, further_link\n"
        "try:\n"
        "    further_link.claim('x' * 65)\n"
        "except ValueError as exc:\n"
        "    print('program side:', exc)\n"
        # A hand-made request the library would not send: the server refuses it too.
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.connect(os.environ['FURTHER_LINK_IO_SOCKET'])\n"
        "body = json.dumps({'resource': '', 'timeout': -1}).encode()\n"
        "s.sendall(struct.pack('!cI', b'A', len(body)) + body)\n"
        "kind, n = struct.unpack('!cI', s.recv(5))\n"
        "print('server side:', kind.decode(), s.recv(n).decode())\n"
    )
    result = await client.run({"sourceScript": script})
    assert result.exit_code == 0, result.stderr
    assert "program side: claim: a resource name has at most 64 characters" in result.stdout
    assert "server side: X a resource name is text of 1 to 64 characters" in result.stdout


async def test_claims_are_device_wide_across_both_apis(
    connect: Connect, connect_run: V5Connect
) -> None:
    holder = await connect()
    await holder.send("start", {"sourceScript": holder_script()})
    holder_id = await started_run_id(holder)
    await read_line(holder)
    v5 = await connect_run()
    await v5.send("start", "7", {"runner": "python3", "code": holder_script()})
    started = await v5.expect("7", "started")
    assert len(started["data"]["runId"]) == 32
    queued = await v5.next_for("7")
    while queued["type"] == "stderr":
        queued = await v5.next_for("7")
    assert queued["type"] == "queued"
    assert queued["data"] == {"resource": "motors", "position": 1, "heldBy": holder_id}
    await holder.send("stdin", {"input": "\n"})
    await holder.collect()
    await v5.send("stdin", "7", {"input": "\n"})
    result = await v5.collect("7")
    assert result.exit_code == 0
    assert "in " in result.stdout and "out " in result.stdout


async def test_exclusive_mode_queues_starts_and_runs_them_in_turn(
    start_server: StartServer, connect: Connect
) -> None:
    server = await start_server(environ={"FURTHER_LINK_EXCLUSIVE": "1"})
    first, second, third = [await connect(server) for _ in range(3)]
    await first.send("start", {"sourceScript": holder_script("nothing")})
    await started_run_id(first)
    first_in = await read_line(first)
    stamp = "import time\nprint('in', time.monotonic())\nprint('out', time.monotonic())\n"
    await second.send("start", {"sourceScript": stamp})
    assert await second.receive() == {"type": "queued", "data": {"position": 1}}
    await third.send("start", {"sourceScript": stamp})
    assert await third.receive() == {"type": "queued", "data": {"position": 2}}
    # Input for a program that has not started is refused in words; the connection stays.
    await third.send("control", {"id": "go"})
    refusal = await third.receive()
    assert refusal["type"] == "error" and "waits for its turn" in refusal["data"]["message"]
    # A queued start is one program on its connection: stop takes it out of the queue.
    await third.send("stop")
    assert await third.receive() == {"type": "stopped", "data": {"exitCode": -15}}

    await first.send("stdin", {"input": "\n"})
    first_result = await first.collect()
    second_id = await started_run_id(second)
    second_result = await second.collect()
    assert first_result.exit_code == second_result.exit_code == 0
    a, b = stamps(first_in + first_result.stdout), stamps(second_result.stdout)
    assert a["out"] <= b["in"]
    assert second_id
    # Nothing of the third ever ran.
    await third.send("ping")
    assert await third.receive() == {"type": "pong", "data": {}}


def test_every_side_channel_frame_kind_means_one_thing() -> None:
    """Claims, keys, frames, plots and controls share the run's side channel: a kind
    letter used twice would make the server read a claim as a subscription (it did once)."""
    import further_link.channel as channel
    import further_link.sharing as sharing

    kinds = {
        f"{module.__name__}.{name}": value
        for module in (channel, sharing)
        for name, value in vars(module).items()
        if name.startswith("KIND_")
    }
    by_value: dict[bytes, list[str]] = {}
    for name, value in kinds.items():
        by_value.setdefault(value, []).append(name)
    assert len(kinds) >= 12
    assert {value: names for value, names in by_value.items() if len(names) > 1} == {}
