"""Run directories made ahead, so that ``start`` does not wait for the file system.

Every run gets a private temporary directory holding its inline script and
the listening socket of its side channel. Creating the directory and binding
the socket are file-system metadata operations that take milliseconds on a
busy machine or an SD card; ``RunPlaces`` keeps a few made before they are
needed, and makes more shortly after one is taken (not at once: the program
that took it is starting then).

A stocked directory is the server's (which is the program user's, after any
privilege drop), mode 0700, and its socket mode 0600, as ``SideChannel``
would make it. Its inline script file is created with it, empty, never
through a link or over a file put there first, and kept open: a run writes
its script through that descriptor, never by path, once it has checked that
nothing in the place changed (creating a file took 0.15-0.23 ms on a 2-core
VM, a tenth of the time from ``start`` to ``started``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from further_link.errors import StartError

log = logging.getLogger(__name__)

RUN_DIR_PREFIX = "further-link-run-"
SCRIPT_NAME = "main.py"
SOCKET_NAME = "io.sock"
STOCK = 2
# Seconds after a place is taken before the next is made (see the module doc).
RESTOCK_DELAY = 0.05
LISTEN_BACKLOG = 8


@dataclass
class RunPlace:
    """A new run directory, with the side channel's socket in it, bound and
    listening, and an empty inline script file; both the directory and the
    file are held open (``dir_fd``, ``script_fd``) until a run writes or
    releases them."""

    directory: Path
    listener: socket.socket
    dir_fd: int | None
    script_fd: int | None

    @property
    def socket_path(self) -> Path:
        return self.directory / SOCKET_NAME

    def write_script(self, data: bytes) -> Path:
        """Write ``data`` into the place's script file (once); returns its path.

        Raises ``StartError`` when the place is not as it was made: its
        directory or file replaced, the file written or linked to, or
        anything added beside them (a module, say). Programs run as the
        server's account, so this refuses what a program did before the run
        started; a program racing the start itself is not kept out.
        """
        dir_fd, script_fd = self.dir_fd, self.script_fd
        if dir_fd is None or script_fd is None:
            raise RuntimeError("the run place's script was already written")
        try:
            if not self._untouched(dir_fd, script_fd):
                raise StartError(
                    f"could not prepare the run: another program changed {self.directory}; "
                    "press Run again"
                )
            os.fchmod(script_fd, 0o644)
            view = memoryview(data)
            while view:
                view = view[os.write(script_fd, view) :]
        finally:
            self.release()
        return self.directory / SCRIPT_NAME

    def _untouched(self, dir_fd: int, script_fd: int) -> bool:
        """Raises ``OSError`` for what is not a change (e.g. out of descriptors)."""
        made_dir, made_script = os.fstat(dir_fd), os.fstat(script_fd)
        try:
            found_dir = os.stat(self.directory, follow_symlinks=False)
            found_script = os.stat(SCRIPT_NAME, dir_fd=dir_fd, follow_symlinks=False)
            names = sorted(os.listdir(dir_fd))  # takes a descriptor of its own
        except (FileNotFoundError, NotADirectoryError):
            return False
        return (
            _same_file(made_dir, found_dir)
            and _same_file(made_script, found_script)
            and made_script.st_size == 0
            and made_script.st_nlink == 1
            and names == sorted((SCRIPT_NAME, SOCKET_NAME))
        )

    def release(self) -> None:
        """Close what the place holds open (the run needs it no more)."""
        for fd in (self.script_fd, self.dir_fd):
            if fd is not None:
                os.close(fd)
        self.dir_fd = self.script_fd = None

    def discard(self) -> None:
        """Close the socket and remove the directory (for a place no run will use)."""
        self.release()
        self.listener.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def make_run_place() -> RunPlace:
    """A fresh place; raises ``OSError`` when the temp dir cannot take one."""
    directory = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    place = RunPlace(directory, listener, None, None)
    try:
        path = directory / SOCKET_NAME
        listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(LISTEN_BACKLOG)
        listener.setblocking(False)
        place.dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        place.script_fd = os.open(SCRIPT_NAME, flags, 0o644, dir_fd=place.dir_fd)
    except BaseException:
        place.discard()
        raise
    return place


class RunPlaces:
    """Up to ``STOCK`` run places made ahead."""

    def __init__(self) -> None:
        self._stock: deque[RunPlace] = deque()
        self._restock: asyncio.TimerHandle | None = None
        self._closed = False

    def start(self) -> None:
        """Make the first places (now: nothing is starting yet)."""
        self._fill()

    def take(self) -> RunPlace:
        """A place for a run, stocked if there is one; raises ``OSError`` otherwise."""
        if self._restock is None and not self._closed:
            loop = asyncio.get_running_loop()
            self._restock = loop.call_later(RESTOCK_DELAY, self._fill)
        if self._stock:
            return self._stock.popleft()
        return make_run_place()

    def _fill(self) -> None:
        self._restock = None
        while not self._closed and len(self._stock) < STOCK:
            try:
                self._stock.append(make_run_place())
            except OSError as exc:
                log.warning("could not prepare a run directory ahead: %s", exc)
                return

    def close(self) -> None:
        """Remove every stocked place."""
        self._closed = True
        if self._restock is not None:
            self._restock.cancel()
        while self._stock:
            with contextlib.suppress(OSError):
                self._stock.popleft().discard()
