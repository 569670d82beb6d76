"""The teacher's page in a real browser (Debian's chromium, headless, through
Playwright) driving real devices through a lesson: push a folder, run it, watch
one console and type into it, stop all, lock and unlock, a device lost and back.

Screenshots land in test-artifacts/screenshots/; the grid during the run is
kept, current, as docs/teacher.png.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Callable

import aiohttp
import pytest
from fleetkit import (
    ClassDevice,
    Teacher,
    class_prefix,
    further_link,
    start_class,
    start_device,
    start_teacher,
    stop_class,
)
from pagekit import CHROMIUM
from test_fleet import LESSON, write_project
from test_webpage import ROOT, browser, expect, new_page, shot

from conftest import AS_ROOT, Client

__all__ = ["browser", "new_page"]  # fixtures this module uses

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium"),
    pytest.mark.skipif(not AS_ROOT, reason="the class's servers are real processes"),
]
CLASS_SIZE = 6
DOCS_SCREENSHOT = ROOT / "docs" / "teacher.png"
WIDE = {"width": 1400, "height": 900}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def tile(page: Any, name: str) -> Any:
    return page.locator(f'article.tile[data-name="{name}"]')


async def test_the_teacher_page_drives_a_lesson(
    sandbox: Path, http: aiohttp.ClientSession, new_page: Callable[..., Any]
) -> None:
    teacher_dir = sandbox / "teacher"
    code, said = await further_link(teacher_dir, "teacher-key")
    assert code == 0, said
    public_key = said.split()[0]
    prefix = class_prefix()
    devices: list[ClassDevice] = await start_class(sandbox, prefix, CLASS_SIZE, public_key)
    teacher: Teacher | None = None
    try:
        teacher = await start_teacher(
            teacher_dir, http, "--interface", "127.0.0.1", "--match", f"{prefix}-*"
        )
        page = await new_page(viewport=WIDE)
        await page.goto(teacher.page_url)
        await expect(page.locator("article.tile")).to_have_count(CLASS_SIZE)
        await expect(page.locator("article.tile.online")).to_have_count(CLASS_SIZE)
        await expect(page.locator("#summary")).to_contain_text(f"{CLASS_SIZE} online")
        await expect(page.locator("#grid")).not_to_contain_text("not paired")

        # Choose the project folder, push it, run it.
        await page.locator("#folder").set_input_files(write_project(sandbox))
        await expect(page.locator("#project")).to_have_text(f"lesson1: {len(LESSON)} files")
        await expect(page.locator("#main")).to_have_value("main.py")
        await page.get_by_role("button", name="Push").click()
        await expect(page.locator("#notice")).to_contain_text(
            f"push: {CLASS_SIZE} of {CLASS_SIZE} devices"
        )
        await page.get_by_role("button", name="Run").click()
        await expect(page.locator("#notice")).to_contain_text(
            f"run: {CLASS_SIZE} of {CLASS_SIZE} devices"
        )
        await expect(page.locator("article.tile.running")).to_have_count(CLASS_SIZE)
        for device in devices:
            await expect(tile(page, device.name).locator("pre")).to_contain_text(
                "hello from the teacher"
            )
        await page.screenshot(path=shot("teacher-running.png"))

        # Watch one console full size and type to its program.
        watched = devices[2].name
        await tile(page, watched).click()
        await expect(page.locator("#watch")).to_be_visible()
        await expect(page.locator("#watch-name")).to_have_text(watched)
        await page.locator("#watch-text").fill("forty-two")
        await page.locator("#watch-text").press("Enter")
        await expect(page.locator("#watch-output")).to_contain_text("got forty-two")
        await expect(page.locator("#watch-output")).to_contain_text("tick")
        await page.screenshot(path=shot("teacher-watch.png"))
        await page.get_by_role("button", name="Close").click()
        await expect(page.locator("#watch")).to_be_hidden()
        await expect(tile(page, watched).locator("pre")).to_contain_text("got forty-two")
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        await page.screenshot(path=str(DOCS_SCREENSHOT))

        # Stop all.
        await page.get_by_role("button", name="Stop all").click()
        await expect(page.locator("#notice")).to_contain_text(
            f"stop: {CLASS_SIZE} of {CLASS_SIZE} devices"
        )
        await expect(page.locator("article.tile.running")).to_have_count(0)
        await expect(tile(page, devices[0].name).locator(".state")).to_contain_text("exit")

        # Lock with a message: a learner's own start is refused with it.
        await page.get_by_label("lock message").fill("Eyes on the board")
        await page.get_by_role("button", name="Lock", exact=True).click()
        await expect(page.locator("#notice")).to_contain_text(
            f"lock: {CLASS_SIZE} of {CLASS_SIZE} devices"
        )
        await expect(page.locator("article.tile .locked")).to_have_count(CLASS_SIZE)
        pupil = Client(await http.ws_connect(devices[4].server.ws_url()))
        await pupil.send("start", {"sourceScript": "print('mine')"})
        assert await pupil.receive() == {
            "type": "error",
            "data": {"message": "Eyes on the board"},
        }
        await page.screenshot(path=shot("teacher-locked.png"))
        await page.get_by_role("button", name="Unlock").click()
        await expect(page.locator("article.tile .locked")).to_have_count(0)
        result = await pupil.run({"sourceScript": "print('mine')"})
        assert result.stdout == "mine\n"
        await pupil.ws.close()

        # A device that goes away is shown offline, then comes back by itself.
        gone = devices[5]
        assert gone.server.process is not None
        gone.server.process.kill()
        await gone.server.process.wait()
        await expect(tile(page, gone.name)).to_have_class(re.compile(r"\boffline\b"))
        await page.screenshot(path=shot("teacher-offline.png"))
        devices[5] = await start_device(gone.root, gone.name, public_key, advertise=True)
        await expect(tile(page, gone.name)).to_have_class(re.compile(r"\bonline\b"))
        await expect(tile(page, gone.name).locator(".facts")).to_contain_text(
            f"127.0.0.1:{devices[5].port}"
        )
    finally:
        if teacher is not None:
            await teacher.stop()
        await stop_class(devices)
        shutil.rmtree(sandbox / "lesson1", ignore_errors=True)
