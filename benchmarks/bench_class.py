"""A whole class, measured: N real servers on loopback driven by one teacher.

    python benchmarks/bench_class.py [--devices 30] [--repeats 5] [--lines 100] [--no-page]

Run as root (as CI is): each device is a real `further-link serve` that drops to
`nobody`, with the warm pool off and its own config and work dir, announced
with mDNS on 127.0.0.1's interface only. The teacher is a real
`further-link teach`. It prints, never fails on a target:

- `devices` wall: `further-link devices` from start to exit (1.5 s of listening
  plus the interpreter's start), and how many of the class it listed;
- found+paired: from the teacher's start until every device is online and paired
  with the teacher key;
- run-all: push+run of a project to every device until each one sent ``started``
  (the API answers then), each repeat and the p100;
- stop-all: until each one sent ``stopped``;
- page fps: chromium's animation frames per second on the teacher's page while
  every console prints ``--lines`` lines a second (one console watched full size);
- the teacher process's peak RSS over the whole run.

Targets (issue 14): run-all <= 1 s, stop-all <= 1 s, >= 30 fps, <= 150 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fleetkit import (  # noqa: E402  (the tests' helpers start the class)
    Teacher,
    class_prefix,
    eventually,
    further_link,
    start_class,
    start_teacher,
    stop_class,
)

MiB = 1024 * 1024
CHROMIUM = "/usr/bin/chromium"
FPS_SECONDS = 5.0
PAGE_TIMEOUT_MS = 120_000


def chatter(lines_per_second: int) -> str:
    """A program printing ``lines_per_second`` lines a second until stopped."""
    return (
        "import time\n"
        "i = 0\n"
        "while True:\n"
        f"    for _ in range({max(1, lines_per_second // 10)}):\n"
        "        i += 1\n"
        "        print(f'line {i} of a busy learner program', flush=True)\n"
        "    time.sleep(0.1)\n"
    )


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def sample_rss(pid: int, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            peak[0] = max(peak[0], rss(pid))
        except OSError:
            return
        await asyncio.sleep(0.2)


async def page_fps(teacher: Teacher, watched: str) -> tuple[float, float]:
    """(frames per second, longest frame in ms) over FPS_SECONDS, one console open."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            await page.goto(teacher.page_url, timeout=PAGE_TIMEOUT_MS)
            await page.locator(f'article.tile[data-name="{watched}"]').click(
                timeout=PAGE_TIMEOUT_MS
            )
            await page.wait_for_timeout(1000)
            measured: list[float] = await page.evaluate(
                """(seconds) => new Promise((done) => {
                    const times = [];
                    const end = performance.now() + seconds * 1000;
                    function tick(t) {
                        times.push(t);
                        if (t < end) requestAnimationFrame(tick); else done(times);
                    }
                    requestAnimationFrame(tick);
                })""",
                FPS_SECONDS,
            )
        finally:
            await browser.close()
    gaps = [b - a for a, b in zip(measured, measured[1:])]
    fps = (len(measured) - 1) / ((measured[-1] - measured[0]) / 1000)
    return fps, max(gaps)


class Figures(dict[str, Any]):
    """Printed as measured: a run that fails later still shows what it got."""

    def __setitem__(self, name: str, value: Any) -> None:
        super().__setitem__(name, value)
        print(f"  {name:<28} {value!s:>10}   {TARGETS.get(name, '')}", flush=True)


TARGETS = {
    "run-all p100 (s)": "<= 1",
    "stop-all p100 (s)": "<= 1",
    "page fps": ">= 30",
    "teacher peak RSS (MiB)": "<= 150",
}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    sandbox = Path(tempfile.mkdtemp(prefix="further-link-bench-class-"))
    sandbox.chmod(0o755)
    print(f"class of {args.devices} devices:", flush=True)
    figures = Figures()
    devices = []
    teacher = None
    stop_sampling = asyncio.Event()
    peak = [0]
    sampler = None
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
            teacher_dir = sandbox / "teacher"
            _, said = await further_link(teacher_dir, "teacher-key")
            public_key = said.split()[0]
            prefix = class_prefix()
            began = time.monotonic()
            devices = await start_class(sandbox, prefix, args.devices, public_key)
            figures["servers started (s)"] = round(time.monotonic() - began, 1)
            class_flags = ("--interface", "127.0.0.1", "--match", f"{prefix}-*")
            await asyncio.sleep(3.0)  # mDNS probing: about a second per announcement
            began = time.monotonic()
            _, said = await further_link(teacher_dir, "devices", *class_flags)
            figures["`devices` wall (s)"] = round(time.monotonic() - began, 2)
            figures["`devices` found"] = sum(
                1 for line in said.splitlines() if line.startswith(prefix)
            )
            began = time.monotonic()
            teacher = await start_teacher(teacher_dir, http, *class_flags)
            sampler = asyncio.ensure_future(sample_rss(teacher.process.pid, peak, stop_sampling))
            names = {d.name for d in devices}

            async def ready() -> bool:
                state = await teacher.devices()
                return set(state) == names and all(
                    d["online"] and d["paired"] for d in state.values()
                )

            await eventually(ready, "every device online and paired", timeout=900, every=0.5)
            figures["found+paired (s)"] = round(time.monotonic() - began, 1)
            project = {"name": "bench", "files": {"main.py": chatter(args.lines)}}
            runs: list[float] = []
            stops: list[float] = []
            for repeat in range(args.repeats):
                answer = await teacher.api("/api/run", {"devices": None, "project": project})
                failed = [r for r in answer["results"] if not r["ok"]]
                assert not failed, failed[:3]
                runs.append(answer["seconds"])
                if repeat == 0 and not args.no_page:
                    try:
                        fps, longest = await page_fps(teacher, devices[0].name)
                    except Exception as exc:  # the browser's failure is a figure too
                        figures["page fps"] = f"not measured: {str(exc).splitlines()[0]}"
                    else:
                        figures["page fps"] = round(fps, 1)
                        figures["page longest frame (ms)"] = round(longest, 1)
                else:
                    await asyncio.sleep(2.0)  # the consoles print meanwhile
                answer = await teacher.api("/api/stop", {"devices": None})
                failed = [r for r in answer["results"] if not r["ok"]]
                assert not failed, failed[:3]
                stops.append(answer["seconds"])
            figures["run-all each (s)"] = " ".join(f"{r:.2f}" for r in runs)
            figures["run-all p100 (s)"] = round(max(runs), 3)
            figures["stop-all each (s)"] = " ".join(f"{r:.2f}" for r in stops)
            figures["stop-all p100 (s)"] = round(max(stops), 3)
            figures["teacher peak RSS (MiB)"] = round(peak[0] / MiB, 1)
    finally:
        stop_sampling.set()
        if sampler is not None:
            await asyncio.gather(sampler, return_exceptions=True)
        if teacher is not None:
            await teacher.stop()
        await stop_class(devices)
        shutil.rmtree(sandbox, ignore_errors=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lines", type=int, default=100, help="lines a second per console")
    parser.add_argument("--no-page", action="store_true", help="skip the browser's frame rate")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root: the devices are real servers that drop to `nobody`")
        return 2
    asyncio.run(bench(args))
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.1f} (1 min), {load[1]:.1f} (5 min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
