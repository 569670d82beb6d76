"""Privilege separation, attacked: the server is started as root, drops to the program
user before serving, and nothing a program does can turn the server's former rights
against the device.

Each attack is a real adversary program (running as the program user, as a learner's
would) racing the server in a tight loop, bounded in time. Run as root only: that is
when there are privileges to separate (CI runs the suite as root).
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import stat
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, Callable

import aiohttp
import pytest
from aiohttp import web
from test_upload import text_file, upload, url_file

from further_link.config import RunAs
from further_link.errors import PrivilegeError
from further_link.system.privsep import drop_privileges

from conftest import AS_ROOT, PROGRAM_USER, TIMEOUT, Client, RunningServer, program_home

pytestmark = pytest.mark.skipif(not AS_ROOT, reason="privileges are separated when started as root")

StartServer = Callable[..., Awaitable[RunningServer]]
ClientFactory = Callable[..., Awaitable[Client]]
SECRET = "root's secret\n"
# How long an adversary keeps attacking, at most.
ATTACK_SECONDS = 20


def program_uid() -> int:
    return pwd.getpwnam(PROGRAM_USER).pw_uid


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def root_only_dir(sandbox: Path) -> Path:
    """A directory only root may enter, holding a root-only secret file."""
    directory = sandbox / "root-only"
    directory.mkdir(mode=0o700)
    secret = directory / "secret"
    secret.write_text(SECRET)
    secret.chmod(0o600)
    return directory


def assert_untouched(directory: Path) -> None:
    """Nothing written, chowned or chmodded in the root-only directory."""
    assert sorted(os.listdir(directory)) == ["secret"]
    info = os.lstat(directory)
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o700)
    secret = os.lstat(directory / "secret")
    assert (secret.st_uid, secret.st_gid, stat.S_IMODE(secret.st_mode)) == (0, 0, 0o600)
    assert (directory / "secret").read_text() == SECRET


async def start_adversary(client: Client, script: str) -> None:
    """Start ``script`` on ``client`` and wait until it says it is attacking."""
    await client.send("start", {"sourceScript": textwrap.dedent(script)})
    assert (await client.receive())["type"] == "started"
    await client.read_output("attacking\n")


async def end_adversary(client: Client) -> str:
    """Stop the adversary; its report is the last line it printed."""
    await client.send("stop")
    result = await client.collect()
    return result.stdout


# ------------------------------------------------------------------ the process


async def test_the_server_serves_as_the_program_user_not_dumpable_with_no_new_privileges(
    start_server: StartServer, connect: ClientFactory
) -> None:
    server = await start_server(no_ssl=False)  # with its TLS key
    client = await connect(server)
    status = proc_status(server.pid)
    uid = program_uid()
    assert status["Uid"].split() == [str(uid)] * 4
    assert status["Gid"].split() == [str(pwd.getpwnam(PROGRAM_USER).pw_gid)] * 4
    assert status["NoNewPrivs"] == "1"
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0
    config_dir = server.config.config_dir
    script = f"""\
        import ctypes, os
        pid = {server.pid}
        libc = ctypes.CDLL(None, use_errno=True)
        def attempt(name, action):
            try:
                action()
            except OSError as exc:
                print(name, 'refused', exc.errno)
            else:
                print(name, 'ALLOWED')
        attempt('mem', lambda: open(f'/proc/{{pid}}/mem', 'rb').read(1))
        attempt('environ', lambda: open(f'/proc/{{pid}}/environ', 'rb').read())
        attempt('fds', lambda: os.listdir(f'/proc/{{pid}}/fd'))
        attempt('token', lambda: open({str(config_dir / "token")!r}).read())
        attempt('key', lambda: open({str(config_dir / "key.pem")!r}).read())
        attempt('control', lambda: os.listdir({str(config_dir / "control")!r}))
        PTRACE_ATTACH = 16
        if libc.ptrace(PTRACE_ATTACH, pid, None, None) == 0:
            print('ptrace ALLOWED')
        else:
            print('ptrace refused', ctypes.get_errno())
        status = open('/proc/self/status').read()
        print([line for line in status.splitlines() if line.startswith('NoNewPrivs')][0])
    """
    result = await client.run({"sourceScript": textwrap.dedent(script)})
    assert "ALLOWED" not in result.stdout, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for name in ("mem", "environ", "fds", "token", "key", "control", "ptrace"):
        assert any(line.startswith(f"{name} refused") for line in lines), result.stdout
    # Refused for want of rights (EACCES, EPERM), not because the file is missing.
    for name in ("mem", "environ", "fds", "token", "key", "control"):
        assert f"{name} refused 13" in lines or f"{name} refused 1" in lines, result.stdout
    assert "NoNewPrivs:\t1" in lines
    # The server keeps working afterwards.
    assert (await client.run({"sourceScript": "print('still here')"})).stdout == "still here\n"


async def test_the_secrets_stay_roots(start_server: StartServer) -> None:
    server = await start_server(no_ssl=False)
    config_dir = server.config.config_dir
    for path in (config_dir, config_dir / "token", config_dir / "key.pem"):
        info = os.lstat(path)
        assert info.st_uid == 0 and not info.st_mode & 0o077, path


# ------------------------------------------------------- upload staging swap


@pytest.fixture
async def stalling_url() -> AsyncIterator[str]:
    """A loopback URL whose body arrives only after a few seconds: the staging dir waits."""

    async def slow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 6
        await response.prepare(request)
        await response.write(b"a,")
        await asyncio.sleep(3)
        await response.write(b"b,c\n")
        return response

    app = web.Application()
    app.router.add_get("/slow.csv", slow)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/slow.csv"
    await runner.cleanup()


STAGING_SWAPPER = """\
    import os, time
    WORK, TARGET = {work!r}, {target!r}
    swapped = 0
    print('attacking', flush=True)
    deadline = time.monotonic() + {seconds}
    while time.monotonic() < deadline:
        try:
            entries = list(os.scandir(WORK))
        except OSError:
            continue
        for entry in entries:
            name = entry.name
            if name.startswith('.flupload-') and not name.endswith('-moved') \\
                    and not entry.is_symlink():
                try:
                    os.rename(entry.path, entry.path + '-moved')
                    os.symlink(TARGET, entry.path)
                    swapped += 1
                    # Said at once: the test may stop this program any time after.
                    print('swapped', swapped, flush=True)
                except OSError:
                    pass
        if swapped >= 2:
            break
    print('swapped', swapped, flush=True)
    time.sleep(600)
"""


# The slow download comes from loopback, which the download policy otherwise refuses at once.
@pytest.mark.loopback_downloads
async def test_a_program_swapping_the_upload_staging_dir_for_a_link_writes_nothing_as_root(
    server: RunningServer, connect: ClientFactory, sandbox: Path, stalling_url: str
) -> None:
    target = root_only_dir(sandbox)
    server.config.work_dir.mkdir(exist_ok=True)
    adversary, victim = await connect(), await connect()
    script = STAGING_SWAPPER.format(
        work=str(server.config.work_dir), target=str(target), seconds=ATTACK_SECONDS
    )
    await start_adversary(adversary, script)
    many = {f"f{i:04}.txt": text_file(f"file {i}\n") for i in range(1000)}
    many_reply = await upload(victim, "proj", many)
    slow_reply = await upload(victim, "data", {"slow.csv": url_file(stalling_url, "b", "s.csv")})
    report = await end_adversary(adversary)
    assert "swapped" in report, (report, many_reply, slow_reply)
    swaps = max(int(line.split()[1]) for line in report.splitlines() if line.startswith("swapped"))
    # The slow download keeps a staging dir in place for seconds: the swap happens.
    assert swaps >= 1, (report, many_reply, slow_reply)
    assert_untouched(target)
    # Whatever the server made is the program user's own, as the program could make it.
    for path in server.config.work_dir.rglob("*"):
        assert os.lstat(path).st_uid == program_uid(), path


# ------------------------------------------------------------ run dir plant

RUN_DIR_PLANTER = """\
    import os, time
    TMP, VICTIMS = {tmp!r}, {victims!r}
    seen, planted = set(), 0
    print('attacking', flush=True)
    deadline = time.monotonic() + {seconds}
    while time.monotonic() < deadline and len(seen) < {runs}:
        for entry in os.scandir(TMP):
            if not entry.name.startswith('further-link-run-') or entry.name in seen:
                continue
            seen.add(entry.name)
            for name, victim in zip(('main.py', 'io.sock'), VICTIMS):
                path = os.path.join(entry.path, name)
                try:
                    os.rename(path, path + '-moved')
                except OSError:
                    pass
                try:
                    os.symlink(victim, path)
                    planted += 1
                except OSError:
                    pass
    print('seen', len(seen), 'planted', planted, flush=True)
    time.sleep(600)
"""


async def test_links_planted_in_run_dirs_never_reach_root_files(
    start_server: StartServer, connect: ClientFactory, sandbox: Path
) -> None:
    tmp = program_home(sandbox) / "tmp"
    tmp.mkdir(mode=0o1777)
    tmp.chmod(0o1777)
    # This server's run dirs (and its programs' temp files) go in `tmp`, not the shared /tmp.
    server = await start_server(environ={"TMPDIR": str(tmp)})
    victims = []
    for name in ("overwrite-me", "chown-me"):
        victim = sandbox / name
        victim.write_text(SECRET)
        victim.chmod(0o644)
        victims.append(victim)
    adversary, victim_client = await connect(server), await connect(server)
    runs = 10
    script = RUN_DIR_PLANTER.format(
        tmp=str(tmp), victims=[str(v) for v in victims], seconds=ATTACK_SECONDS, runs=runs
    )
    await start_adversary(adversary, script)
    refused = 0
    for i in range(runs):
        source = f"import time\ntime.sleep(0.2)\nprint({i})"
        await victim_client.send("start", {"sourceScript": source})
        reply = await victim_client.receive()
        if reply["type"] == "error":  # the plant got in first: the run is refused, in words
            # Planted links (or a run dir the adversary took away) refuse the start.
            assert reply["data"]["message"].startswith(
                ("could not prepare the run", "could not create a directory for the run")
            ), reply
            refused += 1
            continue
        assert reply["type"] == "started", reply
        await victim_client.collect()
    # The connection survived every attempt.
    assert (await victim_client.run({"sourceScript": "print('ok')"})).exit_code is not None
    report = await end_adversary(adversary)
    assert "seen" in report, report
    seen = int(report.split("seen")[1].split()[0])
    assert seen >= 1, report  # the adversary raced in the right place
    for victim in victims:
        info = os.lstat(victim)
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o644)
        assert victim.read_text() == SECRET


# ------------------------------------------------------------ /device probe


async def test_device_never_runs_the_program_interpreter_as_root(
    start_server: StartServer, http: aiohttp.ClientSession, sandbox: Path, shared: Path
) -> None:
    """A venv the program user can write, with a .pth that records who ran it."""
    venv = program_home(sandbox) / "venv"
    subprocess.run(
        ["/usr/bin/python3", "-m", "venv", "--without-pip", "--system-site-packages", str(venv)],
        check=True,
        timeout=TIMEOUT,
    )
    site_packages = next(venv.glob("lib/python3*/site-packages"))
    record = shared / "who-ran"
    (site_packages / "who.pth").write_text(
        "import os; open(os.path.join("
        f"{str(record)!r}, str(os.getpid())), 'w').write(str(os.geteuid()))\n"
    )
    record.mkdir(mode=0o777)
    record.chmod(0o777)
    uid = program_uid()
    for path in [venv, *venv.rglob("*")]:
        os.lchown(path, uid, pwd.getpwnam(PROGRAM_USER).pw_gid)
    server = await start_server(
        environ={"FURTHER_LINK_PYTHON": str(venv / "bin" / "python"), "FURTHER_LINK_POOL_SIZE": "0"}
    )
    async with http.get(f"{server.base_url}/device", params={"token": server.token}) as response:
        assert response.status == 200
        device: dict[str, Any] = await response.json()
    assert device["python"] == subprocess.run(
        ["/usr/bin/python3", "-c", "import platform; print(platform.python_version())"],
        capture_output=True, text=True, check=True, timeout=TIMEOUT,
    ).stdout.strip()  # fmt: skip
    ran_as = [int(p.read_text()) for p in record.iterdir()]
    assert ran_as, "the probe did not run the configured interpreter"
    assert set(ran_as) == {uid}


# ------------------------------------------------------------- sourcePath


async def test_source_path_in_a_root_only_dir_does_not_tell_what_exists(
    client: Client, sandbox: Path
) -> None:
    hidden = root_only_dir(sandbox)
    (hidden / "exists.py").write_text("print('secret')\n")
    (hidden / "a-dir").mkdir()
    replies = {}
    for name in ("exists.py", "missing.py", "a-dir", "secret"):
        path = str(hidden / name)
        await client.send("start", {"sourcePath": path})
        reply = await client.receive()
        assert reply["type"] == "error", reply
        replies[name] = reply["data"]["message"].replace(path, "PATH")
    assert len(set(replies.values())) == 1, replies
    assert "cannot be read" in replies["exists.py"] or "does not exist" in replies["exists.py"]


# ---------------------------------------------------------- token rotation


async def test_token_rotation_reaches_the_dropped_server_at_once(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    connected = await http.ws_connect(server.ws_url())
    env = {k: v for k, v in os.environ.items() if not k.startswith("FURTHER_LINK_")}
    env["FURTHER_LINK_CONFIG_DIR"] = str(server.config.config_dir)
    loop = asyncio.get_running_loop()
    started = loop.time()
    rotated = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "further_link", "token", "--rotate", env=env,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(rotated.communicate(), TIMEOUT)
    assert "told 1 running server(s)" in out.decode()
    closed = await connected.receive(timeout=TIMEOUT)
    assert (closed.type, closed.data) == (aiohttp.WSMsgType.CLOSE, 4001)
    # Not a poll of a file the server can no longer read: the command told it.
    assert loop.time() - started < TIMEOUT
    new = out.decode().split("token: ")[1].split()[0]
    assert new != server.token
    async with http.get(f"{server.base_url}/device", params={"token": new}) as response:
        assert response.status == 200


# ------------------------------------------------------------- the drop itself


def test_root_steps_run_as_root_then_the_drop_cannot_be_undone() -> None:
    """In a forked child: the integrator's hook (ROOT_SETUP_STEPS) runs as root with the
    program user's ids, then the process is that user, for good."""
    entry = pwd.getpwnam(PROGRAM_USER)
    run_as = RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir), drop=True)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        report: dict[str, Any] = {}
        try:
            os.close(read_end)
            calls: list[tuple[int, int, int]] = []
            drop_privileges(run_as, [lambda uid, gid: calls.append((os.geteuid(), uid, gid))])
            report["calls"] = calls
            report["resuid"] = list(os.getresuid())
            report["groups"] = sorted(os.getgroups())
            try:
                os.setuid(0)
                report["regained"] = True
            except PermissionError:
                report["regained"] = False
            report["status"] = Path("/proc/self/status").read_text()
        except BaseException as exc:
            report["error"] = repr(exc)
        finally:
            os.write(write_end, json.dumps(report).encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert "error" not in report, report
    assert report["calls"] == [[0, entry.pw_uid, entry.pw_gid]]
    assert report["resuid"] == [entry.pw_uid] * 3
    assert report["groups"] == sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid)))
    assert report["regained"] is False
    status = report["status"]
    assert "NoNewPrivs:\t1" in status
    assert "CapEff:\t0000000000000000" in status


def test_the_program_user_cannot_be_root() -> None:
    root = RunAs("root", 0, 0, Path("/root"), drop=True)
    with pytest.raises(PrivilegeError, match="never run as root"):
        drop_privileges(root, [])
