"""Pre-started interpreters, so that a program starts without paying for Python's start-up.

Starting CPython costs ~15 ms here and far more on a Raspberry Pi. The pool
keeps ``size`` interpreters waiting, already started as the program user with
their pipes attached, each running ``warm_bootstrap`` and blocked on a private
pipe. ``launch`` hands one the program's details; it then runs the program as
a fresh ``python -u SCRIPT`` would (see warm_bootstrap.py) and is never reused.
The pool refills in the background, one interpreter at a time so that
refilling never competes hard with the programs it serves.

Only a spec the pool was made for is launched warm: same interpreter, flags
and the same environment apart from the per-run variables that
the bootstrap applies itself. Anything else starts cold, unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import uuid
from collections import deque
from collections.abc import Mapping
from pathlib import Path

from . import proctree
from .channel import SOCKET_ENV_VAR
from .display import DISPLAY_VARIABLES
from .errors import StartError
from .process import LaunchedProcess, ProgramSpec, cold_launch, spawn

log = logging.getLogger(__name__)

BOOTSTRAP = (Path(__file__).parent / "warm_bootstrap.py").read_text(encoding="utf-8")
# Set per run by the bootstrap rather than at interpreter start. Besides ours,
# the terminal and login variables a v5 /run start sets: Python's start-up
# does not read them (HOME, which it does read, is not among them).
PER_RUN_VARIABLES = frozenset(
    {"PYTHONPATH", "PWD", SOCKET_ENV_VAR, proctree.RUN_TAG_VAR, *DISPLAY_VARIABLES}
    | {"TERM", "SHELL", "USER", "LOGNAME", "XDG_RUNTIME_DIR"}
)
WAITING_CWD = Path("/")


class WarmPool:
    def __init__(self, size: int, python: str, base_env: Mapping[str, str]):
        self.size = size
        self._python = python
        self._base_env = {k: v for k, v in base_env.items() if k not in PER_RUN_VARIABLES}
        self._waiting: deque[tuple[LaunchedProcess, int]] = deque()
        self._refill: asyncio.Task[None] | None = None
        self._closed = False
        self.warm_starts = 0
        self.cold_starts = 0

    def start(self) -> None:
        """Begin filling the pool in the background."""
        self._schedule_refill()

    def fits(self, spec: ProgramSpec) -> bool:
        """Whether a waiting interpreter can become exactly this program."""
        argv = list(spec.argv)
        if argv[:2] != [self._python, "-u"] or len(argv) < 3:
            return False
        env = {k: v for k, v in spec.env.items() if k not in PER_RUN_VARIABLES}
        return env == self._base_env

    async def launch(self, spec: ProgramSpec) -> LaunchedProcess:
        """The program, in a waiting interpreter when one fits, else freshly started."""
        if self.fits(spec):
            while self._waiting:
                launched, channel = self._waiting.popleft()
                self._schedule_refill()
                if self._hand_over(launched, channel, spec):
                    self.warm_starts += 1
                    log.debug("started a program warm (pid %d)", launched.process.pid)
                    return launched
        self.cold_starts += 1
        return await cold_launch(spec)

    def _hand_over(self, launched: LaunchedProcess, channel: int, spec: ProgramSpec) -> bool:
        env = dict(spec.env)
        env[proctree.RUN_TAG_VAR] = launched.tag
        fields = [str(spec.cwd), spec.argv[2], str(len(spec.argv) - 3), *spec.argv[3:]]
        fields += [f"{key}={value}" for key, value in env.items()]
        message = b"\0".join(os.fsencode(field) for field in fields)
        try:
            if launched.process.returncode is not None:
                raise BrokenPipeError
            view = memoryview(message)
            while view:
                view = view[os.write(channel, view) :]
        except OSError:
            log.warning(
                "a waiting interpreter (pid %d) had gone; discarding it", launched.process.pid
            )
            self._discard(launched)
            return False
        finally:
            os.close(channel)
        return True

    def _schedule_refill(self) -> None:
        if self._closed or (self._refill is not None and not self._refill.done()):
            return
        self._refill = asyncio.ensure_future(self._fill())

    async def _fill(self) -> None:
        while not self._closed and len(self._waiting) < self.size:
            read_end, write_end = os.pipe()
            os.set_inheritable(read_end, True)
            try:
                launched = await spawn(
                    [self._python, "-u", "-c", BOOTSTRAP, str(read_end)],
                    WAITING_CWD,
                    self._base_env,
                    uuid.uuid4().hex,
                    pass_fds=[read_end],
                )
            except (StartError, OSError) as exc:
                os.close(write_end)
                log.warning("could not pre-start an interpreter: %s; starting programs cold", exc)
                return
            finally:
                os.close(read_end)
            if self._closed:
                os.close(write_end)
                self._discard(launched)
                return
            self._waiting.append((launched, write_end))

    def _discard(self, launched: LaunchedProcess) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launched.process.pid, signal.SIGKILL)
        for fd in (launched.stdout_fd, launched.stderr_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        if launched.process.stdin is not None:
            launched.process.stdin.close()

    async def close(self) -> None:
        """End every waiting interpreter and wait for them."""
        self._closed = True
        if self._refill is not None:
            # Not cancelled: an interpreter mid-start would be lost; the loop sees _closed.
            await self._refill
        while self._waiting:
            launched, channel = self._waiting.popleft()
            os.close(channel)  # end-of-file: the bootstrap exits by itself
            self._discard(launched)
            with contextlib.suppress(ProcessLookupError):
                await launched.process.wait()
