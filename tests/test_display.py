"""GUI programs open their windows on the device's display (a real Xvfb here).

The server is started without ``DISPLAY``, as a boot-time service is. Xvfb
picks a free display number itself (``-displayfd``), so concurrent suites never
share one; the server looks for X sockets in a private directory that links
only to this test's display, so another display on the machine is never taken
for "the first one".
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import socket
import struct
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


@pytest.fixture
def display_zero(sandbox: Path) -> Iterator[Path]:
    """A directory of X sockets holding display :0 (a bound socket, no server)."""
    directory = sandbox / "sockets"
    directory.mkdir()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(directory / "X0"))
    with listener:
        yield directory


def _cookie_in_home(sandbox: Path) -> tuple[Path, Path]:
    """A home directory and an ``.Xauthority`` file in it."""
    home = sandbox / "home"
    home.mkdir()
    cookie = home / ".Xauthority"
    cookie.write_bytes(b"\x01\x00")
    return home, cookie


def test_xauthority_of_the_program_user_and_its_runtime_dir(
    sandbox: Path, display_zero: Path
) -> None:
    directory = display_zero
    home, cookie = _cookie_in_home(sandbox)
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
        wayland.close()


def _as_account(account: str, action: Callable[[], object]) -> object:
    """``action()`` in a forked child that has become ``account``, as the server
    does once it drops to the program account (privsep.py); as is when not root."""
    if os.geteuid() != 0:
        return action()
    entry = pwd.getpwnam(account)
    read_end, write_end = os.pipe()
    # Looked up before the fork: the child of a process with threads only makes system calls.
    groups = os.getgrouplist(account, entry.pw_gid)
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.close(read_end)
            os.setgroups(groups)  # as privsep.py does
            os.setresgid(entry.pw_gid, entry.pw_gid, entry.pw_gid)
            os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)
            os.write(write_end, json.dumps(action()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        answer = reader.read()
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child as the program account failed"
    return json.loads(answer)


def test_the_program_accounts_own_cookies_are_judged_as_it_would_read_them(
    sandbox: Path, display_zero: Path
) -> None:
    """Serving as the program account, its groups decide, not only a file's owner."""
    account = "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.getuid()).pw_name
    entry = pwd.getpwnam(account)
    home, cookie = _cookie_in_home(sandbox)
    runtime_root = sandbox / "run-user"  # none: no Wayland, no runtime dir

    def session() -> object:
        return graphical_session({}, entry.pw_uid, home, display_zero, runtime_root)

    if os.geteuid() == 0:  # owned by root, readable through the account's group only
        os.chown(cookie, 0, entry.pw_gid)
    cookie.chmod(0o640)
    assert _as_account(account, session) == {"DISPLAY": ":0", "XAUTHORITY": str(cookie)}
    cookie.chmod(0o600 if os.geteuid() == 0 else 0o000)  # now beyond the account's reach
    assert _as_account(account, session) == {"DISPLAY": ":0"}
    if os.geteuid() == 0:
        # Its mode bits say anyone may read it; an ACL entry denies the account.
        cookie.chmod(0o644)
        _deny_by_acl(cookie, entry.pw_uid)
        assert _as_account(account, session) == {"DISPLAY": ":0"}


def _deny_by_acl(path: Path, uid: int) -> None:
    """Give ``path`` a POSIX access ACL: its mode's rights, and none for ``uid``.

    The extended attribute's format is the kernel's (``posix_acl_xattr.h``):
    a version, then (tag, permissions, id) entries in tag order.
    """
    mode = path.stat().st_mode
    entries = [
        (0x01, (mode >> 6) & 7, 0xFFFFFFFF),  # the owner
        (0x02, 0, uid),  # this account: nothing
        (0x04, (mode >> 3) & 7, 0xFFFFFFFF),  # the owning group
        (0x10, 7, 0xFFFFFFFF),  # the mask
        (0x20, mode & 7, 0xFFFFFFFF),  # others
    ]
    blob = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)
    os.setxattr(path, "system.posix_acl_access", blob)
