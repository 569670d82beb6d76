"""A run ends completely: the program, its children, and whatever escaped.

Programs here fork on purpose: children that call ``setsid``, double-forked
daemons the server adopts as child subreaper, processes that ignore SIGTERM
or hold stdout open. Each test checks the outcome in /proc: nothing of the
run is alive, and nothing is left as a zombie of the server (this process).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Callable

import aiohttp
import pytest
from test_cli import ServerProcess

from further_link.files.upload import UrlCache
from further_link.protocol.runpy import parse_command
from further_link.runs import proctree
from further_link.runs.launch import prepare_library_dir
from further_link.runs.services import Services
from further_link.runs.session import Session
from further_link.server.outbox import Outbox

from conftest import (
    PROGRAM_SETTINGS,
    SERVER_PIDS,
    TIMEOUT,
    Client,
    RunningServer,
    make_config,
    program_home,
    sleeper_script,
)

ClientFactory = Callable[..., Awaitable[Client]]
StartServer = Callable[..., Awaitable[RunningServer]]

# Functions every test program starts with; `MARKERS` is the shared dir where
# each process notes its pid under a name the test waits for.
PROGRAM_PREAMBLE = """\
import os, signal, sys, time

def note(name):
    path = os.path.join(MARKERS, name)
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(path + ".tmp", path)

def wait_for(*names):
    for _ in range(600):
        if all(os.path.exists(os.path.join(MARKERS, n)) for n in names):
            return
        time.sleep(0.05)
    sys.exit("markers never appeared")

def sleeper(name, ignore_term=False, seconds=60):
    if ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    note(name)
    time.sleep(seconds)
    os._exit(0)

def setsid_grandchild(name, **how):
    # A child that stays, whose own child leaves the session.
    if os.fork() == 0:
        if os.fork() == 0:
            os.setsid()
            sleeper(name, **how)
        time.sleep(60)
        os._exit(0)

def daemon(name, setsid=False, **how):
    # The classic double fork: the middle exits, the grandchild is orphaned.
    middle = os.fork()
    if middle == 0:
        if setsid:
            os.setsid()
        if os.fork() == 0:
            sleeper(name, **how)
        os._exit(0)
    os.waitpid(middle, 0)
"""


# A program with descendants that escaped its session: one by setsid below a
# child, one double-forked that also ignores SIGTERM. Markers: ESCAPERS.
ESCAPING_BODY = """
    setsid_grandchild("setsid")
    daemon("stubborn", setsid=True, ignore_term=True)
    wait_for("setsid", "stubborn")
    note("program")
    print("ready")
    time.sleep(60)
"""
ESCAPERS = ("program", "setsid", "stubborn")


def program(markers: Path, body: str) -> str:
    """A test program: the preamble's helpers, then ``body``."""
    return f"MARKERS = {str(markers)!r}\n{PROGRAM_PREAMBLE}\n{textwrap.dedent(body)}"


async def marked_pids(markers: Path, *names: str) -> list[int]:
    """The pids noted under ``names``, once all have been written."""
    paths = [markers / name for name in names]
    for _ in range(int(TIMEOUT / 0.05)):
        if all(path.exists() for path in paths):
            break
        await asyncio.sleep(0.05)
    return [int(path.read_text()) for path in paths]


def left_behind(pid: int) -> bool:
    """Still running, or dead but not reaped by the server that adopted it."""
    info = proctree.read_proc_info(pid)
    if info is None:
        return False
    return not info.zombie or info.ppid in SERVER_PIDS


def adopted(pid: int) -> bool:
    """Whether ``pid`` is now a child of the server, as orphans of a run must be."""
    info = proctree.read_proc_info(pid)
    return info is not None and info.ppid in SERVER_PIDS


async def all_gone(pids: list[int]) -> bool:
    """Whether every pid ends up gone and reaped, waiting for it within TIMEOUT."""
    for _ in range(int(TIMEOUT / 0.05)):
        if not any(left_behind(pid) for pid in pids):
            return True
        await asyncio.sleep(0.05)
    return False


async def start_program(client: Client, script: str) -> None:
    await client.send("start", {"sourceScript": script})
    assert (await client.receive())["type"] == "started"


async def still_usable(client: Client) -> None:
    result = await client.run({"sourceScript": "print('fine')"})
    assert (result.stdout, result.exit_code) == ("fine\n", 0)


# ------------------------------------------------------------------ stop


async def test_stop_kills_a_program_ignoring_sigint_and_sigterm_after_two_grace_periods(
    client: Client, server: RunningServer
) -> None:
    script = (
        "import signal, time\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('up')\n"
    )
    await start_program(client, script + "time.sleep(60)\n")
    await client.read_output("up\n")
    began = time.monotonic()
    await client.send("stop")
    stopped = await client.receive_type("stopped")
    waited = time.monotonic() - began
    # Stopped by the user, as clients understand it; SIGKILL did it in the end.
    assert stopped["data"] == {"exitCode": -15, "signal": 9}
    grace = server.config.kill_grace
    assert 2 * grace <= waited < 2 * grace + TIMEOUT


async def test_stop_ends_setsid_and_double_forked_grandchildren(
    client: Client, shared: Path
) -> None:
    body = """
        setsid_grandchild("setsid")
        daemon("daemon")
        daemon("stubborn", setsid=True, ignore_term=True)
        wait_for("setsid", "daemon", "stubborn")
        print("ready")
        time.sleep(60)
    """
    await start_program(client, program(shared, body))
    await client.read_output("ready\n")
    setsid, *daemons = pids = await marked_pids(shared, "setsid", "daemon", "stubborn")
    assert proctree.read_proc_info(setsid) is not None
    assert all(adopted(pid) for pid in daemons)
    await client.send("stop")
    stopped = await client.receive_type("stopped")
    assert stopped["data"]["exitCode"] == -15
    assert not any(left_behind(pid) for pid in pids)
    await still_usable(client)


async def test_grandchildren_end_when_the_program_exits_by_itself(
    client: Client, shared: Path
) -> None:
    body = """
        setsid_grandchild("setsid")
        daemon("daemon", setsid=True)
        daemon("stubborn", ignore_term=True)
        wait_for("setsid", "daemon", "stubborn")
        print("leaving")
    """
    result = await client.run({"sourceScript": program(shared, body)})
    assert (result.stdout, result.exit_code) == ("leaving\n", 0)
    pids = await marked_pids(shared, "setsid", "daemon", "stubborn")
    assert not any(left_behind(pid) for pid in pids)


async def test_fifty_children_end_on_stop(client: Client, shared: Path) -> None:
    body = """
        children = []
        for n in range(50):
            pid = os.fork()
            if pid == 0:
                if n % 2:
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)
                time.sleep(60)
                os._exit(0)
            children.append(pid)
        with open(os.path.join(MARKERS, "children"), "w") as f:
            f.write(" ".join(map(str, children)))
        note("parent")
        print("forked")
        time.sleep(60)
    """
    await start_program(client, program(shared, body))
    await client.read_output("forked\n")
    (parent,) = await marked_pids(shared, "parent")
    children = [int(pid) for pid in (shared / "children").read_text().split()]
    assert len(children) == 50
    await client.send("stop")
    assert (await client.receive_type("stopped"))["data"]["exitCode"] == -15
    assert not any(left_behind(pid) for pid in [parent, *children])
    await still_usable(client)


async def test_program_forking_while_it_is_stopped_leaves_nothing(
    client: Client, shared: Path
) -> None:
    body = """
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("forking")
        for n in range(300):
            if os.fork() == 0:
                with open(os.path.join(MARKERS, "forks"), "a") as f:
                    f.write(f"{os.getpid()}\\n")
                time.sleep(60)
                os._exit(0)
            time.sleep(0.01)
        time.sleep(60)
    """
    await start_program(client, program(shared, body))
    await client.read_output("forking\n")
    await asyncio.sleep(0.5)
    await client.send("stop")
    assert (await client.receive_type("stopped"))["data"] == {"exitCode": -15, "signal": 9}
    forks = [int(pid) for pid in (shared / "forks").read_text().split()]
    assert forks
    assert not any(left_behind(pid) for pid in forks)
    await still_usable(client)


# ------------------------------------------------------------ output ends


async def test_program_closing_stdout_and_stderr_early_still_reports_its_exit(
    client: Client,
) -> None:
    script = "import os, sys\nprint('bye')\nos.close(1)\nos.close(2)\nsys.exit(len(input()))\n"
    await start_program(client, script)
    await client.read_output("bye\n")
    await client.send("stdin", {"input": "hello\n"})
    result = await client.collect()
    assert (result.stdout, result.stderr, result.exit_code) == ("", "", 5)
    await still_usable(client)


async def test_program_with_closed_stdout_can_be_stopped(client: Client) -> None:
    await start_program(client, "import os, time\nos.close(1)\nos.close(2)\ntime.sleep(60)\n")
    await client.send("stop")
    assert (await client.receive_type("stopped"))["data"]["exitCode"] == -15
    await still_usable(client)


async def test_daemon_holding_stdout_does_not_hold_up_stopped(
    client: Client, server: RunningServer, shared: Path, caplog: pytest.LogCaptureFixture
) -> None:
    body = """
        daemon("holder", setsid=True, ignore_term=True)
        wait_for("holder")
        print("parent done")
    """
    caplog.set_level(logging.WARNING, logger="further_link.runs.process")
    result = await client.run({"sourceScript": program(shared, body)})
    assert (result.stdout, result.exit_code) == ("parent done\n", 0)
    (holder,) = await marked_pids(shared, "holder")
    assert not left_behind(holder)
    # The pipes ended because the holder was killed, not by the drain timeout.
    assert "still open" not in caplog.text + server.log()


async def test_orphans_dying_while_the_program_runs_are_reaped(
    client: Client, shared: Path
) -> None:
    body = """
        daemon("brief", seconds=0)
        daemon("brief-setsid", setsid=True, seconds=2.5)
        wait_for("brief", "brief-setsid")
        print("ready")
        time.sleep(60)
    """
    await start_program(client, program(shared, body))
    await client.read_output("ready\n")
    pids = await marked_pids(shared, "brief", "brief-setsid")
    assert await all_gone(pids)
    await client.send("stop")
    assert (await client.receive_type("stopped"))["data"]["exitCode"] == -15


async def test_invalid_utf8_from_a_dying_tree_does_not_break_the_server(
    client: Client, shared: Path
) -> None:
    body = """
        for n in range(5):
            if os.fork() == 0:
                os.write(1, b"\\xff\\xfe" * 1000 + b"\\xe2\\x82")
                os._exit(0)
            os.wait()
        os.write(2, b"\\xc3")
        os.close(1)
        note("written")
        time.sleep(60)
    """
    await start_program(client, program(shared, body))
    await marked_pids(shared, "written")
    await client.send("stop")
    result = await client.collect()
    assert result.exit_code == -15
    assert result.stdout and set(result.stdout) == {"\ufffd"}
    # The lone byte, then Python's report of the stop (KeyboardInterrupt).
    assert result.stderr.split("Traceback")[0] == "\ufffd"
    await still_usable(client)


# ----------------------------------------------------------- connections


async def test_closing_the_socket_ends_the_whole_tree(connect: ClientFactory, shared: Path) -> None:
    client = await connect()
    await start_program(client, program(shared, ESCAPING_BODY))
    await client.read_output("ready\n")
    pids = await marked_pids(shared, *ESCAPERS)
    assert adopted(pids[2])
    await client.ws.close()
    assert await all_gone(pids)


async def test_client_that_stops_answering_pings_loses_its_program(
    start_server: StartServer, connect: ClientFactory, shared: Path
) -> None:
    server = await start_server(environ={"FURTHER_LINK_HEARTBEAT": "0.5"})
    assert server.config.heartbeat == 0.5
    silent = await connect(server, autoping=False)
    await silent.send("start", {"sourceScript": program(shared, ESCAPING_BODY)})
    pids = await marked_pids(shared, *ESCAPERS)
    assert adopted(pids[2])
    closed = {aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR}
    for _ in range(100):
        if (await silent.ws.receive(timeout=TIMEOUT)).type in closed:
            break
    assert silent.ws.closed
    assert await all_gone(pids)


async def test_program_starting_while_the_session_closes_is_ended(
    sandbox: Path, shared: Path
) -> None:
    """Server shutdown closes every session, possibly while one is mid-start;
    the connection handler's own close then ends what that start made."""
    config = make_config(sandbox)
    library_dir = prepare_library_dir()
    start = {"type": "start", "data": {"sourceScript": sleeper_script(shared / "pid")}}
    try:
        async with aiohttp.ClientSession() as http:
            services = Services(config, UrlCache(config.cache_dir, http, 1), library_dir)
            session = Session(services, Outbox(1024))
            starting = asyncio.ensure_future(session.handle(parse_command(json.dumps(start))))
            await asyncio.sleep(0)  # the start is under way, its program not yet spawned
            await session.close()  # the server's shutdown
            await starting
            await session.close()  # the connection handler's
    finally:
        shutil.rmtree(library_dir)
    alive = await asyncio.get_running_loop().run_in_executor(None, programs_using, library_dir)
    proctree.signal_processes(alive, signal.SIGKILL)  # not to outlive a failure
    assert not alive


def programs_using(library_dir: Path) -> list[int]:
    """Live processes whose import path holds ``library_dir``: the runs of one server."""
    marker = str(library_dir).encode()
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        ours = any(var.startswith(b"PYTHONPATH=") and marker in var for var in environ)
        info = proctree.read_proc_info(int(name)) if ours else None
        if info is not None and not info.zombie:
            found.append(info.pid)
    return found


# ------------------------------------------------------------- the server


@pytest.fixture
def served(sandbox: Path) -> Iterator[ServerProcess]:
    """`python -m further_link` on a free loopback port, as test_cli's `spawned`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FURTHER_LINK_")}
    env.update(PROGRAM_SETTINGS)
    env.update(
        XDG_CONFIG_HOME=str(sandbox / "config"),
        FURTHER_LINK_PORT="0",
        FURTHER_LINK_WORK_DIR=str(program_home(sandbox) / "w"),
        FURTHER_LINK_NOSSL="1",
    )
    server = ServerProcess(["--host", "127.0.0.1"], env)
    yield server
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait()


def run_url(server: ServerProcess, sandbox: Path) -> str:
    """The server's /run-py URL, with its device token."""
    token = (sandbox / "config" / "further-link" / "token").read_text().strip()
    return f"http://127.0.0.1:{server.port}/run-py?token={token}"


async def test_server_sigterm_ends_setsid_grandchildren(
    served: ServerProcess, sandbox: Path, shared: Path
) -> None:
    start = {"type": "start", "data": {"sourceScript": program(shared, ESCAPING_BODY)}}
    async with aiohttp.ClientSession() as http, http.ws_connect(run_url(served, sandbox)) as ws:
        await ws.send_str(json.dumps(start))
        pids = await marked_pids(shared, *ESCAPERS)
        assert all(proctree.read_proc_info(pid) is not None for pid in pids)
        code = await asyncio.get_running_loop().run_in_executor(None, served.stop)
    assert code == 0
    # The server has exited, so whatever it left unreaped now has another
    # parent: only "not running" can be checked here.
    assert await all_not_running(pids)


async def all_not_running(pids: list[int]) -> bool:
    for _ in range(int(TIMEOUT / 0.05)):
        infos = [proctree.read_proc_info(pid) for pid in pids]
        if all(info is None or info.zombie for info in infos):
            return True
        await asyncio.sleep(0.05)
    return False


# ----------------------------------------------------------- proctree unit


def test_server_can_become_a_child_subreaper() -> None:
    assert proctree.become_subreaper() is (sys.platform.startswith("linux"))


def test_reaping_orphans_leaves_other_children_of_the_server_alone() -> None:
    """Zombies of the run's program, of another run's program and of the server
    itself are not the run's orphans: their owners wait for them."""
    program = subprocess.Popen(["sleep", "0"], start_new_session=True)
    other_program = subprocess.Popen(["sleep", "0"], start_new_session=True)
    helper = subprocess.Popen(["sleep", "0"])
    children = [program, other_program, helper]
    for child in children:  # as spawn() and the /device probe register theirs
        proctree.MANAGED_CHILDREN.add(child.pid)
    for _ in range(int(TIMEOUT / 0.01)):
        infos = [proctree.read_proc_info(child.pid) for child in children]
        if all(info is not None and info.zombie for info in infos):
            break
        time.sleep(0.01)
    tree = proctree.RunTree(program.pid, "a-tag")
    assert tree.reap_orphans() == 0
    assert [child.wait(timeout=TIMEOUT) for child in children] == [0, 0, 0]


async def test_setsid_children_exiting_at_once_leave_no_zombies(client: Client) -> None:
    """They die before any scan can see them alive; still they must be reaped."""
    script = (
        "import os, subprocess, time\n"
        "for i in range(100):\n"
        "    if os.fork() == 0:\n"
        "        os.setsid()\n"
        "        os._exit(0)\n"
        "for i in range(5):\n"
        "    subprocess.Popen(['true'], start_new_session=True)\n"
        "time.sleep(0.5)\n"
    )
    result = await client.run({"sourceScript": script})
    assert result.exit_code == 0, result.stderr
    zombies: list[int] = []
    for _ in range(int(TIMEOUT / 0.1)):
        zombies = [
            pid
            for pid in proctree.server_children()
            if (info := proctree.read_proc_info(pid)) is not None and info.zombie
        ]
        if not zombies:
            break
        await asyncio.sleep(0.1)
    assert zombies == []


def test_sigterm_to_a_tree_that_is_gone_signals_nobody() -> None:
    child = subprocess.Popen(["true"])
    child.wait(timeout=TIMEOUT)
    tree = proctree.RunTree(child.pid, "no-such-tag")
    assert tree.signal(signal.SIGTERM) == set()
