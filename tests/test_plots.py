"""Plots: a program's unchanged ``plt.show()`` reaches the browser as ``plot`` events.

Programs run with Debian's python3-matplotlib (``make system-deps``), as the
program user, and find our backend through MPLBACKEND.
"""

from __future__ import annotations

import base64
import io
from typing import Any

from PIL import Image

from conftest import Client
from v5client import V5Connect, connect_run

__all__ = ["connect_run"]

# A 100 x 100 pixel figure whose axes fill it: data (x, y) in 0..1 is pixel
# (99 x, 99 (1 - y)), so a line from (0, 0) to (1, 1) runs corner to corner.
SQUARE_FIGURE = (
    "import matplotlib.pyplot as plt\n"
    "fig = plt.figure(figsize=(2, 2), dpi=50)\n"
    "ax = fig.add_axes([0, 0, 1, 1])\n"
    "ax.set_axis_off()\n"
    "ax.set_xlim(0, 1)\n"
    "ax.set_ylim(0, 1)\n"
)


def decode_plot(message: dict[str, Any]) -> Image.Image:
    data = message["data"]
    raw = base64.b64decode(data["png"])
    assert raw.startswith(b"\x89PNG\r\n\x1a\n"), "plots are PNG"
    image = Image.open(io.BytesIO(raw))
    image.load()
    assert image.size == (data["width"], data["height"])
    return image.convert("RGB")


def is_red(pixel: tuple[int, ...]) -> bool:
    red, green, blue = pixel[:3]
    return red > 200 and green < 80 and blue < 80


def is_white(pixel: tuple[int, ...]) -> bool:
    return all(value > 240 for value in pixel[:3])


async def test_plt_show_of_a_line_plot_shows_the_line(client: Client) -> None:
    script = (
        SQUARE_FIGURE + "print('before')\n"
        "ax.plot([0, 1], [0, 1], color='red', linewidth=4)\n"
        "plt.show()\n"
        "print('after')\n"
    )
    result = await client.run({"sourceScript": script})
    assert result.exit_code == 0, result.stderr
    kinds = [m["type"] for m in result.messages]
    assert kinds.count("plot") == 1, kinds
    # The plot sits between the prints, as the program made them.
    text_before = "".join(
        m["data"]["output"] for m in result.messages[: kinds.index("plot")] if m["type"] == "stdout"
    )
    assert text_before == "before\n"
    assert result.stdout == "before\nafter\n"
    plot = result.messages[kinds.index("plot")]
    assert plot["data"]["figure"] == 1
    assert (plot["data"]["width"], plot["data"]["height"]) == (100, 100)
    image = decode_plot(plot)
    for x in range(10, 91, 10):
        assert is_red(image.getpixel((x, 99 - x))), f"the line is missing at x={x}"
        # Far from the diagonal: the figure's white background.
        assert is_white(image.getpixel((x, x if abs(2 * x - 99) > 30 else (x + 40) % 100)))
    assert is_white(image.getpixel((5, 5))) and is_white(image.getpixel((94, 94)))


async def test_pause_animation_updates_the_same_figure_on_v5(connect_run: V5Connect) -> None:
    """Each changed frame of a plt.pause() loop is one plot of figure 1; an unchanged
    figure shown again sends nothing."""
    client = await connect_run()
    script = (
        SQUARE_FIGURE + "(line,) = ax.plot([0, 1], [0.2, 0.2], color='red', linewidth=4)\n"
        "for height in (0.2, 0.5, 0.8):\n"
        "    line.set_ydata([height, height])\n"
        "    plt.pause(0.05)\n"
        "plt.show()\n"
        "plt.pause(0.05)\n"
    )
    result = await client.run("anim", {"runner": "python3", "code": script})
    assert result.exit_code == 0, result.stderr
    plots = [m for m in result.messages if m["type"] == "plot"]
    assert [m["data"]["figure"] for m in plots] == [1, 1, 1]
    assert all(m["process"] == "anim" for m in plots)
    for message, row in zip(plots, (79, 49, 19)):
        image = decode_plot(message)
        assert is_red(image.getpixel((50, row))), f"frame should show the line at row {row}"
        others = {79, 49, 19} - {row}
        assert all(is_white(image.getpixel((50, other))) for other in others)


async def test_each_figure_keeps_its_number(client: Client) -> None:
    script = (
        "import matplotlib.pyplot as plt\n"
        "plt.figure(1); plt.plot([1, 2, 3])\n"
        "plt.figure(2); plt.bar([1, 2], [3, 4])\n"
        "plt.show()\n"
        "plt.figure(2).clear(); plt.plot([3, 2, 1])\n"
        "plt.show()\n"
    )
    result = await client.run({"sourceScript": script})
    assert result.exit_code == 0, result.stderr
    figures = [m["data"]["figure"] for m in result.messages if m["type"] == "plot"]
    assert figures == [1, 2, 2]


async def test_a_program_may_choose_its_own_backend(client: Client) -> None:
    script = (
        "import matplotlib\n"
        "print(matplotlib.get_backend())\n"
        "matplotlib.use('Agg')\n"
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2])\n"
        "plt.savefig('/dev/null', format='png')\n"
        "plt.show()\n"
    )
    result = await client.run({"sourceScript": script})
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "module://further_link.mpl_backend\n"
    assert [m for m in result.messages if m["type"] == "plot"] == []


async def test_a_plot_frame_that_is_no_png_is_dropped(client: Client) -> None:
    """A program writing to its side channel itself cannot send a browser non-PNG data."""
    script = (
        "from further_link.channel import KIND_PLOT, PLOT_HEADER, _connection\n"
        "_connection.send(KIND_PLOT, PLOT_HEADER.pack(1) + b'<script>alert(1)</script>' * 4)\n"
        "_connection.send(KIND_PLOT, PLOT_HEADER.pack(1) + b'\\x89PNG')\n"
        "print('still running')\n"
    )
    result = await client.run({"sourceScript": script})
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "still running\n"
    assert {m["type"] for m in result.messages} == {"stdout", "stopped"}
