"""A thousand runs take nothing with them.

The server runs in this test process, so the process's own figures are the
server's: open file descriptors, threads, child processes (zombies included)
and resident memory. They are taken after a warm-up (worker threads and
caches exist by then) and must come back to that baseline after the soak;
no run directory may be left in the temp dir. `pytest -s tests/test_soak.py`
prints the figures.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from further_link.runs import rundirs

from conftest import PROGRAM_USER, Client, RunningServer, program_home

ClientFactory = Callable[..., Awaitable[Client]]
StartServer = Callable[..., Awaitable[RunningServer]]

RUNS = 1000
WARM_UP_RUNS = 50
CONNECTIONS = 4
RSS_GROWTH_LIMIT = 10 * 1024 * 1024
# Threads (asyncio's child watchers) and fds end just after `stopped` is sent.
SETTLE_TIMEOUT = 10.0
SETTLE_POLL = 0.2

JPEG = b"\xff\xd8\xff\xe0soak-frame\xff\xd9"

# (source, stdin, stdout, stderr, exit code, frames); one of each in turn.
PROGRAMS: tuple[tuple[str, str, str, str, int, int], ...] = (
    ("import os\nos.write(1, b'hi\\n\\xff')", "", "hi\n\ufffd", "", 0, 0),
    ("import sys\nprint(input(), file=sys.stderr)\nsys.exit(3)", "soak\n", "", "soak\n", 3, 0),
    (
        # A child left running and a double-forked orphan: both must be ended and reaped.
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(30)\n"
        "    os._exit(0)\n"
        "os.wait()\n"
        "if os.fork() == 0:\n"
        "    time.sleep(30)\n"
        "    os._exit(0)\n"
        "print('left two behind')",
        "",
        "left two behind\n",
        "",
        0,
        0,
    ),
    (
        f"import further_link\nfurther_link.send_image({JPEG!r})\nprint('sent')",
        "",
        "sent\n",
        "",
        0,
        1,
    ),
)
STOPPED_PROGRAM = "import time\nprint('up')\ntime.sleep(30)"


# asyncio's default executor (it reads /proc for the server) keeps up to this
# many idle threads, named asyncio_N; they are a bounded pool, not a leak.
POOL_PREFIX = "asyncio_"
POOL_LIMIT = min(32, (os.cpu_count() or 1) + 4)


@dataclass(frozen=True)
class Footprint:
    fds: int
    threads: int  # all of the process's threads, the executor pool excluded
    pool_threads: int
    children: int
    rss: int
    run_dirs: int

    def __str__(self) -> str:
        return (
            f"fds={self.fds} threads={self.threads}+{self.pool_threads} in the pool "
            f"children={self.children} "
            f"rss={self.rss / 1024 / 1024:.1f} MiB run_dirs={self.run_dirs}"
        )


def footprint(server: RunningServer, run_dirs: Path) -> Footprint:
    """The serving process's figures; run dirs counted in ``run_dirs``."""
    proc = Path(f"/proc/{server.pid}")
    status = (proc / "status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    tasks = proc / "task"
    children = sum(
        len((task / "children").read_text().split()) for task in tasks.iterdir() if task.exists()
    )
    # Executor threads can be told apart only in this process (a server process's
    # are counted with the others, and may grow up to POOL_LIMIT).
    in_process = server.process is None
    pool = sum(1 for thread in threading.enumerate() if thread.name.startswith(POOL_PREFIX))
    pool = pool if in_process else 0
    return Footprint(
        fds=len(os.listdir(proc / "fd")),
        threads=int(fields["Threads"]) - pool,
        pool_threads=pool,
        children=children,
        rss=int(fields["VmRSS"].split()[0]) * 1024,
        run_dirs=len(list(run_dirs.glob("further-link-run-*"))),
    )


def _counts(figures: Footprint) -> tuple[int, int, int, int]:
    return (figures.fds, figures.threads, figures.children, figures.run_dirs)


async def steady(server: RunningServer, run_dirs: Path) -> Footprint:
    """The footprint once fds, threads and children stop changing (or the timeout)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_TIMEOUT
    previous = footprint(server, run_dirs)
    while True:
        await asyncio.sleep(SETTLE_POLL)
        gc.collect()
        now = footprint(server, run_dirs)
        if _counts(now) == _counts(previous) or loop.time() >= deadline:
            return now
        previous = now


async def settled(baseline: Footprint, server: RunningServer, run_dirs: Path) -> Footprint:
    """The footprint once fds, threads and children are back down (or the timeout)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_TIMEOUT
    spare_threads = 0 if server.process is None else POOL_LIMIT
    while True:
        gc.collect()
        now = footprint(server, run_dirs)
        limits = _counts(baseline)
        limits = (limits[0], limits[1] + spare_threads, limits[2], limits[3])
        back = all(n <= b for n, b in zip(_counts(now), limits))
        if back or loop.time() >= deadline:
            return now
        await asyncio.sleep(SETTLE_POLL)


async def one_run(client: Client, number: int) -> None:
    if number % (len(PROGRAMS) + 1) == len(PROGRAMS):
        await client.send("start", {"sourceScript": STOPPED_PROGRAM})
        assert (await client.receive())["type"] == "started"
        await client.read_output("up\n")
        await client.send("stop")
        result = await client.collect()
        assert result.exit_code == -15, result
        return
    source, stdin, stdout, stderr, code, frames = PROGRAMS[number % (len(PROGRAMS) + 1)]
    result = await client.run({"sourceScript": source}, stdin=(stdin,) if stdin else ())
    assert (result.stdout, result.stderr, result.exit_code) == (stdout, stderr, code), result
    assert [base64.b64decode(frame) for frame in result.frames] == [JPEG] * frames


async def run_many(clients: list[Client], runs: int) -> None:
    async def share(index: int) -> None:
        for number in range(index, runs, len(clients)):
            await one_run(clients[index], number)
            clients[index].received.clear()

    await asyncio.gather(*(share(i) for i in range(len(clients))))


async def test_thousand_runs_leave_no_fds_threads_processes_or_memory(
    start_server: StartServer,
    connect: ClientFactory,
    sandbox: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Run dirs go to a temp dir of this test's own, so that only they are counted.
    private_tmp = program_home(sandbox) / "tmp"
    private_tmp.mkdir(mode=0o700)
    shutil.chown(private_tmp, PROGRAM_USER)
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))  # an in-process server
    server = await start_server(environ={"TMPDIR": str(private_tmp)})  # a server process
    untouched = private_tmp.stat().st_mtime_ns
    clients = [await connect(server) for _ in range(CONNECTIONS)]
    before_warm_up = footprint(server, private_tmp)
    await run_many(clients, WARM_UP_RUNS)
    baseline = await steady(server, private_tmp)
    began = time.monotonic()
    await run_many(clients, RUNS)
    seconds = time.monotonic() - began
    after = await settled(baseline, server, private_tmp)
    growth = after.rss - baseline.rss
    print(
        f"\nsoak: {RUNS} runs over {CONNECTIONS} connections in {seconds:.1f} s "
        f"({seconds / RUNS * 1000:.1f} ms a run)\n"
        f"  before warm-up: {before_warm_up}\n"
        f"  baseline:       {baseline}\n"
        f"  after:          {after}\n"
        f"  rss growth:     {growth / 1024 / 1024:+.2f} MiB"
    )
    assert after.fds <= baseline.fds
    # A server process's executor threads are among its threads: they may still grow.
    assert after.threads <= baseline.threads + (0 if server.process is None else POOL_LIMIT)
    assert after.pool_threads <= POOL_LIMIT
    assert after.children <= baseline.children
    assert after.run_dirs <= rundirs.STOCK  # only the ones made ahead for the next runs
    assert private_tmp.stat().st_mtime_ns != untouched  # the runs did make their dirs there
    assert growth <= RSS_GROWTH_LIMIT
