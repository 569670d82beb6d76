"""Finding the device's graphical session, so GUI programs open on its screen.

A boot-time service has no ``DISPLAY``; a learner's turtle or tkinter window
belongs on the device's desktop, as with the 2020 server. Looked up at every
run start, since a desktop may start or stop while the server runs:

- an X display: the first local one (lowest ``N`` with a socket
  ``/tmp/.X11-unix/XN``), with an ``XAUTHORITY`` the program user can read:
  its own ``~/.Xauthority``, else that of the user who owns the display's
  socket (the desktop user), else the server's own ``XAUTHORITY``;
- a Wayland session of the program user (``/run/user/<uid>/wayland-N``), which
  only that user can reach;
- ``XDG_RUNTIME_DIR=/run/user/<uid>`` of the program user when it exists.

What the server's own environment already says (started from a desktop
terminal) is kept. With no display at all nothing is set, and a GUI program
fails with Python's own message.
"""

from __future__ import annotations

import os
import pwd
import re
import stat
from collections.abc import Mapping
from pathlib import Path

RUNTIME_DIR_ROOT = Path("/run/user")
_X_SOCKET = re.compile(r"X(\d{1,4})")
_WAYLAND_SOCKET = re.compile(r"wayland-(\d{1,4})")
DISPLAY_VARIABLES = ("DISPLAY", "XAUTHORITY", "WAYLAND_DISPLAY", "XDG_RUNTIME_DIR")


def graphical_session(
    inherited: Mapping[str, str],
    uid: int,
    home: Path | None,
    x11_socket_dir: Path,
    runtime_root: Path = RUNTIME_DIR_ROOT,
) -> dict[str, str]:
    """Variables to add to a program's environment for the user ``uid`` (home ``home``).

    ``x11_socket_dir`` holds the X displays' sockets (``/tmp/.X11-unix``).

    ``inherited`` is the environment the program would get otherwise; names
    it already sets are never replaced. Returns ``{}`` without a session.
    """
    found: dict[str, str] = {}
    runtime_dir = runtime_root / str(uid)
    if _is_dir(runtime_dir):
        found["XDG_RUNTIME_DIR"] = str(runtime_dir)
        wayland = _first_numbered(runtime_dir, _WAYLAND_SOCKET)
        if wayland is not None:
            found["WAYLAND_DISPLAY"] = f"wayland-{wayland}"
    number = _first_numbered(x11_socket_dir, _X_SOCKET)
    if number is not None and "DISPLAY" not in inherited:
        found["DISPLAY"] = f":{number}"
        cookie = _xauthority(uid, home, x11_socket_dir / f"X{number}", inherited)
        if cookie is not None:
            found["XAUTHORITY"] = cookie
    return {name: value for name, value in found.items() if name not in inherited}


def _first_numbered(directory: Path, pattern: re.Pattern[str]) -> int | None:
    """The lowest N of the sockets in ``directory`` whose name matches ``pattern``."""
    try:
        names = os.listdir(directory)
    except OSError:
        return None
    numbered = sorted((int(m.group(1)), m.string) for m in map(pattern.fullmatch, names) if m)
    for number, name in numbered:
        try:
            if stat.S_ISSOCK(os.stat(directory / name).st_mode):
                return number
        except OSError:
            continue
    return None


def _xauthority(
    uid: int, home: Path | None, socket: Path, inherited: Mapping[str, str]
) -> str | None:
    candidates = []
    if home is not None:
        candidates.append(home / ".Xauthority")
    try:
        owner = os.stat(socket).st_uid
        # The program's own session (the usual desktop) needs no account lookup.
        if owner != 0 and not (owner == uid and home is not None):
            candidates.append(Path(pwd.getpwuid(owner).pw_dir) / ".Xauthority")
    except (OSError, KeyError):
        pass
    if inherited.get("XAUTHORITY"):
        candidates.append(Path(inherited["XAUTHORITY"]))
    for candidate in candidates:
        if _readable_by(candidate, uid):
            return str(candidate)
    return None


def _readable_by(path: Path, uid: int) -> bool:
    """Whether the user ``uid`` may read the regular file ``path``."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    if not stat.S_ISREG(info.st_mode):
        return False
    if uid == os.geteuid() != 0:
        # The server serves as the program's account (privsep.py): the kernel
        # answers for the program, with its groups and any ACL, and no lookup.
        return os.access(path, os.R_OK)
    # The server is root (e.g. before it drops): judge by the mode bits.
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return False
    if info.st_uid == uid:
        return bool(info.st_mode & stat.S_IRUSR)
    if info.st_gid in os.getgrouplist(entry.pw_name, entry.pw_gid):
        return bool(info.st_mode & stat.S_IRGRP)
    return bool(info.st_mode & stat.S_IROTH)


def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False
