"""`further-link run` and `further-link pair` as a person runs them: real subprocesses
against real servers, over TLS with pinned certificates or plain HTTP."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from test_cli import ServerProcess

from further_link.client.commands import (
    Device,
    Project,
    describe_refusal,
    exit_status,
    read_project,
)
from further_link.client.hosts import HostStore, certificate_fingerprint
from further_link.errors import ClientError
from further_link.trust.auth import pairing_code

from conftest import (
    PROGRAM_SETTINGS,
    TIMEOUT,
    RunningServer,
    alive,
    program_home,
    sleeper_script,
    write_pid_code,
)

StartServer = Callable[..., Awaitable[RunningServer]]
EXIT_FAILED = 255


@dataclass
class Finished:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def client_env(sandbox: Path) -> dict[str, str]:
    """The client's environment: its own config dir, no server settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FURTHER_LINK_")}
    env["XDG_CONFIG_HOME"] = str(sandbox / "client-config")
    return env


def hosts_file(sandbox: Path) -> Path:
    return sandbox / "client-config" / "further-link" / "hosts.json"


def device_args(server: RunningServer, token: bool = True) -> list[str]:
    port = urlsplit(server.base_url).port
    args = ["--host", "127.0.0.1", "--port", str(port)]
    if not server.config.ssl:
        args.append("--no-ssl")
    return [*args, f"--token={server.token}"] if token else args


def program(sandbox: Path, source: str, name: str = "prog.py") -> str:
    path = sandbox / name
    path.write_text(source)
    return str(path)


async def further_link(
    *args: str, env: dict[str, str], stdin: bytes | None = None, timeout: float = TIMEOUT
) -> Finished:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "further_link",
        *args,
        env=env,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), timeout)
    assert process.returncode is not None
    return Finished(process.returncode, out.decode(), err.decode())


async def start_client(
    *args: str, env: dict[str, str], stdin: int = subprocess.PIPE
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "further_link",
        *args,
        env=env,
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def read_line(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    return (await asyncio.wait_for(process.stdout.readline(), TIMEOUT)).decode()


# ------------------------------------------------------------------- running


async def test_output_and_exit_code_come_through(
    server: RunningServer, sandbox: Path, client_env: dict[str, str]
) -> None:
    script = program(
        sandbox, "import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)"
    )
    result = await further_link("run", script, *device_args(server), env=client_env)
    assert (result.code, result.stdout, result.stderr) == (3, "out\n", "err\n")


async def test_piped_stdin_is_forwarded_line_by_line(
    server: RunningServer, sandbox: Path, client_env: dict[str, str]
) -> None:
    script = program(sandbox, "a = input('first? ')\nb = input()\nprint(f'[{a}|{b}]')")
    result = await further_link(
        "run", script, *device_args(server), env=client_env, stdin="Ada\nLovelace é\n".encode()
    )
    assert result.stdout == "first? [Ada|Lovelace é]\n"
    assert result.code == 0
    # A last line without its newline still reaches input(), as it would locally.
    result = await further_link(
        "run", script, *device_args(server), env=client_env, stdin=b"Ada\nByron"
    )
    assert (result.code, result.stdout) == (0, "first? [Ada|Byron]\n")
    # The end of the piped input ends the program's input too.
    reader = program(sandbox, "import sys\nprint(sorted(sys.stdin.read().split()))")
    result = await further_link(
        "run", reader, *device_args(server), env=client_env, stdin=b"b\nc\na"
    )
    assert (result.code, result.stdout) == (0, "['a', 'b', 'c']\n")


async def test_input_from_a_terminal_is_forwarded_and_the_terminal_left_as_it_was(
    server: RunningServer, sandbox: Path, client_env: dict[str, str]
) -> None:
    script = program(sandbox, "name = input('name? ')\nprint('hi', name)")
    controller, terminal = os.openpty()
    try:
        client = await start_client(
            "run", script, *device_args(server), env=client_env, stdin=terminal
        )
        assert client.stdout is not None
        assert await asyncio.wait_for(client.stdout.readexactly(6), TIMEOUT) == b"name? "
        os.write(controller, b"Ada\n")
        assert await read_line(client) == "hi Ada\n"
        assert await asyncio.wait_for(client.wait(), TIMEOUT) == 0
        assert fcntl.fcntl(terminal, fcntl.F_GETFL) & os.O_NONBLOCK == 0
    finally:
        os.close(controller)
        os.close(terminal)


async def test_ctrl_c_stops_the_remote_program_and_exits_143(
    server: RunningServer, sandbox: Path, shared: Path, client_env: dict[str, str]
) -> None:
    marker = shared / "pid"
    script = program(sandbox, sleeper_script(marker, 120))
    # stdin stays open: the client must not wait for its input to end.
    client = await start_client("run", script, *device_args(server), env=client_env)
    assert await read_line(client) == "up\n"
    pid = int(marker.read_text())
    assert alive(pid)
    client.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(client.wait(), TIMEOUT) == 143
    assert not alive(pid)
    assert client.stderr is not None
    assert "stopping the program" in (await client.stderr.read()).decode()


async def test_second_ctrl_c_leaves_at_once(
    start_server: StartServer, sandbox: Path, client_env: dict[str, str]
) -> None:
    # Two grace periods (SIGINT, then SIGTERM) before SIGKILL: 20 s, within
    # the time the fixture gives the server to shut down afterwards.
    slow = await start_server(environ={"FURTHER_LINK_KILL_GRACE": "10"})
    script = program(
        sandbox,
        "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready')\ntime.sleep(120)\n",
    )
    client = await start_client("run", script, *device_args(slow), env=client_env)
    assert await read_line(client) == "ready\n"
    client.send_signal(signal.SIGINT)
    await asyncio.sleep(0.5)  # the program ignores SIGINT and SIGTERM: stopping it takes 20 s
    assert client.returncode is None
    started = time.monotonic()
    client.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(client.wait(), TIMEOUT) == 130
    assert time.monotonic() - started < 5


async def test_a_closed_output_pipe_stops_the_program(
    server: RunningServer, sandbox: Path, shared: Path, client_env: dict[str, str]
) -> None:
    marker = shared / "pid"
    script = program(
        sandbox,
        f"import time\n{write_pid_code(marker)}"
        "for i in range(100000):\n    print('line', i)\n    time.sleep(0.01)\n",
    )
    command = " ".join(
        shlex.quote(word)
        for word in [sys.executable, "-m", "further_link", "run", script, *device_args(server)]
    )
    pipeline = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        f'{command} | head -n 2; echo "client exit ${{PIPESTATUS[0]}}" >&2',
        env=client_env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(pipeline.communicate(), TIMEOUT)
    assert out.decode() == "line 0\nline 1\n"
    # Stopped as by Ctrl-C: Python's KeyboardInterrupt report, then the client's 143.
    assert err.decode().endswith("KeyboardInterrupt\nclient exit 143\n")
    assert not alive(int(marker.read_text()))


async def test_exit_by_signal_gives_128_plus_the_signal(
    server: RunningServer, sandbox: Path, client_env: dict[str, str]
) -> None:
    script = program(sandbox, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    result = await further_link("run", script, *device_args(server), env=client_env)
    assert result.code == 128 + signal.SIGKILL


async def test_files_are_uploaded_with_sub_directories(
    server: RunningServer, sandbox: Path, client_env: dict[str, str]
) -> None:
    project = sandbox / "my-project"
    (project / "lib").mkdir(parents=True)
    (project / "lib" / "helper.py").write_text("X = 41\n")
    (project / "data.txt").write_text("tea\n")
    (project / "__pycache__").mkdir()
    (project / "__pycache__" / "helper.cpython-311.pyc").write_bytes(b"\x00\x01binary")
    script = program(
        sandbox,
        "import os\nfrom lib import helper\n"
        "print(helper.X + 1, open('data.txt').read().strip(), os.path.basename(os.getcwd()))\n",
    )
    result = await further_link(
        "run", script, "--files", str(project), *device_args(server), env=client_env
    )
    assert (result.code, result.stdout) == (0, "42 tea my-project\n"), result.stderr
    uploaded = server.config.work_dir / "my-project"
    assert (uploaded / "lib" / "helper.py").read_text() == "X = 41\n"
    assert not (uploaded / "__pycache__").exists()  # left out of the upload


async def test_binary_files_are_uploaded_byte_exact_as_base64(
    server: RunningServer, sandbox: Path, client_env: dict[str, str]
) -> None:
    project = sandbox / "pics"
    (project / "img").mkdir(parents=True)
    picture = b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" + bytes(range(256))
    (project / "img" / "cat.png").write_bytes(picture)
    script = program(
        project,
        "import hashlib\nprint(hashlib.sha256(open('img/cat.png', 'rb').read()).hexdigest())\n",
    )
    result = await further_link(
        "run", script, "--files", str(project), *device_args(server), env=client_env
    )
    assert (result.code, result.stdout) == (0, hashlib.sha256(picture).hexdigest() + "\n"), (
        result.stderr
    )
    assert (server.config.work_dir / "pics" / "img" / "cat.png").read_bytes() == picture


async def test_the_devices_error_is_shown_and_nothing_runs(
    start_server: StartServer, sandbox: Path, client_env: dict[str, str]
) -> None:
    strict = await start_server(environ={"FURTHER_LINK_MAX_UPLOAD_FILES": "1"})
    project = sandbox / "two"
    project.mkdir()
    (project / "a.txt").write_text("a")
    (project / "b.txt").write_text("b")
    script = program(sandbox, "print('ran')")
    result = await further_link(
        "run", script, "--files", str(project), *device_args(strict), env=client_env
    )
    assert result.code == EXIT_FAILED
    assert result.stderr == "further-link: upload has 2 files; the limit is 1\n"
    assert result.stdout == ""


# ------------------------------------------------------------- refusals


async def test_run_without_pairing_tells_how_to_pair(
    server: RunningServer, sandbox: Path, client_env: dict[str, str]
) -> None:
    script = program(sandbox, "print('hi')")
    result = await further_link("run", script, *device_args(server, token=False), env=client_env)
    port = urlsplit(server.base_url).port
    assert result.code == EXIT_FAILED
    assert result.stderr.startswith(
        f"further-link: not paired with 127.0.0.1:{port}: "
        f"run further-link pair 127.0.0.1 --port {port} --no-ssl CODE"
    )
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr

    wrong = await further_link(
        "run", script, *device_args(server, token=False), "--token", "guess", env=client_env
    )
    assert wrong.code == EXIT_FAILED
    assert "not paired: 127.0.0.1" in wrong.stderr and "refused the given token" in wrong.stderr


async def test_connection_refused_is_one_clear_line(
    sandbox: Path, client_env: dict[str, str]
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = program(sandbox, "print('hi')")
    for tls in ([], ["--no-ssl"]):
        result = await further_link(
            "run", script, "--host", "127.0.0.1", "--port", str(port), *tls, env=client_env
        )
        assert result.code == EXIT_FAILED
        assert result.stderr == (
            f"further-link: cannot connect to 127.0.0.1:{port}: connection refused; "
            f"is further-link running there, on port {port}?\n"
        )


async def test_tls_and_plain_mix_ups_say_which_flag_to_change(
    start_server: StartServer, sandbox: Path, client_env: dict[str, str]
) -> None:
    plain = await start_server()
    tls = await start_server(no_ssl=False)
    script = program(sandbox, "print('hi')")
    plain_args = [a for a in device_args(plain) if a != "--no-ssl"]
    result = await further_link("run", script, *plain_args, env=client_env)
    assert result.code == EXIT_FAILED
    assert "add --no-ssl" in result.stderr and result.stderr.count("\n") == 1
    result = await further_link("run", script, *device_args(tls), "--no-ssl", env=client_env)
    assert result.code == EXIT_FAILED
    assert "leave out --no-ssl" in result.stderr and result.stderr.count("\n") == 1


def test_refusals_name_the_reason() -> None:
    device = Device("pi.local", 8028, tls=True)
    assert describe_refusal(device, 401, None) == (
        "not paired with pi.local:8028: run further-link pair pi.local CODE with the "
        "pairing code the device shows (`further-link token` prints it there)"
    )
    assert "HTTP 403: its origin is not allowed" in describe_refusal(device, 403, "stored")
    assert exit_status(-15) == 143 and exit_status(-9) == 137 and exit_status(3) == 3


# ---------------------------------------------------------------- pairing


async def test_pair_stores_the_token_and_run_then_needs_none(
    start_server: StartServer, sandbox: Path, client_env: dict[str, str]
) -> None:
    server = await start_server(no_ssl=False)
    args = device_args(server, token=False)
    host_and_port = args[1:4]  # 127.0.0.1 --port P
    wrong_code = f"{(int(pairing_code(server.token).code) + 1) % 10**9:09d}"
    result = await further_link("pair", *host_and_port, wrong_code, env=client_env)
    assert result.code == 1
    assert "pinned the certificate" in result.stderr  # first contact pins, even so
    assert "failed: wrong pairing code" in result.stderr
    assert HostStore(hosts_file(sandbox).parent).get(f"127.0.0.1:{args[3]}").token is None

    code = pairing_code(server.token).code
    result = await further_link("pair", *host_and_port, code, env=client_env)
    assert result.code == 0, result.stderr
    assert f"paired with 127.0.0.1:{args[3]}" in result.stdout
    stored = json.loads(hosts_file(sandbox).read_text())["hosts"][f"127.0.0.1:{args[3]}"]
    assert stored["token"] == server.token
    assert hosts_file(sandbox).stat().st_mode & 0o777 == 0o600

    script = program(sandbox, "print('paired run')")
    result = await further_link("run", script, *args, env=client_env)
    assert (result.code, result.stdout) == (0, "paired run\n"), result.stderr
    assert result.stderr == ""  # already pinned: nothing to say


# ------------------------------------------------------ certificate pinning


@pytest.fixture
def tls_server_env(sandbox: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FURTHER_LINK_")}
    env.update(PROGRAM_SETTINGS, FURTHER_LINK_CONFIG_DIR=str(sandbox / "device"))
    return env


@pytest.fixture
def tls_servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        if server.proc.poll() is None:
            server.stop()


def start_tls_server(
    sandbox: Path, env: dict[str, str], servers: list[ServerProcess], port: int = 0
) -> ServerProcess:
    args = [
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--work-dir",
        str(program_home(sandbox) / "w"),
    ]
    server = ServerProcess(args, env)
    servers.append(server)
    return server


def device_fingerprint(sandbox: Path) -> str:
    pem = (sandbox / "device" / "cert.pem").read_bytes()
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    return certificate_fingerprint(der)


def run_client(*args: str, env: dict[str, str]) -> Finished:
    out = subprocess.run(
        [sys.executable, "-m", "further_link", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    return Finished(out.returncode, out.stdout, out.stderr)


def test_certificate_is_pinned_and_a_changed_one_refused_until_trusted(
    sandbox: Path,
    tls_server_env: dict[str, str],
    tls_servers: list[ServerProcess],
    client_env: dict[str, str],
) -> None:
    first = start_tls_server(sandbox, tls_server_env, tls_servers)
    port = first.port
    token = (sandbox / "device" / "token").read_text().strip()
    script = program(sandbox, "print('on the device')")
    run = ["run", script, "--host", "127.0.0.1", "--port", str(port), f"--token={token}"]

    result = run_client(*run, env=client_env)
    assert (result.code, result.stdout) == (0, "on the device\n"), result.stderr
    first_fingerprint = device_fingerprint(sandbox)
    assert result.stderr == (
        f"further-link: pinned the certificate of 127.0.0.1:{port} on first use "
        f"(SHA-256 {first_fingerprint}); a different certificate will be refused\n"
    )
    store = HostStore(hosts_file(sandbox).parent)
    assert store.get(f"127.0.0.1:{port}").fingerprint == first_fingerprint
    assert hosts_file(sandbox).stat().st_mode & 0o777 == 0o600

    # Another server, same token, new certificate, same host and port.
    assert first.stop() == 0
    (sandbox / "device" / "cert.pem").unlink()
    (sandbox / "device" / "key.pem").unlink()
    start_tls_server(sandbox, tls_server_env, tls_servers, port=port)
    second_fingerprint = device_fingerprint(sandbox)
    assert second_fingerprint != first_fingerprint

    refused = run_client(*run, env=client_env)
    assert refused.code == EXIT_FAILED
    assert refused.stdout == ""
    assert f"the certificate of 127.0.0.1:{port} has CHANGED" in refused.stderr
    assert f"pinned: {first_fingerprint}" in refused.stderr
    assert f"now:    {second_fingerprint}" in refused.stderr
    assert "--trust-new-certificate" in refused.stderr
    assert store.get(f"127.0.0.1:{port}").fingerprint == first_fingerprint

    trusted = run_client(*run, "--trust-new-certificate", env=client_env)
    assert (trusted.code, trusted.stdout) == (0, "on the device\n"), trusted.stderr
    assert "now trusting the NEW certificate" in trusted.stderr
    assert store.get(f"127.0.0.1:{port}").fingerprint == second_fingerprint
    again = run_client(*run, env=client_env)
    assert (again.code, again.stderr) == (0, "")


# ------------------------------------------------------------- local parts


def test_project_reading_keeps_sub_directories_and_skips_caches(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "deep.py").write_text("x = 'é'\n")
    (root / "top.txt").write_text("line\r\nkept as is\n")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    assert read_project(root) == Project(
        "proj", {"a/b/deep.py": "x = 'é'\n", "top.txt": "line\r\nkept as is\n"}
    )
    assert read_project(root / "a" / "..").name == "proj"


def test_a_damaged_hosts_file_is_reported_not_overwritten(tmp_path: Path) -> None:
    store = HostStore(tmp_path)
    store.path.write_text("{not json")
    with pytest.raises(ClientError, match="is not a further-link hosts file"):
        store.get("h:1")
    with pytest.raises(ClientError):
        store.save_token("h:1", "t")
    assert store.path.read_text() == "{not json"
