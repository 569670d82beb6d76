"""Programs never run as root: who they run as, and what they own."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from further_link.config import resolve_run_as
from further_link.errors import ConfigError

from conftest import AS_ROOT, Client, RunningServer


def test_root_never_runs_programs_as_root() -> None:
    with pytest.raises(ConfigError, match="programs never run as root, and user 'root' is root"):
        resolve_run_as("root", euid=0)


def test_root_switches_to_the_configured_user() -> None:
    run_as = resolve_run_as("nobody", euid=0)
    assert run_as.drop and run_as.uid == pwd.getpwnam("nobody").pw_uid


def test_unknown_user_is_a_clear_error() -> None:
    with pytest.raises(
        ConfigError, match="user 'no-such-user-x' to run programs as does not exist"
    ):
        resolve_run_as("no-such-user-x", euid=0)


def test_without_root_programs_run_as_the_server_user() -> None:
    me = pwd.getpwuid(os.getuid())
    if os.getuid() == 0:
        other = pwd.getpwnam("nobody")
        run_as = resolve_run_as(None, euid=other.pw_uid)
        assert (run_as.name, run_as.drop) == ("nobody", False)
        with pytest.raises(ConfigError, match="only root can switch users"):
            resolve_run_as("daemon", euid=other.pw_uid)
    else:  # pragma: no cover - CI runs as root
        assert resolve_run_as(None).name == me.pw_name


async def test_program_runs_as_the_configured_account(
    client: Client, server: RunningServer
) -> None:
    run_as = server.config.run_as
    assert run_as is not None
    script = "import os\nprint(os.getuid(), os.geteuid(), os.getgid(), os.environ['USER'])"
    result = await client.run({"sourceScript": script})
    assert result.stdout == f"{run_as.uid} {run_as.uid} {run_as.gid} {run_as.name}\n"
    if AS_ROOT:
        assert run_as.uid != 0


async def test_uploaded_files_belong_to_the_program_user(
    client: Client, server: RunningServer
) -> None:
    await client.send(
        "upload",
        {
            "directory": {
                "name": "p",
                "files": {"a/b.txt": {"type": "text", "content": {"text": "x"}}},
            }
        },
    )
    assert (await client.receive())["type"] == "uploaded"
    run_as = server.config.run_as
    assert run_as is not None
    project = server.config.work_dir / "p"
    for path in (project, project / "a", project / "a" / "b.txt"):
        assert path.stat().st_uid == run_as.uid
    result = await client.run(
        {"sourceScript": "open('a/new.txt', 'w').write('ok')\nprint('wrote')", "directoryName": "p"}
    )
    assert result.stdout == "wrote\n", result.stderr


async def test_program_cannot_write_the_servers_files(client: Client, sandbox: Path) -> None:
    if not AS_ROOT:
        pytest.skip("only meaningful when the server runs as root")  # pragma: no cover
    planted = sandbox / "planted.txt"  # the sandbox root belongs to root, mode 0755
    result = await client.run({"sourceScript": f"open({str(planted)!r}, 'w')"})
    assert "PermissionError" in result.stderr
    assert not planted.exists()
