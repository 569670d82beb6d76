"""The built-in page with a GUI window and after a lost connection, in a real browser
(Debian's chromium through Playwright, as in test_webpage.py).

A turtle program's window is seen live in the page's window panel (noVNC
drawing into a canvas) and, after the program ends, as the last frame kept
there. A program printing while its connection is cut (its TCP sockets
destroyed with ``ss -K``, the browser offline for a moment) is attached again
by the page by itself, and its terminal shows every line once, in order.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from colours import BLUE, JPEG_TOLERANCE, RED, close_to, turtle_square
from pagekit import run_program
from PIL import Image
from test_webpage import (
    WAIT_MS,
    browser,
    docs_screenshot,
    expect,
    expect_finished,
    new_page,
    open_paired,
    page,
    pytestmark,
    shot,
    terminal_text,
    wait_for_terminal,
)

from conftest import RunningServer

__all__ = ["browser", "new_page", "page", "pytestmark"]

ROOT = Path(__file__).resolve().parent.parent
DOCS_GUI_SCREENSHOT = ROOT / "docs" / "page-gui.png"

# The page asks for a 640x480 display; the turtle window fills it (no window
# manager moves it): red, with a blue 200x200 square in the middle, i.e. at
# (220..420, 140..340). It stays until the learner presses Enter, so the test
# looks at the live window however slow the machine is.
TURTLE_SQUARE = (
    turtle_square(640, 480, 200)
    + """\
input("drawn: press Enter to close the window ")
print("closing")
"""
)
INSIDE = [(320, 240), (240, 160), (400, 320)]  # in the blue square
OUTSIDE = [(40, 40), (600, 240), (320, 440)]  # on the red background


def shows_the_square(pixel_at: Any, tolerance: int) -> bool:
    return all(close_to(pixel_at(xy), BLUE, tolerance) for xy in INSIDE) and all(
        close_to(pixel_at(xy), RED, tolerance) for xy in OUTSIDE
    )


async def live_pixels(page: Any) -> dict[str, Any] | None:
    """The live window's size and its pixels at INSIDE + OUTSIDE, read from noVNC's canvas."""
    found: dict[str, Any] | None = await page.evaluate(
        """points => {
            const canvas = document.querySelector('#gui-screen canvas')
            if (!canvas || !canvas.width) return null
            const context = canvas.getContext('2d')
            return {
                width: canvas.width,
                height: canvas.height,
                pixels: points.map(([x, y]) => Array.from(context.getImageData(x, y, 1, 1).data)),
            }
        }""",
        INSIDE + OUTSIDE,
    )
    return found


async def test_a_turtle_window_shows_live_then_its_last_frame_stays(
    page: Any, server: RunningServer
) -> None:
    await open_paired(page, server)
    await run_program(page, TURTLE_SQUARE)
    panel = page.get_by_role("region", name="Window")
    await expect(panel).to_be_visible()
    await wait_for_terminal(page, "press Enter to close the window")

    # The live window: noVNC's canvas gets the drawing once the display sent it.
    points = INSIDE + OUTSIDE
    live = None
    deadline = time.monotonic() + WAIT_MS / 1000
    while time.monotonic() < deadline:
        live = await live_pixels(page)
        if live is not None:
            colours = dict(zip(points, live["pixels"]))
            if shows_the_square(colours.__getitem__, 8):
                break
        await asyncio.sleep(0.2)
    assert live is not None, "no live window (noVNC canvas) in the panel"
    assert (live["width"], live["height"]) == (640, 480)
    assert shows_the_square(dict(zip(points, live["pixels"])).__getitem__, 8), live
    # What the learner sees: the panel's picture, scaled to fit, has the colours too.
    seen = Image.open(io.BytesIO(await page.locator("#gui-screen canvas").screenshot()))
    seen = seen.convert("RGB")
    scale_x, scale_y = seen.width / 640, seen.height / 480
    assert shows_the_square(
        lambda xy: seen.getpixel((int(xy[0] * scale_x), int(xy[1] * scale_y))), 24
    )
    await page.screenshot(path=shot("gui-live-desktop.png"))
    await docs_screenshot(page, DOCS_GUI_SCREENSHOT, "square", "1 file in square", 400_000)

    await page.locator("#terminal").click()
    await page.keyboard.press("Enter")
    await expect_finished(page)
    assert "closing" in await terminal_text(page)

    # The last frame replaces the live window and stays after the program ended.
    frame = page.get_by_role("img", name="The program's window as it last looked")
    await expect(frame).to_be_visible()
    await expect(page.locator("#gui-screen canvas")).to_have_count(0)
    source = await frame.get_attribute("src")
    assert source is not None and source.startswith("data:image/jpeg;base64,")
    last = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).convert("RGB")
    assert last.size == (640, 480)
    assert shows_the_square(last.getpixel, JPEG_TOLERANCE)
    await page.wait_for_function(
        "() => document.querySelector('#gui-screen img').naturalWidth === 640", timeout=WAIT_MS
    )
    # Whole in view in its panel, under the panel's heading (no scrolling to see it).
    await expect(panel.get_by_role("heading", name="Window")).to_be_in_viewport()
    await expect(frame).to_be_in_viewport(ratio=1)
    box, panel_box = await frame.bounding_box(), await panel.bounding_box()
    assert box is not None and panel_box is not None
    assert (
        panel_box["y"] < box["y"]
        and box["y"] + box["height"] <= panel_box["y"] + panel_box["height"]
    )
    shown = Image.open(io.BytesIO(await frame.screenshot())).convert("RGB")
    scale_x, scale_y = shown.width / 640, shown.height / 480
    assert shows_the_square(
        lambda xy: shown.getpixel((int(xy[0] * scale_x), int(xy[1] * scale_y))), JPEG_TOLERANCE
    )
    await page.screenshot(path=shot("gui-last-frame-desktop.png"))


# ---------------------------------------------------------------- re-attach

LINES = 30
NUMBERED = f"""\
import time
for n in range(1, {LINES + 1}):
    print(f"line {{n:02d}}", flush=True)
    time.sleep(0.2)
"""
SS = shutil.which("ss") or "/usr/bin/ss"


async def cut_connections(port: int) -> int:
    """Destroy every TCP socket to or from ``port`` (both ends are on this machine).

    As a Wi-Fi drop would, without a closing handshake; only this test's
    server port is named, so no other connection on the machine is touched.
    Returns how many sockets were destroyed.
    """
    process = await asyncio.create_subprocess_exec(
        SS,
        "-K",
        "-t",
        "-n",
        "state",
        "established",
        f"( sport = :{port} or dport = :{port} )",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode(errors="replace")
    # ss prints a header line, then one line per socket it destroyed.
    return len([line for line in out.decode().splitlines()[1:] if line.strip()])


@pytest.mark.skipif(not Path(SS).exists(), reason="needs ss (Debian's iproute2)")
async def test_the_page_attaches_again_after_a_lost_connection(
    page: Any, server: RunningServer
) -> None:
    sockets: list[Any] = []
    page.on("websocket", lambda socket: sockets.append(socket))
    await open_paired(page, server)
    await run_program(page, NUMBERED)
    await wait_for_terminal(page, "line 03")
    assert "line 30" not in await terminal_text(page)
    first_socket = sockets[-1]

    # The network goes: the connection breaks mid-run, and for a moment the
    # browser cannot reach the device at all.
    await page.context.set_offline(True)
    port = urlsplit(server.base_url).port
    assert port is not None
    assert await cut_connections(port) >= 2
    await expect(page.locator("#connection")).to_contain_text(
        re.compile(r"Disconnected, retrying in \d+ s")
    )
    await expect(page.locator("#run-state")).to_have_text("Reconnecting to the program…")
    assert first_socket.is_closed()
    await asyncio.sleep(1.5)
    await page.context.set_offline(False)

    await expect(page.locator("#connection")).to_contain_text("Connected", timeout=WAIT_MS * 2)
    await expect_finished(page)
    text = await terminal_text(page)
    lines = [line for line in text.splitlines() if line.startswith("line ")]
    assert lines == [f"line {n:02d}" for n in range(1, LINES + 1)], text
    assert text.count("── Finished ──") == 1, text
    assert len(sockets) >= 2  # the page came back on a new connection
    await expect(page.get_by_role("button", name="Run")).to_be_enabled()
    await page.screenshot(path=shot("reattached-desktop.png"))
