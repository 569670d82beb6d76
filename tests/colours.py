"""The colours test programs draw, and how close a seen pixel must be to count.

Shared by the GUI tests over the websocket (test_gui.py) and in the page
(test_page_gui.py): both draw a blue square on red (``turtle_square``).
"""

from __future__ import annotations

from typing import Any

RED = (255, 0, 0)
BLUE = (0, 0, 255)
# JPEG (video frames, the page's last frame) is lossy: a colour is "the same"
# within this distance per channel.
JPEG_TOLERANCE = 48


def close_to(pixel: Any, colour: tuple[int, int, int], tolerance: int = 8) -> bool:
    """True when every channel of ``pixel`` (an RGB(A) sequence) is within ``tolerance``."""
    return all(abs(int(a) - b) <= tolerance for a, b in zip(pixel, colour))


def turtle_square(width: int, height: int, side: int) -> str:
    """Program lines opening a ``width`` x ``height`` turtle window at the top left
    (no window manager moves it), red, with a blue ``side`` x ``side`` square in
    its middle, drawn and shown; the caller adds what the program does next."""
    return f"""\
import turtle
screen = turtle.Screen()
screen.setup({width}, {height}, 0, 0)
screen.tracer(0)
screen.bgcolor("red")
pen = turtle.Turtle()
pen.hideturtle()
pen.penup()
pen.goto({-side // 2}, {-side // 2})
pen.color("blue")
pen.begin_fill()
for _ in range(4):
    pen.forward({side})
    pen.left(90)
pen.end_fill()
screen.update()
screen.getcanvas().update()
"""
