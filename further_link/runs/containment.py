"""Per-run containment: each run in its own cgroup, with limits, ended as a whole.

At start-up ``detect`` reads ``/proc/self/mountinfo`` and ``/proc/self/cgroup``
and finds what the machine offers:

- ``v2``: a cgroup2 hierarchy whose controllers (memory, pids, cpu) can be
  enabled below the server's own cgroup (Raspberry Pi OS bookworm under
  systemd with ``Delegate=yes``);
- ``hybrid``: a cgroup2 hierarchy without controllers (membership and
  ``cgroup.kill`` only) beside cgroup v1 ``memory``, ``pids`` and ``cpu``
  hierarchies, which carry the limits;
- nothing writable (a container without delegation): ``best-effort``, today's
  process-group and run-tag tracking (proctree.py) plus rlimits set in the
  child (``RLIMIT_NPROC``, ``RLIMIT_AS``).

Layout, in every hierarchy used, below the cgroup the server was started in::

    <own cgroup>/further-link-<pid>-<random>/   one per server instance
        server/        the server itself, only where it had to leave <own cgroup>
        run-<hex>/     one per run, removed when the run ends; a warm
                       interpreter waits in the run cgroup it will run in

Several servers may run on one machine (and in one process: the tests), so
each instance names its own subtree; at start-up only subtrees of processes
that no longer exist are removed, and only when empty (``rmdir`` of a cgroup
fails while any process is in it).

Interface for a server started as root that drops privileges (issue 8 part B):
``prepare_delegation(uid, gid)`` must be called while still root. It creates
the subtree in every hierarchy, moves the calling process into its
``server/`` leaf (cgroup v2 allows no processes in a cgroup whose controllers
are handed down) and chowns the subtree directory and its ``cgroup.procs``,
``cgroup.subtree_control``, ``cgroup.threads`` (v2) or ``tasks`` and
``cgroup.procs`` (v1) to ``uid:gid``. After dropping to that account,
``Containment.start`` finds the prepared subtree from ``/proc/self/cgroup``
(it is in ``further-link-<its pid>-*/server``) and uses it: the unprivileged
server can then create run cgroups in it and move its children there, since
it owns ``cgroup.procs`` of their common ancestor. The same detection makes a
server started unprivileged inside a systemd-delegated cgroup work: it needs
only write access to its own cgroup.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import re
import resource
import secrets
import signal
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

CONTROLLERS = ("memory", "pids", "cpu")
SUBTREE_PREFIX = "further-link-"
SERVER_LEAF = "server"
RUN_PREFIX = "run-"
_SUBTREE_NAME = re.compile(r"^further-link-(\d+)-[0-9a-f]+$")
# A removed run's cgroup lingers while the kernel finishes tearing its
# processes down: rmdir is retried this long.
REMOVE_TIMEOUT = 2.0
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
CGROUP = "cgroup"
BEST_EFFORT = "best-effort"


@dataclass(frozen=True)
class Limits:
    """Per-run limits; 0 means no limit (memory in bytes, tasks in processes+threads)."""

    memory_bytes: int
    tasks: int
    cpu_weight: int  # cgroup v2 scale: 1..10000, 100 is the default share


def default_memory_bytes() -> int:
    """Half of this machine's RAM."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


@dataclass(frozen=True)
class Layout:
    """Where the server's own cgroups are, per hierarchy (absolute directories)."""

    unified: Path | None  # the server's cgroup in the cgroup2 hierarchy
    v2_controllers: frozenset[str]  # controllers the unified cgroup offers its children
    v1: Mapping[str, Path] = field(default_factory=dict)  # controller -> the server's v1 cgroup

    @property
    def kind(self) -> str:
        if self.unified is not None and {"memory", "pids"} <= self.v2_controllers:
            return "v2"
        if self.unified is not None and self.v1:
            return "hybrid"
        return "none"


def _mounts(mountinfo: str) -> list[tuple[str, Path, str, set[str]]]:
    """(root inside the hierarchy, mount point, fs type, super options) per cgroup mount."""
    found = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        mount_point = fields[4].replace("\\040", " ")
        found.append((fields[3], Path(mount_point), tail[0], set(tail[2].split(","))))
    return found


def _inside(mount_root: str, mount_point: Path, own: str) -> Path | None:
    """The directory of cgroup ``own`` under a mount of the hierarchy at ``mount_root``."""
    relative = os.path.relpath(own, mount_root)
    if relative.startswith(".."):
        return None  # the mount shows another part of the hierarchy
    return mount_point if relative == "." else mount_point / relative


def detect(mountinfo: str, own_cgroups: str) -> Layout:
    """Parse the two /proc files into a ``Layout`` (no file access: testable)."""
    own_v2: str | None = None
    own_v1: dict[str, str] = {}
    for line in own_cgroups.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            own_v2 = parts[2]
        for name in parts[1].split(","):
            if name in CONTROLLERS:
                own_v1[name] = parts[2]
    unified: Path | None = None
    v1: dict[str, Path] = {}
    for root, point, kind, options in _mounts(mountinfo):
        if kind == "cgroup2" and own_v2 is not None and unified is None:
            unified = _inside(root, point, own_v2)
        elif kind == "cgroup":
            for name in options & set(own_v1):
                if name not in v1:
                    where = _inside(root, point, own_v1[name])
                    if where is not None:
                        v1[name] = where
    controllers: frozenset[str] = frozenset()
    if unified is not None:
        with contextlib.suppress(OSError):
            controllers = frozenset((unified / "cgroup.controllers").read_text().split())
    return Layout(unified, controllers, v1)


def detect_here() -> Layout:
    with open("/proc/self/mountinfo") as mountinfo, open("/proc/self/cgroup") as own:
        return detect(mountinfo.read(), own.read())


def _write(path: Path, text: str) -> None:
    # O_WRONLY without O_CREAT or O_TRUNC: these are kernel interface files.
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read_keyed(path: Path) -> dict[str, int]:
    """A flat "key value" file such as memory.events; empty when unreadable."""
    values: dict[str, int] = {}
    try:
        text = path.read_text()
    except OSError:
        return values
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            values[key] = int(value)
    return values


def _read_pids(path: Path) -> set[int]:
    try:
        return {int(line) for line in path.read_text().split()}
    except (OSError, ValueError):
        return set()


def _describe_bytes(amount: int) -> str:
    if amount % (1024**3) == 0:
        return f"{amount // 1024**3} GiB"
    return f"{amount / 1024**2:.0f} MiB"


class RunGroup:
    """One run's cgroups (v2 first, then the v1 ones); ended and removed as a whole."""

    def __init__(self, unified: Path | None, v1: Mapping[str, Path], limits: Limits) -> None:
        self.unified = unified
        self.v1 = dict(v1)
        self.limits = limits
        self.reported_limit: str | None = None

    @property
    def directories(self) -> list[Path]:
        return ([self.unified] if self.unified is not None else []) + list(self.v1.values())

    @property
    def _membership(self) -> Path:
        """The cgroup.procs that lists every process of the run."""
        base = self.unified or self.v1.get("pids") or next(iter(self.v1.values()))
        return base / "cgroup.procs"

    def create(self) -> None:
        """Make the group's directories, all or none; raises OSError."""
        made: list[Path] = []
        try:
            for directory in self.directories:
                directory.mkdir()
                made.append(directory)
        except OSError:
            for directory in reversed(made):
                _rmdir(directory)
            raise

    def child(self, name: str) -> RunGroup:
        """A new group ``name`` below each of this one's, under its (hierarchical) limits.

        Raises OSError. Its processes are not among this group's ``pids()``;
        ``cgroup.kill`` of this group ends them too.
        """
        group = RunGroup(
            self.unified / name if self.unified is not None else None,
            {controller: path / name for controller, path in self.v1.items()},
            self.limits,
        )
        group.create()
        return group

    def open_join_fds(self) -> list[int]:
        """Descriptors a child writes ``0`` to, before exec, to join every cgroup of the run."""
        fds: list[int] = []
        try:
            for directory in self.directories:
                fds.append(os.open(directory / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC))
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def add(self, pid: int) -> None:
        """Move a running process (a warm interpreter) into the run; raises OSError.

        Slow (about 10-20 ms, in the kernel's RCU synchronisation) when no
        other cgroup migration happened in the last few ms: call it off the
        event loop, ahead of the run.
        """
        for directory in self.directories:
            _write(directory / "cgroup.procs", str(pid))

    def swap(self, other: RunGroup) -> None:
        """Exchange cgroup directories with ``other`` (made with the same limits).

        How a run takes over the cgroup its warm interpreter already waits
        in, without moving a process at start; the run's fresh, still empty
        one then goes back to the containment (``Containment.recycle``).
        """
        self.unified, other.unified = other.unified, self.unified
        self.v1, other.v1 = other.v1, self.v1

    def pids(self) -> set[int]:
        return _read_pids(self._membership)

    def set_cpu_weight(self, weight: int) -> None:
        """The run's CPU share (cgroup v2 scale: 1..10000, 100 the default).

        Does nothing where no cpu controller is in use.
        """
        with contextlib.suppress(OSError):
            if "cpu" in self.v1:
                _write(self.v1["cpu"] / "cpu.shares", str(_cpu_shares(weight)))
            elif self.unified is not None:
                _write(self.unified / "cpu.weight", str(weight))

    def signal(self, sig: signal.Signals, rounds: int = 20) -> set[int]:
        """Send ``sig`` to every process of the run, again while new ones appear."""
        sent: set[int] = set()
        for _ in range(rounds):
            fresh = self.pids() - sent
            if not fresh:
                break
            for pid in fresh:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            sent |= fresh
        return sent

    def kill(self) -> None:
        """SIGKILL everything in the run at once (``cgroup.kill``, else signal by signal)."""
        if self.unified is not None:
            try:
                _write(self.unified / "cgroup.kill", "1")
                return
            except OSError as exc:  # kernels before 5.14
                log.debug("cgroup.kill failed: %s", exc)
        self.signal(signal.SIGKILL)

    def limit_hit(self) -> str | None:
        """Words for the learner when a limit ended (or must end) the run, else None."""
        if self.reported_limit is not None:
            return self.reported_limit
        tasks = 0
        oom = 0
        if self.unified is not None and "pids" not in self.v1:
            tasks = _read_keyed(self.unified / "pids.events").get("max", 0)
            oom = _read_keyed(self.unified / "memory.events").get("oom_kill", 0)
        if "pids" in self.v1:
            tasks = _read_keyed(self.v1["pids"] / "pids.events").get("max", 0)
        if "memory" in self.v1:
            oom = _read_keyed(self.v1["memory"] / "memory.oom_control").get("oom_kill", 0)
        if oom and self.limits.memory_bytes:
            amount = _describe_bytes(self.limits.memory_bytes)
            self.reported_limit = f"it used more than {amount} of memory"
        elif tasks and self.limits.tasks:
            self.reported_limit = f"it started more than {self.limits.tasks} processes"
        return self.reported_limit

    def remove(self) -> bool:
        """Remove the run's cgroups once empty; False if some are still in use."""
        deadline = time.monotonic() + REMOVE_TIMEOUT
        left = self.directories
        while left:
            left = [d for d in left if not _rmdir(d)]
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        if left:
            log.warning("run cgroups still in use, left behind: %s", ", ".join(map(str, left)))
        return not left

    async def remove_async(self) -> bool:
        """``remove`` on a worker thread: it waits (up to ``REMOVE_TIMEOUT`` s) for the
        kernel to finish tearing the processes down, which must not hold up the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, self.remove)


def _rmdir(directory: Path) -> bool:
    try:
        os.rmdir(directory)
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
            return False
        log.debug("cannot remove %s: %s", directory, exc)
        return False
    return True


def _apply_limits(unified: Path | None, v1: Mapping[str, Path], limits: Limits, v2: bool) -> None:
    if v2 and unified is not None:
        if limits.memory_bytes:
            _write(unified / "memory.max", str(limits.memory_bytes))
            with contextlib.suppress(OSError):  # no swap accounting
                _write(unified / "memory.swap.max", "0")
        if limits.tasks:
            _write(unified / "pids.max", str(limits.tasks))
        if limits.cpu_weight:
            with contextlib.suppress(OSError):  # a kernel without the cpu controller
                _write(unified / "cpu.weight", str(limits.cpu_weight))
        return
    if limits.memory_bytes and "memory" in v1:
        _write(v1["memory"] / "memory.limit_in_bytes", str(limits.memory_bytes))
        with contextlib.suppress(OSError):  # only with swap accounting
            _write(v1["memory"] / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
    if limits.tasks and "pids" in v1:
        _write(v1["pids"] / "pids.max", str(limits.tasks))
    if limits.cpu_weight and "cpu" in v1:
        _write(v1["cpu"] / "cpu.shares", str(_cpu_shares(limits.cpu_weight)))


def _cpu_shares(weight: int) -> int:
    """cgroup v1's cpu.shares for a cgroup v2 cpu.weight (defaults: 1024 and 100)."""
    return max(2, weight * 1024 // 100)


def _process_start(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def remove_stale(parents: Iterable[Path]) -> int:
    """Remove subtrees of servers that no longer run; only empty ones. Returns how many."""
    removed = 0
    for parent in parents:
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for name in names:
            match = _SUBTREE_NAME.match(name)
            if match is None or _process_start(int(match.group(1))):
                continue
            subtree = parent / name
            children = []
            with contextlib.suppress(OSError):
                children = [subtree / c for c in os.listdir(subtree) if (subtree / c).is_dir()]
            if all([_rmdir(child) for child in children]) and _rmdir(subtree):
                removed += 1
    if removed:
        log.info("removed %d cgroup subtree(s) left by servers that ended", removed)
    return removed


def _subtree_of_prepared(own: Path) -> Path | None:
    """The subtree ``prepare_delegation`` put this process in, if it did."""
    match = _SUBTREE_NAME.match(own.parent.name)
    if own.name == SERVER_LEAF and match is not None and int(match.group(1)) == os.getpid():
        return own.parent
    return None


class Containment:
    """The server's cgroup subtree (or the fallback) and the runs made in it.

    ``mode`` is ``"cgroup"`` or ``"best-effort"``. Methods do file I/O on
    cgroupfs only (microseconds); they are called on the event loop.
    """

    def __init__(
        self,
        limits: Limits,
        unified: Path | None = None,
        v1: Mapping[str, Path] | None = None,
        v2_limits: bool = False,
        owned: Sequence[Path] = (),
    ) -> None:
        self.limits = limits
        self._unified = unified
        self._v1 = dict(v1 or {})
        self._v2_limits = v2_limits
        self._owned = list(owned)  # subtrees this instance created and removes
        # Run cgroups made for a run that then took over its warm
        # interpreter's: never entered, handed out again by ``new_run``.
        self._stock: list[RunGroup] = []

    @property
    def mode(self) -> str:
        return CGROUP if self._unified is not None or self._v1 else BEST_EFFORT

    @property
    def rlimits(self) -> Limits | None:
        """The limits to set as rlimits in each child: only without cgroups."""
        return self.limits if self.mode == BEST_EFFORT else None

    @property
    def description(self) -> str:
        if self.mode == BEST_EFFORT:
            return "best-effort (process groups, run tags and rlimits; no cgroup available)"
        if self._v2_limits:
            return f"cgroup v2 at {self._unified}"
        where = [f"v2 {self._unified}"] if self._unified else []
        where += [f"v1 {name} {path}" for name, path in sorted(self._v1.items())]
        return "cgroup (" + ", ".join(where) + ")"

    @classmethod
    def start(cls, limits: Limits, force_best_effort: bool = False) -> Containment:
        """Set up this server instance's subtree; falls back (logged) when it cannot."""
        if force_best_effort:
            return cls(limits)
        try:
            layout = detect_here()
        except OSError as exc:
            log.warning("cannot read cgroup layout: %s", exc)
            return cls(limits)
        try:
            return cls._from_layout(layout, limits)
        except OSError as exc:
            log.warning("cannot create cgroups (%s); containment is best-effort", exc)
            return cls(limits)

    @classmethod
    def _from_layout(cls, layout: Layout, limits: Limits) -> Containment:
        kind = layout.kind
        if kind == "none":
            return cls(limits)
        unified = layout.unified
        v1 = {} if kind == "v2" else dict(layout.v1)
        homes = ([unified] if unified is not None else []) + list(v1.values())
        prepared = [_subtree_of_prepared(home) for home in homes]
        if all(p is not None for p in prepared):
            subtrees = [p for p in prepared if p is not None]
            owned: list[Path] = []
        else:
            writable = [h for h in homes if os.access(h, os.W_OK | os.X_OK)]
            if unified is None or unified not in writable:
                return cls(limits)
            v1 = {name: path for name, path in v1.items() if path in writable}
            homes = [unified, *v1.values()]
            remove_stale(homes)
            name = f"{SUBTREE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
            subtrees = [home / name for home in homes]
            owned = []
            try:
                for subtree in subtrees:
                    subtree.mkdir()
                    owned.append(subtree)
                if kind == "v2":
                    _hand_down_controllers(unified, subtrees[0])
            except OSError:
                for subtree in reversed(owned):
                    _rmdir(subtree)
                raise
        return cls(
            limits,
            subtrees[0],
            dict(zip(v1, subtrees[1:])),
            v2_limits=kind == "v2",
            owned=owned,
        )

    def _make_group(self, name: str) -> RunGroup:
        assert self._unified is not None or self._v1
        unified = self._unified / name if self._unified is not None else None
        v1 = {controller: path / name for controller, path in self._v1.items()}
        group = RunGroup(unified, v1, self.limits)
        group.create()
        try:
            _apply_limits(unified, v1, self.limits, self._v2_limits)
        except OSError:
            group.remove()
            raise
        return group

    def new_run(self, from_stock: bool = True) -> RunGroup | None:
        """A fresh cgroup for one run with the limits applied; None in best-effort mode.

        ``from_stock``: one taken back by ``recycle`` may serve (at ``start``,
        where making one costs a few ms); the pool makes its own ahead of time.
        Raises OSError when the cgroup cannot be made (the run must not start
        uncontained without saying so).
        """
        if self.mode == BEST_EFFORT:
            return None
        if self._stock and from_stock:
            return self._stock.pop()
        return self._make_group(RUN_PREFIX + secrets.token_hex(8))

    def recycle(self, group: RunGroup) -> None:
        """Take back a run cgroup no process ever entered, for the next ``new_run``."""
        self._stock.append(group)

    def close(self) -> None:
        """Remove the subtree this instance created (its run cgroups are gone by then)."""
        while self._stock:
            self._stock.pop().remove()
        for subtree in self._owned:
            if not _rmdir(subtree):
                log.warning("cgroup subtree %s is not empty; left behind", subtree)
        self._owned = []


def _hand_down_controllers(home: Path, subtree: Path) -> None:
    """Enable memory, pids and cpu for the subtree's children (cgroup v2).

    Controllers can be handed down only by a cgroup without processes of its
    own (the root excepted): when ``home`` still holds this server, the
    server moves into ``subtree/server`` first.
    """
    try:
        offered = set((home / "cgroup.controllers").read_text().split())
    except OSError:
        offered = set(CONTROLLERS)
    wanted = " ".join(f"+{name}" for name in CONTROLLERS if name in offered)
    try:
        _write(home / "cgroup.subtree_control", wanted)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        leaf = subtree / SERVER_LEAF
        leaf.mkdir()
        _write(leaf / "cgroup.procs", "0")
        _write(home / "cgroup.subtree_control", wanted)
    _write(subtree / "cgroup.subtree_control", wanted)


def prepare_delegation(uid: int, gid: int) -> list[Path]:
    """As root, before dropping to ``uid:gid``: hand this server a subtree it can manage.

    Creates ``further-link-<pid>-<random>/server`` in every hierarchy used,
    moves the calling process into that leaf, hands the v2 controllers down
    and chowns the subtree directory and its membership files so that the
    unprivileged server can make run cgroups and move its children into
    them. Returns the subtree directories (v2 first); an empty list when
    the machine offers no usable cgroups (the server then runs best-effort).
    Raises OSError when a cgroup exists but cannot be set up.
    """
    layout = detect_here()
    kind = layout.kind
    if kind == "none" or layout.unified is None:
        return []
    homes = [layout.unified] + ([] if kind == "v2" else list(layout.v1.values()))
    remove_stale(homes)
    name = f"{SUBTREE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    subtrees = []
    for index, home in enumerate(homes):
        subtree = home / name
        subtree.mkdir()
        subtrees.append(subtree)
        leaf = subtree / SERVER_LEAF
        leaf.mkdir()
        _write(leaf / "cgroup.procs", "0")
        v2 = index == 0
        if v2 and kind == "v2":
            _hand_down_controllers(home, subtree)
        files = (
            ("cgroup.procs", "cgroup.subtree_control", "cgroup.threads")
            if v2
            else (
                "cgroup.procs",
                "tasks",
            )
        )
        for directory in (subtree, leaf):
            os.chown(directory, uid, gid)
            for file_name in files:
                with contextlib.suppress(FileNotFoundError):
                    os.chown(directory / file_name, uid, gid)
    return subtrees


# ------------------------------------------------------------------ the child side


_libc = ctypes.CDLL(None, use_errno=True)


def set_no_new_privs() -> None:
    """PR_SET_NO_NEW_PRIVS: no setuid binary or file capability can raise this process."""
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def child_setup(join_fds: Sequence[int], limits: Limits | None) -> Callable[[], None]:
    """The step run in the forked child just before exec (``preexec_fn``).

    Python 3.9 has no CLONE_INTO_CGROUP, and with ``subprocess`` the parent
    cannot move the child between fork and exec, so the child joins its
    run's cgroups itself: it writes ``0`` (itself) to ``cgroup.procs``
    descriptors the server opened beforehand (the kernel checks the
    opener's rights), and the program's first instruction already runs inside
    the cgroup (a wrapper executable would cost another exec per run). Only
    system calls on prepared values run here: nothing that allocates much or
    takes locks another thread of the server may hold across fork.
    ``limits`` are set as rlimits in best-effort mode (no cgroup).
    """
    payload = b"0"

    def setup() -> None:
        for fd in join_fds:
            os.write(fd, payload)
        set_no_new_privs()
        if limits is not None:
            if limits.tasks:
                resource.setrlimit(resource.RLIMIT_NPROC, (limits.tasks, limits.tasks))
            if limits.memory_bytes:
                memory = limits.memory_bytes
                resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return setup
