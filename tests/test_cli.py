"""The `further-link` command as a user starts it: a real subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import aiohttp
import pytest

from further_link.config import DEFAULT_PORT, load_config
from further_link.errors import ConfigError

from conftest import AS_ROOT, PROGRAM_SETTINGS, alive, program_home, sleeper_script

# Settings for load_config alone, which creates nothing: nobody's home does not
# exist, so root's config needs a work dir (see test_accounts.py).
SETTINGS = {**PROGRAM_SETTINGS, "FURTHER_LINK_WORK_DIR": "/srv/further-link-test-unused"}
LISTENING = re.compile(r"listening on [^ ]+:(\d+)")


class ServerProcess:
    """`python -m further_link` in the background, with its log captured."""

    def __init__(self, args: list[str], env: dict[str, str], prefix: Sequence[str] = ()) -> None:
        """``prefix``: a command that runs the server, e.g. ``setpriv`` with its options."""
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "further_link", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.log: list[str] = []
        self.port = self._wait_for_port()

    def _wait_for_port(self) -> int:
        match = LISTENING.search(self.read_until("listening on"))
        assert match is not None
        return int(match.group(1))

    def read_until(self, text: str) -> str:
        """Read the log up to and including the first line containing ``text``."""
        assert self.proc.stdout is not None
        for line in self.log:
            if text in line:
                return line
        for line in self.proc.stdout:
            self.log.append(line)
            if text in line:
                return line
        raise AssertionError(f"server exited before logging {text!r}:\n" + "".join(self.log))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        assert self.proc.stdout is not None
        self.log += self.proc.stdout.readlines()
        return code


def plain_server(
    sandbox: Path, prefix: Sequence[str] = (), extra: Sequence[str] = ()
) -> ServerProcess:
    """`further-link serve` on a free loopback port over plain HTTP, its config in sandbox/cfg."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FURTHER_LINK_")}
    env.update(PROGRAM_SETTINGS, FURTHER_LINK_CONFIG_DIR=str(sandbox / "cfg"))
    work_dir = str(program_home(sandbox) / "w")
    args = ["--host", "127.0.0.1", "--port", "0", "--no-ssl", "--work-dir", work_dir, *extra]
    return ServerProcess(args, env, prefix)


@pytest.fixture
def server_env(sandbox: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FURTHER_LINK_")}
    env["XDG_CONFIG_HOME"] = str(sandbox / "config")
    env.update(PROGRAM_SETTINGS)
    # nobody's home does not exist, so the server needs a work dir (see test_accounts.py).
    env["FURTHER_LINK_WORK_DIR"] = str(program_home(sandbox) / "w")
    return env


@pytest.fixture
def spawned(sandbox: Path, server_env: dict[str, str]) -> Iterator[ServerProcess]:
    env = dict(
        server_env, FURTHER_LINK_PORT="0", FURTHER_LINK_WORK_DIR=str(program_home(sandbox) / "w")
    )
    env["FURTHER_LINK_NOSSL"] = "1"
    server = ServerProcess(["--host", "127.0.0.1"], env)
    yield server
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait()


async def test_env_vars_configure_port_work_dir_and_no_ssl(
    spawned: ServerProcess, sandbox: Path
) -> None:
    assert (program_home(sandbox) / "w").is_dir()
    startup = "".join(spawned.log)
    assert f"serving http://127.0.0.1:{spawned.port}/" in startup
    status_url = f"http://127.0.0.1:{spawned.port}/status"
    async with aiohttp.ClientSession() as http, http.get(status_url) as response:
        assert await response.text() == "OK"
    assert spawned.stop() == 0


async def test_sigterm_ends_running_programs_and_exits_cleanly(
    spawned: ServerProcess, sandbox: Path, shared: Path
) -> None:
    marker = shared / "pid"
    script = sleeper_script(marker, 120)
    token = (sandbox / "config" / "further-link" / "token").read_text().strip()
    url = f"http://127.0.0.1:{spawned.port}/run-py?token={token}"
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        await ws.send_str(json.dumps({"type": "start", "data": {"sourceScript": script}}))
        while json.loads((await ws.receive(timeout=30)).data)["type"] != "stdout":
            pass
        pid = int(marker.read_text())
        assert alive(pid)
        code = await asyncio.get_running_loop().run_in_executor(None, spawned.stop)
    assert code == 0
    assert not alive(pid)
    assert any("stopping" in line for line in spawned.log)


def test_tls_is_on_by_default(sandbox: Path, server_env: dict[str, str]) -> None:
    server = ServerProcess(
        ["--host", "127.0.0.1", "--port", "0", "--work-dir", str(program_home(sandbox) / "w")],
        server_env,
    )
    try:
        assert any(f"serving https://127.0.0.1:{server.port}/" in line for line in server.log)
        assert (sandbox / "config" / "further-link" / "key.pem").is_file()
    finally:
        assert server.stop() == 0


def test_version_flag(server_env: dict[str, str]) -> None:
    from further_link import PACKAGE_VERSION, __version__

    out = subprocess.run(
        [sys.executable, "-m", "further_link", "--version"],
        env=server_env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == f"further-link {PACKAGE_VERSION} (Further-Link API {__version__})"


def test_bad_port_is_reported_not_a_traceback(server_env: dict[str, str]) -> None:
    env = dict(server_env, FURTHER_LINK_PORT="eighty")
    out = subprocess.run(
        [sys.executable, "-m", "further_link"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1
    assert "FURTHER_LINK_PORT='eighty' is not a valid int" in out.stderr
    assert "Traceback" not in out.stderr


def test_config_defaults_follow_the_seed(tmp_path: Path) -> None:
    # As root: an account with a home (nobody's does not exist, see test_accounts.py).
    user = {"FURTHER_LINK_USER": "daemon"} if os.geteuid() == 0 else {}
    config = load_config(environ={"HOME": str(tmp_path), **PROGRAM_SETTINGS, **user})
    assert config.port == DEFAULT_PORT == 8028
    assert config.ssl is True
    assert config.work_dir.name == "further"
    assert config.run_as is not None
    assert config.work_dir == config.run_as.home / "further"


def test_config_env_vars(tmp_path: Path) -> None:
    config = load_config(
        environ={
            **SETTINGS,
            "FURTHER_LINK_PORT": "9000",
            "FURTHER_LINK_WORK_DIR": str(tmp_path / "wd"),
            "FURTHER_LINK_NOSSL": "true",
        }
    )
    assert (config.port, config.work_dir, config.ssl) == (9000, tmp_path / "wd", False)
    assert load_config(environ={"FURTHER_LINK_NOSSL": "0", **SETTINGS}).ssl is True


def test_flags_override_env() -> None:
    config = load_config(environ={"FURTHER_LINK_PORT": "9000", **SETTINGS}, port=9100)
    assert config.port == 9100


def test_config_rejects_bad_ports_and_hosts() -> None:
    with pytest.raises(ConfigError, match="port 99999 is not a port number"):
        load_config(environ=dict(SETTINGS), port=99999)
    with pytest.raises(ConfigError, match="is not an address"):
        load_config(environ=dict(SETTINGS), host="a\nExecStartPre=/bin/evil")


def test_config_rejects_half_a_certificate() -> None:
    with pytest.raises(ConfigError, match="both a certificate and a key"):
        load_config(environ={"FURTHER_LINK_CERT": "/x.pem", **SETTINGS})


async def test_plain_start_runs_programs_with_the_system_python_and_its_numpy(
    spawned: ServerProcess, sandbox: Path
) -> None:
    """The server runs from its virtualenv; programs get Debian's python3 and its packages."""
    assert sys.prefix != "/usr"  # the server's own interpreter is the project's virtualenv
    script = (
        "import sys, numpy, further_link\n"
        "print(sys.executable, numpy.__file__, int(numpy.arange(5).sum()))\n"
    )
    token = (sandbox / "config" / "further-link" / "token").read_text().strip()
    url = f"http://127.0.0.1:{spawned.port}/run-py?token={token}"
    output, stopped = "", None
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        await ws.send_str(json.dumps({"type": "start", "data": {"sourceScript": script}}))
        for _ in range(100):
            message = json.loads((await ws.receive(timeout=30)).data)
            if message["type"] == "stopped":
                stopped = message["data"]["exitCode"]
                break
            output += message["data"].get("output", "")
    assert stopped == 0, output
    executable, numpy_file, total = output.split()
    assert executable == "/usr/bin/python3"
    assert numpy_file.startswith("/usr/lib/python3/dist-packages/numpy/")
    assert total == "10"


def test_an_interpreter_the_program_user_cannot_run_stops_the_start(
    sandbox: Path, server_env: dict[str, str]
) -> None:
    private = sandbox / "private"
    private.mkdir(mode=0o700)
    if AS_ROOT:
        # A checkout under /root: the program account cannot even reach it.
        python = private / "python3"
        python.symlink_to("/usr/bin/python3")
        account = "nobody"
    else:
        python = private / "python3"
        python.write_text("#!/bin/sh\n")
        python.chmod(0o644)  # not executable
        account = pwd.getpwuid(os.getuid()).pw_name
    env = dict(server_env, FURTHER_LINK_PYTHON=str(python), FURTHER_LINK_PORT="0")
    env.update(FURTHER_LINK_NOSSL="1", FURTHER_LINK_WORK_DIR=str(sandbox / "w"))
    out = subprocess.run(
        [sys.executable, "-m", "further_link", "--host", "127.0.0.1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "listening on" not in out.stderr
    assert (
        f"programs would run with {python} as {account!r}, but {account!r} cannot run it "
        "(Permission denied); set FURTHER_LINK_PYTHON (or FURTHER_VENV)"
    ) in out.stderr
