"""`further-link install-service`: the systemd unit it writes, checked by systemd itself,
its refusal of installations others could change, and its hardening tried on a real
server that drops to the program user."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from test_cli import plain_server

from further_link.errors import ServiceError
from further_link.system.service import (
    Installation,
    ServiceInstaller,
    installation_problems,
    quote_exec_word,
    render_unit,
)

from conftest import AS_ROOT, PROGRAM_SETTINGS, TIMEOUT, alive, program_home, write_pid_code

UNIT = Path("etc/systemd/system/further-link.service")
WORK_DIR = "/srv/further work/100% fun"
# Programs are stopped with SIGTERM, then SIGKILL after 1 s; allow for a slow machine.
STOP_WITHIN = 15.0


def install_service(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FURTHER_LINK_")}
    return subprocess.run(
        [sys.executable, "-m", "further_link", "install-service", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> values, in order: systemd allows a key more than once."""
    sections: dict[str, dict[str, list[str]]] = {}
    section: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = sections.setdefault(line.strip("[]"), {})
            continue
        key, separator, value = line.partition("=")
        assert separator, f"not a setting: {line!r}"
        section.setdefault(key, []).append(value)
    return sections


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    # --force: the suite runs from a development checkout, which is refused otherwise.
    result = install_service(
        "--root",
        str(tmp_path),
        "--user",
        "nobody",
        "--port",
        "9000",
        "--work-dir",
        WORK_DIR,
        "--force",
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote {tmp_path / UNIT}" in result.stdout
    assert "--root was given, so systemctl was not run" in result.stdout
    return tmp_path / UNIT


def test_unit_starts_this_server_at_boot_with_the_given_settings(installed: Path) -> None:
    assert installed.stat().st_mode & 0o777 == 0o644
    unit = read_unit(installed)
    assert set(unit) == {"Unit", "Service", "Install"}
    assert unit["Unit"]["After"] == unit["Unit"]["Wants"] == ["network-online.target"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    service = {key: values[-1] for key, values in unit["Service"].items()}
    exec_start = service["ExecStart"]
    assert exec_start == f"{os.path.abspath(sys.executable)} -m further_link serve"
    assert os.access(exec_start.split()[0], os.X_OK)
    # A program (same account as the server) can kill it; it comes back.
    assert service["Restart"] == "always"
    assert service["Delegate"] == "yes"
    assert service["StandardOutput"] == "journal"
    assert service["KillMode"] == "mixed"
    assert unit["Service"]["Environment"] == [
        '"FURTHER_LINK_USER=nobody"',
        '"FURTHER_LINK_PORT=9000"',
        '"FURTHER_LINK_WORK_DIR=/srv/further work/100%% fun"',
    ]
    assert service["EnvironmentFile"] == "-/etc/default/further-link"
    assert service["NoNewPrivileges"] == "yes"
    capabilities = service["CapabilityBoundingSet"].split()
    # Only what the root phase needs before the drop.
    assert set(capabilities) == {"CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_NET_BIND_SERVICE"}
    # Started as root (the secrets stay root's), it drops by itself; programs keep
    # devices, /tmp and home; the delegated cgroup subtree stays writable.
    for breaks in ("User", "PrivateDevices", "PrivateTmp", "ProtectHome", "ProtectControlGroups"):
        assert breaks not in service


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_the_unit(installed: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(installed)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "further-link.service" not in output, output  # no warnings about our unit


def test_reinstalling_updates_and_uninstall_removes(installed: Path, tmp_path: Path) -> None:
    again = install_service("--root", str(tmp_path), "--user", "nobody", "--no-ssl", "--force")
    assert again.returncode == 0, again.stderr
    assert f"updated {installed}" in again.stdout
    assert '"FURTHER_LINK_NOSSL=1"' in installed.read_text()
    assert "FURTHER_LINK_PORT" not in installed.read_text()
    removed = install_service("--root", str(tmp_path), "--uninstall")
    assert removed.returncode == 0, removed.stderr
    assert f"removed {installed}" in removed.stdout
    assert not installed.exists()
    twice = install_service("--root", str(tmp_path), "--uninstall")
    assert twice.returncode == 0 and "not installed" in twice.stdout


def test_programs_never_run_as_root_here_either(tmp_path: Path) -> None:
    result = install_service("--root", str(tmp_path), "--user", "root", "--force")
    assert result.returncode == 1
    assert "programs never run as root" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / UNIT).exists()


def make_venv(where: Path) -> Path:
    """A virtualenv at ``where`` that can import further-link (through the suite's own venv)."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=TIMEOUT
    )
    site_packages = next(where.glob("lib/python3*/site-packages"))
    ours = next(Path(sys.prefix).glob("lib/python3*/site-packages"))
    (site_packages / "suite.pth").write_text(f"import site; site.addsitedir({str(ours)!r})\n")
    return where / "bin" / "python"


def install_with(python: Path, root: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FURTHER_LINK_")}
    return subprocess.run(
        [
            str(python),
            "-m",
            "further_link",
            "install-service",
            "--root",
            str(root),
            "--user",
            "nobody",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd="/",
    )


@pytest.mark.skipif(not AS_ROOT, reason="needs root to give the venv to another account")
def test_a_virtualenv_the_program_user_can_write_is_refused(sandbox: Path) -> None:
    home = program_home(sandbox)
    python = make_venv(home / ".venv")
    nobody = pwd.getpwnam("nobody")
    for path in [home / ".venv", *(home / ".venv").rglob("*")]:
        os.lchown(path, nobody.pw_uid, nobody.pw_gid)
    result = install_with(python, sandbox / "root")
    assert result.returncode == 1, result.stdout
    assert f"will not start {python} as root at boot" in result.stderr
    assert f"{home / '.venv'} belongs to nobody, not root" in result.stderr
    assert "Fix: install further-link where only root can write" in result.stderr
    assert "--force" in result.stderr
    assert not (sandbox / "root" / UNIT).exists()


def test_an_interpreter_under_tmp_is_refused(tmp_path: Path) -> None:
    where = Path(tempfile.mkdtemp(dir="/tmp", prefix="further-link-test-venv-"))
    try:
        where.chmod(0o755)
        python = make_venv(where / "venv")
        result = install_with(python, tmp_path)
    finally:
        shutil.rmtree(where)
    assert result.returncode == 1, result.stdout
    assert "/tmp is a world-writable directory (like /tmp)" in result.stderr
    assert not (tmp_path / UNIT).exists()


def test_a_development_checkout_is_refused_unless_forced(tmp_path: Path) -> None:
    result = install_service("--root", str(tmp_path), "--user", "nobody")
    assert result.returncode == 1
    assert "further-link runs from a development checkout" in result.stderr
    assert not (tmp_path / UNIT).exists()


def test_a_root_only_system_python_passes_the_check() -> None:
    """The check can pass: Debian's own python3 and its packages belong to root alone."""
    system = Installation(
        executable=Path("/usr/bin/python3"),
        prefixes=(Path("/usr"),),
        import_paths=tuple(p for p in (Path("/usr/lib/python3/dist-packages"),) if p.is_dir()),
        package_dir=Path("/usr/lib/python3/dist-packages"),
        editable=False,
    )
    assert installation_problems(system) == []


def test_only_root_installs_for_real() -> None:
    with pytest.raises(ServiceError, match="install-service must run as root"):
        ServiceInstaller(None, print, euid=1000)
    ServiceInstaller(Path("/tmp/anywhere"), print, euid=1000)  # --root needs no root


def test_without_systemd_the_unit_is_written_and_the_next_step_explained(tmp_path: Path) -> None:
    said: list[str] = []
    installer = ServiceInstaller(None, said.append, euid=0, manage=False)
    installer.unit_path = tmp_path / UNIT  # not the real /etc in a test
    installer.install("[Unit]\n")
    assert said[-1] == (
        "systemd is not running here, so systemctl was not run; on the target system run: "
        "systemctl daemon-reload && systemctl enable --now further-link"
    )


def test_exec_words_are_quoted_for_systemd() -> None:
    assert quote_exec_word("/usr/bin/python3") == "/usr/bin/python3"
    assert quote_exec_word("/opt/my venv/bin/python") == '"/opt/my venv/bin/python"'
    assert quote_exec_word("/opt/100%/$HOME") == "/opt/100%%/$$HOME"
    assert quote_exec_word('a"b\\c') == '"a\\"b\\\\c"'
    unit = render_unit(["/opt/my venv/bin/python", "-m", "further_link", "serve"], {})
    assert 'ExecStart="/opt/my venv/bin/python" -m further_link serve\n' in unit


async def receive_type(ws: aiohttp.ClientWebSocketResponse, kind: str) -> dict[str, Any]:
    while True:
        message: dict[str, Any] = json.loads((await ws.receive()).data)
        if message["type"] == kind:
            return message


def setpriv_prefix(unit_path: Path) -> list[str]:
    """``setpriv`` options that give a process what the unit gives the service."""
    service = read_unit(unit_path)["Service"]
    assert service["NoNewPrivileges"] == ["yes"]
    keep = [cap.lower()[len("cap_") :] for cap in service["CapabilityBoundingSet"][-1].split()]
    return ["setpriv", "--nnp", "--bounding-set", ",".join(["-all", *(f"+{c}" for c in keep)])]


@pytest.mark.skipif(not AS_ROOT, reason="switching to the program user needs root")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux's setpriv")
async def test_hardened_server_still_runs_programs_as_the_program_user(
    installed: Path, sandbox: Path, shared: Path
) -> None:
    server = plain_server(sandbox, prefix=setpriv_prefix(installed))
    marker = shared / "daemon-pid"
    # A learner's program that leaves a double-forked daemon behind in its own session:
    # the server finds it by the run tag in its environment (same account: no capability needed).
    daemon_source = (
        "import os, time\n"
        "if os.fork(): os._exit(0)\n"
        "os.setsid()\n"
        f"{write_pid_code(marker)}"
        "time.sleep(120)\n"
    )
    script = textwrap.dedent(
        f"""\
        import os, subprocess, sys, time
        status = dict(line.split(':', 1) for line in open('/proc/self/status').read().splitlines())
        print(os.getuid(), status['NoNewPrivs'].strip(), status['CapEff'].strip())
        subprocess.run([sys.executable, '-c', {daemon_source!r}])
        while not os.path.exists({str(marker)!r}):
            time.sleep(0.05)
        print('ready', flush=True)
        time.sleep(120)
        """
    )
    try:
        token = (sandbox / "cfg" / "token").read_text().strip()
        url = f"http://127.0.0.1:{server.port}/run-py?token={token}"
        async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
            await ws.send_json({"type": "start", "data": {"sourceScript": script}})
            output = ""
            while "ready" not in output:
                message = json.loads((await ws.receive(timeout=TIMEOUT)).data)
                assert message["type"] in ("started", "stdout"), message
                output += message.get("data", {}).get("output", "")
            uid, no_new_privs, effective = output.split("\n")[0].split()
            assert int(uid) == pwd.getpwnam(PROGRAM_SETTINGS["FURTHER_LINK_USER"]).pw_uid
            assert no_new_privs == "1"
            assert int(effective, 16) == 0  # the server dropped root: no capability left
            server_status = Path(f"/proc/{server.proc.pid}/status").read_text()
            assert f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}\n" in server_status
            daemon = int(marker.read_text())
            assert alive(daemon)
            await ws.send_json({"type": "stop"})
            # Well before the daemon's own end: the server found it and killed it.
            stopped = await asyncio.wait_for(receive_type(ws, "stopped"), STOP_WITHIN)
            assert stopped["data"]["exitCode"] == -15
            assert not alive(daemon)
    finally:
        code = await asyncio.get_running_loop().run_in_executor(None, server.stop)
    assert code == 0, "".join(server.log)
