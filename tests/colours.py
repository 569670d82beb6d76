"""The colours test programs draw, and how close a seen pixel must be to count.

Shared by the GUI tests over the websocket (test_gui.py) and in the page
(test_page_gui.py): both draw a blue square on red.
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
