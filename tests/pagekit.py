"""The built-in page in Debian's headless chromium: what the page tests
(test_webpage.py and the modules that import its fixtures) and the page
benchmark (benchmarks/bench_page.py, which puts tests/ on ``sys.path``) share.

No pytest here: the benchmark imports this module as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]

# 10 MB of output: 100 000 lines of 100 characters.
TEN_MB = "line = 'x' * 99\nfor i in range(100_000):\n    print(line)\n"
# Output as fast as a program can print, until it is stopped.
FLOOD = "import itertools\nfor i in itertools.count():\n    print('line', i)\n"

# Evaluated in the page: from now on ``window.pageWatch`` keeps the longest task
# (ms; input waits at most that long), every long task as [start, duration] and
# the longest gap between two frames (ms), until ``done`` is set (READ_WATCH).
WATCH_TASKS = """() => {
    window.pageWatch = { longest: 0, gap: 0, last: performance.now(), done: false, tasks: [] }
    new PerformanceObserver(list => {
        for (const entry of list.getEntries()) {
            window.pageWatch.longest = Math.max(window.pageWatch.longest, entry.duration)
            window.pageWatch.tasks.push([Math.round(entry.startTime), Math.round(entry.duration)])
        }
    }).observe({ type: 'longtask' })
    const frame = now => {
        window.pageWatch.gap = Math.max(window.pageWatch.gap, now - window.pageWatch.last)
        window.pageWatch.last = now
        if (!window.pageWatch.done) requestAnimationFrame(frame)
    }
    requestAnimationFrame(frame)
}"""
# Stops WATCH_TASKS and answers its figures: {longest, gap, tasks, ...}.
READ_WATCH = "(() => { window.pageWatch.done = true; return window.pageWatch })()"

# Evaluated in the page before a click on Stop: ``window.stopTimes`` gets
# ``clicked`` and, once the page says "Stopped", ``shown`` (performance.now(), ms).
WATCH_STOP = """() => {
    const state = document.getElementById('run-state')
    window.stopTimes = {}
    const clicked = () => { window.stopTimes.clicked = performance.now() }
    const options = { capture: true, once: true }
    document.getElementById('stop').addEventListener('click', clicked, options)
    const observer = new MutationObserver(() => {
        if (state.textContent === 'Stopped') {
            window.stopTimes.shown = performance.now()
            observer.disconnect()
        }
    })
    observer.observe(state, { childList: true, characterData: true, subtree: true })
}"""


async def launch_chromium(playwright: Any, timeout_ms: float) -> Any:
    """Debian's chromium, headless, started by Playwright within ``timeout_ms``."""
    return await playwright.chromium.launch(
        executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=timeout_ms
    )


async def set_program(page: Any, source: str) -> None:
    """Replace the open file's text as a paste would (no auto-indent, no closing brackets)."""
    content = page.locator("#editor .cm-content")
    await content.click()
    await content.press("Control+a")
    await content.press("Delete")
    await page.keyboard.insert_text(source)


async def run_program(page: Any, source: str) -> None:
    """Put ``source`` in the open file and press Run."""
    await set_program(page, source)
    await page.get_by_role("button", name="Run").click()
