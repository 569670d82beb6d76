"""Finding, signalling and reaping every process that belongs to one run.

A program may fork, call ``setsid`` or double-fork to escape its process
group. A run's processes are found three ways, any one of which is enough:
descent from the program's pid, membership of its process group or session,
and the run tag in their environment (which survives setsid and reparenting).

The server is a child subreaper (``become_subreaper``), so a run's orphans
become the server's children instead of init's, and must be reaped by the
server once they die. A zombie has no environment left to read, so
``RunTree`` remembers every process it has seen alive (pid and start time)
and reaps only zombies it can prove belong to the run. It never waits for
the run's own program: asyncio's child watcher owns that pid.

Only ``/proc`` is read; this module knows nothing about asyncio.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

RUN_TAG_VAR = "FURTHER_LINK_RUN_ID"
PR_SET_CHILD_SUBREAPER = 36  # from <linux/prctl.h>


class ManagedChildren:
    """Pids of the server's children that an asyncio child watcher waits for.

    Every other zombie child of the server is an adopted orphan of some run
    (the server is a subreaper) and is reaped here; these never are, or
    asyncio would lose their exit codes. Process-wide by nature, like the
    subreaper flag itself.
    """

    def __init__(self) -> None:
        self._pids: set[int] = set()
        self._lock = threading.Lock()
        self._starting = 0

    @contextlib.contextmanager
    def starting(self) -> Iterator[None]:
        """Around creating a child: until its pid is added, it is unknown here."""
        with self._lock:
            self._starting += 1
        try:
            yield
        finally:
            with self._lock:
                self._starting -= 1

    @property
    def complete(self) -> bool:
        """False while a child is being created and may not be registered yet."""
        with self._lock:
            return self._starting == 0

    def add(self, pid: int) -> None:
        with self._lock:
            self._pids.add(pid)

    def __contains__(self, pid: object) -> bool:
        with self._lock:
            return pid in self._pids

    def prune(self, children: set[int]) -> None:
        """Forget pids asyncio has already reaped (no longer our children)."""
        with self._lock:
            self._pids &= children


MANAGED_CHILDREN = ManagedChildren()


def become_subreaper() -> bool:
    """Make orphaned descendants of this process its children, not init's.

    Without this, a double-forked daemon of a run is adopted by init and the
    server can still kill it (by its run tag) but no longer reap it. Returns
    False where the system offers no subreaper (not Linux, or older than 3.4).
    """
    if not sys.platform.startswith("linux"):
        log.warning("not Linux: orphaned processes of programs go to init")
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        log.warning("cannot become a child subreaper: %s", os.strerror(error))
        return False
    return True


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str
    start_time: int  # clock ticks after boot: with the pid, names one process for good

    @property
    def zombie(self) -> bool:
        return self.state == "Z"


def read_proc_info(pid: int) -> ProcInfo | None:
    """Parse /proc/PID/stat; ``None`` when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm is in parentheses and may itself contain spaces or parentheses.
    rest = raw[raw.rfind(")") + 2 :].split()
    if len(rest) < 20:  # read while the process was being torn down
        return None
    return ProcInfo(
        pid,
        ppid=int(rest[1]),
        pgid=int(rest[2]),
        sid=int(rest[3]),
        state=rest[0],
        start_time=int(rest[19]),
    )


def _all_pids() -> Iterable[int]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


def _all_infos() -> dict[int, ProcInfo]:
    return {pid: info for pid in _all_pids() if (info := read_proc_info(pid)) is not None}


def server_children() -> set[int]:
    """Pids of this process's children, read from /proc without a full scan."""
    me = os.getpid()
    try:
        tasks = os.listdir(f"/proc/{me}/task")
    except OSError:
        tasks = []
    children: set[int] = set()
    for tid in tasks:
        try:
            with open(f"/proc/{me}/task/{tid}/children") as f:
                children.update(int(pid) for pid in f.read().split())
        except FileNotFoundError:  # kernel without CONFIG_PROC_CHILDREN
            return {info.pid for info in _all_infos().values() if info.ppid == me}
        except OSError:
            continue
    return children


def _has_tag(pid: int, tag_entry: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return tag_entry in f.read().split(b"\0")
    except OSError:
        return False


def signal_processes(pids: Iterable[int], sig: signal.Signals) -> int:
    """Send ``sig`` to each pid that still exists; returns how many were signalled."""
    sent = 0
    for pid in pids:
        try:
            os.kill(pid, sig)
            sent += 1
        except ProcessLookupError:
            pass
        except PermissionError:
            log.warning("not allowed to send %s to pid %d", sig.name, pid)
    return sent


class RunTree:
    """The processes of one run: found in /proc, signalled, and their orphans reaped.

    Methods may be called from worker threads; a lock keeps the memory of
    seen processes consistent.
    """

    def __init__(self, root_pid: int, tag: str, root_start_time: int | None = None) -> None:
        """``root_start_time``: the root's start time as /proc gives it, if known
        (read now otherwise)."""
        self.root_pid = root_pid
        self._tag_entry = f"{RUN_TAG_VAR}={tag}".encode()
        self._me = os.getpid()
        self._lock = threading.Lock()
        # pid -> start time of every process seen alive in the run, root included.
        self._seen: dict[int, int] = {}
        if root_start_time is None:
            root = read_proc_info(root_pid)
            root_start_time = root.start_time if root is not None else None
        if root_start_time is not None:
            self._seen[root_pid] = root_start_time

    def live_processes(self) -> set[int]:
        """Every live process of the run (the root included while it runs)."""
        infos = _all_infos()
        children: dict[int, list[int]] = {}
        for info in infos.values():
            children.setdefault(info.ppid, []).append(info.pid)
        found: set[int] = set()
        for info in infos.values():
            if info.pid == self._me or info.zombie:
                continue
            if (
                info.pid == self.root_pid
                or self.root_pid in (info.pgid, info.sid)
                or _has_tag(info.pid, self._tag_entry)
            ):
                found.add(info.pid)
        # Descendants of anything found so far (children that cleared their env).
        stack = list(found)
        while stack:
            for child in children.get(stack.pop(), []):
                if child not in found and child != self._me:
                    found.add(child)
                    stack.append(child)
        alive = {pid for pid in found if not infos[pid].zombie}
        self._remember(infos[pid] for pid in alive)
        return alive

    def has_leftovers(self) -> bool:
        """Whether anything of the run may outlive its program, checked cheaply.

        Once the program has exited, each of its live descendants is either
        still in its process group or, through an orphaned ancestor adopted
        by this subreaper, below one of the server's own children. So this
        reads only those few children rather than all of /proc, and a run
        that left nothing behind ends without a scan.
        """
        try:
            os.killpg(self.root_pid, 0)
            return True
        except ProcessLookupError:
            pass
        except PermissionError:
            return True
        return any(
            pid != self.root_pid and _has_tag(pid, self._tag_entry) for pid in server_children()
        )

    def signal(self, sig: signal.Signals, rounds: int = 20) -> set[int]:
        """Signal the whole run, repeating while new processes keep appearing.

        Repeating closes the window in which a process forks between the scan
        and the signal. Returns the pids signalled.
        """
        signalled: set[int] = set()
        for _ in range(rounds):
            pids = self.live_processes() - signalled
            if not pids:
                break
            signal_processes(pids, sig)
            signalled |= pids
        return signalled

    def reap_orphans(self) -> int:
        """Reap the run's dead orphans that the server adopted; returns how many.

        Also remembers the run's live orphans (by their tag) so that they can
        be reaped later, when their environment can no longer be read.
        """
        reaped = 0
        children = server_children()
        MANAGED_CHILDREN.prune(children)
        for pid in children:
            info = read_proc_info(pid)
            if info is None or info.ppid != self._me or info.pid == self.root_pid:
                continue
            if not info.zombie:
                if _has_tag(info.pid, self._tag_entry):
                    self._remember([info])
            elif (
                self._owns_zombie(info)
                or (MANAGED_CHILDREN.complete and info.pid not in MANAGED_CHILDREN)
            ) and _reap(info.pid):
                # Zombies of any run are reaped: one that died before it could
                # be seen (a setsid child exiting at once) belongs to no one else.
                reaped += 1
        if reaped:
            log.debug("reaped %d orphan(s) of pid=%d", reaped, self.root_pid)
        return reaped

    def _remember(self, infos: Iterable[ProcInfo]) -> None:
        with self._lock:
            for info in infos:
                self._seen[info.pid] = info.start_time

    def _owns_zombie(self, info: ProcInfo) -> bool:
        """Whether a zombie child of the server is provably one of the run's processes.

        Either it was seen alive (same pid and start time), or it is in a
        session or group led by a process seen in the run and started after
        it. A leader itself is matched only by being seen: every run's program
        leads its own session, and asyncio, not this class, waits for those.
        """
        with self._lock:
            if self._seen.get(info.pid) == info.start_time:
                return True
            for leader in {info.sid, info.pgid} - {info.pid}:
                leader_start = self._seen.get(leader)
                if leader_start is not None and info.start_time >= leader_start:
                    return True
        return False


def _reap(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # someone else reaped it first
        return False
    return done == pid
