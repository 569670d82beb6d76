"""The Debian package, installed on this machine as a school technician would.

`make deb` builds it (`make test` builds it once and passes it in
FURTHER_LINK_TEST_DEB); the test installs it with apt, checks what postinst
made, starts the installed unit's ExecStart= as systemd would (systemd is not
PID 1 here, so it cannot), runs a program through it, then removes and purges
the package. Root and apt only. The server listens on an ephemeral loopback
port and keeps uploads in the sandbox: concurrent suites never meet it.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import signal
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import psutil
import pytest

from further_link import __version__
from further_link.accounts import SYSTEM_ACCOUNT

from conftest import AS_ROOT, TIMEOUT

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "further-link"
COMMAND = Path("/usr/bin/further-link")
UNIT = Path("/lib/systemd/system/further-link.service")
DEFAULTS = Path("/etc/default/further-link")
CONFIG_DIR = Path("/etc/further-link")
WANTS = Path("/etc/systemd/system/multi-user.target.wants/further-link.service")
APT_TIMEOUT = 600
# What systemd gives a system service: no HOME, a fixed PATH.
SYSTEMD_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}

pytestmark = pytest.mark.skipif(
    not (AS_ROOT and shutil.which("apt-get") and shutil.which("dpkg")),
    reason="installs a Debian package: root on Debian only",
)


def sh(*command: str, timeout: float = APT_TIMEOUT) -> str:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", PATH=SYSTEMD_ENV["PATH"])
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def installed() -> bool:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${db:Status-Status}", PACKAGE], capture_output=True, text=True
    )
    return result.stdout.strip() not in ("", "not-installed", "config-files") and (
        result.returncode == 0
    )


@pytest.fixture(scope="module")
def deb() -> Path:
    given = os.environ.get("FURTHER_LINK_TEST_DEB")
    if given:
        return Path(given)
    sh("make", "-C", str(REPO), "--no-print-directory", "deb")
    return REPO / "dist" / f"further-link_{__version__}_all.deb"


@pytest.fixture
def clean_machine() -> Iterator[None]:
    """Refuses to touch an installation it did not make; purges its own in any case."""
    if installed() or COMMAND.exists() or CONFIG_DIR.exists():
        pytest.fail(f"{PACKAGE} is already on this machine: remove it first (apt purge)")
    had_system_account = any(e.pw_name == SYSTEM_ACCOUNT for e in pwd.getpwall())
    yield
    if installed() or CONFIG_DIR.exists():
        subprocess.run(["apt-get", "purge", "-y", PACKAGE], capture_output=True, timeout=600)
    if not had_system_account and any(e.pw_name == SYSTEM_ACCOUNT for e in pwd.getpwall()):
        # postinst made it on a machine with no person's account; leave none behind.
        subprocess.run(["userdel", "--remove", SYSTEM_ACCOUNT], capture_output=True, timeout=60)
        subprocess.run(["groupdel", SYSTEM_ACCOUNT], capture_output=True, timeout=60)


def service_command(unit_text: str, overrides: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """ExecStart= and the environment systemd would give it (Environment=, EnvironmentFile=)."""
    env = dict(SYSTEMD_ENV)
    command: list[str] = []
    for line in unit_text.splitlines():
        key, _, value = line.partition("=")
        if key == "ExecStart":
            command = shlex.split(value)
        elif key == "Environment":
            for assignment in shlex.split(value):
                name, _, setting = assignment.partition("=")
                env[name] = setting
        elif key == "EnvironmentFile":
            path = Path(value.lstrip("-"))
            for setting in path.read_text().splitlines() if path.exists() else []:
                if setting.strip() and not setting.lstrip().startswith("#"):
                    name, _, raw = setting.partition("=")
                    env[name.strip()] = raw.strip()
    env.update(overrides)
    return command, env


async def test_package_installs_serves_runs_a_program_and_is_removed_and_purged(
    deb: Path, clean_machine: None, sandbox: Path
) -> None:
    assert deb.name == f"further-link_{__version__}_all.deb" and deb.is_file()
    out = sh("apt-get", "install", "-y", str(deb))
    # postinst: the account choice, the config dir, token and certificate, and where to pair.
    assert re.search(r"programs run as '[^']+': ", out), out
    assert "journalctl -u further-link" in out and "sudo further-link token" in out
    assert COMMAND.is_file() and UNIT.is_file() and DEFAULTS.is_file()
    assert WANTS.is_symlink(), "dh_installsystemd enables the service"
    assert (CONFIG_DIR.stat().st_mode & 0o777) == 0o700
    token = (CONFIG_DIR / "token").read_text().strip()
    assert (CONFIG_DIR / "cert.pem").is_file() and (CONFIG_DIR / "key.pem").is_file()
    sh("systemd-analyze", "verify", str(UNIT), timeout=120)

    command, env = service_command(
        UNIT.read_text(),
        # As systemd would start it, but on an ephemeral loopback port and with
        # uploads in the sandbox, so no other server or account is touched.
        {
            "FURTHER_LINK_HOST": "127.0.0.1",
            "FURTHER_LINK_PORT": "0",
            "FURTHER_LINK_WORK_DIR": str(sandbox / "work"),
        },
    )
    assert command == [str(COMMAND), "serve"]
    server = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert server.stdout is not None
        log = ""
        for line in server.stdout:
            log += line
            if "programs run as" in line:
                break
        port_match = re.search(r"listening on 127\.0\.0\.1:(\d+)", log)
        account_match = re.search(r"programs run as '([^']+)'", log)
        assert port_match and account_match, log
        account = pwd.getpwnam(account_match.group(1))
        assert account.pw_uid != 0
        tls = ssl.create_default_context(cafile=str(CONFIG_DIR / "cert.pem"))
        base = f"https://127.0.0.1:{port_match.group(1)}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/status", ssl=tls) as response:
                assert (response.status, await response.text()) == (200, "OK")
            url = f"wss://127.0.0.1:{port_match.group(1)}/run-py?token={token}"
            async with http.ws_connect(url, ssl=tls) as ws:
                script = "import os\nprint('hi from', os.getuid())"
                await ws.send_str(json.dumps({"type": "start", "data": {"sourceScript": script}}))
                output = ""
                while True:
                    message = json.loads((await ws.receive(timeout=TIMEOUT)).data)
                    if message["type"] == "stdout":
                        output += message["data"]["output"]
                    elif message["type"] == "stopped":
                        break
        assert output == f"hi from {account.pw_uid}\n"
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0

    # Stopping on remove is systemd's (no PID 1 here): the script must ask it to.
    prerm = Path("/var/lib/dpkg/info/further-link.prerm").read_text()
    assert "deb-systemd-invoke stop 'further-link.service'" in prerm
    sh("apt-get", "remove", "-y", PACKAGE)
    assert not COMMAND.exists() and not UNIT.exists()
    assert not [
        p.pid for p in psutil.process_iter(["cmdline"]) if str(COMMAND) in (p.info["cmdline"] or [])
    ]
    assert (CONFIG_DIR / "token").read_text().strip() == token, "remove keeps the token"
    sh("apt-get", "purge", "-y", PACKAGE)
    assert not CONFIG_DIR.exists() and not DEFAULTS.exists() and not WANTS.is_symlink()
    assert not installed()
