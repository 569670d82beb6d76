"""The pairing code on a pi-top [4]'s own 128 x 64 miniscreen.

When a browser asks to pair, the person at the device should not need a log
to read the code: ``PairingScreen`` renders the code, the device's name and
its address as a one-bit 128 x 64 image (Pillow, with Pillow's built-in
bitmap font so that the pixels are the same under every Pillow version), and
hands it to the pi-top SDK (``pitop``) when that is importable. The SDK is
imported and used only in the server that already dropped root, in a worker
thread, and only once a browser asked; on any other machine nothing happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import time
from typing import Any, Callable, Protocol

from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)

WIDTH, HEIGHT = 128, 64
# How long the code stays on the screen after the last request to pair.
SHOW_SECONDS = 60.0
_LINE_HEIGHT = 11  # Pillow's bitmap font: 6 x 11 pixels a character
_CHAR_WIDTH = 6
_MAX_CHARS = WIDTH // _CHAR_WIDTH


class Display(Protocol):
    def show(self, image: Image.Image) -> None: ...

    def release(self) -> None: ...


def _bitmap_font() -> Any:
    """Pillow's own bitmap font; Pillow >= 10.1 gives a FreeType font from load_default()."""
    loader = getattr(ImageFont, "load_default_imagefont", None)
    return loader() if loader is not None else ImageFont.load_default()


# Loaded at import, before the server drops root: loading it opens Pillow's PNG
# plugin, which a dropped server may no longer be allowed to read.
_FONT = _bitmap_font()


def _printable(text: str) -> str:
    """What the bitmap font can draw, cut to one screen line (``..`` marks the cut)."""
    text = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
    return text if len(text) <= _MAX_CHARS else text[: _MAX_CHARS - 2] + ".."


def render_pairing_screen(code: str, name: str, address: str) -> Image.Image:
    """The miniscreen image: mode ``"1"``, 128 x 64, lit pixels 1.

    ``name`` on the top line, ``code`` (digits) as large as fits in groups of
    three, ``address`` (e.g. ``192.168.1.20:8028``) on the bottom line.
    """
    font = _FONT
    image = Image.new("1", (WIDTH, HEIGHT), 0)
    draw = ImageDraw.Draw(image)
    draw.text((0, 0), _printable(name), font=font, fill=1)
    bottom = _printable(address)
    draw.text((WIDTH - _CHAR_WIDTH * len(bottom), HEIGHT - _LINE_HEIGHT), bottom, font=font, fill=1)
    groups = [code[i : i + 3] for i in range(0, len(code), 3)] or [""]
    digits = len(code)
    space = HEIGHT - 2 * _LINE_HEIGHT - 4
    scale = 1
    for candidate in (4, 3, 2):
        width = candidate * (_CHAR_WIDTH * digits + 2 * (len(groups) - 1))
        if width <= WIDTH and candidate * _LINE_HEIGHT <= space:
            scale = candidate
            break
    total = scale * (_CHAR_WIDTH * digits + 2 * (len(groups) - 1))
    x = (WIDTH - total) // 2
    y = _LINE_HEIGHT + 2 + (space - scale * _LINE_HEIGHT) // 2
    for group in groups:
        small = Image.new("1", (_CHAR_WIDTH * len(group), _LINE_HEIGHT), 0)
        ImageDraw.Draw(small).text((0, 0), _printable(group), font=font, fill=1)
        image.paste(
            small.resize((small.width * scale, small.height * scale), Image.Resampling.NEAREST),
            (x, y),
        )
        x += scale * (_CHAR_WIDTH * len(group) + 2)
    return image


class PitopDisplay:
    """The pi-top SDK's miniscreen: the one part that cannot be tested off a pi-top."""

    def __init__(self) -> None:
        from pitop.miniscreen import Miniscreen

        self._screen = Miniscreen()

    def show(self, image: Image.Image) -> None:
        self._screen.display_image(image)

    def release(self) -> None:
        # The pi-top's own menu takes the screen back once ours is reset.
        reset = getattr(self._screen, "reset", None)
        if reset is not None:
            reset()


def pitop_available() -> bool:
    return importlib.util.find_spec("pitop") is not None


class PairingScreen:
    """Puts the current pairing code on a device screen when a browser asks to pair.

    ``request`` never blocks the server: rendering and the SDK's calls run in a
    worker thread, one at a time. The same picture is not handed over again
    while it is shown; the screen is released ``show_seconds`` after the last
    request. ``open_display`` makes the display on first use (the SDK's import
    may take seconds); when it fails, the screen is left alone from then on.
    """

    def __init__(
        self, open_display: Callable[[], Display], show_seconds: float = SHOW_SECONDS
    ) -> None:
        self._open_display = open_display
        self._show_seconds = show_seconds
        self._display: Display | None = None
        self._broken = False
        self._shown: tuple[str, str, str] | None = None
        self._until = 0.0
        self._wanted: tuple[str, str, str] | None = None
        self._task: asyncio.Task[None] | None = None
        self._ending = False  # the task has decided to release the screen

    @property
    def shown(self) -> tuple[str, str, str] | None:
        """(code, name, address) on the screen now, or None."""
        return self._shown

    def request(self, code: str, name: str, address: str) -> None:
        """Show this code (again) for the next ``show_seconds``."""
        if self._broken:
            return
        self._wanted = (code, name, address)
        self._until = time.monotonic() + self._show_seconds
        if self._task is None or self._task.done() or self._ending:
            # A task that is releasing the screen shows nothing more: the next one,
            # after it, shows this code.
            self._task = asyncio.ensure_future(self._run(self._task))

    async def _run(self, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        self._ending = False
        loop = asyncio.get_running_loop()
        try:
            while not self._broken:
                wanted = self._wanted
                if wanted is not None and wanted != self._shown:
                    await loop.run_in_executor(None, self._show, wanted)
                    self._shown = wanted
                left = self._until - time.monotonic()
                if left <= 0 and self._wanted == self._shown:
                    self._ending = True
                    break
                await asyncio.sleep(min(max(left, 0.05), 1.0))
        except Exception as exc:  # the SDK's errors are not ours to know: log, stop using it
            self._broken = True
            log.warning("the pairing code cannot be shown on the miniscreen: %s", exc)
        finally:
            await self._release(loop)

    def _show(self, wanted: tuple[str, str, str]) -> None:
        if self._display is None:
            self._display = self._open_display()
        self._display.show(render_pairing_screen(*wanted))

    async def _release(self, loop: asyncio.AbstractEventLoop) -> None:
        display, self._display = self._display, None
        self._shown = None
        if display is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(loop.run_in_executor(None, display.release))

    async def close(self) -> None:
        """Stop showing the code (server shutdown)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
