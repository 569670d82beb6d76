"""The built-in web page, in a real browser: Debian's chromium, headless, driven
by Playwright (whose wheel brings its driver; no browser is downloaded).

Screenshots land in test-artifacts/screenshots/ (printed by the tests); one
desktop screenshot is also kept, current, as docs/screenshot.png.
"""

from __future__ import annotations

import mimetypes
import re
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import aiohttp
import pytest

from further_link.trust.auth import pairing_code
from further_link.trust.pairing import BURST

from conftest import RunningServer, rotate_token

playwright_api = pytest.importorskip("playwright.async_api")
async_playwright = playwright_api.async_playwright
expect = playwright_api.expect

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
ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
DOCS_SCREENSHOT = ROOT / "docs" / "screenshot.png"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
# Generous: a slow, busy machine runs the browser, the server and the programs.
WAIT_MS = 30_000

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)"
)
expect.set_options(timeout=WAIT_MS)

StartServer = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=WAIT_MS * 2
        )
        yield browser
        await browser.close()


@pytest.fixture
async def new_page(browser: Any) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """Factory for pages in fresh browser profiles; fails the test on script errors."""
    contexts = []
    problems: list[str] = []

    async def open_page(viewport: dict[str, int] = DESKTOP, **options: Any) -> Any:
        context = await browser.new_context(viewport=viewport, **options)
        context.set_default_timeout(WAIT_MS)
        contexts.append(context)
        page = await context.new_page()
        page.on("pageerror", lambda error: problems.append(f"script error: {error}"))

        def on_console(message: Any) -> None:
            if "Content Security Policy" in message.text:
                problems.append(f"CSP: {message.text}")

        page.on("console", on_console)
        return page

    yield open_page
    for context in contexts:
        await context.close()
    assert not problems


@pytest.fixture
async def page(new_page: Callable[..., Awaitable[Any]]) -> Any:
    return await new_page()


async def open_paired(page: Any, server: RunningServer) -> None:
    """Pair as the person at the device may: paste `further-link token`'s token; wait to connect."""
    await page.goto(f"{server.base_url}/")
    await page.get_by_label("Pairing code").fill(server.token)
    await page.get_by_role("button", name="Pair").click()
    await expect(page.locator("#connection")).to_contain_text("Connected")


async def run_program(page: Any, source: str) -> None:
    await page.locator("#editor textarea").fill(source)
    await page.get_by_role("button", name="Run").click()


async def pick_files(page: Any, files: dict[str, bytes]) -> None:
    """Choose files with the page's "Add files" picker."""
    await page.locator("#pick-files").set_input_files(
        files=[
            {"name": name, "mimeType": mimetypes.guess_type(name)[0] or "", "buffer": body}
            for name, body in files.items()
        ]
    )


def shot(name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    print(f"screenshot: {path}")
    return path


# ---------------------------------------------------------------- HTTP


async def test_page_and_assets_need_no_token_but_run_py_still_does(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(server.base_url + "/") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        assert response.headers["Cache-Control"] == "no-cache"
        policy = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy
        assert "img-src 'self' data:" in policy
        assert "connect-src 'self' ws://127.0.0.1:" in policy
        assert "frame-ancestors 'none'" in policy
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert '<script type="module" src="/static/app.js">' in await response.text()
    for name, kind in [
        ("app.js", "text/javascript"),
        ("editor.js", "text/javascript"),
        ("style.css", "text/css"),
        ("favicon.svg", "image/svg+xml"),
    ]:
        async with http.get(f"{server.base_url}/static/{name}") as response:
            assert response.status == 200, name
            assert response.content_type == kind
            assert response.headers["Cache-Control"] == "no-cache"
            assert response.headers["X-Content-Type-Options"] == "nosniff"
    for missing in ("/static/missing.js", "/static/..%2Fwebpage.py", "/static/index.html"):
        async with http.get(server.base_url + missing) as response:
            assert response.status == 404, missing
    async with http.get(server.ws_url(token=False).replace("ws", "http", 1)) as response:
        assert response.status == 401


# ---------------------------------------------------------------- pairing


async def test_pairing_with_the_code_remembers_the_device(page: Any, server: RunningServer) -> None:
    await page.goto(server.base_url + "/")
    code_box = page.get_by_label("Pairing code")
    await expect(code_box).to_be_visible()
    await expect(page.locator("#connection")).to_contain_text("Not paired")
    await page.screenshot(path=shot("pairing-desktop.png"))

    good = pairing_code(server.token).code
    await code_box.fill(f"{(int(good) + 1) % 10**9:09d}")
    await page.get_by_role("button", name="Pair").click()
    await expect(page.locator("#pair-message")).to_have_text("Wrong pairing code.")
    await page.screenshot(path=shot("pairing-wrong-code-desktop.png"))
    await code_box.fill(f"{good[:3]} {good[3:6]} {good[6:]}")
    await page.get_by_role("button", name="Pair").click()
    await expect(page.locator("#connection")).to_contain_text("Connected")
    await expect(page.locator("#pairing")).to_be_hidden()
    assert server.token not in await page.evaluate("JSON.stringify(localStorage)")

    await page.reload()
    await expect(page.locator("#connection")).to_contain_text("Connected")
    await expect(page.locator("#workspace")).to_be_visible()

    # Unpair asks for a code again, even though the pairing cookie would still work.
    await page.get_by_role("button", name="Unpair").click()
    await expect(code_box).to_be_visible()
    await page.reload()
    await expect(code_box).to_be_visible()
    await expect(page.locator("#connection")).to_contain_text("Not paired")


async def test_a_spent_pairing_budget_shows_a_countdown(
    page: Any, server: RunningServer, http: aiohttp.ClientSession
) -> None:
    await page.goto(server.base_url + "/")
    good = pairing_code(server.token).code
    wrong = f"{(int(good) + 1) % 10**9:09d}"
    await page.get_by_label("Pairing code").fill(wrong)
    pair_button = page.get_by_role("button", name="Pair")
    message = page.locator("#pair-message")
    await pair_button.click()
    await expect(message).to_have_text("Wrong pairing code.")
    # An attacker elsewhere on the network spends the rest of the device's budget.
    for _ in range(BURST):
        async with http.post(server.base_url + "/pair", json={"code": wrong}) as response:
            if response.status == 429:
                break
            assert response.status == 403
    else:
        raise AssertionError(f"{BURST} wrong codes did not spend the budget")
    await page.evaluate("document.getElementById('pair-message').textContent = ''")
    await pair_button.click()
    await expect(message).to_contain_text(
        re.compile(r"Too many wrong codes: pairing is locked\. Try again in \d+ s\.")
    )
    await expect(pair_button).to_be_disabled()


async def test_the_token_is_in_no_url_and_no_storage(page: Any, server: RunningServer) -> None:
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    page.on("websocket", lambda ws: urls.append(ws.url))
    await open_paired(page, server)
    await run_program(page, "print('hi')")
    await expect(page.locator("#console")).to_contain_text("exited with code 0")
    await page.reload()
    await expect(page.locator("#connection")).to_contain_text("Connected")
    assert any(url.endswith("/run-py") for url in urls)
    assert [url for url in urls if server.token in url] == []
    assert server.token not in await page.evaluate("JSON.stringify(localStorage)")
    assert server.token not in await page.evaluate("JSON.stringify(sessionStorage)")
    # The cookie that carries it is out of the page's reach.
    assert server.token not in await page.evaluate("document.cookie")


async def test_an_old_token_in_the_address_or_storage_is_forgotten(
    page: Any, server: RunningServer
) -> None:
    await page.goto(server.base_url + "/")
    await page.evaluate(f"localStorage.setItem('further-link:token', {server.token!r})")
    await page.goto(f"{server.base_url}/?token={server.token}")
    await expect(page.get_by_label("Pairing code")).to_be_visible()
    assert "token" not in page.url
    assert await page.evaluate("localStorage.getItem('further-link:token')") is None


async def test_a_refused_pairing_goes_back_to_pairing(page: Any, server: RunningServer) -> None:
    await open_paired(page, server)
    await rotate_token(server.config.config_dir)
    await expect(page.get_by_label("Pairing code")).to_be_visible(timeout=60_000)
    await expect(page.locator("#pair-message")).to_contain_text(
        "no longer accepts the pairing saved in this browser"
    )


# ---------------------------------------------------------------- running


async def test_run_with_input_shows_output_and_exit_code(page: Any, server: RunningServer) -> None:
    await open_paired(page, server)
    await run_program(
        page,
        "import sys\n"
        "name = input('name? ')\n"
        "print('hi', name)\n"
        "print('careful', file=sys.stderr)\n"
        "sys.exit(3)\n",
    )
    console = page.locator("#console")
    await expect(console).to_contain_text("name? ")
    stdin = page.get_by_label("Input", exact=True)
    await expect(stdin).to_be_enabled()
    await stdin.fill("Ada")
    await stdin.press("Enter")
    await expect(console).to_contain_text("name? Ada\nhi Ada\ncareful")
    await expect(console).to_contain_text("exited with code 3")
    await expect(page.locator("#console .out-stdin")).to_have_text("Ada\n")
    stderr = page.locator("#console .out-stderr")
    await expect(stderr).to_have_text("careful\n")
    colours = await page.evaluate(
        "[...document.querySelectorAll('#console .out-stdout, #console .out-stderr')]"
        ".map(e => getComputedStyle(e).color)"
    )
    assert len(set(colours)) == 2, colours
    await expect(page.get_by_role("button", name="Run")).to_be_enabled()
    await expect(stdin).to_be_disabled()


async def test_stop_ends_a_flooding_program_and_the_console_stays_bounded(
    page: Any, server: RunningServer
) -> None:
    await open_paired(page, server)
    await run_program(page, "import itertools\nfor i in itertools.count():\n    print('line', i)\n")
    # Over 3 MB printed, checked in the page (a failing expect() would print it all).
    await page.wait_for_function(
        """() => {
            const tail = (document.querySelector('#console').lastChild?.textContent || '')
            const last = [...tail.slice(-100).matchAll(/line (\\d+)/g)].pop()
            return last && Number(last[1]) >= 250000
        }""",
        timeout=WAIT_MS * 4,
    )
    await page.get_by_role("button", name="Stop").click()
    await expect(page.locator("#console .out-exit")).to_contain_text("stopped (signal 15)")
    await expect(page.get_by_role("button", name="Run")).to_be_enabled()
    kept = await page.evaluate("document.getElementById('console').textContent.length")
    assert 100_000 < kept <= 2_100_000
    await expect(page.locator("#console .out-notice")).to_have_text(
        "Earlier output was removed to keep the page fast."
    )


async def test_console_follows_wrapped_output_to_the_exit_line_on_a_phone(
    new_page: Callable[..., Awaitable[Any]], server: RunningServer
) -> None:
    page = await new_page(PHONE)
    await open_paired(page, server)
    await run_program(page, "for i in range(300):\n    print('line', i, 'x' * 150)\n")
    exit_line = page.locator("#console .out-exit")
    await expect(exit_line).to_contain_text("exited with code 0")
    # Still following: the end of the output is in view, without any scrolling.
    await expect(exit_line).to_be_in_viewport()
    at_bottom = await page.evaluate(
        "(() => { const c = document.getElementById('console');"
        " return c.scrollHeight - c.scrollTop - c.clientHeight < 30 })()"
    )
    assert at_bottom


async def test_camera_frames_show_in_one_image(page: Any, server: RunningServer) -> None:
    await open_paired(page, server)
    await run_program(
        page,
        "import further_link, numpy as np\n"
        "further_link.send_image(np.zeros((40, 60, 3), dtype=np.uint8))\n"
        "print('sent')\n",
    )
    await expect(page.locator("#console")).to_contain_text("exited with code 0")
    image = page.get_by_role("img", name="The latest picture from the program")
    await expect(image).to_be_visible()
    await expect(image).to_have_attribute("src", re.compile(r"^data:image/jpeg;base64,/9j/"))
    await page.wait_for_function(
        "() => document.getElementById('frame').naturalWidth === 60"
        " && document.getElementById('frame').naturalHeight === 40",
        timeout=WAIT_MS,
    )
    assert await page.locator("img#frame").count() == 1


async def test_uploaded_files_are_where_the_program_runs(
    page: Any, server: RunningServer, tmp_path: Path
) -> None:
    await open_paired(page, server)
    await pick_files(page, {"data.txt": b"from a file\n", "photo.png": b"\x89PNG\r\n\x1a\n\0\0"})
    status = page.locator("#files-status")
    await expect(status).to_contain_text("Not uploaded: photo.png")
    await expect(status).to_contain_text("text files only")
    await expect(status).to_contain_text("1 file on the device")

    folder = tmp_path / "project"
    (folder / "lib").mkdir(parents=True)
    (folder / "lib" / "helper.py").write_text("X = 42\n")
    (folder / "notes.md").write_text("# notes\n")
    await page.locator("#pick-folder").set_input_files(folder)
    await expect(status).to_contain_text("3 files on the device")
    files = page.get_by_role("list", name="Uploaded files")
    await expect(files).to_contain_text("data.txt")
    await expect(files).to_contain_text("lib/helper.py")
    await expect(files).to_contain_text("notes.md")

    await run_program(
        page,
        "import os\n"
        "from lib import helper\n"
        "print(open('data.txt').read().strip(), helper.X)\n"
        # Besides the uploads, only the running script itself is in the project.
        "print(sorted(set(os.listdir('.')) - {os.path.basename(__file__)}))\n",
    )
    console = page.locator("#console")
    await expect(console).to_contain_text("exited with code 0")
    await expect(console).to_contain_text("from a file 42")
    await expect(console).to_contain_text("['data.txt', 'lib', 'notes.md']")

    await page.get_by_role("button", name="Remove notes.md").click()
    await expect(status).to_contain_text("2 files on the device")
    await expect(files).not_to_contain_text("notes.md")


async def test_server_errors_are_shown_in_words(
    new_page: Callable[..., Awaitable[Any]], start_server: StartServer
) -> None:
    strict = await start_server(environ={"FURTHER_LINK_MAX_UPLOAD_FILES": "1"})
    page = await new_page()
    await open_paired(page, strict)
    await pick_files(page, {"a.txt": b"a", "b.txt": b"b"})
    banner = page.get_by_role("alert")
    await expect(banner).to_contain_text("The device says: upload has 2 files; the limit is 1")
    await expect(page.locator("#files-status")).to_contain_text("The files were not uploaded")
    await expect(page.locator("#console .out-error")).to_contain_text("upload has 2 files")
    await page.screenshot(path=shot("error-desktop.png"))
    await banner.get_by_role("button", name="Dismiss this message").click()
    await expect(banner).to_be_hidden()


async def test_a_lost_server_shows_retrying_and_reconnects(
    page: Any, start_server: StartServer
) -> None:
    first = await start_server()
    await open_paired(page, first)
    await first.stop()
    connection = page.locator("#connection")
    await expect(connection).to_contain_text(re.compile(r"Disconnected, retrying in \d+ s"))
    await expect(page.get_by_role("button", name="Retry now")).to_be_visible()
    await expect(page.get_by_role("button", name="Run")).to_be_disabled()
    await page.screenshot(path=shot("disconnected-desktop.png"))

    port = urlsplit(first.base_url).port
    await start_server(port=port)
    await expect(connection).to_contain_text("Connected", timeout=WAIT_MS * 2)
    await expect(page.get_by_role("button", name="Run")).to_be_enabled()


async def test_the_page_works_over_https(
    new_page: Callable[..., Awaitable[Any]], start_server: StartServer
) -> None:
    secure = await start_server(no_ssl=False)
    assert secure.base_url.startswith("https://")
    page = await new_page(ignore_https_errors=True)  # the device's self-signed certificate
    await open_paired(page, secure)
    await run_program(page, "print('over wss')")
    await expect(page.locator("#console")).to_contain_text("over wss\nexited with code 0")


# ---------------------------------------------------------------- the editor


async def test_editor_indents_highlights_and_runs_with_ctrl_enter(
    page: Any, server: RunningServer
) -> None:
    await open_paired(page, server)
    editor = page.get_by_label("Python program")
    await editor.fill("")
    await editor.press_sequentially("def greet(name):")
    await editor.press("Enter")
    await editor.press_sequentially("return 'hi ' + name")
    await editor.press("Enter")
    await editor.press_sequentially("for n in range(2):")
    await editor.press("Enter")
    await editor.press_sequentially("print(greet(str(n)))  # twice")
    assert await editor.input_value() == (
        "def greet(name):\n"
        "    return 'hi ' + name\n"
        "for n in range(2):\n"
        "    print(greet(str(n)))  # twice"
    )
    source = await editor.input_value()

    # Tab and Shift+Tab on a selection of lines; Tab alone inserts 4 spaces.
    await editor.press("Control+a")
    await editor.press("Tab")
    assert await editor.input_value() == "\n".join("    " + line for line in source.split("\n"))
    await editor.press("Shift+Tab")
    assert await editor.input_value() == source
    await editor.press("Control+End")
    await editor.press("Home")
    await editor.press("Tab")
    assert (await editor.input_value()).endswith("\n        print(greet(str(n)))  # twice")
    await editor.press("Shift+Tab")
    assert await editor.input_value() == source

    code = page.locator("#editor pre")
    await expect(code.locator(".tok-keyword").first).to_have_text("def")
    await expect(code.locator(".tok-def")).to_have_text("greet")
    await expect(code.locator(".tok-string")).to_have_text("'hi '")
    await expect(code.locator(".tok-number")).to_have_text("2")
    await expect(code.locator(".tok-comment")).to_have_text("# twice")
    await expect(code.locator(".tok-builtin").first).to_have_text("range")
    await expect(page.locator("#editor .editor-gutter")).to_have_text("1\n2\n3\n4")

    await editor.press("Control+Enter")
    await expect(page.locator("#console")).to_contain_text("hi 0\nhi 1\nexited with code 0")

    # Escape, then Tab, leaves the editor (no keyboard trap) and types nothing.
    await editor.focus()
    await editor.press("Escape")
    await editor.press("Tab")
    await expect(editor).not_to_be_focused()
    assert await editor.input_value() == source

    await editor.fill('s = """one\ntwo"""  # done\nx = 0x1F + 1.5e3\n')
    await expect(code.locator(".tok-string")).to_have_text('"""one\ntwo"""')
    await expect(code.locator(".tok-number")).to_have_text(["0x1F", "1.5e3"])


# ---------------------------------------------------------------- screenshots

SHOWCASE = '''\
"""A sunset for the camera panel, and a friendly question."""
import numpy as np
import further_link

HEIGHT, WIDTH = 180, 320


def sunset():
    """Blue, green, red channels, as OpenCV's frames have them."""
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    sky = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    sky[..., 2] = 255 - ys * 60 // HEIGHT
    sky[..., 1] = 90 + ys * 90 // HEIGHT
    sky[..., 0] = 150 - ys * 100 // HEIGHT
    sun = (xs - 160) ** 2 + (ys - 120) ** 2 < 45**2
    sky[sun] = (120, 225, 255)
    sky[140:] = (110, 60, 30)  # the sea
    return sky


further_link.send_image(sunset())
for n in range(1, 5):
    print(f"{n} squared is {n * n}")
name = input("What is your name? ")
print(f"Good evening, {name}!")
'''


async def show_a_finished_run(page: Any, server: RunningServer) -> None:
    await open_paired(page, server)
    await pick_files(page, {"scores.csv": b"name,score\nAda,10\n"})
    await expect(page.locator("#files-status")).to_contain_text("1 file on the device")
    await run_program(page, SHOWCASE)
    stdin = page.get_by_label("Input", exact=True)
    await expect(page.locator("#console")).to_contain_text("What is your name? ")
    await stdin.fill("Ada")
    await stdin.press("Enter")
    await expect(page.locator("#console")).to_contain_text("exited with code 0")
    await page.wait_for_function("() => document.getElementById('frame').naturalWidth === 320")
    editor = page.get_by_label("Python program")
    await editor.press("Control+Home")  # the top of the program in view
    await editor.blur()


async def test_screenshots_desktop_and_phone(
    new_page: Callable[..., Awaitable[Any]], server: RunningServer
) -> None:
    desktop = await new_page(DESKTOP)
    await show_a_finished_run(desktop, server)
    await desktop.screenshot(path=shot("run-desktop.png"))
    # For the docs, the name of a typical device instead of this test's random
    # port, so that the picture changes only when the page does.
    await desktop.locator("#device-name").evaluate("e => { e.textContent = 'raspberrypi:8028' }")
    DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
    await desktop.screenshot(path=str(DOCS_SCREENSHOT))
    assert DOCS_SCREENSHOT.stat().st_size < 300_000

    # A classroom projector: bigger text (A+ twice), and the dark theme.
    projector = await new_page({"width": 1920, "height": 1080}, color_scheme="dark")
    await show_a_finished_run(projector, server)
    for _ in range(2):
        await projector.get_by_role("button", name="Larger text").click()
    await expect(projector.locator("html")).to_have_css("font-size", "24px")
    await projector.screenshot(path=shot("run-projector-dark.png"))

    phone = await new_page(PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    await show_a_finished_run(phone, server)
    width = await phone.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the page is {width} px wide on a phone"
    await phone.screenshot(path=shot("run-phone.png"), full_page=True)
    await phone.get_by_role("button", name="Unpair").click()
    await expect(phone.get_by_label("Pairing code")).to_be_visible()
    await phone.screenshot(path=shot("pairing-phone.png"))
    width = await phone.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the pairing screen is {width} px wide on a phone"
