"""GUI programs open their windows on the device's display (a real Xvfb here).

The server is started without ``DISPLAY``, as a boot-time service is. Xvfb
picks a free display number itself (``-displayfd``), so concurrent suites never
share one; the server looks for X sockets in a private directory that links
only to this test's display, so another display on the machine is never taken
for "the first one".
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Callable

import pytest

from further_link.runs.display import graphical_session

from conftest import Client, RunningServer

ClientFactory = Callable[..., Awaitable[Client]]
ServerFactory = Callable[..., Awaitable[RunningServer]]

XVFB_START_TIMEOUT = 30.0


@pytest.fixture
def x_display(sandbox: Path) -> Iterator[int]:
    """A running Xvfb; yields its display number."""
    read_end, write_end = os.pipe()
    xvfb = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write_end), "-nolisten", "tcp", "-screen", "0", "640x480x24"],
        pass_fds=[write_end],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_end)
    try:
        with os.fdopen(read_end) as announced:
            number = announced.readline().strip()
        assert number.isdigit(), "Xvfb did not start"
        yield int(number)
    finally:
        xvfb.terminate()
        xvfb.wait(timeout=XVFB_START_TIMEOUT)


@pytest.fixture
def socket_dir(sandbox: Path, x_display: int) -> Path:
    """A private stand-in for /tmp/.X11-unix holding only this test's display."""
    directory = sandbox / "x11"
    directory.mkdir()
    (directory / f"X{x_display}").symlink_to(f"/tmp/.X11-unix/X{x_display}")
    return directory


def window_tree(number: int) -> str:
    return subprocess.run(
        ["xwininfo", "-display", f":{number}", "-root", "-tree"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout


async def test_tkinter_window_opens_on_the_devices_display(
    start_server: ServerFactory, connect: ClientFactory, x_display: int, socket_dir: Path
) -> None:
    server = await start_server(x11_socket_dir=socket_dir)
    assert "DISPLAY" not in server.config.program_env
    client = await connect(server)
    title = f"further-link-test-{secrets.token_hex(4)}"
    script = (
        "import os, tkinter\n"
        "root = tkinter.Tk()\n"
        f"root.title({title!r})\n"
        "root.geometry('200x100+10+10')\n"
        "root.update()\n"
        "print(os.environ['DISPLAY'], root.winfo_screenwidth(), root.winfo_screenheight())\n"
        "input()\n"
        "root.destroy()\n"
        "print('closed')\n"
    )
    await client.send("start", {"sourceScript": script})
    assert (await client.receive())["type"] == "started"
    await client.read_output(f":{x_display} 640 480\n")
    assert f'"{title}"' in window_tree(x_display)
    await client.send("stdin", {"input": "\n"})
    result = await client.collect()
    assert result.stdout == "closed\n"
    assert result.exit_code == 0
    assert f'"{title}"' not in window_tree(x_display)


async def test_without_a_display_the_error_is_pythons_own(
    start_server: ServerFactory, connect: ClientFactory, sandbox: Path
) -> None:
    empty = sandbox / "no-x11"
    empty.mkdir()
    server = await start_server(x11_socket_dir=empty)
    client = await connect(server)
    result = await client.run({"sourceScript": "import tkinter\ntkinter.Tk()"})
    assert result.exit_code == 1
    assert result.stderr.rstrip().endswith(
        "_tkinter.TclError: no display name and no $DISPLAY environment variable"
    )


def test_the_first_display_is_the_lowest_numbered_socket(sandbox: Path) -> None:
    directory = sandbox / "sockets"
    directory.mkdir()
    listeners = []
    for name in ("X12", "X3", "X7"):
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(directory / name))
        listeners.append(listener)
    (directory / "X1").write_text("a stale file, not a socket")
    (directory / "Xnot").mkdir()
    try:
        found = graphical_session({}, os.getuid(), None, directory, sandbox / "no-run-user")
        assert found == {"DISPLAY": ":3"}
        # What the server's own environment says is kept.
        kept = graphical_session({"DISPLAY": ":0"}, os.getuid(), None, directory, sandbox / "x")
        assert kept == {}
    finally:
        for listener in listeners:
            listener.close()


def test_xauthority_of_the_program_user_and_its_runtime_dir(sandbox: Path) -> None:
    directory = sandbox / "sockets"
    directory.mkdir()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(directory / "X0"))
    home = sandbox / "home"
    home.mkdir()
    cookie = home / ".Xauthority"
    cookie.write_bytes(b"\x01\x00")
    cookie.chmod(0o600)
    runtime_root = sandbox / "run-user"
    runtime = runtime_root / str(os.getuid())
    runtime.mkdir(parents=True)
    wayland = socket.socket(socket.AF_UNIX)
    wayland.bind(str(runtime / "wayland-1"))
    try:
        found = graphical_session({}, os.getuid(), home, directory, runtime_root)
        assert found == {
            "DISPLAY": ":0",
            "XAUTHORITY": str(cookie),
            "WAYLAND_DISPLAY": "wayland-1",
            "XDG_RUNTIME_DIR": str(runtime),
        }
        cookie.chmod(0o000)  # not readable by its owner: not offered
        assert "XAUTHORITY" not in graphical_session({}, os.getuid(), home, directory, runtime_root)
    finally:
        listener.close()
        wayland.close()
