"""Each run in its own cgroup: escapees end, limits hold with words, runs stay apart.

The adversaries here are real programs: they leave their session, process
group and environment, fork until the task limit, allocate until the memory
limit, connect to another run's side channel, and read waiting interpreters.
Cgroups need root on this machine (and delegation on others): tests of what
only a cgroup gives skip, saying so, when the server runs best-effort. The
best-effort path is tested by forcing it (FURTHER_LINK_CONTAINMENT).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Awaitable
from pathlib import Path
from typing import Callable

import aiohttp
import pytest
from test_pool_fidelity import pool_of
from test_process_tree import all_gone, left_behind, marked_pids, program, start_program

from further_link.runs import containment
from further_link.runs.containment import CGROUP, detect
from further_link.runs.services import Services
from further_link.server.app import SERVICES

from conftest import AS_ROOT, POOL_SIZE, TIMEOUT, Client, RunningServer

ClientFactory = Callable[..., Awaitable[Client]]
StartServer = Callable[..., Awaitable[RunningServer]]

BEST_EFFORT = {"FURTHER_LINK_CONTAINMENT": "best-effort"}


async def containment_mode(server: RunningServer) -> str:
    """What the server says is in force, in ``GET /device``."""
    headers = {"Authorization": f"Bearer {server.token}"}
    async with aiohttp.ClientSession() as http:
        response = await http.get(f"{server.base_url}/device", headers=headers)
        assert response.status == 200
        mode: str = (await response.json())["containment"]
    return mode


async def require_cgroup(server: RunningServer) -> None:
    if await containment_mode(server) != CGROUP:
        pytest.skip("no cgroup can be made here (needs root or a delegated cgroup)")


def waiting_interpreters(server: RunningServer) -> list[int]:
    """Pids of the server's waiting warm interpreters."""
    if server.runner is not None:  # in-process
        services: Services = server.runner.app[SERVICES]
        assert services.pool is not None
        return services.pool.waiting_pids()
    # A separate server process: each waits in the run cgroup it will run in,
    # beside the server's own (prepare_delegation); no program runs yet.
    with open(f"/proc/{server.pid}/cgroup") as own, open("/proc/self/mountinfo") as mounts:
        layout = detect(mounts.read(), own.read())
    assert layout.unified is not None
    pids: list[int] = []
    for procs in layout.unified.parent.glob("run-*/cgroup.procs"):
        pids += [int(pid) for pid in procs.read_text().split()]
    return pids


async def two_waiting(server: RunningServer) -> list[int]:
    """Pids of the waiting interpreters once at least two wait (within TIMEOUT)."""
    waiting: list[int] = []
    for _ in range(int(TIMEOUT / 0.05)):
        waiting = waiting_interpreters(server)
        if len(waiting) >= 2:
            break
        await asyncio.sleep(0.05)
    assert len(waiting) >= 2
    return waiting


def escapee(marker: Path, keep_stdout: bool = False) -> str:
    """A shell line that leaves session, group and environment, noting its pid."""
    redirect = "" if keep_stdout else " >/dev/null 2>&1 </dev/null"
    inner = f"echo $$ > {marker}.tmp && mv {marker}.tmp {marker} && exec sleep 300"
    return f"setsid env -i /bin/sh -c '{inner}'{redirect} &"


ESCAPING = """
    import subprocess
    os.system({setsid!r})
    subprocess.Popen(["nohup", "/bin/sh", "-c", {nohup!r}],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if os.fork() == 0:          # daemon(): fork, setsid, fork, close everything
        os.setsid()
        if os.fork() == 0:
            os.closerange(0, 1024)
            note("daemon")
            time.sleep(300)
        os._exit(0)
    wait_for("setsid", "nohup", "daemon")
    print("escaped")
    time.sleep(300)
"""


def escaping_program(shared: Path) -> str:
    nohup = (
        f"echo $$ > {shared}/nohup.tmp && mv {shared}/nohup.tmp {shared}/nohup && exec sleep 300"
    )
    body = ESCAPING.format(setsid=escapee(shared / "setsid"), nohup=nohup)
    return program(shared, body)


@pytest.mark.parametrize("ending", ["stop", "disconnect", "shutdown"])
async def test_escapees_end_with_the_run(
    start_server: StartServer, connect: ClientFactory, shared: Path, ending: str
) -> None:
    server = await start_server()
    await require_cgroup(server)
    client = await connect(server)
    await start_program(client, escaping_program(shared))
    await client.read_output("escaped\n")
    pids = await marked_pids(shared, "setsid", "nohup", "daemon")
    assert not any(map(left_behind_dead, pids))  # all alive before
    if ending == "stop":
        await client.send("stop")
        stopped = await client.receive_type("stopped")
        assert stopped["data"]["exitCode"] == -15
    elif ending == "disconnect":
        await client.ws.close()
    else:
        await server.stop()
    assert await all_gone(pids), [p for p in pids if left_behind(p)]


def left_behind_dead(pid: int) -> bool:
    """Already gone (the opposite of ``left_behind`` for a process that should run)."""
    return not left_behind(pid)


@pytest.mark.parametrize("settings", [{}, BEST_EFFORT], ids=["cgroup", "best-effort"])
async def test_an_escapee_holding_stdout_does_not_leave_the_session_stopping(
    start_server: StartServer, connect: ClientFactory, shared: Path, settings: dict[str, str]
) -> None:
    server = await start_server(environ=settings)
    client = await connect(server)
    marker = shared / "holder"
    script = (
        f"import os, time\nos.system({escapee(marker, keep_stdout=True)!r})\n"
        f"for _ in range(600):\n    if os.path.exists({str(marker)!r}):\n        break\n"
        "    time.sleep(0.05)\nprint('left')\n"
    )
    try:
        result = await client.run({"sourceScript": script})
        assert result.stdout == "left\n"
        assert result.exit_code == 0
        # The connection is usable at once: no "still stopping".
        again = await client.run({"sourceScript": "print('again')"})
        assert (again.stdout, again.exit_code, again.errors) == ("again\n", 0, [])
        if settings == {} and await containment_mode(server) == CGROUP:
            (pid,) = await marked_pids(shared, "holder")
            assert await all_gone([pid])
    finally:
        if marker.exists():  # best-effort cannot find it: the test cleans up
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(marker.read_text()), signal.SIGKILL)


FORK_BOMB = (
    "import os\nprint('ready', flush=True)\n"
    "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
)
MEMORY_HOG = "print('ready')\nx = []\nwhile True:\n    x.append(' ' * 10**6)\n"


@pytest.mark.parametrize(
    ("setting", "script", "why"),
    [
        (("FURTHER_LINK_MAX_TASKS", "24"), FORK_BOMB, "it started more than 24 processes"),
        (("FURTHER_LINK_MAX_MEMORY", "64M"), MEMORY_HOG, "it used more than 64 MiB of memory"),
    ],
    ids=["fork-bomb", "memory-hog"],
)
async def test_a_run_over_a_limit_is_stopped_with_words_while_others_run(
    start_server: StartServer,
    connect: ClientFactory,
    setting: tuple[str, str],
    script: str,
    why: str,
) -> None:
    server = await start_server(environ=dict([setting]))
    await require_cgroup(server)
    greedy, other = await connect(server), await connect(server)
    await start_program(greedy, script)
    await greedy.read_output("ready\n")
    hi = await other.run({"sourceScript": "print('hi')"})
    assert (hi.stdout, hi.exit_code) == ("hi\n", 0)
    result = await greedy.collect()
    assert result.stderr.endswith(f"further-link: the program was stopped because {why}\n")
    # The exit code stays the signal's.
    assert result.exit_code == -9
    assert result.messages[-1]["data"]["signal"] == 9


@pytest.mark.parametrize("settings", [{}, BEST_EFFORT], ids=["cgroup", "best-effort"])
async def test_stop_lets_finally_and_atexit_run(
    start_server: StartServer, connect: ClientFactory, shared: Path, settings: dict[str, str]
) -> None:
    client = await connect(await start_server(environ=settings))
    script = textwrap.dedent(
        f"""
        import atexit, time
        atexit.register(lambda: open({str(shared / "atexit")!r}, "w").write("done"))
        try:
            print("running")
            time.sleep(300)
        finally:
            open({str(shared / "finally")!r}, "w").write("done")
        """
    )
    await start_program(client, script)
    await client.read_output("running\n")
    await client.send("stop")
    result = await client.collect()
    assert result.exit_code == -15
    assert result.messages[-1]["data"]["signal"] == signal.SIGINT
    assert (shared / "finally").read_text() == "done"
    assert (shared / "atexit").read_text() == "done"


SOCKET_THIEF = """
import socket, struct, sys
path = sys.argv[1] if len(sys.argv) > 1 else {path!r}
jpeg = bytes.fromhex("ffd8ffe000104a46494600010100000100010000ffd9")
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    sock.connect(path)
    sock.sendall(struct.pack("!cI", b"J", len(jpeg)) + jpeg)
    sock.settimeout(10)
    print("ack" if sock.recv(1) == b"\\x06" else "refused")
except OSError as error:
    print("refused", type(error).__name__)
"""


async def test_another_run_cannot_inject_frames_into_a_runs_side_channel(
    start_server: StartServer, connect: ClientFactory
) -> None:
    server = await start_server()
    await require_cgroup(server)
    victim, thief = await connect(server), await connect(server)
    victim_script = (
        "import os, sys, time\nprint(os.environ['FURTHER_LINK_IO_SOCKET'])\n"
        "sys.stdin.readline()\n"
        "from further_link import send_image\n"
        "send_image(bytes.fromhex('ffd8ffe000104a46494600010100000100010000ffd9'))\n"
        "print('sent')\n"
    )
    await start_program(victim, victim_script)
    printed = ""
    while not printed.endswith("\n"):  # one print may arrive in pieces
        printed += (await victim.receive_type("stdout"))["data"]["output"]
    path = printed.strip()
    stolen = await thief.run({"sourceScript": SOCKET_THIEF.format(path=path)})
    assert stolen.stdout.startswith("refused"), stolen.stdout
    # The victim's own frame still goes through, and is the only one it gets.
    await victim.send("stdin", {"input": "go\n"})
    result = await victim.collect()
    assert result.stdout == "sent\n"
    assert len([m for m in victim.received if m["type"] == "video"]) == 1


@pytest.mark.parametrize("settings", [{}, BEST_EFFORT], ids=["cgroup", "best-effort"])
async def test_programs_have_no_new_privileges_and_limits(
    start_server: StartServer, connect: ClientFactory, settings: dict[str, str]
) -> None:
    server = await start_server(environ={**settings, "FURTHER_LINK_MAX_TASKS": "77"})
    client = await connect(server)
    script = (
        "import resource\n"
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('NoNewPrivs')])\n"
        "print(resource.getrlimit(resource.RLIMIT_NPROC)[0])\n"
        "print(open('/proc/self/cgroup').read())\n"
    )
    result = await client.run({"sourceScript": script})
    lines = result.stdout.splitlines()
    assert lines[0] == "['1']"
    mode = await containment_mode(server)
    if settings:
        assert mode == "best-effort"
        assert lines[1] == "77"  # RLIMIT_NPROC stands in for the task limit
        assert "/run-" not in result.stdout
    elif mode == CGROUP:
        assert "/run-" in result.stdout


async def test_the_run_cgroup_is_removed_after_the_run(
    start_server: StartServer, connect: ClientFactory
) -> None:
    server = await start_server()
    await require_cgroup(server)
    client = await connect(server)
    result = await client.run({"sourceScript": "print(open('/proc/self/cgroup').read())"})
    own = next(line for line in result.stdout.splitlines() if line.startswith("0::"))
    assert "/run-" in own
    with open("/proc/self/mountinfo") as mountinfo:
        layout = detect(mountinfo.read(), own)
    assert layout.unified is not None and layout.unified.name.startswith("run-")
    for _ in range(int(TIMEOUT / 0.05)):  # removed just before `stopped`, or at once after
        if not layout.unified.exists():
            break
        await asyncio.sleep(0.05)
    assert not layout.unified.exists()


@pytest.mark.parametrize("settings", [{}, BEST_EFFORT], ids=["cgroup", "best-effort"])
async def test_device_says_which_containment_is_in_force(
    start_server: StartServer, http: aiohttp.ClientSession, settings: dict[str, str]
) -> None:
    server = await start_server(environ=settings)
    headers = {"Authorization": f"Bearer {server.token}"}
    async with http.get(f"{server.base_url}/device", headers=headers) as response:
        assert response.status == 200
        body = await response.json()
    if settings:
        assert body["containment"] == "best-effort"
    elif AS_ROOT:
        assert body["containment"] == "cgroup"  # this machine offers cgroups to root
    else:  # without root, whatever this machine grants this account
        assert body["containment"] in ("cgroup", "best-effort")


@pytest.mark.skipif(POOL_SIZE == "0", reason="the warm pool is off in this run")
async def test_waiting_interpreters_cannot_be_read_by_programs(
    start_server: StartServer, connect: ClientFactory
) -> None:
    server = await start_server()
    client = await connect(server)
    waiting = await two_waiting(server)  # the program takes one; the other must refuse it
    await asyncio.sleep(1)  # past the interpreter's start-up, into its wait
    script = textwrap.dedent(
        f"""
        import ctypes, os
        for pid in set({waiting!r}) - {{os.getpid()}}:
            try:
                open(f"/proc/{{pid}}/environ", "rb").read()
                print("read", pid)
            except PermissionError:
                print("denied", pid)
        print("dumpable", ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))
        """
    )
    result = await client.run({"sourceScript": script})
    lines = result.stdout.splitlines()
    # Every other waiting interpreter refuses (the program itself may have been one).
    assert lines[:-1] and all(line.startswith("denied") for line in lines[:-1]), lines
    # The program itself is dumpable again, as a fresh interpreter is.
    assert lines[-1] == "dumpable 1"


def test_detect_reads_hybrid_and_pure_v2_layouts(tmp_path: Path) -> None:
    hybrid = (
        "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
        "39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
    )
    own = "4:memory:/a/b\n8:pids:/\n1:cpu,cpuacct:/x\n0::/user.slice\n"
    layout = detect(hybrid, own)
    assert layout.unified == Path("/sys/fs/cgroup/unified/user.slice")
    assert layout.v1 == {
        "memory": Path("/sys/fs/cgroup/memory/a/b"),
        "pids": Path("/sys/fs/cgroup/pids"),
        "cpu": Path("/sys/fs/cgroup/cpu,cpuacct/x"),
    }
    pure = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n"
    layout = detect(pure, "0::/system.slice/further-link.service\n")
    assert layout.unified == Path("/sys/fs/cgroup/system.slice/further-link.service")
    assert layout.v1 == {}
    # A container that sees only its own part of the hierarchy.
    inside = "30 23 0:26 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    assert detect(inside, "0::/docker/abc\n").unified == Path("/sys/fs/cgroup")
    assert detect("", "").kind == "none"


NOBODY_SIDE = """
import os, signal, subprocess, sys, time
from further_link.runs.containment import Containment, Limits, child_setup
contained = Containment.start(Limits(0, 50, 100))
print("mode", contained.mode, flush=True)
group = contained.new_run()
fds = group.open_join_fds()
child = subprocess.Popen(
    ["/bin/sh", "-c", "setsid sleep 300 & sleep 300"],
    preexec_fn=child_setup(fds, None), start_new_session=True,
)
for fd in fds:
    os.close(fd)
for _ in range(200):
    if len(group.pids()) >= 3:
        break
    time.sleep(0.05)
print("members", len(group.pids()), flush=True)
group.kill()
child.wait()
for _ in range(200):
    if not group.pids():
        break
    time.sleep(0.05)
print("left", len(group.pids()), "removed", group.remove(), flush=True)
contained.close()
"""

# As root: hand this process's cgroups to the account with prepare_delegation,
# print them, and become that account for good.
PREPARED = """
import os, pwd, sys
from further_link.runs.containment import prepare_delegation
entry = pwd.getpwnam(sys.argv[1])
for subtree in prepare_delegation(entry.pw_uid, entry.pw_gid):
    print(subtree, flush=True)
"""

# As root: what systemd's Delegate=yes does for a unit running as the account
# (a cgroup of its own, owned by it, the process inside), then the same.
DELEGATED_BY_SYSTEMD = """
import os, pwd, secrets, sys
from further_link.runs.containment import detect_here
entry = pwd.getpwnam(sys.argv[1])
layout = detect_here()
name = f"test-delegated-{os.getpid()}-{secrets.token_hex(4)}"
for home in [layout.unified, *layout.v1.values()]:
    unit = home / name
    unit.mkdir()
    os.chown(unit, entry.pw_uid, entry.pw_gid)
    for file in ("cgroup.procs", "cgroup.subtree_control", "cgroup.threads", "tasks"):
        if (unit / file).exists():
            os.chown(unit / file, entry.pw_uid, entry.pw_gid)
    fd = os.open(unit / "cgroup.procs", os.O_WRONLY)
    os.write(fd, b"0")
    os.close(fd)
    print(unit, flush=True)
"""

BECOME = """
os.execv("/usr/bin/setpriv", ["setpriv", "--reuid", str(entry.pw_uid),
         "--regid", str(entry.pw_gid), "--clear-groups",
         "/usr/bin/python3", "-c", sys.argv[2]])
"""


@pytest.mark.skipif(not AS_ROOT, reason="handing a cgroup subtree to another account needs root")
@pytest.mark.parametrize("root_side", [PREPARED, DELEGATED_BY_SYSTEMD], ids=["prepared", "systemd"])
def test_an_unprivileged_server_contains_runs_in_a_delegated_cgroup(root_side: str) -> None:
    copy = Path(tempfile.mkdtemp(prefix="further-link-delegation-"))
    subtrees: list[str] = []
    try:
        os.chmod(copy, 0o755)
        shutil.copytree(Path(containment.__file__).parent, copy / "further_link")
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(copy)}
        completed = subprocess.run(
            [sys.executable, "-c", root_side + BECOME, "nobody", NOBODY_SIDE],
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        lines = completed.stdout.splitlines()
        subtrees = [line for line in lines if line.startswith("/")]
        assert completed.returncode == 0, completed.stderr
        assert subtrees and all(f"further-link-{os.getpid()}" not in s for s in subtrees)
        nobody = pwd.getpwnam("nobody")
        assert all(Path(s).stat().st_uid == nobody.pw_uid for s in subtrees)
        assert "mode cgroup" in lines
        assert "members 3" in lines
        assert "left 0 removed True" in lines
    finally:
        for subtree in subtrees:  # empty now: bottom up
            for directory, _, _ in sorted(os.walk(subtree), key=lambda w: -len(w[0])):
                os.rmdir(directory)
        shutil.rmtree(copy, ignore_errors=True)


def test_stale_subtrees_of_ended_servers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    # Plain directories stand in for cgroups: rmdir behaves alike on empty ones.
    gone_pid = _a_pid_that_has_ended()
    stale = tmp_path / f"further-link-{gone_pid}-abcd1234"
    (stale / "pool").mkdir(parents=True)
    live = tmp_path / f"further-link-{os.getpid()}-abcd1234"
    live.mkdir()
    busy = tmp_path / f"further-link-{gone_pid}-00ff00ff"
    (busy / "run-1").mkdir(parents=True)
    (busy / "run-1" / "cgroup.procs").write_text("1\n")  # not empty: kept
    other = tmp_path / "someone-else"
    other.mkdir()
    assert containment.remove_stale([tmp_path]) == 1
    assert not stale.exists()
    assert live.exists() and busy.exists() and other.exists()


def _a_pid_that_has_ended() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.mark.skipif(POOL_SIZE == "0", reason="the warm pool is off in this run")
async def test_a_warm_run_s_cgroup_holds_exactly_its_own_processes(
    start_server: StartServer, connect: ClientFactory
) -> None:
    # Waiting interpreters enter their run's cgroup ahead of the run: the run
    # must still hold the program and its children, and nothing else.
    server = await start_server()
    await require_cgroup(server)
    client = await connect(server)
    waiting = await two_waiting(server)
    script = textwrap.dedent(
        """
        import os, subprocess, sys
        child = subprocess.Popen(["sleep", "60"])
        own = [l for l in open("/proc/self/cgroup").read().splitlines() if l.startswith("0::")]
        print(os.getpid(), child.pid, own[0], flush=True)
        sys.stdin.readline()
        """
    )
    await client.send("start", {"sourceScript": script})
    await client.receive_type("started")
    line = ""
    while not line.endswith("\n"):
        line += (await client.receive_type("stdout"))["data"]["output"]
    pid, child, own = line.split()
    assert int(pid) in waiting  # the program started in a waiting interpreter
    with open("/proc/self/mountinfo") as mountinfo:
        layout = detect(mountinfo.read(), own)
    assert layout.unified is not None and layout.unified.name.startswith("run-")
    members = {int(p) for p in (layout.unified / "cgroup.procs").read_text().split()}
    assert members == {int(pid), int(child)}
    # The interpreter still waiting is in a run cgroup of its own.
    for other in set(waiting) - {int(pid)}:
        with open(f"/proc/{other}/cgroup") as cgroups:
            theirs = [line for line in cgroups.read().splitlines() if line.startswith("0::")]
        assert theirs and theirs[0] != own and "/run-" in theirs[0]
    await client.send("stop")
    await client.receive_type("stopped")
    assert await all_gone([int(child)])


@pytest.mark.skipif(POOL_SIZE == "0", reason="the warm pool is off in this run")
async def test_a_preloaded_run_gets_the_configured_cpu_weight_back(
    start_server: StartServer, connect: ClientFactory
) -> None:
    # Preloading runs at a low CPU weight; the program must run at the run's.
    server = await start_server(
        environ={"FURTHER_LINK_POOL_PRELOAD": "json", "FURTHER_LINK_CPU_WEIGHT": "300"}
    )
    await require_cgroup(server)
    client = await connect(server)
    pool = pool_of(server)
    await asyncio.wait_for(pool.ready(), TIMEOUT)
    waiting = pool.waiting_pids()
    script = (
        "import os\nprint(os.getpid(), flush=True)\n"
        "print(open('/proc/self/cgroup').read())\ninput()"
    )
    await client.send("start", {"sourceScript": script})
    await client.receive_type("started")
    output = ""
    while not output.endswith("\n\n"):
        output += (await client.receive_type("stdout"))["data"]["output"]
    pid, _, cgroups = output.partition("\n")
    assert int(pid) in waiting  # a preloaded interpreter ran it
    with open("/proc/self/mountinfo") as mountinfo:
        layout = detect(mountinfo.read(), cgroups)
    if "cpu" in layout.v1:
        shares = (layout.v1["cpu"] / "cpu.shares").read_text().split()
        assert shares == [str(300 * 1024 // 100)]
    else:
        assert layout.unified is not None
        assert (layout.unified / "cpu.weight").read_text().split() == ["300"]
    await client.send("stdin", {"input": "\n"})
    await client.receive_type("stopped")
