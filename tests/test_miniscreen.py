"""The pairing code on a pi-top [4]'s miniscreen: the picture, pixel for pixel, and
when it is handed to a display. Only the pi-top SDK's own hand-off (PitopDisplay)
cannot run here."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Callable

import aiohttp
import pytest
from PIL import Image, ImageChops

from further_link.system.addresses import local_addresses
from further_link.system.miniscreen import HEIGHT, WIDTH, PairingScreen, render_pairing_screen
from further_link.trust.auth import pairing_code

from conftest import TIMEOUT, RunningServer

REPO = Path(__file__).resolve().parent.parent
# Made once with render_pairing_screen("493027", "pi-top-4a2f", "192.168.1.20:8028") and
# looked at: the name on top, 493 027 large in the middle, the address at the bottom right.
REFERENCE = Path(__file__).parent / "data" / "miniscreen-493027.png"
SCREEN = ("493027", "pi-top-4a2f", "192.168.1.20:8028")


def lit_pixels(image: Image.Image) -> int:
    return sum(1 for value in image.convert("L").tobytes() if value)


def differing_pixels(image: Image.Image, reference: Image.Image) -> int:
    return lit_pixels(ImageChops.difference(image.convert("L"), reference.convert("L")))


def test_the_code_493027_renders_exactly_as_the_reference() -> None:
    image = render_pairing_screen(*SCREEN)
    reference = Image.open(REFERENCE)
    assert (image.mode, image.size) == ("1", (WIDTH, HEIGHT))
    assert reference.size == (WIDTH, HEIGHT)
    assert differing_pixels(image, reference) == 0
    # The reference itself is no blank screen: the code's big digits light many pixels.
    assert 600 < lit_pixels(reference) < 3000


def test_debian_pillow_renders_the_same_pixels(tmp_path: Path) -> None:
    """The Debian package's server uses Debian's Pillow, which must agree with the reference."""
    out = tmp_path / "screen.png"
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from further_link.system.miniscreen import render_pairing_screen\n"
        f"render_pairing_screen(*{SCREEN!r}).save({str(out)!r})\n"
    )
    subprocess.run(["/usr/bin/python3", "-c", code], check=True, timeout=TIMEOUT)
    assert differing_pixels(Image.open(out), Image.open(REFERENCE)) == 0


def test_a_different_code_or_address_changes_the_picture() -> None:
    reference = Image.open(REFERENCE)
    assert differing_pixels(render_pairing_screen("493028", *SCREEN[1:]), reference) > 10
    assert differing_pixels(
        render_pairing_screen("493027", "pi-top-4a2f", "10.0.0.2:80"), reference
    )


# Stands in for the pi-top SDK's miniscreen in the real (dropped) server: it keeps
# every picture it is given as a file the test can read.
STAND_IN_SDK = """\
import itertools, os
_pictures = itertools.count(1)
class Miniscreen:
    def display_image(self, image):
        image.save(os.path.join({folder!r}, "screen-%d.png" % next(_pictures)))
    def reset(self):
        pass
"""


async def test_a_browser_refused_for_want_of_the_token_gets_the_code_on_the_screen(
    start_server: Callable[..., Awaitable[RunningServer]],
    http: aiohttp.ClientSession,
    sandbox: Path,
    shared: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sdk = sandbox / "sdk"
    (sdk / "pitop").mkdir(parents=True)
    (sdk / "pitop" / "__init__.py").write_text("")
    (sdk / "pitop" / "miniscreen.py").write_text(STAND_IN_SDK.format(folder=str(shared)))
    sdk.chmod(0o755)
    monkeypatch.syspath_prepend(str(sdk))  # an in-process server (not root) finds it too
    server = await start_server(environ={"PYTHONPATH": str(sdk)})
    before = pairing_code(server.token).code
    url = server.ws_url(token=False)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(url, headers={"Origin": server.base_url})
    assert refused.value.status == 401
    picture = shared / "screen-1.png"
    await wait_for(picture.exists, "the pairing code on the screen")
    await asyncio.sleep(0.2)  # the file is written whole by then
    after = pairing_code(server.token).code
    port = int(server.base_url.rsplit(":", 1)[1])
    address = f"{(local_addresses(ipv6=False) or [socket.gethostname()])[0]}:{port}"
    shown = Image.open(picture)
    expected = [
        render_pairing_screen(code, socket.gethostname(), address) for code in {before, after}
    ]
    assert any(differing_pixels(shown, picture_) == 0 for picture_ in expected)
    # A page asking again with the same code changes nothing on the screen.
    async with http.post(server.base_url + "/pair", json={"code": "000"}) as response:
        assert response.status == 403
    await asyncio.sleep(0.5)
    assert not (shared / "screen-2.png").exists()


def test_nine_digits_and_long_names_fit_the_screen() -> None:
    image = render_pairing_screen("123456789", "a-very-long-device-name-indeed", "[fe80::1]:8028")
    assert image.size == (WIDTH, HEIGHT)
    # The code's three groups are drawn large (2x): a tall band of lit pixels mid-screen.
    rows = [y for y in range(HEIGHT) if any(image.getpixel((x, y)) for x in range(WIDTH))]
    assert max(rows) - min(rows) > 50


class RecordingDisplay:
    """A display that keeps what it was shown: a stand-in for the miniscreen's hardware."""

    def __init__(self) -> None:
        self.shown: list[Image.Image] = []
        self.released = 0

    def show(self, image: Image.Image) -> None:
        self.shown.append(image)

    def release(self) -> None:
        self.released += 1


async def wait_for(condition: object, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_requests_show_the_code_once_and_release_the_screen_after_a_while() -> None:
    display = RecordingDisplay()
    screen = PairingScreen(lambda: display, show_seconds=0.5)
    try:
        for _ in range(20):  # a page retrying: one picture, not twenty
            screen.request(*SCREEN)
        await wait_for(lambda: display.shown, "the first picture")
        screen.request("111222333", *SCREEN[1:])  # the code changed: shown at once
        await wait_for(lambda: len(display.shown) == 2, "the new code")
        await wait_for(lambda: display.released >= 1 and screen.shown is None, "the release")
    finally:
        await screen.close()
    assert differing_pixels(display.shown[0], Image.open(REFERENCE)) == 0
    assert len(display.shown) == 2


async def test_a_request_while_the_screen_is_released_shows_the_code_again() -> None:
    display = RecordingDisplay()
    screen = PairingScreen(lambda: display, show_seconds=0.1)
    try:
        screen.request(*SCREEN)
        await wait_for(lambda: display.released == 1, "the first release")
        for _ in range(3):  # each after the last showing ended: shown again every time
            screen.request(*SCREEN)
            shown = len(display.shown)
            await wait_for(lambda: len(display.shown) > shown, "the code again")  # noqa: B023
            await wait_for(lambda: screen.shown is None, "the release")
    finally:
        await screen.close()
    assert len(display.shown) == 4


async def test_a_display_that_cannot_open_is_left_alone() -> None:
    opened = 0

    def broken() -> RecordingDisplay:
        nonlocal opened
        opened += 1
        raise OSError("no miniscreen here")

    screen = PairingScreen(broken, show_seconds=0.2)
    try:
        screen.request(*SCREEN)
        await wait_for(lambda: opened == 1, "the attempt to open the display")
        await asyncio.sleep(0.3)
        screen.request(*SCREEN)
        await asyncio.sleep(0.3)
    finally:
        await screen.close()
    assert opened == 1
