"""Behaving as the 2020 clients expect and as a learner's own `python3` would (issue 10).

Each test replays what a learner or the 2020 suite does over the wire, against
a real server running real programs.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Callable

import aiohttp
import pytest
from test_hostile_input import open_raw_websocket

from further_link.errors import ConfigError
from further_link.files.project import SCRIPT_PATTERN

from conftest import (
    Client,
    RunningServer,
    alive,
    give_to_program_user,
    program_home,
    sleeper_script,
    write_pid_code,
)

ClientFactory = Callable[..., Awaitable[Client]]
ServerFactory = Callable[..., Awaitable[RunningServer]]


def text_file(text: str) -> dict[str, Any]:
    return {"type": "text", "content": {"text": text}}


async def upload(client: Client, name: str, files: dict[str, Any]) -> dict[str, Any]:
    await client.send("upload", {"directory": {"name": name, "files": files}})
    return await client.receive()


def names_in(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


# ------------------------------------------------ inline script in its project


async def test_cereal_csv_is_read_next_to_the_script(client: Client, server: RunningServer) -> None:
    """The 2020 suite's upload test: data opened through os.path.dirname(__file__)."""
    csv = "name,calories\ncorn flakes,100\n"
    reply = await upload(client, "cereal-project", {"cereal.csv": text_file(csv)})
    assert reply["type"] == "uploaded"
    script = (
        "import os\n"
        "with open(os.path.dirname(__file__) + '/cereal.csv') as f:\n"
        "    print(f.read(), end='')\n"
    )
    result = await client.run({"sourceScript": script, "directoryName": "cereal-project"})
    assert result.stdout == csv
    assert result.exit_code == 0
    assert names_in(server.config.work_dir / "cereal-project") == ["cereal.csv"]


async def test_file_path_and_traceback_point_at_the_project(
    client: Client, server: RunningServer
) -> None:
    project = server.config.work_dir / "proj"
    assert (await upload(client, "proj", {"helper.py": text_file("X = 1\n")}))["type"] == "uploaded"
    script = (
        "import os, sys\n"
        "print(os.path.dirname(__file__))\n"
        "print(sys.path[0])\n"
        "print(os.getcwd(), os.environ['PWD'])\n"
        "raise ValueError('here')\n"
    )
    result = await client.run({"sourceScript": script, "directoryName": "proj"})
    real = os.path.realpath(project)
    assert result.stdout.splitlines() == [real, real, f"{real} {real}"]
    name = re.search(r'File "([^"]+)", line 5, in <module>', result.stderr)
    assert name is not None, result.stderr
    assert os.path.dirname(name.group(1)) == real
    assert SCRIPT_PATTERN.fullmatch(os.path.basename(name.group(1)))
    assert "raise ValueError('here')" in result.stderr  # the source line is shown
    assert result.exit_code == 1
    assert names_in(project) == ["helper.py"]


async def test_learners_own_main_py_is_never_touched(client: Client, server: RunningServer) -> None:
    files = {"main.py": text_file("print('learner main')\n")}
    assert (await upload(client, "proj", files))["type"] == "uploaded"
    script = "import os\nprint(open('main.py').read(), end='')\nprint(os.path.basename(__file__))"
    result = await client.run({"sourceScript": script, "directoryName": "proj"})
    first, second = result.stdout.splitlines()
    assert first == "print('learner main')"
    assert second != "main.py" and SCRIPT_PATTERN.fullmatch(second)
    project = server.config.work_dir / "proj"
    assert names_in(project) == ["main.py"]
    assert (project / "main.py").read_text() == "print('learner main')\n"


# Run by a program as the program account: it tampers with every run directory
# stocked for later runs, in one of three ways (argv[1]).
PLANT_IN_STOCKED_PLACES = """
import os, pathlib, sys, time
mine = pathlib.Path(os.environ["FURTHER_LINK_IO_SOCKET"]).parent
time.sleep(0.5)  # the places taken after this run's are stocked 50 ms after it took its own
planted = 0
for place in mine.parent.iterdir():
    if place == mine or not place.name.startswith("further-link-run-"):
        continue
    how = {HOW!r}
    if how == "replaced":
        (place / "main.py").unlink()
        (place / "main.py").write_text("print('planted')")
    elif how == "written":  # the same file, filled before the run writes from byte 0
        with open(place / "main.py", "r+") as script:
            script.write(" " * 4096 + "\\nprint('planted')\\n")
    else:  # a module beside the script, first on its import path
        (place / "random.py").write_text("print('planted')")
    planted += 1
print(planted)
"""


@pytest.mark.parametrize("how", ["replaced", "written", "module"])
async def test_a_program_cannot_plant_the_next_runs_script(
    how: str,
    start_server: ServerFactory,
    connect: ClientFactory,
    sandbox: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Run directories are made ahead, and programs run as the server's account:
    a program that changes a stocked one makes the run that takes it refuse."""
    # A temp dir of this test's own: the adversary must not reach other servers' runs.
    private_tmp = sandbox / "tmp"
    private_tmp.mkdir(mode=0o1777)
    private_tmp.chmod(0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))  # a server in this process
    server = await start_server(environ={"TMPDIR": str(private_tmp)})  # or in its own
    client = await connect(server)
    adversary = PLANT_IN_STOCKED_PLACES.replace("{HOW!r}", repr(how))
    result = await client.run({"sourceScript": adversary})
    assert result.exit_code == 0, result.stderr
    assert int(result.stdout) >= 1, "the adversary found no stocked run directory"
    outcomes = []
    for _ in range(3):  # past the planted places, to a fresh one
        await client.send("start", {"sourceScript": "import random\nprint('mine')"})
        reply = await client.receive()
        if reply["type"] == "error":
            outcomes.append(reply["data"]["message"])
            continue
        assert reply["type"] == "started", reply
        outcomes.append((await client.collect()).stdout)
    assert not any("planted" in outcome for outcome in outcomes), outcomes
    assert any("another program changed" in outcome for outcome in outcomes), outcomes
    assert outcomes[-1] == "mine\n", outcomes


async def test_two_runs_in_one_directory_at_once(
    connect: ClientFactory, server: RunningServer
) -> None:
    first, second = await connect(), await connect()
    assert (await upload(first, "shared-proj", {}))["type"] == "uploaded"
    script = "print(__file__)\nprint(input() + open(__file__).read().count('\\n').__str__())\n"
    for client in (first, second):
        await client.send("start", {"sourceScript": script, "directoryName": "shared-proj"})
        assert (await client.receive())["type"] == "started"
    paths = []
    for client in (first, second):
        message = await client.receive()
        assert message["type"] == "stdout"
        paths.append(message["data"]["output"].split("\n")[0])
    assert paths[0] != paths[1]
    project = server.config.work_dir / "shared-proj"
    assert sorted(os.path.basename(p) for p in paths) == names_in(project)
    for client in (first, second):
        await client.send("stdin", {"input": "lines:"})
        await client.send("stdin", {"input": "\n"})
    for client in (first, second):
        result = await client.collect()
        assert result.stdout.endswith("lines:2\n")
        assert result.exit_code == 0
    assert names_in(project) == []


async def start_sleeping_in_project(client: Client, server: RunningServer) -> Path:
    """Start a program that sleeps in project 'p'; return the project, holding its script."""
    await client.send(
        "start", {"sourceScript": "import time\nprint('up')\ntime.sleep(60)", "directoryName": "p"}
    )
    assert (await client.receive())["type"] == "started"
    await client.read_output("up\n")
    project = server.config.work_dir / "p"
    assert len(names_in(project)) == 1
    return project


async def test_stopped_run_leaves_nothing_in_the_project(
    client: Client, server: RunningServer
) -> None:
    project = await start_sleeping_in_project(client, server)
    await client.send("stop")
    assert (await client.receive_type("stopped"))["type"] == "stopped"
    assert names_in(project) == []


async def test_closed_connection_leaves_nothing_in_the_project(
    connect: ClientFactory, server: RunningServer
) -> None:
    client = await connect()
    project = await start_sleeping_in_project(client, server)
    await client.ws.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while names_in(project) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    assert names_in(project) == []


async def test_scripts_left_by_a_crash_are_removed_at_start_up(
    start_server: ServerFactory, sandbox: Path
) -> None:
    work = program_home(sandbox) / "work"
    nested = work / "a" / "b"
    nested.mkdir(parents=True)
    outside = sandbox / "outside"
    outside.mkdir()
    stale = [work / ".further-link-run-0123abcd.py", nested / ".further-link-run-deadbeef.py"]
    kept = [
        work / "main.py",
        work / ".further-link-run-0123abc.py",  # not our exact pattern
        work / ".further-link-run-0123abcd.py.bak",
        nested / "further-link-run-deadbeef.py",
        outside / ".further-link-run-feedf00d.py",
    ]
    for path in stale + kept:
        path.write_text("x")
    # Links are never followed and never taken for our files.
    (work / "linked").symlink_to(outside)
    (work / ".further-link-run-00000000.py").symlink_to(outside / ".further-link-run-feedf00d.py")
    cache_copy = work / ".flcache" / "bucket" / ".further-link-run-11111111.py"
    cache_copy.parent.mkdir(parents=True)
    cache_copy.write_text("a download, not ours")
    give_to_program_user(work)
    await start_server()
    assert [path for path in stale if path.exists()] == []
    assert [path for path in kept if not path.exists()] == []
    assert (work / ".further-link-run-00000000.py").is_symlink()
    assert cache_copy.exists()


# ------------------------------------------------ missing directoryName


async def test_missing_directory_name_is_created(client: Client, server: RunningServer) -> None:
    """The 2020 suite: `datetime` printed from a newly created `my-dirname`."""
    script = "from datetime import datetime\nprint(datetime.now())"
    result = await client.run({"sourceScript": script, "directoryName": "my-dirname"})
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+\n", result.stdout), result.stdout
    assert result.exit_code == 0
    created = server.config.work_dir / "my-dirname"
    assert created.is_dir() and names_in(created) == []
    run_as = server.config.run_as
    assert run_as is not None
    assert created.stat().st_uid == run_as.uid


async def test_missing_nested_directory_is_created_and_writable(
    client: Client, server: RunningServer
) -> None:
    script = "open('made-here.txt', 'w').write('ok')\nimport os\nprint(os.getcwd())"
    result = await client.run({"sourceScript": script, "directoryName": "course/lesson-1"})
    created = server.config.work_dir / "course" / "lesson-1"
    assert result.stdout == f"{os.path.realpath(created)}\n", result.stderr
    assert (created / "made-here.txt").read_text() == "ok"
    run_as = server.config.run_as
    assert run_as is not None
    assert (server.config.work_dir / "course").stat().st_uid == run_as.uid


async def test_directory_name_through_a_file_is_refused(
    client: Client, server: RunningServer
) -> None:
    work = server.config.work_dir
    (work / "notes.txt").write_text("n")
    await client.send("start", {"sourceScript": "print(1)", "directoryName": "notes.txt/sub"})
    message = await client.receive()
    assert message["data"] == {
        "message": "directoryName 'notes.txt/sub' cannot be created: 'notes.txt' is a regular "
        "file in the work dir, not a directory"
    }
    assert (work / "notes.txt").read_text() == "n"


async def test_reserved_directory_names_are_refused(client: Client, server: RunningServer) -> None:
    for name in (".flcache", ".flcache/bucket", "proj/.flupload-x"):
        await client.send("start", {"sourceScript": "print(1)", "directoryName": name})
        assert await client.receive() == {
            "type": "error",
            "data": {"message": f"directoryName {name!r} is reserved by further-link"},
        }
    assert not (server.config.work_dir / "proj").exists()


# ------------------------------------------------ input racing the end


async def test_input_racing_the_end_is_dropped_silently(client: Client) -> None:
    """The 2020 suite: exactly stdout, then stopped, when input crosses the program's end."""
    for _ in range(25):
        await client.send("start", {"sourceScript": 'print("hello world")'})
        await client.send("stdin", {"input": "unterminated input"})
        started = await client.receive()
        assert started == {"type": "started", "data": {"runId": started["data"]["runId"]}}
        result = await client.collect()
        assert [m["type"] for m in result.messages[:-1]] == ["stdout"] * (len(result.messages) - 1)
        assert result.stdout == "hello world\n"
        assert result.exit_code == 0
        # Nothing follows `stopped` either: the next answer is the pong.
        await client.send("ping")
        assert await client.receive() == {"type": "pong", "data": {}}


async def test_input_with_no_program_at_all_is_an_error(client: Client) -> None:
    await client.send("stdin", {"input": "x\n"})
    assert await client.receive() == {
        "type": "error",
        "data": {"message": "no program is running to read this input"},
    }


# ------------------------------------------------ upload without files


async def test_upload_without_files_names_the_field(client: Client, server: RunningServer) -> None:
    await client.send("upload", {"directory": {"name": "x"}})
    message = await client.receive()
    assert message["type"] == "error"
    assert "data.directory.files" in message["data"]["message"]
    assert not (server.config.work_dir / "x").exists()
    reply = await upload(client, "x", {})
    assert reply["type"] == "uploaded" and isinstance(reply["data"]["version"], str)
    assert (server.config.work_dir / "x").is_dir()


# ------------------------------------------------ which interpreter


async def test_further_venv_chooses_the_virtualenv_python(
    start_server: ServerFactory, connect: ClientFactory, sandbox: Path
) -> None:
    venv = sandbox / "venv"
    subprocess.run(
        ["/usr/bin/python3", "-m", "venv", "--without-pip", "--system-site-packages", str(venv)],
        check=True,
        timeout=120,
    )
    server = await start_server(environ={"FURTHER_VENV": str(venv)})
    assert server.config.python == str(venv / "bin" / "python3")
    client = await connect(server)
    script = "import sys, further_link\nprint(sys.prefix)"
    result = await client.run({"sourceScript": script})
    assert result.stdout == f"{venv}\n", result.stderr


async def test_missing_interpreter_refuses_to_start(start_server: ServerFactory) -> None:
    # In-process the refusal is raised; a server process started as root logs it and exits.
    with pytest.raises((ConfigError, AssertionError)) as refused:
        await start_server(environ={"FURTHER_LINK_PYTHON": "/nonexistent/python3"})
    assert "programs would run with /nonexistent/python3" in str(refused.value)
    assert "No such file or directory" in str(refused.value)


# ------------------------------------------------ silent clients


async def test_silent_client_loses_its_program_within_10_s(
    server: RunningServer, connect: ClientFactory, shared: Path
) -> None:
    """Wi-Fi drops: the client neither answers pings nor sends anything any more."""
    assert server.config.heartbeat == 5.0
    client = await connect(autoping=False)
    marker = shared / "pid"
    await client.send("start", {"sourceScript": sleeper_script(marker, 120)})
    last_sent = time.monotonic()
    assert (await client.receive())["type"] == "started"
    await client.read_output("up\n")
    pid = int(marker.read_text())
    deadline = last_sent + 60
    while alive(pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    gone_after = time.monotonic() - last_sent
    print(f"\nsilent client: program gone {gone_after:.2f} s after the client's last message")
    assert not alive(pid)
    # Pinged after 5 s of silence, dropped 2.5 s later; slack for a busy machine.
    assert 5.0 <= gone_after <= 10.0 + 5.0


# ------------------------------------------------ message size limit


def message_of(size: int) -> str:
    """A ping of exactly ``size`` bytes of UTF-8."""
    bare = json.dumps({"type": "ping", "data": {"padding": ""}})
    padding = "é" * ((size - len(bare)) // 2) + "x" * ((size - len(bare)) % 2)
    text = json.dumps({"type": "ping", "data": {"padding": padding}}, ensure_ascii=False)
    assert len(text.encode("utf-8")) == size
    return text


@pytest.mark.parametrize("compress", [15, 0], ids=["permessage-deflate", "uncompressed"])
async def test_the_size_limit_is_the_same_compressed_or_not(
    start_server: ServerFactory, connect: ClientFactory, compress: int
) -> None:
    limit = 4096
    server = await start_server(environ={"FURTHER_LINK_MAX_MESSAGE_BYTES": str(limit)})
    client = await connect(server, compress=compress)
    assert client.ws.compress == compress  # what was negotiated
    await client.ws.send_str(message_of(limit - 1))
    assert await client.receive() == {"type": "pong", "data": {}}
    await client.ws.send_str(message_of(limit))
    closed = await client.ws.receive(timeout=30)
    assert (closed.type, closed.data) == (aiohttp.WSMsgType.CLOSE, 1009), closed
    assert closed.extra == (
        f"message over the limit of {limit} bytes (FURTHER_LINK_MAX_MESSAGE_BYTES)"
    )


def masked_text_frame(text: str) -> bytes:
    """One client-to-server text frame (clients must mask)."""
    payload = text.encode("utf-8")
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


async def test_client_reading_a_flood_is_kept_though_its_pongs_are_late(
    server: RunningServer, shared: Path
) -> None:
    """A client that reads output slowly and never answers a ping is alive, not gone.

    This raw client never sends a pong (as one whose pongs wait behind a flood
    on slow Wi-Fi): only its reading the output shows it is there.
    """
    reader, writer = await open_raw_websocket(server)
    marker = shared / "pid"
    flood = write_pid_code(marker) + "while True:\n    print('x' * 999)\n"
    start = json.dumps({"type": "start", "data": {"sourcePath": str(shared / "flood.py")}})
    (shared / "flood.py").write_text(flood)
    try:
        writer.write(masked_text_frame(start))
        await writer.drain()
        read = 0
        began = time.monotonic()
        # Three heartbeat rounds (ping after 5 s, pong due 2.5 s later), read at ~1 MB/s.
        while time.monotonic() - began < 3 * 7.5:
            chunk = await asyncio.wait_for(reader.read(64 * 1024), 30)
            assert chunk, "the server closed the connection of a client that was reading"
            read += len(chunk)
            await asyncio.sleep(0.05)
        assert alive(int(marker.read_text()))
        assert read > 1_000_000
    finally:
        writer.close()
