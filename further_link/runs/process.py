"""One user program as an async object: start, feed stdin, stop, collect output.

Output is read straight from the pipes' file descriptors, decoded with an
incremental UTF-8 decoder (no character is split, invalid bytes become U+FFFD)
and handed to an async sink. Awaiting the sink is the backpressure: while the
sink is full the pipe is not read, so the program blocks on write instead of
the server buffering without limit. This module knows nothing about JSON.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import uuid
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from further_link.errors import StartError, StdinError
from further_link.runs import proctree
from further_link.runs.containment import Limits, RunGroup, child_setup
from further_link.system.memory import OUTPUT_PIECE_BYTES

log = logging.getLogger(__name__)

OutputSink = Callable[[str, str], Awaitable[None]]
READ_CHUNK = OUTPUT_PIECE_BYTES  # below malloc's mmap threshold (see memory.py)
PIPE_BUFFER_BYTES = 1024 * 1024
STDIN_BACKLOG_LIMIT = 4 * 1024 * 1024
# After the program has exited and its tree is killed, how long to wait for
# pipes to report end-of-file before giving up on a process that escaped.
PIPE_DRAIN_TIMEOUT = 2.0
# An idle pipe's reader wakes this often to see whether that drain has begun.
DEADLINE_RECHECK = 0.5
# How long SIGKILLed processes may take to vanish before the server gives up
# on them (a process stuck in the kernel) and reports the run as ended anyway.
KILL_TIMEOUT = 5.0
# While waiting for the run's processes to end, /proc is scanned after these
# pauses: soon at first (most programs end at once), then less often, since a
# scan reads every process's environment.
POLL_FIRST = 0.005
POLL_MAX = 0.1
# How often orphans that die while the program still runs are reaped, so that
# e.g. a loop of `os.system("cmd &")` does not pile up zombies.
ORPHAN_REAP_INTERVAL = 1.0
# How often a contained run's limit counters are read while it runs: a fork
# bomb that reached the task limit is ended within this.
LIMIT_CHECK_INTERVAL = 0.2
# A stop is a terminal's Ctrl-C first; what a program leaves running after it
# exits by itself gets SIGTERM, quietly, as before; a run over a limit, nothing.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
LEFTOVER_SIGNALS = (signal.SIGTERM,)
# What a stopped program reports, whichever signal finally ended it: the
# 2020 and v5 servers' SIGTERM, which clients show as "stopped by user".
STOPPED_EXIT_CODE = -signal.SIGTERM


def _poll_pauses() -> Iterator[float]:
    pause = POLL_FIRST
    while True:
        yield pause
        pause = min(pause * 2, POLL_MAX)


@dataclass(frozen=True)
class ProgramSpec:
    """Everything needed to start one program."""

    argv: Sequence[str]
    cwd: Path
    env: Mapping[str, str]
    group: RunGroup | None = None  # the run's cgroups, which the program joins before exec
    rlimits: Limits | None = None  # set as rlimits when there is no cgroup (best-effort)
    # A waiting interpreter may become this program. Not when processes of the
    # run already live in a child of ``group`` (a GUI run's display): a warm
    # start takes over the interpreter's own cgroup and recycles ``group``'s.
    warm: bool = True


@dataclass(frozen=True)
class LaunchedProcess:
    """A process with its output pipes' read ends, as a launcher hands it over."""

    process: asyncio.subprocess.Process
    stdout_fd: int
    stderr_fd: int
    tag: str  # the run tag in its environment (see proctree)
    # Its start time in /proc (clock ticks after boot), when the launcher read
    # it ahead (the pool, for a waiting interpreter); else read at start.
    start_time: int | None = None


Launcher = Callable[[ProgramSpec], Awaitable[LaunchedProcess]]


async def exec_in_group(
    argv: Sequence[str],
    group: RunGroup | None,
    rlimits: Limits | None,
    what: str,
    **options: Any,
) -> asyncio.subprocess.Process:
    """Start ``argv`` with its first instruction already inside ``group`` (its cgroups).

    The child joins ``group`` and sets ``PR_SET_NO_NEW_PRIVS`` and ``rlimits``
    before exec (``containment.child_setup``); its pid is one the orphan reaper
    leaves to asyncio (``proctree.MANAGED_CHILDREN``). ``options`` go to
    ``asyncio.create_subprocess_exec`` (stdio, ``cwd``, ``env``, ...). Raises
    ``StartError`` naming ``what`` (e.g. ``'python3'``) when the child cannot
    join its cgroup or start.
    """
    try:
        join_fds = group.open_join_fds() if group is not None else []
    except OSError as exc:
        raise StartError(f"could not put {what} in its cgroup: {exc.strerror}") from None
    try:
        # Registered before the orphan reaper may look again: asyncio waits for it.
        with proctree.MANAGED_CHILDREN.starting():
            process = await asyncio.create_subprocess_exec(
                *argv, preexec_fn=child_setup(join_fds, rlimits), **options
            )
            proctree.MANAGED_CHILDREN.add(process.pid)
    except OSError as exc:
        raise StartError(f"could not start {what}: {exc.strerror}") from None
    except subprocess.SubprocessError as exc:  # the child's set-up step (joining its cgroup)
        raise StartError(f"could not start {what}: {exc}") from None
    finally:
        for fd in join_fds:
            os.close(fd)
    return process


async def spawn(
    argv: Sequence[str],
    cwd: Path,
    env: Mapping[str, str],
    tag: str,
    pass_fds: Sequence[int] = (),
    group: RunGroup | None = None,
    rlimits: Limits | None = None,
) -> LaunchedProcess:
    """Start a process in its own session, as the server's own user, with piped stdio.

    A server started as root has already become the program user (privsep.py),
    so there is no account to switch to here. The child joins ``group`` (its
    cgroups) and sets ``PR_SET_NO_NEW_PRIVS`` and ``rlimits`` before exec.
    Raises ``StartError``.
    """
    env = dict(env)
    env[proctree.RUN_TAG_VAR] = tag
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    _widen_pipe(out_r)
    try:
        process = await exec_in_group(
            argv,
            group,
            rlimits,
            repr(argv[0]),
            stdin=asyncio.subprocess.PIPE,
            stdout=out_w,
            stderr=err_w,
            cwd=str(cwd),
            env=env,
            start_new_session=True,
            pass_fds=pass_fds,
        )
    except BaseException:
        for fd in (out_r, err_r):
            os.close(fd)
        raise
    finally:
        for fd in (out_w, err_w):
            os.close(fd)
    return LaunchedProcess(process, out_r, err_r, tag)


def _widen_pipe(fd: int) -> None:
    """Give a pipe a larger buffer: fewer reads and wake-ups when a program floods output.

    Unprivileged processes may go up to /proc/sys/fs/pipe-max-size (1 MiB by
    default); where that fails the default 64 KiB simply stays.
    """
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BUFFER_BYTES)  # type: ignore[attr-defined]


async def cold_launch(spec: ProgramSpec) -> LaunchedProcess:
    """Start the program as a fresh interpreter."""
    return await spawn(
        spec.argv, spec.cwd, spec.env, uuid.uuid4().hex, group=spec.group, rlimits=spec.rlimits
    )


class PipeReader:
    """Reads one pipe without blocking and delivers decoded text to a sink.

    ``read_available`` can also be called from outside (see ``Program.sync``)
    to deliver everything written so far before a side-channel message.
    """

    def __init__(self, fd: int, stream: str, sink: OutputSink) -> None:
        self.fd = fd
        self.stream = stream
        self._sink = sink
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._lock = asyncio.Lock()
        self.eof = False
        os.set_blocking(fd, False)

    async def read_available(self) -> None:
        async with self._lock:
            while not self.eof:
                try:
                    data = os.read(self.fd, READ_CHUNK)
                except BlockingIOError:
                    return
                except OSError as exc:  # EIO and friends end the stream too
                    log.debug("reading %s failed: %s", self.stream, exc)
                    data = b""
                if not data:
                    self.eof = True
                    text = self._decoder.decode(b"", final=True)
                else:
                    text = self._decoder.decode(data)
                if text:
                    await self._sink(self.stream, text)

    async def _readable(self, timeout: float | None) -> bool:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(self.fd, wake)
        try:
            await asyncio.wait_for(ready, timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            loop.remove_reader(self.fd)

    async def run(self, deadline: Callable[[], float | None]) -> None:
        """Read until end-of-file, or until ``deadline()`` (seconds left) runs out.

        ``deadline`` is asked again at least every ``DEADLINE_RECHECK`` seconds:
        it is set only once the program has ended, while this reader waits.
        """
        while not self.eof:
            await self.read_available()
            if self.eof:
                break
            remaining = deadline()
            if remaining is not None and remaining <= 0:
                log.warning("%s still open after the program ended; closing it", self.stream)
                await self.read_available()
                break
            wait = DEADLINE_RECHECK if remaining is None else min(remaining, DEADLINE_RECHECK)
            await self._readable(wait)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class Program:
    """A started program and every process it creates: its cgroup, else its run tag.

    The owner must ``await wait()`` (or ``stop()`` then ``wait()``), or
    ``abort()`` when it goes away; either returns only when the program has
    exited and its leftover processes are killed and reaped. ``wait`` also
    delivers every byte of output to the sink first.
    """

    def __init__(
        self,
        spec: ProgramSpec,
        sink: OutputSink,
        kill_grace: float = 1.0,
        launcher: Launcher = cold_launch,
    ) -> None:
        self.spec = spec
        self.tag = ""
        self._launcher = launcher
        self._sink = sink
        self._dropping_output = False
        self._kill_grace = kill_grace
        self._process: asyncio.subprocess.Process | None = None
        self._tree: proctree.RunTree | None = None
        self._ending: asyncio.Task[None] | None = None
        self._orphan_reaper: asyncio.Task[None] | None = None
        self._readers: list[PipeReader] = []
        self._pump_tasks: list[asyncio.Task[None]] = []
        self._stdin_task: asyncio.Task[None] | None = None
        self._stdin_buffer = bytearray()
        self._stdin_wakeup = asyncio.Event()
        self._stdin_closed = False
        self._stdin_eof = False
        self._drain_deadline: float | None = None
        self._exit_code: int | None = None
        self._group = spec.group
        self._limit_watch: asyncio.Task[None] | None = None
        self.stop_requested = False
        # The signal that ended the program (e.g. 2, 15 or 9), None after a normal exit.
        self.ending_signal: int | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None, "program not started"
        return self._process.pid

    @property
    def exited(self) -> bool:
        return self._process is not None and self._process.returncode is not None

    async def start(self) -> None:
        """Launch the program; ``begin`` then starts reading its output and feeding stdin.

        Split so that the caller can announce the start before any of that
        work (and the log line) is done: what the program prints meanwhile
        waits in its pipe. Raises ``StartError`` (or ``OSError``) when it cannot
        be started.
        """
        launched = await self._launcher(self.spec)
        self._process = launched.process
        self.tag = launched.tag
        self._tree = proctree.RunTree(self._process.pid, self.tag, launched.start_time)
        self._readers = [
            PipeReader(launched.stdout_fd, "stdout", self._deliver),
            PipeReader(launched.stderr_fd, "stderr", self._deliver),
        ]

    def begin(self) -> None:
        """Start reading the started program's output, feeding its stdin and watching it."""
        assert self._process is not None, "program not started"
        log.info("program started pid=%d cwd=%s", self._process.pid, self.spec.cwd)
        self._pump_tasks = [
            asyncio.ensure_future(reader.run(self._remaining_drain_time))
            for reader in self._readers
        ]
        self._stdin_task = asyncio.ensure_future(self._feed_stdin())
        self._orphan_reaper = asyncio.ensure_future(self._reap_orphans_while_running())
        if self._group is not None:
            self._limit_watch = asyncio.ensure_future(self._watch_limits())

    async def _deliver(self, stream: str, text: str) -> None:
        if not self._dropping_output:  # nobody is left to read what a dying program says
            await self._sink(stream, text)

    def _remaining_drain_time(self) -> float | None:
        if self._drain_deadline is None:
            return None
        return max(0.0, self._drain_deadline - asyncio.get_running_loop().time())

    # ------------------------------------------------------------- stdin

    def write_stdin(self, text: str) -> None:
        """Queue input for the program.

        Input for a program that has closed its stdin or exited is dropped: the
        client sent it before it could know (input crossing the program's end).
        Raises ``StdinError`` after the client's own eof and when the program
        has stopped reading while input piles up.
        """
        if self._stdin_eof:
            raise StdinError("the program's input was already ended (eof)")
        if self._stdin_closed or self.exited:
            log.debug("dropped %d characters of input: the program is ending", len(text))
            return
        if len(self._stdin_buffer) > STDIN_BACKLOG_LIMIT:
            raise StdinError(
                f"the program is not reading its input: {len(self._stdin_buffer)} bytes are waiting"
            )
        self._stdin_buffer += text.encode("utf-8")
        self._stdin_wakeup.set()

    def close_stdin(self) -> None:
        """End the program's input once what is queued has been written."""
        self._stdin_eof = True
        self._stdin_wakeup.set()

    async def _feed_stdin(self) -> None:
        assert self._process is not None and self._process.stdin is not None
        writer = self._process.stdin
        try:
            while True:
                await self._stdin_wakeup.wait()
                self._stdin_wakeup.clear()
                if self._stdin_buffer:
                    data = bytes(self._stdin_buffer)
                    self._stdin_buffer.clear()
                    writer.write(data)
                    await writer.drain()
                if self._stdin_eof and not self._stdin_buffer:
                    log.debug("closing the program's stdin (eof)")
                    return
        except (BrokenPipeError, ConnectionResetError):
            log.debug("program closed its stdin")
        finally:
            self._stdin_closed = True
            self._stdin_buffer.clear()
            writer.close()

    # ------------------------------------------------------- side channel

    async def sync_output(self) -> None:
        """Deliver everything already written to stdout/stderr.

        A side channel (images) calls this before delivering its own message,
        so that a frame sent after a print arrives after that print.
        """
        for reader in self._readers:
            await reader.read_available()

    # ------------------------------------------------------ end of a run

    async def stop(self) -> None:
        """End every process of the run as a terminal would, then for sure.

        SIGINT (Python's KeyboardInterrupt: ``finally`` and ``atexit`` run),
        then SIGTERM, then SIGKILL (``cgroup.kill``), each after the grace
        period. ``wait`` then returns ``STOPPED_EXIT_CODE``.
        """
        if self._process is None:
            return
        if self._process.returncode is None and self._ending is None:
            log.info("stopping program pid=%d", self._process.pid)
            self.stop_requested = True
        await self._end_tree(STOP_SIGNALS)

    async def _end_tree(self, signals: Sequence[signal.Signals]) -> None:
        """End every process of the run, once; later callers wait for the same ending."""
        if self._ending is None:
            self._ending = asyncio.ensure_future(self._terminate_tree(signals))
        # Shielded: a caller cancelled because its connection went away must not
        # leave the tree half killed; ``abort`` then waits for this same task.
        await asyncio.shield(self._ending)

    async def _terminate_tree(self, signals: Sequence[signal.Signals]) -> None:
        """Each of ``signals`` to the whole run, a grace period apart, then SIGKILL."""
        assert self._tree is not None
        loop = asyncio.get_running_loop()
        for sig in signals:
            if not await loop.run_in_executor(None, self._signal_run, sig):
                break  # nothing of the run is left
            if await self._wait_until_gone(self._kill_grace):
                break
        else:
            await self._kill_survivors()
        self._tree.reap_orphans()  # on the loop: never races a spawn registering its pid

    def _signal_run(self, sig: signal.Signals) -> set[int]:
        if self._group is not None:
            return self._group.signal(sig)
        assert self._tree is not None
        return self._tree.signal(sig)

    def _live_processes(self) -> set[int]:
        if self._group is not None:
            return self._group.pids()
        assert self._tree is not None
        return self._tree.live_processes()

    async def _wait_until_gone(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pauses = _poll_pauses()
        while await loop.run_in_executor(None, self._live_processes):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(min(next(pauses), max(0.0, deadline - loop.time())))
        return True

    async def _kill_survivors(self) -> None:
        """SIGKILL until nothing of the run is left, forks made meanwhile included."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + KILL_TIMEOUT
        killed: set[int] = set()
        pauses = _poll_pauses()
        if self._group is not None:
            self._group.kill()  # the kernel ends the whole cgroup; forks cannot race it
            if await self._wait_until_gone(KILL_TIMEOUT):
                return
        while loop.time() < deadline:
            signalled = await loop.run_in_executor(None, self._signal_run, signal.SIGKILL)
            if not signalled:
                if killed:
                    log.info("killed %d process(es) of pid=%d", len(killed), self.pid)
                return
            killed |= signalled
            await asyncio.sleep(next(pauses))
        log.warning(
            "pid=%d: processes survived SIGKILL for %.0f s; giving up", self.pid, KILL_TIMEOUT
        )

    async def _reap_orphans_while_running(self) -> None:
        assert self._tree is not None
        while True:
            await asyncio.sleep(ORPHAN_REAP_INTERVAL)
            self._tree.reap_orphans()  # reads only the server's few children

    async def _watch_limits(self) -> None:
        """End a run that hit its task limit (a fork bomb) at once, without grace."""
        assert self._group is not None
        while self._group.limit_hit() is None:
            await asyncio.sleep(LIMIT_CHECK_INTERVAL)
        log.info("pid=%d: %s; ending the run", self.pid, self._group.limit_hit())
        if self._ending is None:
            self._ending = asyncio.ensure_future(self._terminate_tree(()))

    async def wait(self) -> int:
        """Wait for exit, end leftovers, deliver all output; return the exit code.

        The exit code is negative (the signal number) when a signal ended it.
        """
        assert self._process is not None, "program not started"
        if self._exit_code is not None:
            return self._exit_code
        code = await self._process.wait()
        # The program is gone; whatever it left running goes too.
        assert self._tree is not None
        if self._ending is not None or self._has_leftovers():
            await self._end_tree(LEFTOVER_SIGNALS)
        else:
            self._tree.reap_orphans()  # children that died before anything saw them
        self._drain_deadline = asyncio.get_running_loop().time() + PIPE_DRAIN_TIMEOUT
        await asyncio.gather(*self._pump_tasks)
        await self._close()
        await self._explain_limit()
        self._exit_code = self._reported(code)
        log.info("program ended pid=%d exit code %d", self._process.pid, code)
        return self._exit_code

    def _has_leftovers(self) -> bool:
        if self._group is not None:
            return bool(self._group.pids())
        assert self._tree is not None
        return self._tree.has_leftovers()

    def _reported(self, code: int) -> int:
        self.ending_signal = -code if code < 0 else None
        return STOPPED_EXIT_CODE if self.stop_requested else code

    async def _explain_limit(self) -> None:
        """Tell the learner, on stderr, when a limit ended the program."""
        why = self._group.limit_hit() if self._group is not None else None
        if why is not None:
            await self._sink("stderr", f"further-link: the program was stopped because {why}\n")

    async def _close(self) -> None:
        for task in (self._stdin_task, self._orphan_reaper, self._limit_watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for reader in self._readers:
            reader.close()

    async def abort(self) -> None:
        """Used when the owner goes away: kill everything, drop the output."""
        if self._process is None or self._exit_code is not None:
            return
        self._dropping_output = True
        await self.stop()
        for task in self._pump_tasks:
            task.cancel()
        await asyncio.gather(*self._pump_tasks, return_exceptions=True)
        try:
            await asyncio.wait_for(self._process.wait(), KILL_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("pid=%d survived SIGKILL; leaving it behind", self.pid)
        await self._close()
        code = self._process.returncode
        self._exit_code = None if code is None else self._reported(code)
