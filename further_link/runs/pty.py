"""Programs on a pseudo-terminal: one pty per program, resizable.

``PtyLauncher`` is a ``process.Launcher``: it starts the program with the pty's
slave as stdin, stdout and stderr, and hands ``Program`` the master as the
program's only output stream (stderr is an empty stream: a terminal merges
them) and as its stdin writer. So a pty run is an ordinary ``Program``:
the same output pump and back-pressure, the same stop and tree kill.

The program gets the pty as its controlling terminal (util-linux
``setsid --ctty`` before it execs), so the kernel echoes input, turns
``\\n`` into ``\\r\\n``, sends SIGINT for Ctrl-C and SIGWINCH on ``resize``,
as a terminal in a browser's xterm.js expects.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import struct
import termios
import uuid

from further_link.runs import proctree
from further_link.runs.process import LaunchedProcess, ProgramSpec, exec_in_group

log = logging.getLogger(__name__)

# Upstream's initial size; clients send `resize` right after `start`.
INITIAL_ROWS = 4
INITIAL_COLS = 60
SETSID = "/usr/bin/setsid"


def set_size(fd: int, rows: int, cols: int) -> None:
    """TIOCSWINSZ on a pty; the kernel then signals SIGWINCH to its foreground group."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class PtyLauncher:
    """Starts one program on a new pty; afterwards ``resize`` changes its size.

    The owner calls ``close`` when the run has ended (it keeps one master fd
    for ``resize``).
    """

    def __init__(self, rows: int = INITIAL_ROWS, cols: int = INITIAL_COLS) -> None:
        self._rows = rows
        self._cols = cols
        self._control_fd: int | None = None

    async def __call__(self, spec: ProgramSpec) -> LaunchedProcess:
        master, slave = os.openpty()
        try:
            self._prepare_terminal(slave)
            empty_read, empty_write = os.pipe()
            os.close(empty_write)  # stderr is merged into the terminal: an empty stream
        except OSError:
            os.close(master)
            os.close(slave)
            raise
        output_fd = stdin_fd = -1
        try:
            output_fd = os.dup(master)
            stdin_fd = os.dup(master)
            launched = await self._spawn(spec, slave, output_fd, empty_read)
            launched.process.stdin = await _master_writer(stdin_fd)  # type: ignore[assignment]
        except BaseException:
            for fd in (master, output_fd, stdin_fd, empty_read):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            raise
        finally:
            # Only the program holds the slave now: when it (and its children) exit,
            # the master reads end-of-file (EIO).
            os.close(slave)
        self._control_fd = master
        return launched

    def _prepare_terminal(self, slave: int) -> None:
        set_size(slave, self._rows, self._cols)
        attributes = termios.tcgetattr(slave)
        # IUTF8: erasing a character with backspace removes all of its bytes.
        attributes[0] |= getattr(termios, "IUTF8", 0)
        termios.tcsetattr(slave, termios.TCSANOW, attributes)

    async def _spawn(
        self, spec: ProgramSpec, slave: int, output_fd: int, stderr_fd: int
    ) -> LaunchedProcess:
        tag = uuid.uuid4().hex
        env = dict(spec.env)
        env[proctree.RUN_TAG_VAR] = tag
        # Not start_new_session: setsid(1) makes the session itself, so that the
        # pty becomes its controlling terminal; the pid stays the program's. The
        # child joins its cgroups before that exec, as process.spawn's children do.
        process = await exec_in_group(
            [SETSID, "--ctty", *spec.argv],
            spec.group,
            spec.rlimits,
            repr(spec.argv[0]),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=str(spec.cwd),
            env=env,
        )
        return LaunchedProcess(process, output_fd, stderr_fd, tag)

    def resize(self, rows: int, cols: int) -> None:
        """Set the terminal size in character cells; no-op once the run has ended."""
        if self._control_fd is not None:
            with contextlib.suppress(OSError):
                set_size(self._control_fd, rows, cols)

    def close(self) -> None:
        fd, self._control_fd = self._control_fd, None
        if fd is not None:
            os.close(fd)


async def _master_writer(fd: int) -> asyncio.StreamWriter:
    """An asyncio writer on the pty master: input goes through the terminal's line discipline.

    Writing blocks (``drain`` waits) while the terminal's input buffer is full,
    which is the same back-pressure a pipe gives. Once the program has gone,
    the connection is lost and ``drain`` raises ``ConnectionResetError``.
    """
    loop = asyncio.get_running_loop()
    pipe = os.fdopen(fd, "wb", buffering=0)
    transport, protocol = await loop.connect_write_pipe(
        lambda: asyncio.streams.FlowControlMixin(loop=loop), pipe
    )
    return asyncio.StreamWriter(transport, protocol, None, loop)
