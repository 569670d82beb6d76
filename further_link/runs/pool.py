"""Pre-started interpreters, so that a program starts without paying for Python's start-up.

Starting CPython costs ~15 ms here and far more on a Raspberry Pi. The pool
keeps ``size`` interpreters waiting, already started as the program user with
their pipes attached, each running ``warm_bootstrap`` and blocked on a private
pipe. ``launch`` hands one the program's details; it then runs the program as
a fresh ``python -u SCRIPT`` would (see warm_bootstrap.py) and is never reused.
The pool refills in the background, one interpreter at a time, once the
program that took an interpreter has ended or run for a second, so that
refilling never competes hard with the programs it serves.

Only a spec the pool was made for is launched warm: same interpreter, flags
and the same environment apart from the per-run variables that
the bootstrap applies itself. Anything else starts cold, unchanged.

Waiting interpreters may also import ``preload`` modules before they get a
program (heavy libraries such as numpy), so the program's own ``import``
finds them loaded. A module that cannot be imported, or that writes output or
ends the interpreter while imported, is dropped from the list with one log
line; the interpreter that tried it is discarded and the pool carries on.
``launch`` takes any spec of the form ``python -u SCRIPT ARGS...`` and knows
nothing of the wire API that asked for it.

With per-run cgroups, each interpreter waits in the cgroup of the run it will
become, made (with the run's limits) and entered before it is offered: moving
a process between cgroups costs 10-20 ms of kernel RCU synchronisation, which
is paid on a worker thread while the pool refills instead of between ``start``
and ``started``. At hand-over the run's own freshly made cgroup and the
interpreter's swap places (``RunGroup.swap``); the fresh one, still empty,
goes back to the containment for the next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

from further_link.channel import SOCKET_ENV_VAR
from further_link.errors import StartError
from further_link.runs import proctree
from further_link.runs.containment import Containment, RunGroup
from further_link.runs.display import DISPLAY_VARIABLES
from further_link.runs.process import (
    KILL_TIMEOUT,
    LaunchedProcess,
    ProgramSpec,
    cold_launch,
    spawn,
)

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
# Generous: numpy takes 1-2 s to import on a Raspberry Pi 4, more when it is busy.
PRELOAD_TIMEOUT = 60.0
# Starting an interpreter blocks the event loop for a few ms (fork and exec):
# a refill waits this long (s) after what prompted it, so that the program's
# `started`, first output or `stopped` go out first.
REFILL_DELAY = 0.03
# Refilling (an interpreter's start-up and its preload imports: ~0.12 s of CPU
# for numpy and PIL.Image here, a second or more on a Raspberry Pi) waits for
# the program that took an interpreter to end, or to have run this long (s):
# a program's first moments (its imports, first output, a burst of prints)
# should not share the cores with it. The other waiting interpreter serves a
# second start meanwhile.
REFILL_AFTER = 1.0
# While it imports the preload modules, a waiting interpreter's run cgroup has
# this CPU weight (cgroup v2 scale, 100 the default): about a sixth of the CPU
# beside one busy program, which it should not slow much, and still enough to
# finish numpy well within PRELOAD_TIMEOUT on a Raspberry Pi.
PRELOAD_CPU_WEIGHT = 20


class WarmPool:
    """``size`` waiting interpreters of ``python``, each with ``preload`` imported.

    ``preload`` holds module names (``numpy``, ``PIL.Image``), searched for
    first in ``base_env``'s ``PYTHONPATH`` (the entries every program gets);
    ``quiet_missing`` leaves out one that is not installed with a debug line
    only (for the default list). While runs come faster than preloading
    interpreters can be made, the pool refills with plain ones until it has
    caught up.
    """

    def __init__(
        self,
        size: int,
        python: str,
        base_env: Mapping[str, str],
        preload: Sequence[str] = (),
        quiet_missing: bool = False,
        containment: Containment | None = None,
    ):
        self.size = size
        self._containment = containment
        self._python = python
        self._base_env = {k: v for k, v in base_env.items() if k not in PER_RUN_VARIABLES}
        self.preload = list(preload)
        self._preload_path = base_env.get("PYTHONPATH", "")
        # Set while runs come faster than preloading interpreters can be made:
        # the pool then refills with plain ones (a quick start beats none).
        self._behind = False
        # For a default list: a module that is not installed is left out without a warning.
        self._quiet_missing = quiet_missing
        # (interpreter, its program channel, the run cgroup it waits in)
        self._waiting: deque[tuple[LaunchedProcess, int, RunGroup | None]] = deque()
        # Discarded interpreters whose cgroup is removed once they have ended.
        self._retiring: set[asyncio.Task[None]] = set()
        # Refills waiting for the program that took an interpreter (REFILL_AFTER).
        self._pending_refills: set[asyncio.Task[None]] = set()
        self._filled = asyncio.Event()
        self._refill: asyncio.Task[None] | None = None
        self._closed = False
        self.warm_starts = 0
        self.cold_starts = 0

    def start(self) -> None:
        """Begin filling the pool in the background."""
        self._schedule_refill()

    def fits(self, spec: ProgramSpec) -> bool:
        """Whether a waiting interpreter can become exactly this program."""
        if not spec.warm:
            return False
        argv = list(spec.argv)
        if argv[:2] != [self._python, "-u"] or len(argv) < 3:
            return False
        env = {k: v for k, v in spec.env.items() if k not in PER_RUN_VARIABLES}
        return env == self._base_env

    async def launch(self, spec: ProgramSpec) -> LaunchedProcess:
        """The program, in a waiting interpreter when one fits, else freshly started."""
        if self.fits(spec):
            if not self._waiting:
                self._behind = True
            while self._waiting and (self._waiting[0][2] is None) == (spec.group is None):
                launched, channel, group = self._waiting.popleft()
                if self._hand_over(launched, channel, group, spec):
                    self._refill_after(launched)
                    self.warm_starts += 1
                    log.debug("started a program warm (pid %d)", launched.process.pid)
                    return launched
                asyncio.get_running_loop().call_later(REFILL_DELAY, self._schedule_refill)
        self.cold_starts += 1
        return await cold_launch(spec)

    def _hand_over(
        self, launched: LaunchedProcess, channel: int, group: RunGroup | None, spec: ProgramSpec
    ) -> bool:
        """Give the interpreter the program; the run takes over the cgroup it waits in."""
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
            self._discard(launched, group)
            return False
        finally:
            os.close(channel)
        if spec.group is not None and group is not None and self._containment is not None:
            spec.group.swap(group)
            self._containment.recycle(group)
        return True

    def waiting_pids(self) -> list[int]:
        """Process ids of the interpreters waiting now (for figures such as their memory)."""
        return [launched.process.pid for launched, _, _ in self._waiting]

    async def ready(self) -> None:
        """Wait until an interpreter waits, or the pool stopped trying to start one."""
        while not self._waiting and self._refill is not None and not self._refill.done():
            self._filled.clear()
            filled = asyncio.ensure_future(self._filled.wait())
            try:
                await asyncio.wait([filled, self._refill], return_when=asyncio.FIRST_COMPLETED)
            finally:
                filled.cancel()

    def _refill_after(self, launched: LaunchedProcess) -> None:
        """Refill once the program ``launched`` became has ended, or after ``REFILL_AFTER``."""

        async def when_ended() -> None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(launched.process.wait(), REFILL_AFTER)
            await asyncio.sleep(REFILL_DELAY)
            self._schedule_refill()

        task = asyncio.ensure_future(when_ended())
        self._pending_refills.add(task)
        task.add_done_callback(self._pending_refills.discard)

    def _schedule_refill(self) -> None:
        if self._closed or (self._refill is not None and not self._refill.done()):
            return
        self._refill = asyncio.ensure_future(self._fill())

    async def _fill(self) -> None:
        while not self._closed and len(self._waiting) < self.size:
            containment = self._containment
            try:
                group = self._new_group()
            except OSError as exc:
                log.warning("could not make a cgroup for a waiting interpreter: %s", exc)
                return
            read_end, write_end = os.pipe()
            preload = [] if self._behind else self.preload
            status_read, status_write = os.pipe() if preload else (-1, -1)
            passed = [fd for fd in (read_end, status_write) if fd >= 0]
            try:
                launched = await spawn(
                    [
                        *(self._python, "-u", "-c", BOOTSTRAP),
                        *(str(read_end), str(status_write), self._preload_path, *preload),
                    ],
                    WAITING_CWD,
                    self._base_env,
                    uuid.uuid4().hex,
                    pass_fds=passed,
                    rlimits=containment.rlimits if containment is not None else None,
                )
            except (StartError, OSError) as exc:
                os.close(write_end)
                if status_read >= 0:
                    os.close(status_read)
                if group is not None and containment is not None:
                    containment.recycle(group)
                log.warning("could not pre-start an interpreter: %s; starting programs cold", exc)
                return
            finally:
                for fd in passed:
                    os.close(fd)
            if not await self._enter(launched, group):
                os.close(write_end)
                if status_read >= 0:
                    os.close(status_read)
                return
            if status_read >= 0:
                if group is not None:
                    group.set_cpu_weight(PRELOAD_CPU_WEIGHT)
                if not await self._preloaded(launched, status_read):
                    os.close(write_end)
                    self._discard(launched, group)
                    continue
                if group is not None and containment is not None:
                    group.set_cpu_weight(containment.limits.cpu_weight or 100)
            if self._closed:
                os.close(write_end)
                self._discard(launched, group)
                return
            # Read now, so that the run which takes it need not (see RunTree).
            info = proctree.read_proc_info(launched.process.pid)
            if info is not None:
                launched = dataclasses.replace(launched, start_time=info.start_time)
            self._waiting.append((launched, write_end, group))
            # Tests of a server process (and a curious admin) see the pool fill from the log.
            log.debug(
                "an interpreter waits (pid %d, preloading %s)",
                launched.process.pid,
                ",".join(self.preload) or "nothing",
            )
            self._filled.set()
        if len(self._waiting) >= self.size:
            self._behind = False  # caught up: preload again from the next refill

    def _new_group(self) -> RunGroup | None:
        """A run cgroup for the next interpreter; None without cgroups. Raises OSError."""
        if self._containment is None:
            return None
        # Not from the stock: that serves runs at start, and each hand-over refills it.
        return self._containment.new_run(from_stock=False)

    async def _enter(self, launched: LaunchedProcess, group: RunGroup | None) -> bool:
        """Move a just started interpreter into its run cgroup, on a worker thread.

        Until then it runs Python's start-up in the server's own cgroup: only
        the interpreter's own start-up code, which every fresh ``python`` runs
        too. False (logged, the interpreter discarded) when the move failed.
        """
        if group is None:
            return True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, group.add, launched.process.pid)
        except ProcessLookupError:
            # It has already ended, before it could be moved: a preload module
            # may have ended it, and its status pipe says which (the caller
            # reads it next, and drops that module); without preloading, the
            # hand-over finds it gone and discards it.
            return True
        except OSError as exc:
            log.warning("could not move a waiting interpreter into its cgroup: %s", exc)
            self._discard(launched, group)
            return False
        return True

    async def _preloaded(self, launched: LaunchedProcess, status_fd: int) -> bool:
        """Whether the interpreter imported every preload module; drops the one that failed."""
        lines, timed_out = await read_status(status_fd, PRELOAD_TIMEOUT)
        if lines and lines[-1] == "ready":
            return True
        culprit, why = "", "the interpreter ended before preloading"
        for line in lines:
            verb, _, rest = line.partition(" ")
            name, _, detail = rest.partition(": ")
            if verb == "begin":
                culprit = name
                why = (
                    f"it did not finish importing within {PRELOAD_TIMEOUT:.0f} s"
                    if timed_out
                    else "the interpreter ended while importing it"
                )
            elif verb in ("missing", "fail"):
                culprit, why = name, "it is not installed" if verb == "missing" else detail
        if culprit not in self.preload:
            log.warning("waiting interpreters could not preload (%s); preloading nothing", why)
            self.preload = []
            return False
        self.preload.remove(culprit)
        if why == "it is not installed" and self._quiet_missing:
            log.debug("not preloading %s: it is not installed", culprit)
        else:
            log.warning("not preloading %s any more: %s", culprit, why[:200])
        return False

    def _discard(self, launched: LaunchedProcess, group: RunGroup | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launched.process.pid, signal.SIGKILL)
        for fd in (launched.stdout_fd, launched.stderr_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        if launched.process.stdin is not None:
            launched.process.stdin.close()
        if group is not None:
            task = asyncio.ensure_future(self._remove_when_ended(launched, group))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _remove_when_ended(self, launched: LaunchedProcess, group: RunGroup) -> None:
        """End whatever is in a discarded interpreter's cgroup, then remove the cgroup."""
        group.kill()
        with contextlib.suppress(ProcessLookupError, asyncio.TimeoutError):
            await asyncio.wait_for(launched.process.wait(), KILL_TIMEOUT)
        await group.remove_async()

    async def close(self) -> None:
        """End every waiting interpreter and wait for them."""
        self._closed = True
        for task in list(self._pending_refills):
            task.cancel()
        if self._refill is not None:
            # Not cancelled: an interpreter mid-start would be lost; the loop sees _closed.
            await self._refill
        while self._waiting:
            launched, channel, group = self._waiting.popleft()
            os.close(channel)  # end-of-file: the bootstrap exits by itself
            self._discard(launched, group)
            with contextlib.suppress(ProcessLookupError):
                await launched.process.wait()
        await asyncio.gather(*self._retiring, return_exceptions=True)


async def read_status(fd: int, timeout: float) -> tuple[list[str], bool]:
    """Lines from a waiting interpreter's status pipe until ``ready``, end-of-file or ``timeout`` s.

    Returns the lines (decoded as UTF-8, stripped) and whether the time ran
    out. Closes ``fd``.
    """
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    readable = asyncio.Event()
    loop.add_reader(fd, readable.set)
    data = b""
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        while not data.endswith(b"ready\n"):
            readable.clear()
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(readable.wait(), remaining)
                continue
            if not chunk:
                break
            data += chunk
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return [line.strip() for line in data.decode("utf-8", "replace").splitlines()], timed_out
