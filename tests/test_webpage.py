"""The built-in web page, in a real browser: Debian's chromium, headless, driven
by Playwright (whose wheel brings its driver; no browser is downloaded).

Screenshots land in test-artifacts/screenshots/ (printed by the tests); one
desktop screenshot is also kept, current, as docs/screenshot.png.
"""

from __future__ import annotations

import base64
import hashlib
import mimetypes
import re
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import aiohttp
import pytest
from pagekit import (
    CHROMIUM,
    FLOOD,
    READ_WATCH,
    TEN_MB,
    WATCH_STOP,
    WATCH_TASKS,
    launch_chromium,
    run_program,
    set_program,
)

from further_link.trust.auth import pairing_code
from further_link.trust.pairing import BURST

from conftest import RunningServer, rotate_token

playwright_api = pytest.importorskip("playwright.async_api")
async_playwright = playwright_api.async_playwright
expect = playwright_api.expect

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
# A 2x2 PNG, red and blue: bytes that are not text.
LOGO_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGP8z8DAwMDA8J+BgYHhPwAUCAL//zEV8wAAAABJRU5ErkJggg=="
)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with async_playwright() as playwright:
        browser = await launch_chromium(playwright, WAIT_MS * 2)
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


async def terminal_text(page: Any, which: str = "program") -> str:
    """What the terminal shows: its scrollback and screen, one line a row."""
    text: str = await page.evaluate(f"window.furtherLink.{which}.terminal.text()")
    return text


async def wait_for_terminal(page: Any, needle: str, which: str = "program", **options: Any) -> None:
    """Wait until the terminal shows ``needle`` (checked in the page: no huge failure text)."""
    await page.wait_for_function(
        f"n => window.furtherLink.{which}.terminal.text().includes(n)",
        arg=needle,
        timeout=options.get("timeout", WAIT_MS),
    )


async def expect_finished(page: Any, words: str = "Finished") -> None:
    await expect(page.locator("#run-state")).to_have_text(words)
    await wait_for_terminal(page, f"── {words} ──")


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


async def docs_screenshot(
    page: Any, path: Path, project: str, files_status: str, max_bytes: int
) -> None:
    """A screenshot for the docs at ``path``, smaller than ``max_bytes``.

    A typical device's name and the given project instead of this test's random
    port and names, so that the picture changes only when the page does.
    """
    await page.locator("#device-name").evaluate("e => { e.textContent = 'raspberrypi:8028' }")
    await page.get_by_role("textbox", name="Project").evaluate("(e, v) => { e.value = v }", project)
    await page.locator("#files-status").evaluate("(e, v) => { e.textContent = v }", files_status)
    path.parent.mkdir(exist_ok=True)
    await page.screenshot(path=str(path))
    assert path.stat().st_size < max_bytes


# ---------------------------------------------------------------- HTTP


async def test_page_and_assets_need_no_token_but_run_still_does(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    nonces = []
    for _ in range(2):
        async with http.get(server.base_url + "/") as response:
            assert response.status == 200
            assert response.content_type == "text/html"
            assert response.headers["Cache-Control"] == "no-cache"
            policy = response.headers["Content-Security-Policy"]
            assert "default-src 'none'" in policy and "script-src 'self'" in policy
            assert "'unsafe-inline'" not in policy and "'unsafe-eval'" not in policy
            nonce = re.search(r"style-src 'self' 'nonce-([A-Za-z0-9_-]{20,})'", policy)
            assert nonce, policy
            assert "img-src 'self' data:" in policy
            assert "connect-src 'self' ws://127.0.0.1:" in policy
            assert "frame-ancestors 'none'" in policy
            assert response.headers["Referrer-Policy"] == "no-referrer"
            html = await response.text()
            assert '<script type="module" src="/static/app.js">' in html
            assert f'<meta name="csp-nonce" content="{nonce[1]}">' in html
            nonces.append(nonce[1])
    assert nonces[0] != nonces[1]
    for name, kind in [
        ("app.js", "text/javascript"),
        ("app.css", "text/css"),
        ("LICENSES.txt", "text/plain"),
        ("favicon.svg", "image/svg+xml"),
    ]:
        async with http.get(f"{server.base_url}/static/{name}") as response:
            assert response.status == 200, name
            assert response.content_type == kind
            assert response.headers["Cache-Control"] == "no-cache"
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            if name == "LICENSES.txt":
                licences = await response.text()
                for package in ("@codemirror/view", "@xterm/xterm", "@novnc/novnc"):
                    assert f"\n{package} " in licences, package
    for missing in (
        "/static/missing.js",
        "/static/editor.js",
        "/static/..%2Fwebpage.py",
        "/static/index.html",
    ):
        async with http.get(server.base_url + missing) as response:
            assert response.status == 404, missing
    for route in ("/run", "/run-py"):
        async with http.get(server.base_url + route) as response:
            assert response.status == 401, route


async def test_nothing_is_loaded_from_outside_the_device(page: Any, server: RunningServer) -> None:
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    await open_paired(page, server)
    await run_program(page, "print('hi')")
    await expect_finished(page)
    outside = [url for url in urls if not url.startswith((server.base_url, "data:"))]
    assert outside == []


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
    await expect_finished(page)
    await page.reload()
    await expect(page.locator("#connection")).to_contain_text("Connected")
    assert any(url.endswith("/run?pty=true") for url in urls)
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


# ---------------------------------------------------------------- the terminal

COLOURS_AND_PROGRESS = r"""
import sys, time
print("before the clear")
print("\x1b[2J\x1b[H", end="")
print("\x1b[31mred\x1b[0m and \x1b[1;32mbold green\x1b[0m")
for percent in range(0, 101, 10):
    sys.stdout.write(f"\rprogress {percent:3d}%")
    sys.stdout.flush()
    time.sleep(0.01)
print()
print("done")
"""


async def test_terminal_shows_colours_and_a_progress_bar_once(
    page: Any, server: RunningServer
) -> None:
    await open_paired(page, server)
    await run_program(page, COLOURS_AND_PROGRESS)
    await expect_finished(page)
    text = await terminal_text(page)
    assert text.count("progress") == 1, text
    assert "progress 100%" in text
    assert "red and bold green" in text
    assert "before the clear" not in text
    # The colours are the terminal's own: the cells of "red" carry palette colour 1.
    red, green = await page.evaluate(
        """() => {
            const buffer = window.furtherLink.program.terminal.terminal.buffer.active
            for (let y = 0; y < buffer.length; y += 1) {
                const line = buffer.getLine(y)
                if (!line.translateToString(true).startsWith('red and')) continue
                return [line.getCell(0).getFgColor(), line.getCell(8).getFgColor()]
            }
            return null
        }"""
    )
    assert (red, green) == (1, 2)
    await page.screenshot(path=shot("terminal-colours-desktop.png"))


async def test_input_is_typed_in_the_terminal_and_the_exit_code_is_said_in_words(
    page: Any, server: RunningServer
) -> None:
    await open_paired(page, server)
    await run_program(page, "import sys\nname = input('name? ')\nprint('hi', name)\nsys.exit(3)\n")
    await wait_for_terminal(page, "name? ")
    await page.locator("#terminal").click()
    await page.keyboard.type("Ada")
    await page.keyboard.press("Enter")
    await wait_for_terminal(page, "hi Ada")
    await expect_finished(page, "Finished with an error (exit code 3)")
    assert "name? Ada\nhi Ada" in await terminal_text(page)
    await expect(page.get_by_role("button", name="Run")).to_be_enabled()


async def test_ctrl_c_in_the_terminal_interrupts_the_program(
    page: Any, server: RunningServer
) -> None:
    await open_paired(page, server)
    await run_program(page, "import time\nprint('looping')\nwhile True:\n    time.sleep(0.1)\n")
    await wait_for_terminal(page, "looping")
    await page.locator("#terminal").click()
    await page.keyboard.press("Control+c")
    await wait_for_terminal(page, "KeyboardInterrupt")
    await expect_finished(page, "Interrupted (Ctrl+C)")
    assert "Traceback (most recent call last)" in await terminal_text(page)


async def test_stop_under_a_flood_is_shown_within_half_a_second(
    page: Any, server: RunningServer
) -> None:
    await open_paired(page, server)
    await run_program(page, FLOOD)
    # A few MB through the terminal first.
    await page.wait_for_function(
        "() => window.furtherLink.program.terminal.written > 3_000_000", timeout=WAIT_MS * 4
    )
    # The time from the click to the page saying so, measured in the page.
    await page.evaluate(WATCH_STOP)
    await page.get_by_role("button", name="Stop").click()
    await expect(page.locator("#run-state")).to_have_text("Stopped")
    figures = await page.evaluate("window.stopTimes")
    elapsed_ms = figures["shown"] - figures["clicked"]
    print(f"stop under a flood: shown stopped {elapsed_ms:.0f} ms after the click")
    assert elapsed_ms <= 500
    await wait_for_terminal(page, "── Stopped ──")
    await expect(page.get_by_role("button", name="Run")).to_be_enabled()


async def test_ten_megabytes_of_output_never_block_the_page_for_100_ms(
    page: Any, server: RunningServer
) -> None:
    await open_paired(page, server)
    await page.evaluate(WATCH_TASKS)
    await run_program(page, TEN_MB)
    await expect(page.locator("#run-state")).to_have_text("Finished", timeout=WAIT_MS * 4)
    await page.wait_for_function(
        "() => window.furtherLink.program.terminal.backlog.length === 0", timeout=WAIT_MS * 4
    )
    figures = await page.evaluate(READ_WATCH)
    written = await page.evaluate("window.furtherLink.program.terminal.written")
    print(
        f"10 MB of output: {written} characters to the terminal; longest task "
        f"{figures['longest']:.0f} ms, longest gap between frames {figures['gap']:.0f} ms"
    )
    assert written >= 10_000_000
    # The target is 100 ms (README gives the figure measured on a quiet machine);
    # here other test suites may share the two cores, and a task the scheduler
    # pauses looks long. Handing all 10 MB to the terminal at once blocks for
    # seconds even on a quiet machine.
    assert figures["longest"] < 1000


async def test_keys_the_program_listens_to_reach_it(page: Any, server: RunningServer) -> None:
    await open_paired(page, server)
    await run_program(
        page,
        "from further_link import KeyboardButton\n"
        "import threading\n"
        "up = KeyboardButton('ArrowUp')\n"
        "done = threading.Event()\n"
        "up.when_pressed = lambda: print('pressed', flush=True)\n"
        "def released():\n"
        "    print('released', flush=True)\n"
        "    done.set()\n"
        "up.when_released = released\n"
        "print('ready', flush=True)\n"
        "done.wait(60)\n",
    )
    await wait_for_terminal(page, "ready")
    keys = page.locator("#keys")
    await expect(keys).to_contain_text("This program listens to keys: ArrowUp")
    await page.screenshot(path=shot("keys-desktop.png"))
    await page.locator("#terminal").click()
    await page.keyboard.down("ArrowUp")
    await wait_for_terminal(page, "pressed")
    await page.keyboard.up("ArrowUp")
    await wait_for_terminal(page, "released")
    await expect_finished(page)
    await expect(keys).to_be_hidden()


async def test_the_shell_tab_runs_commands_in_the_project(page: Any, server: RunningServer) -> None:
    await open_paired(page, server)
    await run_program(page, "print('saved first')")
    await expect_finished(page)
    await page.get_by_role("tab", name="Shell").click()
    await expect(page.locator("#shell-terminal")).to_be_visible()
    await page.wait_for_function("() => window.furtherLink.shell.state === 'running'")
    await page.keyboard.type("ls\r")
    await wait_for_terminal(page, "main.py", which="shell")
    await page.screenshot(path=shot("shell-desktop.png"))
    await page.get_by_role("tab", name="Output").click()
    await expect(page.locator("#terminal")).to_be_visible()


async def test_camera_frames_show_in_one_image(page: Any, server: RunningServer) -> None:
    await open_paired(page, server)
    await run_program(
        page,
        "import further_link, numpy as np\n"
        "further_link.send_image(np.zeros((40, 60, 3), dtype=np.uint8))\n"
        "print('sent')\n",
    )
    await expect_finished(page)
    image = page.get_by_role("img", name="The latest picture from the program")
    await expect(image).to_be_visible()
    await expect(image).to_have_attribute("src", re.compile(r"^data:image/jpeg;base64,/9j/"))
    await page.wait_for_function(
        "() => document.getElementById('frame').naturalWidth === 60"
        " && document.getElementById('frame').naturalHeight === 40",
        timeout=WAIT_MS,
    )
    assert await page.locator("img#frame").count() == 1


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
    await expect_finished(page)
    assert "over wss" in await terminal_text(page)


# ---------------------------------------------------------------- the editor


async def test_editor_types_undoes_searches_and_runs_with_ctrl_enter(
    page: Any, server: RunningServer
) -> None:
    await open_paired(page, server)
    content = page.locator("#editor .cm-content")
    await set_program(page, "")
    await page.keyboard.type("def greet(name):")
    await page.keyboard.press("Enter")
    await page.keyboard.type("return 'hi ' + name")
    await page.keyboard.press("Enter")
    await page.keyboard.press("Backspace")  # back out of the function body
    await page.keyboard.type("for n in range(2):")
    await page.keyboard.press("Enter")
    await page.keyboard.type("print(greet(str(n)))  # twice")
    source = (
        "def greet(name):\n"
        "    return 'hi ' + name\n"
        "for n in range(2):\n"
        "    print(greet(str(n)))  # twice"
    )
    doc = "() => window.furtherLink.editor.view.state.doc.toString()"
    assert await page.evaluate(doc) == source
    # Python highlighting, line numbers and matching brackets.
    await expect(page.locator("#editor .cm-lineNumbers .cm-gutterElement").last).to_have_text("4")
    keyword_colour = (
        await page.locator("#editor .cm-line")
        .first.locator("span")
        .first.evaluate("e => getComputedStyle(e).color")
    )
    plain_colour = await content.evaluate("e => getComputedStyle(e).color")
    assert keyword_colour != plain_colour

    # Undo takes back the last typing; redo brings it back.
    await page.keyboard.press("Control+z")
    assert await page.evaluate(doc) != source
    await page.keyboard.press("Control+y")
    assert await page.evaluate(doc) == source

    # Search finds "greet" twice.
    await page.keyboard.press("Control+f")
    search = page.get_by_role("textbox", name="Find")
    await expect(search).to_be_focused()
    await search.press_sequentially("greet")
    await expect(page.locator("#editor .cm-searchMatch")).to_have_count(2)
    await page.screenshot(path=shot("editor-search-desktop.png"))
    await search.press("Escape")

    await content.click()
    await page.keyboard.press("Control+Enter")
    await expect_finished(page)
    assert "hi 0\nhi 1" in await terminal_text(page)

    # Tab indents; Escape, then Tab, leaves the editor (no keyboard trap) and types nothing.
    await content.click()
    await page.keyboard.press("Control+End")
    await page.keyboard.press("Escape")
    await page.keyboard.press("Tab")
    await expect(content).not_to_be_focused()
    assert await page.evaluate(doc) == source


async def test_files_of_a_project_are_saved_run_and_reopened_after_a_reload(
    page: Any, server: RunningServer, http: aiohttp.ClientSession
) -> None:
    page.on("dialog", lambda dialog: dialog.accept("helper.py"))
    await open_paired(page, server)
    await page.get_by_role("textbox", name="Project").fill("robot-arm")
    await page.get_by_role("textbox", name="Project").press("Enter")
    await expect(page.locator("#files-status")).to_have_text(re.compile(r"in robot-arm$"))
    await page.get_by_role("button", name="New file").click()
    await expect(page.get_by_role("tab", name="helper.py")).to_have_attribute(
        "aria-selected", "true"
    )
    await set_program(page, "X = 42\n")
    await pick_files(page, {"data.csv": b"name,score\nAda,10\n", "logo.png": LOGO_PNG})
    await expect(page.get_by_role("tab", name="data.csv")).to_be_visible()
    await page.get_by_role("tab", name="logo.png").click()
    await expect(page.get_by_role("img", name="logo.png")).to_be_visible()
    await page.get_by_role("tab", name="main.py").click()
    program = (
        "import hashlib, os\n"
        "from helper import X\n"
        "print(open('data.csv').read().splitlines()[1], X)\n"
        "print('logo', hashlib.sha256(open('logo.png', 'rb').read()).hexdigest())\n"
        "print(os.path.basename(os.getcwd()), sorted(set(os.listdir('.')) - {'__pycache__'}))\n"
        "open('scores.txt', 'w').write('written by the program')\n"
    )
    logo_line = f"logo {hashlib.sha256(LOGO_PNG).hexdigest()}"
    await run_program(page, program)
    await expect_finished(page)
    text = await terminal_text(page)
    assert "Ada,10 42" in text
    assert logo_line in text
    assert "robot-arm ['data.csv', 'helper.py', 'logo.png', 'main.py']" in text
    await expect(page.locator("#save-status")).to_have_text("Saved on the device")
    await page.screenshot(path=shot("project-desktop.png"))

    # The device's listing has it; a reload reopens it, with the file the
    # program wrote, and runs it again.
    async with http.get(
        f"{server.base_url}/projects", headers={"Authorization": f"Bearer {server.token}"}
    ) as response:
        listed = [project["name"] for project in (await response.json())["projects"]]
    assert "robot-arm" in listed
    await page.reload()
    await expect(page.locator("#connection")).to_contain_text("Connected")
    await expect(page.get_by_role("textbox", name="Project")).to_have_value("robot-arm")
    await page.get_by_role("tab", name="main.py").click()
    await page.get_by_role("button", name="Run").click()
    await expect_finished(page)
    text = await terminal_text(page)
    assert "Ada,10 42" in text and logo_line in text
    assert "robot-arm ['data.csv', 'helper.py', 'logo.png', 'main.py', 'scores.txt']" in text
    await expect(page.get_by_role("tab")).to_have_text(
        ["data.csv", "helper.py", "logo.png", "main.py", "scores.txt", "Output", "Shell"]
    )


async def test_two_tabs_keep_two_projects_apart(
    new_page: Callable[..., Awaitable[Any]], server: RunningServer
) -> None:
    first = await new_page()
    await open_paired(first, server)
    second = await first.context.new_page()
    await second.goto(f"{server.base_url}/")
    await expect(second.locator("#connection")).to_contain_text("Connected")
    names = [
        await tab.get_by_role("textbox", name="Project").input_value() for tab in (first, second)
    ]
    assert names[0] != names[1] and all(name.startswith("untitled-") for name in names)
    program = "import os\nprint('here:', os.listdir('.'), open('main.py').readline().strip())\n"
    await run_program(first, "# one\n" + program)
    await run_program(second, "# two\n" + program)
    for tab, mark in ((first, "one"), (second, "two")):
        await expect_finished(tab)
        assert f"here: ['main.py'] # {mark}" in await terminal_text(tab)
    # Running the first again: its file was not touched by the second tab.
    await first.get_by_role("button", name="Run").click()
    await expect_finished(first)
    assert "here: ['main.py'] # one" in await terminal_text(first)


async def test_two_tabs_on_one_project_never_overwrite_each_other_silently(
    new_page: Callable[..., Awaitable[Any]], server: RunningServer
) -> None:
    first = await new_page()
    await open_paired(first, server)
    await first.get_by_role("textbox", name="Project").fill("shared")
    await first.get_by_role("textbox", name="Project").press("Enter")
    await expect(first.locator("#files-status")).to_have_text(re.compile(r"in shared$"))
    # The program writes a file: the next run keeps it (it joins the project).
    await run_program(first, "print('one')\nopen('out.txt', 'w').write('made')\n")
    await expect_finished(first)
    await first.get_by_role("button", name="Run").click()
    await expect_finished(first)
    await expect(first.get_by_role("tab", name="out.txt")).to_be_visible()
    await expect(first.get_by_role("alert")).to_be_hidden()

    second = await first.context.new_page()
    await second.goto(f"{server.base_url}/")
    await expect(second.locator("#connection")).to_contain_text("Connected")
    # Naming a new project like an existing one would replace its files: refused.
    await second.get_by_role("textbox", name="Project").fill("shared")
    await second.get_by_role("textbox", name="Project").press("Enter")
    await expect(second.get_by_role("alert")).to_contain_text(
        "The device already has a project called shared"
    )
    await expect(second.get_by_role("textbox", name="Project")).to_have_value(
        re.compile(r"^untitled-")
    )
    await second.get_by_role("button", name="Dismiss this message").click()
    await second.get_by_label("Open a project on the device").select_option("shared")
    await expect(second.get_by_role("textbox", name="Project")).to_have_value("shared")
    await run_program(second, "print('two')\n")
    await expect_finished(second)

    # The first tab still has the old main.py open: its save is refused, in words.
    await run_program(first, "print('one again')\n")
    alert = first.get_by_role("alert")
    await expect(alert).to_contain_text(
        "Not saved: main.py changed on the device since this page opened shared"
    )
    await expect(first.locator("#run-state")).to_have_text(
        "Not started: the project could not be saved"
    )
    await first.screenshot(path=shot("save-conflict-desktop.png"))
    # The second tab's program is what the device has.
    await second.get_by_role("button", name="Run").click()
    await expect_finished(second)
    assert "two" in await terminal_text(second)


# ---------------------------------------------------------------- screenshots

SHOWCASE = """\
\"\"\"A sunset for the camera panel, and a friendly question.\"\"\"
import numpy as np
import further_link

HEIGHT, WIDTH = 180, 320


def sunset():
    # Blue, green, red channels, as OpenCV's frames have them.
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
    print(f"{n} squared is \\x1b[1;33m{n * n}\\x1b[0m")
name = input("What is your name? ")
print(f"Good evening, {name}!")
"""


async def show_a_finished_run(page: Any, server: RunningServer) -> None:
    await open_paired(page, server)
    await pick_files(page, {"scores.csv": b"name,score\nAda,10\n"})
    await page.get_by_role("tab", name="main.py").click()
    await run_program(page, SHOWCASE)
    await wait_for_terminal(page, "What is your name? ")
    await page.locator("#terminal").click()
    await page.keyboard.type("Ada\r")
    await expect_finished(page)
    await page.wait_for_function("() => document.getElementById('frame').naturalWidth === 320")
    await page.locator("#editor .cm-content").click()
    await page.keyboard.press("Control+Home")  # the top of the program in view
    await page.locator("#run").focus()


async def test_screenshots_desktop_projector_and_phone(
    new_page: Callable[..., Awaitable[Any]], server: RunningServer
) -> None:
    desktop = await new_page(DESKTOP)
    await show_a_finished_run(desktop, server)
    await desktop.screenshot(path=shot("run-desktop.png"))
    await docs_screenshot(desktop, DOCS_SCREENSHOT, "sunset", "2 files in sunset", 300_000)

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
