"""The built-in page shows a program's buttons, sliders and plots, and its controls
reach the program: Debian's chromium through Playwright, as in test_webpage.py."""

from __future__ import annotations

import base64
import io
from typing import Any

from pagekit import run_program
from PIL import Image
from test_webpage import (
    WAIT_MS,
    browser,
    expect,
    expect_finished,
    new_page,
    open_paired,
    page,
    pytestmark,
    wait_for_terminal,
)

from conftest import RunningServer

__all__ = ["browser", "new_page", "page", "pytestmark"]


async def test_a_button_click_in_the_page_reaches_the_programs_callback(
    page: Any, server: RunningServer
) -> None:
    await open_paired(page, server)
    await run_program(
        page,
        "import threading, further_link\n"
        "done = threading.Event()\n"
        "def go():\n"
        "    print('pressed', flush=True)\n"
        "def speed(value):\n"
        "    print('speed', value, flush=True)\n"
        "    done.set()\n"
        "further_link.button('Go', on_press=go)\n"
        "further_link.slider('speed', 0, 100, on_change=speed)\n"
        "print('ready', flush=True)\n"
        "done.wait(60)\n",
    )
    await wait_for_terminal(page, "ready")
    panel = page.locator("#controls-panel")
    await expect(panel).to_be_visible()
    await panel.get_by_role("button", name="Go").click()
    await wait_for_terminal(page, "pressed")
    await panel.get_by_role("slider").fill("42")
    await wait_for_terminal(page, "speed 42")
    await expect_finished(page)


async def test_a_plot_shows_in_the_pages_plot_panel(page: Any, server: RunningServer) -> None:
    await open_paired(page, server)
    await run_program(
        page,
        "import matplotlib.pyplot as plt\n"
        "fig = plt.figure(figsize=(2, 2), dpi=50)\n"
        "ax = fig.add_axes([0, 0, 1, 1])\n"
        "ax.set_axis_off()\n"
        "ax.plot([0, 1], [0, 1], color='red', linewidth=4)\n"
        "plt.show()\n",
    )
    await expect_finished(page)
    image = page.locator("#plots img")
    await expect(image).to_have_count(1)
    source = await image.get_attribute("src")
    assert source.startswith("data:image/png;base64,")
    picture = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).convert("RGB")
    red, green, blue = picture.getpixel((50, 49))
    assert red > 200 and green < 80 and blue < 80
    await page.wait_for_function(
        "() => document.querySelector('#plots img').naturalWidth === 100", timeout=WAIT_MS
    )
