"""The v5 /run websocket (today's Further IDE), replaying the spec's recorded exchanges."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
from collections.abc import Awaitable
from pathlib import Path
from typing import Callable

import pytest

from conftest import (
    PROGRAM_SETTINGS,
    TIMEOUT,
    RunningServer,
    alive,
    give_to_program_user,
    sleeper_script,
    write_pid_code,
)
from v5client import V5Connect, connect_run

PROGRAM_PYTHON = PROGRAM_SETTINGS.get("FURTHER_LINK_PYTHON", "/usr/bin/python3")

__all__ = ["connect_run"]


def frame(kind: str, data: object, client: str, process: str | None) -> str:
    """A server frame exactly as upstream formats it."""
    return json.dumps({"type": kind, "data": data, "client": client, "process": process})


async def test_python_run_with_pipes(connect_run: V5Connect) -> None:
    client = await connect_run("client=abc")
    await client.ws.send_str(
        '{"type": "start", "process": "1", "data": {"runner": "python3", "code": '
        "\"import sys\\nprint('hi')\\nprint('err', file=sys.stderr)\\nimport os\\n"
        'print(os.getcwd())\\nsys.exit(3)"}}'
    )
    result = await client.collect("1")
    run_id = json.loads(client.raw[0])["data"]["runId"]
    assert client.raw[0] == frame("started", {"runId": run_id}, "abc", "1")
    assert re.fullmatch("[0-9a-f]{32}", run_id)
    assert result.stdout == "hi\n/tmp\n"
    assert result.stderr == "err\n"
    assert client.raw[-1] == frame("stopped", {"exitCode": 3}, "abc", "1")


async def test_stdin_reversed(connect_run: V5Connect) -> None:
    client = await connect_run()
    await client.ws.send_str(
        '{"type": "start", "process": "a", "data": {"runner": "python3", '
        '"code": "print(input()[::-1])"}}'
    )
    started = await client.expect("a", "started")
    assert client.raw[0] == frame("started", {"runId": started["data"]["runId"]}, "", "a")
    await client.ws.send_str('{"type": "stdin", "process": "a", "data": {"input": "hello\\n"}}')
    result = await client.collect("a")
    assert result.stdout == "olleh\n"
    assert client.raw[-1] == frame("stopped", {"exitCode": 0}, "", "a")


PTY_SCRIPT = (
    "import shutil,sys\nprint(shutil.get_terminal_size())\nprint('x', file=sys.stderr)\n"
    "print(input())\nprint(shutil.get_terminal_size())"
)


async def test_pty_initial_size_echo_crlf_and_resize(connect_run: V5Connect) -> None:
    client = await connect_run("pty=1")
    await client.send("start", "a", {"runner": "python3", "code": PTY_SCRIPT})
    await client.expect("a", "started")
    await client.read_output("a", "os.terminal_size(columns=60, lines=4)\r\nx\r\n")
    await client.send("resize", "a", {"rows": 30, "cols": 100})
    await client.send("stdin", "a", {"input": "typed\r"})
    result = await client.collect("a")
    assert result.stdout == "typed\r\ntyped\r\nos.terminal_size(columns=100, lines=30)\r\n"
    assert result.stderr == ""
    assert result.exit_code == 0


async def test_resize_without_pty_is_an_error_and_the_process_runs_on(
    connect_run: V5Connect,
) -> None:
    client = await connect_run()
    await client.send("start", "a", {"runner": "python3", "code": "print(input())"})
    await client.expect("a", "started")
    await client.ws.send_str(
        '{"type": "resize", "process": "a", "data": {"rows": 30, "cols": 100}}'
    )
    error = await client.expect("a", "error")
    assert "pty=true" in error["data"]["message"]
    await client.send("stdin", "a", {"input": "still here\n"})
    result = await client.collect("a")
    assert (result.stdout, result.exit_code) == ("still here\n", 0)


@pytest.fixture
def project(server: RunningServer) -> Path:
    """work/proj1 with a.py and sub/, owned by the program user as an upload leaves it."""
    project = server.config.work_dir / "proj1"
    (project / "sub").mkdir(parents=True)
    (project / "a.py").write_text("print(1)\n")
    give_to_program_user(project)
    return project


async def test_shell_runner_in_a_relative_path_and_stop(
    connect_run: V5Connect, project: Path
) -> None:
    client = await connect_run()
    await client.ws.send_str(
        '{"type": "start", "process": "sh", "data": {"runner": "shell", "path": "proj1"}}'
    )
    await client.expect("sh", "started")
    await client.ws.send_str(
        '{"type": "stdin", "process": "sh", "data": {"input": "pwd; ls; echo $TERM\\n"}}'
    )
    await client.read_output("sh", f"{project}\na.py\nsub\nxterm-256color\n")
    await client.ws.send_str('{"type": "stop", "process": "sh"}')
    assert await client.next_for("sh") == {
        "type": "stopped",
        "data": {"exitCode": -15},
        "client": "",
        "process": "sh",
    }


async def test_shell_runner_creates_its_directory_on_a_terminal(
    connect_run: V5Connect, server: RunningServer
) -> None:
    client = await connect_run("pty=true")
    await client.send("start", "sh", {"runner": "shell", "path": "new/dir"})
    await client.expect("sh", "started")
    await client.send("stdin", "sh", {"input": "pwd; echo $TERM; exit 4\r"})
    result = await client.collect("sh")
    assert f"{server.config.work_dir}/new/dir\r\nxterm-256color\r\n" in result.stdout
    assert result.exit_code == 4
    assert (server.config.work_dir / "new" / "dir").is_dir()


async def test_exec_runner_with_a_shebang(connect_run: V5Connect) -> None:
    client = await connect_run()
    await client.ws.send_str(
        '{"type": "start", "process": "e", "data": {"runner": "exec", '
        '"code": "#!/bin/sh\\necho exec-ok; pwd; echo $0"}}'
    )
    result = await client.collect("e")
    assert re.fullmatch(r"exec-ok\n/tmp\n/tmp/exec-\d{3}\n", result.stdout), result.stdout
    assert result.exit_code == 0
    script = Path(result.stdout.split("\n")[2])
    assert not script.exists(), "the temporary script is removed after the run"


async def test_exec_runner_runs_a_users_file_and_never_changes_its_mode(
    connect_run: V5Connect, project: Path
) -> None:
    tool = project / "tool"
    tool.write_text("#!/bin/sh\necho tool ran in $(pwd)\n")
    tool.chmod(0o755)
    plain = project / "plain"
    plain.write_text("#!/bin/sh\necho never\n")
    plain.chmod(0o644)
    client = await connect_run()
    result = await client.run("t", {"runner": "exec", "path": "proj1/tool"})
    assert result.stdout == f"tool ran in {project}\n"
    await client.send("start", "p", {"runner": "exec", "path": "proj1/plain"})
    error = await client.expect("p", "error")
    assert "not executable" in error["data"]["message"]
    assert tool.stat().st_mode & 0o777 == 0o755
    assert plain.stat().st_mode & 0o777 == 0o644


async def test_file_by_path_then_code_in_the_uploaded_directory(
    connect_run: V5Connect, project: Path
) -> None:
    client = await connect_run()
    await client.ws.send_str(
        '{"type": "start", "process": "p", "data": {"runner": "python3", "path": "proj1/a.py"}}'
    )
    first = await client.collect("p")
    assert (first.stdout, first.exit_code) == ("1\n", 0)
    await client.ws.send_str(
        '{"type": "start", "process": "p", "data": {"runner": "python3", "path": "proj1", '
        '"code": "import os;print(os.getcwd(), sorted(os.listdir()))"}}'
    )
    second = await client.collect("p")
    match = re.fullmatch(r"(\S+) \['(\d{3})\.py', 'a\.py', 'sub'\]\n", second.stdout)
    assert match, second.stdout
    assert match.group(1) == str(project)
    assert sorted(os.listdir(project)) == ["a.py", "sub"], "the temporary script is gone"


async def test_several_processes_and_a_duplicate_id(connect_run: V5Connect) -> None:
    client = await connect_run()
    await client.send(
        "start", "1", {"runner": "python3", "code": "import time\ntime.sleep(0.5)\nprint(1)"}
    )
    await client.send("start", "2", {"runner": "python3", "code": "input()\nprint(2)"})
    await client.send("start", "2", {"runner": "python3", "code": "print(22)"})
    for process in ("1", "2"):
        started = await client.next_for(process)
        expected = frame("started", {"runId": started["data"]["runId"]}, "", process)
        assert started == json.loads(expected)
    error = await client.expect("2", "error")
    assert "still running" in error["data"]["message"]
    await client.send("stdin", "2", {"input": "\n"})
    two, one = await client.collect("2"), await client.collect("1")
    assert (two.stdout, two.exit_code) == ("2\n", 0)
    assert (one.stdout, one.exit_code) == ("1\n", 0)


def ignore_stop_signals(marker: Path) -> str:
    """A program that ignores Ctrl-C and SIGTERM: only SIGKILL ends it."""
    return write_pid_code(marker) + (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "print('ignoring TERM')\n"
        "time.sleep(60)\n"
    )


async def test_stop_escalates_to_kill_and_stopping_again_is_an_error(
    start_server: Callable[..., Awaitable[RunningServer]],
    connect_run: V5Connect,
    shared: Path,
) -> None:
    server = await start_server(kill_grace=0.5)
    client = await connect_run(target=server)
    marker = shared / "stubborn"
    await client.send("start", "1", {"runner": "python3", "code": ignore_stop_signals(marker)})
    await client.expect("1", "started")
    await client.read_output("1", "ignoring TERM\n")
    await client.send("stop", "1")
    stopped = await client.expect("1", "stopped")
    # Upstream reports -9 when SIGKILL was needed; a server that reports every
    # stop as the user's (-15, as Further shows it) is as right.
    assert stopped["data"]["exitCode"] in (-9, -15), stopped
    assert not alive(int(marker.read_text())), "the program that ignored TERM is gone"
    await client.send("stop", "1")
    error = await client.expect("1", "error")
    assert "no process '1'" in error["data"]["message"]


KEYS_SCRIPT = """
import threading
from further_link import KeyboardButton
done = threading.Event()
up = KeyboardButton('ArrowUp')
up.when_pressed = lambda: print('down', up.is_pressed)
up.when_released = lambda: print('up', up.is_pressed)
space = KeyboardButton(' ')
space.when_pressed = lambda: print('space', space.is_pressed)
space.when_released = done.set
print('ready')
done.wait(60)
"""


async def test_keyboard_buttons_for_arrow_up_and_the_space_key(connect_run: V5Connect) -> None:
    client = await connect_run()
    await client.send("start", "k", {"runner": "python3", "code": KEYS_SCRIPT})
    await client.expect("k", "started")
    assert await client.next_for("k") == json.loads(
        frame("keylisten", {"output": "ArrowUp"}, "", "k")
    )
    assert await client.next_for("k") == json.loads(frame("keylisten", {"output": " "}, "", "k"))
    await client.read_output("k", "ready\n")
    await client.send("keyevent", "k", {"key": "ArrowUp", "event": "keydown"})
    await client.read_output("k", "down True\n")
    await client.send("keyevent", "k", {"key": "ArrowUp", "event": "keyup"})
    await client.read_output("k", "up False\n")
    await client.send("keyevent", "k", {"key": "a", "event": "keydown"})  # nobody listens
    await client.send("keyevent", "k", {"key": " ", "event": "keydown"})
    await client.read_output("k", "space True\n")
    await client.send("keyevent", "k", {"key": " ", "event": "keyup"})
    result = await client.collect("k")
    assert (result.stdout, result.exit_code) == ("", 0)


async def test_video_from_send_image(connect_run: V5Connect) -> None:
    client = await connect_run()
    code = (
        "from PIL import Image\nfrom further_link import send_image\n"
        "send_image(Image.new('RGB',(2,2),(255,0,0)))"
    )
    await client.send("start", "v", {"runner": "python3", "code": code})
    await client.expect("v", "started")
    video = await client.expect("v", "video")
    assert list(video["data"]) == ["output"]
    assert video["data"]["output"].startswith("/9j/")
    assert await client.next_for("v") == json.loads(frame("stopped", {"exitCode": 0}, "", "v"))


async def test_ping(connect_run: V5Connect) -> None:
    client = await connect_run()
    await client.ws.send_str('{"type": "ping"}')
    await client.receive()
    assert client.raw == ['{"type": "pong", "data": null, "client": "", "process": null}']


@pytest.mark.parametrize(
    ("text", "process"),
    [
        ("not json", None),
        ('{"type": "stop"}', None),
        ('{"type": "stop", "process": 1}', None),
        ('{"type": "start", "process": "r", "data": {"runner": "ruby"}}', "r"),
        ('{"type": "dance", "process": "d"}', "d"),
        ('{"type": "stdin", "process": "nope", "data": {"input": "x"}}', "nope"),
    ],
)
async def test_bad_input_gives_an_error_naming_the_process(
    connect_run: V5Connect, text: str, process: str | None
) -> None:
    client = await connect_run("client=c")
    await client.ws.send_str(text)
    message = await client.receive()
    assert message["type"] == "error"
    assert message["process"] == process
    assert message["client"] == "c"
    assert message["data"]["message"]
    await client.send("ping")
    assert (await client.receive())["type"] == "pong", "the connection stays usable"


async def test_unknown_user_fails_every_start_with_the_process_id(
    connect_run: V5Connect,
) -> None:
    client = await connect_run("user=nosuchuser")
    await client.send("start", "1", {"runner": "python3", "code": "print(1)"})
    error = await client.expect("1", "error")
    assert "nosuchuser" in error["data"]["message"]


async def test_failed_start_answers_an_error_and_frees_the_id(connect_run: V5Connect) -> None:
    client = await connect_run()
    await client.send("start", "x", {"runner": "python3", "path": "missing.py"})
    error = await client.expect("x", "error")
    assert "missing.py" in error["data"]["message"]
    result = await client.run("x", {"runner": "python3", "code": "print('second try')"})
    assert result.stdout == "second try\n"


async def test_closing_the_socket_ends_every_process(connect_run: V5Connect, shared: Path) -> None:
    client = await connect_run()
    markers = [shared / f"pid{index}" for index in range(3)]
    for index, marker in enumerate(markers):
        code = sleeper_script(marker, 30)
        await client.send("start", str(index), {"runner": "python3", "code": code})
    for index in range(3):
        await client.expect(str(index), "started")
        await client.read_output(str(index), "up\n")
    pids = [int(marker.read_text()) for marker in markers]
    await client.ws.close()
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while any(alive(pid) for pid in pids):
        assert asyncio.get_running_loop().time() < deadline, "programs outlived their socket"
        await asyncio.sleep(0.05)


async def test_twenty_processes_at_once_on_one_socket(connect_run: V5Connect) -> None:
    client = await connect_run()
    code = "import sys\nname = input()\nprint('hello', name)\nsys.exit(len(name))"
    ids = [f"p{index}" for index in range(20)]
    for process in ids:
        await client.send("start", process, {"runner": "python3", "code": code})
    for process in ids:
        await client.expect(process, "started")
    for process in reversed(ids):
        await client.send("stdin", process, {"input": process + "\n"})
    for process in ids:
        result = await client.collect(process)
        assert (result.stdout, result.exit_code) == (f"hello {process}\n", len(process))


async def test_environment_as_upstream(connect_run: V5Connect, server: RunningServer) -> None:
    client = await connect_run()
    code = (
        "import os\nfor k in ('TERM','USER','LOGNAME','HOME','SHELL','PWD'):\n"
        "    print(k, os.environ.get(k))\nprint(os.getcwd())"
    )
    result = await client.run("env", {"runner": "python3", "code": code})
    values = dict(line.split(" ", 1) for line in result.stdout.splitlines()[:-1])
    account = pwd.getpwnam(server.config.run_as.name) if server.config.run_as else None
    assert account is not None
    assert values["TERM"] == "xterm-256color"
    assert values["USER"] == values["LOGNAME"] == account.pw_name
    assert values["HOME"] == account.pw_dir
    assert values["PWD"] == "/tmp" == result.stdout.splitlines()[-1]
    assert os.access(values["SHELL"], os.X_OK)


async def test_further_venv_is_used_by_the_python3_runner(
    start_server: Callable[..., Awaitable[RunningServer]],
    connect_run: V5Connect,
    sandbox: Path,
) -> None:
    venv = sandbox / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python3").symlink_to(PROGRAM_PYTHON)
    server = await start_server(environ={"FURTHER_VENV": str(venv)})
    client = await connect_run(target=server)
    code = "import os, sys\nprint(sys.executable)\nprint(os.environ['VIRTUAL_ENV'])"
    result = await client.run("v", {"runner": "python3", "code": code})
    assert result.stdout == f"{venv}/bin/python3\n{venv}\n", result.stderr


async def test_utf8_split_across_reads_is_lossless(connect_run: V5Connect) -> None:
    client = await connect_run()
    code = "import sys\nfor i in range(3000):\n    sys.stdout.write('é' * 7 + '\\n')"
    result = await client.run("u", {"runner": "python3", "code": code})
    assert result.stdout == ("é" * 7 + "\n") * 3000


async def test_pty_output_is_lossless_utf8_and_ctrl_c_interrupts(connect_run: V5Connect) -> None:
    client = await connect_run("pty=true")
    code = (
        "import sys, time\nfor i in range(3000):\n    sys.stdout.write('é' * 7 + '\\n')\n"
        "print('waiting')\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
        "    print('interrupted')\n    sys.exit(5)\n"
    )
    await client.send("start", "u", {"runner": "python3", "code": code})
    await client.expect("u", "started")
    await client.read_output("u", ("é" * 7 + "\r\n") * 3000 + "waiting\r\n")
    await client.send("stdin", "u", {"input": "\x03"})
    result = await client.collect("u")
    assert result.stdout.endswith("interrupted\r\n"), result.stdout
    assert result.exit_code == 5


async def test_a_link_to_a_directory_the_user_cannot_write_gets_no_script(
    connect_run: V5Connect, server: RunningServer, sandbox: Path
) -> None:
    """A learner's symlink gets the server no further than the learner."""
    protected = sandbox / "protected"
    protected.mkdir()
    protected.chmod(0o555)
    (server.config.work_dir / "sneaky").symlink_to(protected)
    client = await connect_run()
    for runner in ("python3", "exec"):
        await client.send("start", runner, {"runner": runner, "path": "sneaky", "code": "x"})
        error = await client.expect(runner, "error")
        assert "cannot write a script" in error["data"]["message"]
        assert "Permission denied" in error["data"]["message"]
    await client.send("start", "sh", {"runner": "shell", "path": "sneaky/inner"})
    error = await client.expect("sh", "error")
    assert "cannot create" in error["data"]["message"]
    assert os.listdir(protected) == []


@pytest.mark.parametrize("query", ["", "pty=true"], ids=["pipes", "pty"])
async def test_each_process_has_its_own_cgroup_removed_after_it(
    connect_run: V5Connect, server: RunningServer, query: str
) -> None:
    """Containment applies to /run processes, terminals included (when cgroups can be made)."""
    from test_containment import require_cgroup

    from further_link.runs.containment import detect

    await require_cgroup(server)
    client = await connect_run(query)
    code = "print(open('/proc/self/cgroup').read())\ninput()"
    for process in ("a", "b"):
        await client.send("start", process, {"runner": "python3", "code": code})
    groups = {}
    for process in ("a", "b"):
        await client.expect(process, "started")
        text, own = "", None
        while own is None:
            text += (await client.expect(process, "stdout"))["data"]["output"]
            lines = text.splitlines(keepends=True)
            own = next((x.strip() for x in lines if x.startswith("0::") and x.endswith("\n")), None)
        assert "/run-" in own, own
        with open("/proc/self/mountinfo") as mountinfo:
            groups[process] = detect(mountinfo.read(), own).unified
    assert groups["a"] != groups["b"], "each process is contained on its own"
    for process in ("a", "b"):
        await client.send("stdin", process, {"input": "\n" if not query else "\r"})
        await client.collect(process)
        directory = groups[process]
        assert directory is not None
        for _ in range(int(TIMEOUT / 0.05)):
            if not directory.exists():
                break
            await asyncio.sleep(0.05)
        assert not directory.exists()
