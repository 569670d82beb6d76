"""The built-in page under heavy output, in Debian's headless chromium (Playwright).

* 10 MB printed by a program (100 000 lines of 100 characters): the longest
  task the page ran meanwhile (PerformanceObserver "longtask"; input waits
  at most that long), the longest gap between two frames, and the time until
  the terminal had all of it. Target: no task over 100 ms.
* Stop under a flood (a program printing as fast as it can): from the click
  on Stop to the page saying "Stopped", each round. Target: 500 ms.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

from _client import BenchClientError
from _context import BenchContext, record_server_log
from _report import BenchResult

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from pagekit import (
    CHROMIUM,
    FLOOD,
    READ_WATCH,
    TEN_MB,
    WATCH_STOP,
    WATCH_TASKS,
    launch_chromium,
    run_program,
)

WAIT_MS = 120_000
LONG_TASK_TARGET_MS = 100.0
STOP_TARGET_MS = 500.0


async def bench_page(ctx: BenchContext) -> BenchResult:
    result = BenchResult("page")
    try:
        from playwright.async_api import async_playwright
    except ImportError as exc:
        raise BenchClientError("needs Playwright: pip install -e '.[dev]'") from exc
    if not CHROMIUM.exists():
        raise BenchClientError("needs Debian's chromium: apt-get install chromium")
    rounds = 1 if ctx.scale is not None and ctx.scale.stdin_rounds == 1 else 3
    async with contextlib.AsyncExitStack() as stack:
        served = await stack.enter_async_context(ctx.serve(result))
        server = served.server
        playwright = await stack.enter_async_context(async_playwright())
        browser = await launch_chromium(playwright, WAIT_MS)
        stack.push_async_callback(browser.close)
        page = await browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(WAIT_MS)
        await page.goto(f"http://127.0.0.1:{server.port}/")
        await page.wait_for_function(
            "() => document.getElementById('connection').dataset.state === 'connected'"
        )

        await page.evaluate(WATCH_TASKS)
        began = time.perf_counter()
        await run_program(page, TEN_MB)
        await page.wait_for_function(
            "() => document.getElementById('run-state').textContent === 'Finished'"
            " && window.furtherLink.program.terminal.backlog.length === 0"
            " && window.furtherLink.program.terminal.written >= 10_000_000"
        )
        shown_all = time.perf_counter() - began
        figures = await page.evaluate(READ_WATCH)
        longest = float(figures["longest"])
        result.add(
            "10 MB output: longest task",
            longest,
            "ms",
            LONG_TASK_TARGET_MS,
            "target",
            target="< 100 ms",
            met=longest < LONG_TASK_TARGET_MS,
        )
        result.add("10 MB output: longest gap between frames", float(figures["gap"]), "ms")
        result.add("10 MB output: run to all of it in the terminal", shown_all, "s")

        stops: list[float] = []
        for _ in range(rounds):
            await run_program(page, FLOOD)
            await page.wait_for_function(
                "() => window.furtherLink.program.terminal.written > 3_000_000"
            )
            await page.evaluate(WATCH_STOP)
            await page.locator("#stop").click()
            await page.wait_for_function("() => window.stopTimes.shown !== undefined")
            times = await page.evaluate("window.stopTimes")
            stops.append(float(times["shown"]) - float(times["clicked"]))
        worst = max(stops)
        result.add(
            f"Stop under a flood to 'Stopped' shown, worst of {rounds}",
            worst,
            "ms",
            STOP_TARGET_MS,
            "target",
            target="<= 500 ms",
            met=worst <= STOP_TARGET_MS,
        )
        result.details["stop_ms"] = stops
        result.details["ten_mb"] = figures
        record_server_log(result, server)
    return result
