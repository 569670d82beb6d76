"""The Debian package, installed on this machine as a school technician would.

`make deb` builds it (`make test` builds it once and passes it in
FURTHER_LINK_TEST_DEB); the test installs it with apt, checks what postinst
made, starts the installed unit's ExecStart= as systemd would (systemd is not
PID 1 here, so it cannot), runs a program through it, then removes and purges
the package. Root and apt only. The server listens on an ephemeral loopback
port and keeps uploads in the sandbox: concurrent suites never meet it.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import aiohttp
import psutil
import pytest

from further_link import PACKAGE_VERSION
from further_link.system.accounts import SYSTEM_ACCOUNT

from conftest import AS_ROOT, read_startup, run_py_stdout

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "further-link"
COMMAND = Path("/usr/bin/further-link")
UNIT = Path("/lib/systemd/system/further-link.service")
DEFAULTS = Path("/etc/default/further-link")
CONFIG_DIR = Path("/etc/further-link")
WANTS = Path("/etc/systemd/system/multi-user.target.wants/further-link.service")
APT_TIMEOUT = 600
# Another apt on this machine (another suite's `make system-deps`) is waited for, not failed on.
APT = ("apt-get", "-o", "DPkg::Lock::Timeout=300")
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
    return REPO / "dist" / f"further-link_{PACKAGE_VERSION}_all.deb"


@pytest.fixture
def clean_machine() -> Iterator[None]:
    """Refuses to touch an installation it did not make; purges its own in any case."""
    if installed() or COMMAND.exists() or CONFIG_DIR.exists():
        pytest.fail(f"{PACKAGE} is already on this machine: remove it first (apt purge)")
    had_system_account = any(e.pw_name == SYSTEM_ACCOUNT for e in pwd.getpwall())
    yield
    if installed() or CONFIG_DIR.exists():
        subprocess.run([*APT, "purge", "-y", PACKAGE], capture_output=True, timeout=600)
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
    assert deb.name == f"further-link_{PACKAGE_VERSION}_all.deb" and deb.is_file()
    out = sh(*APT, "install", "-y", str(deb))
    # postinst: the account choice, the config dir, token and certificate, and where to pair.
    chosen = re.search(r"programs run as '([^']+)': ", out)
    assert chosen, out
    program_user = pwd.getpwnam(chosen.group(1))
    assert program_user.pw_uid != 0
    assert "journalctl -u further-link" in out and "sudo further-link token" in out
    assert COMMAND.is_file() and UNIT.is_file() and DEFAULTS.is_file()
    assert WANTS.is_symlink(), "dh_installsystemd enables the service"
    assert (CONFIG_DIR.stat().st_mode & 0o777) == 0o700
    token = (CONFIG_DIR / "token").read_text().strip()
    assert (CONFIG_DIR / "cert.pem").is_file() and (CONFIG_DIR / "key.pem").is_file()
    sh("systemd-analyze", "verify", str(UNIT), timeout=120)

    # The server drops to the program user before making its work dir: a dir of its own.
    own = sandbox / "own"
    own.mkdir()
    os.chown(own, program_user.pw_uid, program_user.pw_gid)
    command, env = service_command(
        UNIT.read_text(),
        # As systemd would start it, but on an ephemeral loopback port and with
        # uploads in the sandbox, so no other server or account is touched.
        {
            "FURTHER_LINK_HOST": "127.0.0.1",
            "FURTHER_LINK_PORT": "0",
            "FURTHER_LINK_WORK_DIR": str(own / "work"),
        },
    )
    assert command == [str(COMMAND), "serve"]
    server = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert server.stdout is not None
        startup = read_startup(server.stdout)
        account = pwd.getpwnam(startup.account)
        assert account == program_user
        tls = ssl.create_default_context(cafile=str(CONFIG_DIR / "cert.pem"))
        base = f"https://127.0.0.1:{startup.port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/status", ssl=tls) as response:
                assert (response.status, await response.text()) == (200, "OK")
            url = f"wss://127.0.0.1:{startup.port}/run-py?token={token}"
            script = "import os\nprint('hi from', os.getuid())"
            output = await run_py_stdout(http, url, script, tls)
        assert output == f"hi from {account.pw_uid}\n"
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0

    # Stopping on remove is systemd's (no PID 1 here): the script must ask it to.
    prerm = Path("/var/lib/dpkg/info/further-link.prerm").read_text()
    assert "deb-systemd-invoke stop 'further-link.service'" in prerm
    sh(*APT, "remove", "-y", PACKAGE)
    assert not COMMAND.exists() and not UNIT.exists()
    assert not [
        p.pid for p in psutil.process_iter(["cmdline"]) if str(COMMAND) in (p.info["cmdline"] or [])
    ]
    assert (CONFIG_DIR / "token").read_text().strip() == token, "remove keeps the token"
    sh(*APT, "purge", "-y", PACKAGE)
    assert not CONFIG_DIR.exists() and not DEFAULTS.exists() and not WANTS.is_symlink()
    assert not installed()


# --------------------------------------------- a booted throw-away Debian with systemd

ROOTFS_PACKAGES = "systemd,systemd-sysv,dbus,adduser,python3-aiohttp,python3-cryptography,"
ROOTFS_PACKAGES += "python3-psutil,python3-pil,python3-zeroconf"
# Named by the package list too: a dependency added later gets a root that has it.
ROOTFS_NAME = hashlib.sha256(ROOTFS_PACKAGES.encode()).hexdigest()[:8]
ROOTFS = Path("/var/cache/further-link-test") / f"{PACKAGE_VERSION}-{ROOTFS_NAME}-rootfs"
BOOT_TIMEOUT = 120
# Runs inside the container: /status, then a program through the installed service.
CLIENT = """
import asyncio, json, ssl, sys
import aiohttp
async def main():
    token = open("/etc/further-link/token").read().strip()
    tls = ssl.create_default_context(cafile="/etc/further-link/cert.pem")
    async with aiohttp.ClientSession() as http:
        async with http.get("https://127.0.0.1:8028/status", ssl=tls) as response:
            print("status", response.status, await response.text())
        url = "wss://127.0.0.1:8028/run-py?token=" + token
        async with http.ws_connect(url, ssl=tls) as ws:
            start = {"type": "start", "data": {"sourceScript": sys.argv[1]}}
            await ws.send_str(json.dumps(start))
            # An unbuffered print() is several writes, which may come as several messages.
            output = ""
            while True:
                message = json.loads((await ws.receive(timeout=60)).data)
                if message["type"] == "stdout":
                    output += message["data"]["output"]
                if message["type"] == "stopped":
                    break
            print("stdout", json.dumps(output))
asyncio.run(main())
"""


def codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip('"')
    return "bookworm"


@pytest.fixture(scope="module")
def debian_root() -> Path:
    """A minimal Debian of this machine's release with systemd, made once and kept."""
    missing = [t for t in ("mmdebstrap", "systemd-nspawn") if shutil.which(t) is None]
    if missing:
        sh(
            *APT,
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "mmdebstrap",
            "systemd-container",
        )
    if not ROOTFS.is_dir():
        ROOTFS.parent.mkdir(parents=True, exist_ok=True)
        partial = ROOTFS.with_name(f"{ROOTFS.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        sh(
            "mmdebstrap",
            "--variant=minbase",
            f"--include={ROOTFS_PACKAGES}",
            codename(),
            str(partial),
            timeout=900,
        )
        try:
            partial.rename(ROOTFS)
        except OSError:  # another run made it first
            shutil.rmtree(partial, ignore_errors=True)
    probe = subprocess.run(
        ["systemd-nspawn", "-q", "--register=no", "--keep-unit", "-D", str(ROOTFS), "/bin/true"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.returncode != 0:
        pytest.skip(f"systemd-nspawn cannot run containers here: {probe.stderr.strip()}")
    return ROOTFS


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return ""


class Container:
    """A booted throw-away copy of ``root`` (no network but its own loopback)."""

    def __init__(self, root: Path, deb: Path) -> None:
        self.nspawn = subprocess.Popen(
            [
                "systemd-nspawn",
                "-q",
                "--register=no",
                "--keep-unit",
                "--private-network",
                "--ephemeral",
                "-D",
                str(root),
                f"--bind-ro={deb}:/root/further-link.deb",
                "--console=passive",
                "-b",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.init = 0
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline and self.init == 0:
            # The container's init, not nspawn's own helper child that comes first.
            self.init = next(
                (p.pid for p in _descendants(self.nspawn.pid) if _name(p) == "systemd"), 0
            )
            time.sleep(0.2)
        state = ""
        while time.monotonic() < deadline and state not in ("running", "degraded"):
            time.sleep(0.5)
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
        assert state in ("running", "degraded"), f"the container did not boot: {state!r}"

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [
                "nsenter",
                "-t",
                str(self.init),
                "-a",
                "env",
                "-i",
                f"PATH={SYSTEMD_ENV['PATH']}",
                "LANG=C.UTF-8",
                "HOME=/root",
                "DEBIAN_FRONTEND=noninteractive",
                *command,
            ],
            capture_output=True,
            text=True,
            timeout=APT_TIMEOUT,
        )
        assert not check or result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"
        return result

    def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not predicate():
            assert time.monotonic() < deadline, f"gave up waiting: {what}"
            time.sleep(0.5)

    def stop(self) -> None:
        self.nspawn.terminate()  # nspawn shuts the container down
        try:
            self.nspawn.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.nspawn.kill()
            self.nspawn.wait(timeout=60)


def test_package_under_systemd_starts_at_install_and_apt_remove_stops_it(
    deb: Path, debian_root: Path
) -> None:
    """The package on a fresh Debian with systemd as PID 1 and no person's account."""
    box = Container(debian_root, deb)
    try:
        out = box.run("apt-get", "install", "-y", "/root/further-link.deb").stdout
        assert "programs run as 'further-link': the dedicated system account (created it" in out
        account = box.run("getent", "passwd", "further-link").stdout.split(":")
        assert account[6].strip() == "/usr/sbin/nologin" and int(account[2]) < 1000
        journal = ("journalctl", "-u", "further-link", "--no-pager")
        box.wait_for(lambda: "programs run as" in box.run(*journal).stdout, "the service's log")
        assert box.run("systemctl", "is-active", "further-link").stdout.strip() == "active"
        assert box.run("systemctl", "is-enabled", "further-link").stdout.strip() == "enabled"
        log = box.run(*journal).stdout
        assert re.search(r"serving https://[^ ]+\.local:8028/", log), log
        box.run("systemd-analyze", "verify", str(UNIT))

        ran = box.run("python3", "-c", CLIENT, "import os\nprint('hi', os.getuid())").stdout
        assert ran.splitlines() == ["status 200 OK", f'stdout "hi {account[2]}\\n"'], ran

        box.run("apt-get", "remove", "-y", PACKAGE)
        assert box.run("systemctl", "is-active", "further-link", check=False).stdout.strip() in (
            "inactive",
            "unknown",
        )
        leftovers = box.run(
            "python3",
            "-c",
            "import psutil; print([p.pid for p in psutil.process_iter(['cmdline', 'username'])"
            " if p.info['username'] == 'further-link'"
            " or '/usr/bin/further-link' in (p.info['cmdline'] or [])])",
        ).stdout.strip()
        assert leftovers == "[]", "apt remove stopped the server and every program"
        assert box.run("test", "-e", str(UNIT), check=False).returncode == 1
        assert box.run("test", "-d", str(CONFIG_DIR), check=False).returncode == 0
        box.run("apt-get", "purge", "-y", PACKAGE)
        assert box.run("test", "-e", str(CONFIG_DIR), check=False).returncode == 1
        assert box.run("test", "-L", str(WANTS), check=False).returncode == 1
    finally:
        box.stop()
