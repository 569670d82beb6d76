"""Finding and signalling every process that belongs to one run.

A program may fork, call ``setsid`` or double-fork to escape its process
group. A run's processes are found three ways, any one of which is enough:
descent from the program's pid, membership of its process group or session,
and the run tag in their environment (which survives setsid and reparenting).
Only ``/proc`` is read; this module knows nothing about asyncio.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)

RUN_TAG_VAR = "FURTHER_LINK_RUN_ID"


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str


def read_proc_info(pid: int) -> ProcInfo | None:
    """Parse /proc/PID/stat; ``None`` when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm is in parentheses and may itself contain spaces or parentheses.
    rest = raw[raw.rfind(")") + 2 :].split()
    return ProcInfo(pid, ppid=int(rest[1]), pgid=int(rest[2]), sid=int(rest[3]), state=rest[0])


def _all_pids() -> Iterable[int]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


def _has_tag(pid: int, tag_entry: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return tag_entry in f.read().split(b"\0")
    except OSError:
        return False


def find_run_processes(root_pid: int, tag: str) -> set[int]:
    """Every live process of the run rooted at ``root_pid`` (the root included)."""
    infos = {pid: info for pid in _all_pids() if (info := read_proc_info(pid)) is not None}
    children: dict[int, list[int]] = {}
    for info in infos.values():
        children.setdefault(info.ppid, []).append(info.pid)
    tag_entry = f"{RUN_TAG_VAR}={tag}".encode()
    me = os.getpid()
    found: set[int] = set()
    for info in infos.values():
        if info.pid == me or info.state == "Z":
            continue
        if (
            info.pid == root_pid
            or root_pid in (info.pgid, info.sid)
            or _has_tag(info.pid, tag_entry)
        ):
            found.add(info.pid)
    # Descendants of anything found so far (children that cleared their env).
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found and child != me:
                found.add(child)
                stack.append(child)
    return {pid for pid in found if infos[pid].state != "Z"}


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


def kill_run(root_pid: int, tag: str, sig: signal.Signals, rounds: int = 20) -> int:
    """Signal the whole run, repeating while new processes keep appearing.

    Repeating closes the window in which a process forks between the scan
    and the signal. Returns the number of processes signalled in total.
    """
    seen: set[int] = set()
    for _ in range(rounds):
        pids = find_run_processes(root_pid, tag) - seen
        if not pids:
            break
        signal_processes(pids, sig)
        seen |= pids
    return len(seen)
