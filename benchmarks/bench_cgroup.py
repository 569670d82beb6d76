"""Per-run cgroup set-up: what containment adds to every start.

Times, in this process, what the server does for each run before the
program starts: create the run's cgroups (one per hierarchy in use: v2, and
v1 memory, pids and cpu in hybrid mode), write the limits, open the
descriptors the child joins through. Removing them after the run is timed
too (after ``stopped`` is queued: not on a client's path). The limit is a
plain directory made and opened the same way on tmpfs. Needs root or a
delegated cgroup; elsewhere this benchmark cannot be measured.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from _context import BenchContext
from _report import BenchResult, Target, summarise

from further_link.containment import CGROUP, Containment, Limits

TARGET_MS = 2.0
COUNT = {True: 100, False: 1000}  # quick, full


def _plain_directory(parent: Path, number: int) -> float:
    began = time.perf_counter()
    directory = parent / f"run-{number}"
    directory.mkdir()
    (directory / "cgroup.procs").touch()
    fd = os.open(directory / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
    elapsed = time.perf_counter() - began
    os.close(fd)
    (directory / "cgroup.procs").unlink()
    directory.rmdir()
    return elapsed


async def bench_cgroup(ctx: BenchContext) -> BenchResult:
    result = BenchResult("cgroup")
    contained = Containment.start(Limits(512 * 1024 * 1024, 256, 100))
    if contained.mode != CGROUP:
        contained.close()
        raise OSError("no cgroup can be made here (run as root or in a delegated cgroup)")
    count = COUNT[ctx.scale.stdin_rounds <= 1]
    setup: list[float] = []
    removal: list[float] = []
    plain: list[float] = []
    try:
        with tempfile.TemporaryDirectory(dir="/dev/shm") as scratch:
            for number in range(count):
                began = time.perf_counter()
                group = contained.new_run()
                assert group is not None
                fds = group.open_join_fds()
                setup.append(time.perf_counter() - began)
                for fd in fds:
                    os.close(fd)
                began = time.perf_counter()
                group.remove()
                removal.append(time.perf_counter() - began)
                plain.append(_plain_directory(Path(scratch), number))
    finally:
        contained.close()
    target = Target("p50", f"<= {TARGET_MS:g} ms", lambda figure, _: figure <= TARGET_MS)
    result.add_percentiles(
        "run cgroup set-up", setup, plain, "plain dir", labels=("p50", "p90"), target=target
    )
    result.add_percentiles("run cgroup removal", removal, plain, "plain dir", labels=("p50",))
    result.details.update(
        containment=contained.description,
        setup=summarise(setup),
        removal=summarise(removal),
        plain=summarise(plain),
    )
    return result
