"""Fixtures that start the real thing: a server on an ephemeral loopback port,
websocket clients, and a loopback HTTP server for url uploads."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import shutil
import signal
import ssl
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import aiohttp
import pytest
from aiohttp import web

from further_link.config import Config, load_config
from further_link.server.app import create_app
from further_link.server.netguard import GuardedSite
from further_link.trust.auth import TokenStore
from further_link.trust.tls import server_ssl_context


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "loopback_downloads: the test's servers may download from 127.0.0.1"
    )


# Generous: tests must pass on a slow, busy machine.
TIMEOUT = 30.0

# CI runs the suite as root, and the server never runs programs as root: then
# the server is the real `further-link serve`, started as root, which drops to
# `nobody` before serving and runs programs as itself with the default
# interpreter, the system's /usr/bin/python3 (whose numpy and Pillow `make
# test` installs from Debian). As any other user, the server runs in-process
# and programs run as that user.
AS_ROOT = os.geteuid() == 0
PROGRAM_USER = "nobody" if AS_ROOT else pwd.getpwuid(os.geteuid()).pw_name
PROGRAM_SETTINGS: dict[str, str] = {"FURTHER_LINK_USER": "nobody"} if AS_ROOT else {}
# Every process that serves in this test run: this one (in-process servers) and
# the server processes, so tests can tell whether a server adopted or reaped a process.
SERVER_PIDS: set[int] = {os.getpid()}
LISTENING = re.compile(r"serving \S+ \(listening on \S+:(\d+),")


@dataclass
class RunningServer:
    config: Config
    base_url: str
    ssl_client: ssl.SSLContext | None
    token: str
    # In-process (not root): the aiohttp runner.
    runner: web.AppRunner | None = None
    # As root: the real server process, which dropped to the program user, and its log.
    process: asyncio.subprocess.Process | None = None
    log_path: Path | None = None

    def ws_url(self, path: str = "/run-py", token: bool = True) -> str:
        """The websocket URL, carrying the device token unless ``token=False``."""
        url = self.base_url.replace("http", "ws", 1) + path
        return f"{url}?token={self.token}" if token else url

    @property
    def pid(self) -> int:
        """The process that serves: the subprocess as root, else this very process."""
        return self.process.pid if self.process is not None else os.getpid()

    def log(self) -> str:
        """What the server process has logged so far ("" when in-process)."""
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    async def stop(self) -> int | None:
        """Shut the server down as SIGTERM would; stopping twice is harmless.

        Returns the process's exit code (None in-process).
        """
        if self.runner is not None:
            await self.runner.cleanup()
            return None
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), TIMEOUT)
            except asyncio.TimeoutError:
                self.process.kill()
                await self.process.wait()
                raise AssertionError(f"the server did not stop on SIGTERM:\n{self.log()}") from None
        return self.process.returncode


@dataclass
class Client:
    """A websocket client that speaks /run-py and remembers what it received."""

    ws: aiohttp.ClientWebSocketResponse
    received: list[dict[str, Any]] = field(default_factory=list)

    async def send(self, kind: str, data: dict[str, Any] | None = None) -> None:
        message: dict[str, Any] = {"type": kind}
        if data is not None:
            message["data"] = data
        await self.ws.send_str(json.dumps(message))

    async def receive(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        message = await asyncio.wait_for(self.ws.receive(), timeout)
        assert message.type == aiohttp.WSMsgType.TEXT, f"expected text, got {message!r}"
        decoded: dict[str, Any] = json.loads(message.data)
        self.received.append(decoded)
        return decoded

    async def receive_type(self, kind: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """Next message of ``kind``; anything else in between is kept in ``received``."""
        while True:
            message = await self.receive(timeout)
            if message["type"] == kind:
                return message

    async def read_output(self, expected: str, stream: str = "stdout") -> None:
        """Read ``stream`` messages until exactly ``expected`` has arrived.

        Programs run unbuffered, so one print may arrive as several messages
        (``"hi"`` then ``"\\n"``); only the concatenation is guaranteed.
        """
        text = ""
        while len(text) < len(expected):
            message = await self.receive()
            assert message["type"] == stream, f"expected {stream}, got {message}"
            text += message["data"]["output"]
        assert text == expected

    async def run(self, data: dict[str, Any], stdin: tuple[str, ...] = ()) -> RunResult:
        """Start a program, feed it input, collect everything until ``stopped``."""
        await self.send("start", data)
        started = await self.receive()
        assert started["type"] == "started", started
        for text in stdin:
            await self.send("stdin", {"input": text})
        return await self.collect()

    async def collect(self) -> RunResult:
        result = RunResult()
        while True:
            message = await self.receive()
            kind = message["type"]
            result.messages.append(message)
            if kind == "stopped":
                result.exit_code = message["data"]["exitCode"]
                return result
            if kind in ("stdout", "stderr"):
                setattr(result, kind, getattr(result, kind) + message["data"]["output"])
            elif kind == "video":
                result.frames.append(message["data"]["output"])
            elif kind == "error":
                result.errors.append(message["data"]["message"])


@dataclass
class RunResult:
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    frames: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Startup:
    """What a starting `further-link serve` printed, up to the account its programs run as."""

    port: int
    account: str
    log: str


def read_startup(lines: Iterable[str]) -> Startup:
    """Read a server's output until its "programs run as" line (it follows "listening on")."""
    log = ""
    for line in lines:
        log += line
        if "programs run as" in line:
            break
    port = re.search(r"listening on 127\.0\.0\.1:(\d+)", log)
    account = re.search(r"programs run as '([^']+)'", log)
    assert port and account, log
    return Startup(int(port.group(1)), account.group(1), log)


async def run_py_stdout(
    http: aiohttp.ClientSession, url: str, source: str, tls: ssl.SSLContext | None = None
) -> str:
    """Run ``source`` over the /run-py websocket at ``url``; everything it printed."""
    options: dict[str, Any] = {} if tls is None else {"ssl": tls}
    async with http.ws_connect(url, **options) as ws:
        result = await Client(ws).run({"sourceScript": source})
    assert result.exit_code == 0, result
    return result.stdout


@pytest.fixture
def sandbox() -> Iterator[Path]:
    """A directory that programs can reach even when they run as `nobody`.

    ``sandbox / "shared"`` is world-writable: programs leave pid files there
    and tests put files there for programs to read.
    """
    root = Path(tempfile.mkdtemp(prefix="further-link-test-"))
    root.chmod(0o755)
    shared = root / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def shared(sandbox: Path) -> Path:
    return sandbox / "shared"


# `make test` runs the suite twice: with the warm interpreter pool on (the
# default) and off, since programs must not be able to tell the difference.
POOL_SIZE = os.environ.get("FURTHER_LINK_TEST_POOL_SIZE", "2")


def program_home(sandbox: Path) -> Path:
    """A directory of the program user's own, as its home would be: the work dir goes in it.

    A server that dropped root creates its work dir as the program user, so
    the parent must be that user's.
    """
    home = sandbox / "home"
    if not home.exists():
        home.mkdir()
        entry = pwd.getpwnam(PROGRAM_USER)
        os.chown(home, entry.pw_uid, entry.pw_gid)
    return home


def give_to_program_user(path: Path) -> None:
    """Make ``path`` and everything below it the program user's, as its own files would be.

    A server that dropped root (or any server) acts as that user, so files a
    test puts in the work dir for programs must belong to it.
    """
    entry = pwd.getpwnam(PROGRAM_USER)
    for item in [path, *path.rglob("*")]:
        os.lchown(item, entry.pw_uid, entry.pw_gid)


def server_environ(sandbox: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment test servers start with (and programs inherit)."""
    environ = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(sandbox)}
    environ["FURTHER_LINK_POOL_SIZE"] = POOL_SIZE
    # Preloading (tests/test_pool.py covers it) would import numpy in every test's pool.
    environ["FURTHER_LINK_POOL_PRELOAD"] = "none"
    # Announcing on mDNS is tests/test_fleet.py's business; others keep the network quiet.
    environ["FURTHER_LINK_ADVERTISE"] = "0"
    environ.update(PROGRAM_SETTINGS)
    environ.update(extra or {})
    return environ


def default_settings(sandbox: Path) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": 0,
        "work_dir": str(program_home(sandbox) / "work"),
        "config_dir": str(sandbox / "config"),
        "no_ssl": True,
    }


def make_config(sandbox: Path, **overrides: Any) -> Config:
    environ = server_environ(sandbox, overrides.pop("environ", {}))
    settings = default_settings(sandbox)
    settings.update(overrides)
    return load_config(environ=environ, **settings)


# Settings start_server() takes as keywords, and how the server process is given them.
SETTING_VARIABLES = {
    "host": "FURTHER_LINK_HOST",
    "port": "FURTHER_LINK_PORT",
    "work_dir": "FURTHER_LINK_WORK_DIR",
    "config_dir": "FURTHER_LINK_CONFIG_DIR",
    "cert_file": "FURTHER_LINK_CERT",
    "key_file": "FURTHER_LINK_KEY",
    "kill_grace": "FURTHER_LINK_KILL_GRACE",
    "x11_socket_dir": "FURTHER_LINK_X11_SOCKET_DIR",
}


def process_environ(sandbox: Path, overrides: dict[str, Any]) -> dict[str, str]:
    """``make_config``'s settings as the environment of a `further-link serve` process."""
    environ = server_environ(sandbox, overrides.get("environ", {}))
    settings = default_settings(sandbox)
    settings.update({k: v for k, v in overrides.items() if k != "environ"})
    no_ssl = settings.pop("no_ssl")
    if no_ssl:
        environ["FURTHER_LINK_NOSSL"] = "1"
    else:
        environ.pop("FURTHER_LINK_NOSSL", None)
    for name, value in settings.items():
        environ[SETTING_VARIABLES[name]] = str(value)
    return environ


async def start_server_process(sandbox: Path, **overrides: Any) -> RunningServer:
    """The real `further-link serve`, started as this (root) process; it drops to the program user.

    It binds an ephemeral port and logs it; this waits for that line.
    """
    config = make_config(sandbox, **dict(overrides))
    token = TokenStore(config.config_dir).load_or_create()
    log_path = Path(tempfile.mkstemp(prefix="server-", suffix=".log", dir=sandbox)[1])
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "further_link",
            "serve",
            "--log-level",
            "DEBUG",
            env=process_environ(sandbox, overrides),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            cwd=str(sandbox),
        )
    SERVER_PIDS.add(process.pid)
    port = None
    for _ in range(int(TIMEOUT / 0.02)):
        match = LISTENING.search(log_path.read_text(errors="replace"))
        if match is not None:
            port = int(match.group(1))
            break
        if process.returncode is not None:
            break
        await asyncio.sleep(0.02)
    if port is None:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise AssertionError(f"the server did not start:\n{log_path.read_text()}")
    client_ssl = None
    if config.ssl:
        trusted = config.cert_file or config.config_dir / "cert.pem"
        client_ssl = ssl.create_default_context(cafile=str(trusted))
    scheme = "https" if config.ssl else "http"
    return RunningServer(
        config,
        f"{scheme}://127.0.0.1:{port}",
        client_ssl,
        token,
        process=process,
        log_path=log_path,
    )


async def start_server_in_process(sandbox: Path, **overrides: Any) -> RunningServer:
    config = make_config(sandbox, **overrides)
    tokens = TokenStore(config.config_dir)
    token = tokens.load_or_create()
    runner = web.AppRunner(create_app(config, tokens), handle_signals=False)
    await runner.setup()
    ssl_context = server_ssl_context(config) if config.ssl else None
    site = GuardedSite(runner, config, ssl_context)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    port = runner.addresses[0][1]
    client_ssl = None
    if ssl_context is not None:
        trusted = config.cert_file or config.config_dir / "cert.pem"
        client_ssl = ssl.create_default_context(cafile=str(trusted))
    scheme = "https" if ssl_context else "http"
    return RunningServer(config, f"{scheme}://127.0.0.1:{port}", client_ssl, token, runner)


@pytest.fixture
async def start_server(
    sandbox: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., Awaitable[RunningServer]]]:
    """Factory: ``await start_server(no_ssl=False, kill_grace=0.5, environ={...})``.

    As root, each is a real server process that drops to the program user.
    A test that uses ``file_server`` (on loopback) or is marked
    ``loopback_downloads`` gets servers that may download from 127.0.0.1,
    which the download policy otherwise refuses.
    """
    servers: list[RunningServer] = []
    allow_loopback = "file_server" in request.fixturenames or bool(
        request.node.get_closest_marker("loopback_downloads")
    )

    async def start(**overrides: Any) -> RunningServer:
        if allow_loopback:
            environ = {"FURTHER_LINK_DOWNLOAD_ALLOW": "127.0.0.1", **overrides.get("environ", {})}
            overrides["environ"] = environ
        starter = start_server_process if AS_ROOT else start_server_in_process
        server = await starter(sandbox, **overrides)
        servers.append(server)
        return server

    yield start
    for server in servers:
        code = await server.stop()
        # Shown by pytest when the test fails: what the server said (without its chatter).
        said = [line for line in server.log().splitlines() if " DEBUG " not in line]
        print(f"server pid {server.pid} exited with {code}; its log:", *said[-40:], sep="\n")


@pytest.fixture
async def server(start_server: Callable[..., Awaitable[RunningServer]]) -> RunningServer:
    return await start_server()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def connect(
    server: RunningServer, http: aiohttp.ClientSession
) -> AsyncIterator[Callable[..., Awaitable[Client]]]:
    """Factory for websocket clients of the default server; all closed afterwards."""
    sockets: list[aiohttp.ClientWebSocketResponse] = []

    async def open_client(
        target: RunningServer | None = None, token: bool = True, **kwargs: Any
    ) -> Client:
        target = target or server
        url = target.ws_url(token=token)
        ws = await http.ws_connect(url, ssl=target.ssl_client or True, **kwargs)
        sockets.append(ws)
        return Client(ws)

    yield open_client
    for ws in sockets:
        await ws.close()


@pytest.fixture
async def client(connect: Callable[..., Awaitable[Client]]) -> Client:
    return await connect()


@dataclass
class FileServer:
    """A loopback HTTP server whose routes and request counts tests control."""

    base_url: str
    bodies: dict[str, bytes]
    hits: dict[str, int]

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"


@pytest.fixture
async def file_server() -> AsyncIterator[FileServer]:
    bodies: dict[str, bytes] = {}
    hits: dict[str, int] = {}

    async def serve(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        hits[name] = hits.get(name, 0) + 1
        if name == "broken":
            return web.Response(status=500, text="boom")
        if name not in bodies:
            return web.Response(status=404)
        return web.Response(body=bodies[name])

    app = web.Application()
    app.router.add_get("/{name}", serve)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield FileServer(f"http://127.0.0.1:{port}", bodies, hits)
    await runner.cleanup()


def write_pid_code(marker: Path) -> str:
    """Program lines that record the pid in ``marker`` atomically.

    Written under another name and renamed, so a test (or a parent program)
    polling for ``marker`` never reads a file that exists but is still empty.
    """
    partial = f"{marker}.partial-"
    return (
        "import os\n"
        f"open({partial!r} + str(os.getpid()), 'w').write(str(os.getpid()))\n"
        f"os.replace({partial!r} + str(os.getpid()), {str(marker)!r})\n"
    )


def sleeper_script(marker: Path, seconds: int = 60) -> str:
    """A program that records its pid in ``marker``, prints 'up' and sleeps."""
    return write_pid_code(marker) + f"import time\nprint('up')\ntime.sleep({seconds})\n"


def reset_peak_rss(pid: int) -> int:
    """Set the peak resident size of ``pid`` (VmHWM) to its size now; return that, in bytes.

    The kernel's own mark, not samples: a buffer that lives a millisecond counts.
    """
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return peak_rss(pid)


def peak_rss(pid: int) -> int:
    """The most memory ``pid`` has held resident since its peak was last reset, in bytes."""
    found = re.search(r"^VmHWM:\s+(\d+) kB$", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert found is not None, "the kernel reports no VmHWM"
    return int(found.group(1)) * 1024


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def rotate_token(config_dir: Path) -> str:
    """Run `further-link token --rotate` as a person at the device would; returns its output.

    As root (as in CI) it also hands the new token to the running servers that
    dropped root, which cannot read the token file themselves.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("FURTHER_LINK_")}
    env["FURTHER_LINK_CONFIG_DIR"] = str(config_dir)
    rotated = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "further_link",
        "token",
        "--rotate",
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(rotated.communicate(), 60)
    assert rotated.returncode == 0, out
    return out.decode()
