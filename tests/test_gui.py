"""GUI runs (novncOptions): a private Xvfb + x11vnc per run, seen through the device's own port.

Real Xvfb, x11vnc and turtle programs; the browser's side is a real websocket
speaking RFB (tests/rfbclient.py) to the path the ``novnc`` event names. A
display's processes are found by the run's private Xauthority path in their
command line, so other suites' displays on this machine are never looked at.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import aiohttp
import psutil
import pytest
from colours import BLUE, JPEG_TOLERANCE, RED, close_to, turtle_square
from PIL import Image
from rfbclient import RfbClient

from further_link.protocol.run import encode_run_event
from further_link.protocol.runpy import Novnc
from further_link.server.novnc_proxy import MAX_VIEWERS

from conftest import TIMEOUT, RunningServer
from v5client import V5Client, V5Connect, connect_run

__all__ = ["connect_run"]

StartServer = Callable[..., Awaitable[RunningServer]]

# A 300x200 turtle window at the top left (no window manager moves it): red
# background, a blue 100x100 square in its middle, i.e. at (100..200, 50..150).
DRAW = (
    turtle_square(300, 200, 100)
    + """\
import os, sys, time
cgroup = [l for l in open("/proc/self/cgroup").read().splitlines() if l.startswith("0::")]
print(os.environ["DISPLAY"], os.environ["XAUTHORITY"], cgroup[0][3:] if cgroup else "-")
sys.stdout.flush()
time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else {sleep})
"""
)
INSIDE = (150, 100)  # in the blue square
OUTSIDE = (30, 100)  # on the red background


def draw_program(sleep: float) -> str:
    return DRAW.replace("{sleep}", repr(sleep))


def shows_the_drawing(image: Image.Image, tolerance: int = 8) -> bool:
    return close_to(image.getpixel(INSIDE), BLUE, tolerance) and close_to(
        image.getpixel(OUTSIDE), RED, tolerance
    )


def display_processes(auth_path: str) -> dict[int, str]:
    """pid -> name of every process whose command line names the run's Xauthority file."""
    found = {}
    for process in psutil.process_iter(["name", "cmdline"]):
        if auth_path in (process.info["cmdline"] or []):
            found[process.pid] = process.info["name"]
    return found


def unified_cgroup(pid: int) -> str | None:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


async def start_gui(
    client: V5Client, process: str, code: str, width: int = 640, height: int = 480
) -> dict[str, Any]:
    """Start a GUI run; returns its ``novnc`` data (which must come before ``started``)."""
    options = {"enabled": True, "width": width, "height": height}
    await client.send(
        "start", process, {"runner": "python3", "code": code, "novncOptions": options}
    )
    novnc = await client.expect(process, "novnc")
    await client.expect(process, "started")
    data: dict[str, Any] = novnc["data"]
    return data


async def read_line(client: V5Client, process: str) -> str:
    text = ""
    while not text.endswith("\n"):
        message = await client.next_for(process)
        assert message["type"] == "stdout", f"{message} after {text!r}"
        text += message["data"]["output"]
    return text


@contextlib.asynccontextmanager
async def reading(client: V5Client) -> AsyncIterator[None]:
    """Keep reading /run into the backlog, as a page does, while the test speaks RFB.

    aiohttp answers the server's heartbeat pings only inside ``receive()``: a
    /run socket left unread for 7.5 s on a slow machine is rightly dropped.
    """

    async def pump() -> None:
        while True:
            client.backlog.append(await client._read(TIMEOUT * 10))

    task = asyncio.ensure_future(pump())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def viewer_url(server: RunningServer, path: str, token: bool = True) -> str:
    url = server.base_url.replace("http", "ws", 1) + path
    return url + (f"?token={server.token}" if token else "")


async def live_screen(rfb: RfbClient) -> Image.Image:
    """The framebuffer once it shows the drawing (x11vnc polls the screen: it may lag)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while True:
        screen = await rfb.screen()
        if shows_the_drawing(screen) or loop.time() > deadline:
            return screen
        await asyncio.sleep(0.2)


async def until_stopped(client: V5Client, process: str) -> list[dict[str, Any]]:
    messages = []
    while True:
        message = await client.next_for(process)
        messages.append(message)
        if message["type"] == "stopped":
            return messages


def video_frame(messages: list[dict[str, Any]]) -> Image.Image:
    videos = [m for m in messages if m["type"] == "video"]
    assert len(videos) == 1, [m["type"] for m in messages]
    assert messages[-1]["type"] == "stopped" and messages.index(videos[0]) < len(messages) - 1
    return Image.open(io.BytesIO(base64.b64decode(videos[0]["data"]["output"]))).convert("RGB")


async def test_a_turtle_window_live_through_the_proxy_then_its_last_screen_and_nothing_left(
    connect_run: V5Connect, server: RunningServer, http: aiohttp.ClientSession
) -> None:
    client = await connect_run()
    novnc = await start_gui(client, "gui", draw_program(600))
    assert novnc["port"] == urlsplit(server.base_url).port
    assert novnc["path"].startswith("/novnc/") and len(novnc["path"]) >= len("/novnc/") + 32
    display, auth_path, program_cgroup = (await read_line(client, "gui")).split()
    assert display.startswith(":") and display[1:].isdigit()

    processes = display_processes(auth_path)
    assert sorted(processes.values()) == ["Xvfb", "x11vnc"], processes
    for pid in processes:  # reachable only through the server: no network socket at all
        assert psutil.Process(pid).net_connections(kind="inet") == []
    if "/run-" in program_cgroup:  # the server has cgroups: the display is inside the run's
        for pid in processes:
            assert unified_cgroup(pid) == program_cgroup + "/display"

    async with http.ws_connect(viewer_url(server, novnc["path"])) as viewer:
        rfb = RfbClient(viewer)
        async with reading(client):
            await rfb.handshake()
            assert rfb.version in (b"RFB 003.008\n", b"RFB 003.007\n", b"RFB 003.003\n")
            assert (rfb.width, rfb.height) == (640, 480)
            screen = await live_screen(rfb)
        assert shows_the_drawing(screen), (screen.getpixel(INSIDE), screen.getpixel(OUTSIDE))

        await client.send("stop", "gui")
        messages = await until_stopped(client, "gui")
        frame = video_frame(messages)
        assert frame.size == (640, 480)
        assert shows_the_drawing(frame, JPEG_TOLERANCE)
        # The viewer is cut off with the display.
        closed = await asyncio.wait_for(viewer.receive(), TIMEOUT)
        assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)

    assert display_processes(auth_path) == {}


@pytest.mark.parametrize("containment", ["auto", "best-effort"])
async def test_a_program_that_draws_then_ends_sends_its_last_screen_before_stopped(
    start_server: StartServer, connect_run: V5Connect, containment: str
) -> None:
    # Best-effort's task limit is RLIMIT_NPROC, which counts every process of the
    # account on the machine (other suites' programs too): off here.
    settings = {"FURTHER_LINK_CONTAINMENT": containment, "FURTHER_LINK_MAX_TASKS": "0"}
    server = await start_server(environ=settings)
    client = await connect_run(target=server)
    await start_gui(client, "t", draw_program(3.0))
    _, auth_path, _ = (await read_line(client, "t")).split()
    assert sorted(display_processes(auth_path).values()) == ["Xvfb", "x11vnc"]
    messages = await until_stopped(client, "t")
    assert messages[-1]["data"]["exitCode"] == 0
    assert shows_the_drawing(video_frame(messages), JPEG_TOLERANCE)
    assert display_processes(auth_path) == {}


async def test_a_program_that_draws_nothing_sends_no_frame(connect_run: V5Connect) -> None:
    client = await connect_run()
    code = "import os, time; print(os.environ['DISPLAY']); time.sleep(1.2)"
    await start_gui(client, "quiet", code)
    messages = await until_stopped(client, "quiet")
    # Unbuffered output may come in pieces; what matters is: no frame.
    assert {m["type"] for m in messages} == {"stdout", "stopped"}
    assert messages[-1]["type"] == "stopped" and messages[-1]["data"]["exitCode"] == 0
    assert "".join(m["data"]["output"] for m in messages[:-1]).startswith(":")


async def test_over_tls_the_window_comes_through_the_devices_own_port_and_certificate(
    start_server: StartServer, connect_run: V5Connect, http: aiohttp.ClientSession
) -> None:
    server = await start_server(no_ssl=False)
    client = await connect_run(target=server)
    novnc = await start_gui(client, "tls", draw_program(600))
    assert novnc["port"] == urlsplit(server.base_url).port
    await read_line(client, "tls")
    url = viewer_url(server, novnc["path"])
    assert url.startswith("wss://")
    async with http.ws_connect(url, ssl=server.ssl_client) as viewer, reading(client):
        rfb = RfbClient(viewer)
        await rfb.handshake()
        assert shows_the_drawing(await live_screen(rfb))
    await client.send("stop", "tls")
    await until_stopped(client, "tls")


async def test_two_gui_runs_at_once_get_their_own_displays(
    connect_run: V5Connect, server: RunningServer, http: aiohttp.ClientSession
) -> None:
    first, second = await connect_run(), await connect_run()
    one = await start_gui(first, "a", draw_program(600), 320, 240)
    two = await start_gui(second, "a", draw_program(600), 400, 300)
    assert one["path"] != two["path"]
    display_one = (await read_line(first, "a")).split()[0]
    display_two = (await read_line(second, "a")).split()[0]
    assert display_one != display_two
    for novnc, size in ((one, (320, 240)), (two, (400, 300))):
        url = viewer_url(server, novnc["path"])
        async with reading(first), reading(second), http.ws_connect(url) as viewer:
            rfb = RfbClient(viewer)
            await rfb.handshake()
            assert (rfb.width, rfb.height) == size
    for client in (first, second):
        await client.send("stop", "a")
        await until_stopped(client, "a")


async def refused_upgrade(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> int:
    """The HTTP status a websocket upgrade to ``url`` is refused with."""
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with http.ws_connect(url, **kwargs):
            pass
    return refused.value.status


async def test_the_display_proxy_wants_token_origin_a_live_key_and_few_viewers(
    connect_run: V5Connect, server: RunningServer, http: aiohttp.ClientSession
) -> None:
    client = await connect_run()
    novnc = await start_gui(client, "p", "import time; time.sleep(600)")
    url = viewer_url(server, novnc["path"])
    assert await refused_upgrade(http, viewer_url(server, novnc["path"], token=False)) == 401
    assert await refused_upgrade(http, url, headers={"Origin": "https://evil.example"}) == 403
    guessed = novnc["path"][:-4] + ("aaaa" if not novnc["path"].endswith("aaaa") else "bbbb")
    assert await refused_upgrade(http, viewer_url(server, guessed)) == 404
    viewers = [await http.ws_connect(url) for _ in range(MAX_VIEWERS)]
    assert await refused_upgrade(http, url) == 429
    for viewer in viewers:
        assert (await RfbClient(viewer).read(12)).startswith(b"RFB 003.")
        await viewer.close()
    await client.send("stop", "p")
    await until_stopped(client, "p")
    assert await refused_upgrade(http, url) == 404


async def test_a_device_without_xvfb_refuses_gui_runs_saying_what_to_install(
    start_server: StartServer, connect_run: V5Connect
) -> None:
    server = await start_server(environ={"FURTHER_LINK_XVFB": "/nonexistent/Xvfb"})
    client = await connect_run(target=server)
    options = {"enabled": True, "width": 640, "height": 480}
    await client.send(
        "start", "g", {"runner": "python3", "code": "print(1)", "novncOptions": options}
    )
    error = await client.next_for("g")
    assert error["type"] == "error", error
    assert "Xvfb" in error["data"]["message"] and "apt-get install xvfb" in error["data"]["message"]
    # The same connection still runs programs without a display.
    result = await client.run("g", {"runner": "python3", "code": "print(1)"})
    assert (result.stdout, result.exit_code) == ("1\n", 0)


@pytest.mark.parametrize("size", [(10, 480), (640, 100000)])
async def test_a_display_size_out_of_range_is_refused(
    connect_run: V5Connect, size: tuple[int, int]
) -> None:
    client = await connect_run()
    options = {"enabled": True, "width": size[0], "height": size[1]}
    await client.send(
        "start", "s", {"runner": "python3", "code": "print(1)", "novncOptions": options}
    )
    error = await client.next_for("s")
    assert error["type"] == "error" and "width and height must be" in error["data"]["message"]


FREEZE = """
import os, signal
auth = os.environ["XAUTHORITY"]
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if auth.encode() in f.read().split(b"\\0"):
                os.kill(int(pid), signal.SIGSTOP)
    except OSError:
        pass
print("frozen", flush=True)
time.sleep(600)
"""


async def test_a_program_that_freezes_its_display_is_still_stopped_with_its_last_screen(
    connect_run: V5Connect,
) -> None:
    # Draws, waits for a few screen grabs, then SIGSTOPs its own Xvfb and x11vnc:
    # a grab would now wait for ever. Stop must not.
    code = draw_program(2.0) + FREEZE
    client = await connect_run()
    await start_gui(client, "f", code)
    _, auth_path, _ = (await read_line(client, "f")).split()
    assert await read_line(client, "f") == "frozen\n"
    frozen = display_processes(auth_path)
    assert all(psutil.Process(pid).status() == psutil.STATUS_STOPPED for pid in frozen)
    await client.send("stop", "f")
    messages = await until_stopped(client, "f")
    assert shows_the_drawing(video_frame(messages), JPEG_TOLERANCE)
    assert display_processes(auth_path) == {}


def test_the_novnc_event_on_the_wire_as_upstream_shapes_it() -> None:
    event = Novnc(61123, "/novnc/abc", process="n")
    assert encode_run_event(event, "") == (
        '{"type": "novnc", "data": {"port": 61123, "path": "/novnc/abc"}, '
        '"client": "", "process": "n"}'
    )
