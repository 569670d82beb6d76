"""Per-run cgroup set-up: what containment adds to every start.

Times, in this process, what the server does for each run before the
program starts: create the run's cgroups (one per hierarchy in use: v2, and
v1 memory, pids and cpu in hybrid mode), write the limits, open the
descriptors the child joins through. Removing them after the run is timed
too (after ``stopped`` is queued: not on a client's path). The limit is a
plain directory made and opened the same way on tmpfs. Needs root or a
delegated cgroup; elsewhere this benchmark cannot be measured.

Moving a running process into a run cgroup is timed apart, after a pause of
``MOVE_PAUSE`` (as between runs) and back to back: the kernel's RCU
synchronisation makes the first move after a pause slow. A warm
interpreter pays it while the pool refills, off the event loop; a cold
start pays it in the child, between fork and exec, while the server waits.

Then, on a real server with a task limit of ``BOMB_TASKS``: another
client's ``print('hi')`` started while a fork bomb runs, from ``start`` to
``stopped``, against the same run with no bomb (interleaved, one of each per
round). The bomb must end with the limit's words each time.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

from _client import (
    BenchClientError,
    check_hello,
    collect_until_stopped,
    run_program,
    send,
    wait_for_event,
)
from _context import BenchContext
from _programs import HELLO_SOURCE
from _report import BenchResult, Target, summarise

from further_link.runs.containment import CGROUP, Containment, Limits

TARGET_MS = 2.0
COUNT = {True: 100, False: 1000}  # quick, full
BOMB_TASKS = 64
BOMB_ROUNDS = {True: 3, False: 10}
BOMB_TIMEOUT = 60.0
FORK_BOMB = (
    "import os\nprint('ready', flush=True)\n"
    "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
)
BOMB_WORDS = f"because it started more than {BOMB_TASKS} processes"
MOVES = {True: 10, False: 40}
MOVE_PAUSE = 0.05  # s


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
        paused, back_to_back = await _moves(contained, MOVES[count == COUNT[True]])
    finally:
        contained.close()
    beside_bomb, alone = await _hello_beside_a_fork_bomb(
        ctx, result, BOMB_ROUNDS[count == COUNT[True]]
    )
    result.add_percentiles(
        "print('hi') beside a fork bomb",
        beside_bomb,
        alone,
        "no bomb",
        labels=("p50", "max"),
        target=Target("max", "< 2000 ms", lambda figure, _: figure < 2000),
    )
    target = Target("p50", f"<= {TARGET_MS:g} ms", lambda figure, _: figure <= TARGET_MS)
    result.add_percentiles(
        "run cgroup set-up", setup, plain, "plain dir", labels=("p50", "p90"), target=target
    )
    result.add_percentiles("run cgroup removal", removal, plain, "plain dir", labels=("p50",))
    result.add_percentiles(
        f"moving a process in, after {MOVE_PAUSE * 1000:.0f} ms",
        paused,
        back_to_back,
        "back to back",
        labels=("p50", "p90"),
    )
    result.details.update(
        containment=contained.description,
        setup=summarise(setup),
        removal=summarise(removal),
        plain=summarise(plain),
    )
    return result


async def _moves(contained: Containment, count: int) -> tuple[list[float], list[float]]:
    """Seconds per move of a sleeping process between two run cgroups: paused, back to back."""
    groups = [contained.new_run(), contained.new_run()]
    sleeper = await asyncio.create_subprocess_exec("sleep", "60")
    paused: list[float] = []
    back_to_back: list[float] = []
    try:
        for _ in range(count):
            await asyncio.sleep(MOVE_PAUSE)
            for move, times in enumerate((paused, back_to_back)):
                group = groups[move]  # from the other one: always a real move
                assert group is not None
                began = time.perf_counter()
                group.add(sleeper.pid)
                times.append(time.perf_counter() - began)
    finally:
        sleeper.kill()
        await sleeper.wait()
        for group in groups:
            if group is not None:
                group.remove()
    return paused, back_to_back


async def _hello_beside_a_fork_bomb(
    ctx: BenchContext, result: BenchResult, rounds: int
) -> tuple[list[float], list[float]]:
    beside: list[float] = []
    alone: list[float] = []
    settings = {"FURTHER_LINK_MAX_TASKS": str(BOMB_TASKS)}
    async with (
        ctx.serve(result, settings=settings) as served,
        served.client() as bomber,
        served.client() as other,
    ):
        for _ in range(rounds):
            outcome = await run_program(other, HELLO_SOURCE)
            check_hello(outcome)
            alone.append(outcome.seconds)
            await send(bomber, "start", sourceScript=FORK_BOMB)
            await wait_for_event(bomber, "stdout", BOMB_TIMEOUT)
            outcome = await run_program(other, HELLO_SOURCE)
            check_hello(outcome)
            beside.append(outcome.seconds)
            ended = await collect_until_stopped(bomber, time.monotonic() + BOMB_TIMEOUT)
            if BOMB_WORDS not in "".join(ended.stderr):
                raise BenchClientError(f"the fork bomb ended without the words: {ended}")
            await asyncio.sleep(0.1)
    return beside, alone
