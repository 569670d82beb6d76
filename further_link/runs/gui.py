"""A private virtual display for one GUI run: Xvfb, x11vnc, and the run's last screen.

A v5 ``start`` with ``novncOptions.enabled`` gets its own X display, so that a
learner's turtle or tkinter window can be shown in the browser (noVNC) and not
on the device's desktop::

    Xvfb :N  (-displayfd: the X server itself picks a free N, no race;
              no TCP; access only with the run's random cookie)
    x11vnc   (RFB on a unix socket in the run dir, no TCP port, no password:
              only the server can reach it, and proxies it to the browser)

Both run in ``display/``, a child cgroup of the run's cgroup: they count
against the run's limits and die with it, yet the run's own "did the program
leave anything behind" check (process.py reads only the run cgroup's direct
members) leaves them alone until the server has taken the last screenshot.
Without cgroups (best-effort) they are tracked by pid.

The last screen: a program's windows vanish the moment it exits, so the
screen is grabbed every ``GRAB_INTERVAL`` seconds while the run lives, and
once more just before a stop. The last grab that showed anything is the run's
final frame. Grabs are Debian's ``xwd`` in a subprocess with a timeout, not an
X connection in the server: the program can SIGSTOP its X server (same
account), and Pillow's X11 grab waits for the reply holding the GIL, which
froze the whole server.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import secrets
import shutil
import signal
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from further_link.errors import StartError
from further_link.runs import proctree
from further_link.runs.containment import Limits, RunGroup
from further_link.runs.process import exec_in_group

log = logging.getLogger(__name__)

DEFAULT_SIZE = (1280, 720)
MIN_SIDE = 64
MAX_WIDTH, MAX_HEIGHT = 3840, 2160
# Xvfb answers within ~0.1 s here; a busy SD-card Pi may take far longer.
XVFB_TIMEOUT = 15.0
X11VNC_TIMEOUT = 15.0
HELPER_TIMEOUT = 10.0
GRAB_INTERVAL = 0.5
# A grab waits on the X server, which the program (same account) can stop with
# SIGSTOP: a stop never waits longer than this for the last screen.
GRAB_TIMEOUT = 2.0
# xwd's header: 25 big-endian 32-bit fields (X11's XWDFile.h), then the window name.
XWD_HEADER = struct.Struct(">25I")
XWD_VERSION = 7
XWD_ZPIXMAP = 2
XWD_COLOUR_BYTES = 12
# Xvfb removes its lock file and socket on SIGTERM; SIGKILL follows after this.
TERM_GRACE = 2.0
# x11vnc's unix socket may not accept yet when a browser connects: retried this long.
CONNECT_TIMEOUT = 5.0
JPEG_QUALITY = 85
DISPLAY_DIR = "display"
PACKAGES_HINT = "sudo apt-get install xvfb x11vnc x11-apps"


@dataclass(frozen=True)
class DisplaySize:
    width: int
    height: int

    @classmethod
    def choose(cls, width: int | None, height: int | None) -> DisplaySize:
        """The size asked for (pixels), or the default; raises ``StartError`` when out of range."""
        size = cls(width or DEFAULT_SIZE[0], height or DEFAULT_SIZE[1])
        if not (MIN_SIDE <= size.width <= MAX_WIDTH and MIN_SIDE <= size.height <= MAX_HEIGHT):
            raise StartError(
                f"novncOptions: a display of {size.width}x{size.height} pixels cannot be made; "
                f"width and height must be {MIN_SIDE} to {MAX_WIDTH} and {MIN_SIDE} to {MAX_HEIGHT}"
            )
        return size


@dataclass(frozen=True)
class GuiTools:
    """The programs a virtual display needs (command names or paths)."""

    xvfb: str = "Xvfb"
    x11vnc: str = "x11vnc"
    xwd: str = "xwd"

    def resolve(self, search_path: str | None) -> tuple[str, str, str]:
        """Full paths of the three; raises ``StartError`` naming what is missing."""
        names = (self.xvfb, self.x11vnc, self.xwd)
        found = [shutil.which(tool, path=search_path) for tool in names]
        missing = [tool for tool, path in zip(names, found) if path is None]
        if missing:
            raise StartError(
                "GUI windows need a virtual display, but "
                + ", ".join(repr(name) for name in missing)
                + f" cannot be found on this device: install them with '{PACKAGES_HINT}'"
            )
        xvfb, x11vnc, xwd = (path for path in found if path is not None)
        return xvfb, x11vnc, xwd


@dataclass(frozen=True)
class DisplayRequest:
    """A run's wish for its own display (v5 ``novncOptions``), in pixels (None: default).

    ``port`` is the server port the client came in on, named in ``novnc``.
    """

    width: int | None
    height: int | None
    port: int


class DisplayRegistry:
    """The server's live displays by their unguessable key (the proxy's path looks them up)."""

    def __init__(self) -> None:
        self._displays: dict[str, VirtualDisplay] = {}

    def add(self, display: VirtualDisplay) -> None:
        self._displays[display.key] = display

    def discard(self, display: VirtualDisplay) -> None:
        if self._displays.get(display.key) is display:
            del self._displays[display.key]

    def find(self, key: str) -> VirtualDisplay | None:
        """The live display with this key; None for any other string."""
        for known, display in self._displays.items():
            if secrets.compare_digest(known, key):
                return display
        return None

    def __len__(self) -> int:
        return len(self._displays)


def write_wildcard_cookie(path: Path, cookie: bytes) -> None:
    """An Xauthority file whose one MIT-MAGIC-COOKIE-1 entry fits every display.

    Xvfb picks its display number only when it starts, so the entry cannot
    name it: family 0xFFFF ("any address") with an empty display number is
    what clients match against any display. Each field is a big-endian
    16-bit length and the bytes.
    """

    def counted(data: bytes) -> bytes:
        return struct.pack(">H", len(data)) + data

    entry = struct.pack(">H", 0xFFFF) + counted(b"") + counted(b"")
    entry += counted(b"MIT-MAGIC-COOKIE-1") + counted(cookie)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(entry)


class VirtualDisplay:
    """One run's X display and VNC server; ``start`` it, then ``close`` it (owner's duty).

    ``env`` is what the program's environment gets (``DISPLAY``, ``XAUTHORITY``);
    ``vnc_socket`` is where x11vnc speaks RFB; ``key`` names it in the proxy's path.
    """

    def __init__(self, directory: Path, size: DisplaySize) -> None:
        self.directory = directory
        self.size = size
        self.key = secrets.token_urlsafe(24)
        self.number: int | None = None
        self.vnc_socket = directory / "vnc.sock"
        self._auth_file = directory / "xauthority"
        self._group: RunGroup | None = None
        self._processes: list[asyncio.subprocess.Process] = []
        self._grabber: asyncio.Task[None] | None = None
        self._last_screen: Any = None  # a PIL image, once one showed anything
        self._xwd = "xwd"
        self._x_env: dict[str, str] = {}
        self._grab_lock = asyncio.Lock()
        self._closed = False
        self.viewers = 0  # browsers connected through the proxy now

    @property
    def env(self) -> dict[str, str]:
        assert self.number is not None, "display not started"
        return {"DISPLAY": f":{self.number}", "XAUTHORITY": str(self._auth_file)}

    async def start(
        self,
        tools: GuiTools,
        base_env: Mapping[str, str],
        run_group: RunGroup | None,
        rlimits: Limits | None,
    ) -> None:
        """Start Xvfb and x11vnc; raises ``StartError`` (and leaves nothing running)."""
        xvfb, x11vnc, self._xwd = tools.resolve(base_env.get("PATH"))
        try:
            await self._start(xvfb, x11vnc, base_env, run_group, rlimits)
        except OSError as exc:
            await self.close()
            raise StartError(f"could not start the virtual display: {exc.strerror}") from None
        except BaseException:
            await self.close()
            raise

    async def _start(
        self,
        xvfb: str,
        x11vnc: str,
        base_env: Mapping[str, str],
        run_group: RunGroup | None,
        rlimits: Limits | None,
    ) -> None:
        self.directory.mkdir(mode=0o700)
        write_wildcard_cookie(self._auth_file, secrets.token_bytes(16))
        if run_group is not None:
            self._group = run_group.child(DISPLAY_DIR)
        env = {name: base_env[name] for name in ("PATH", "LANG") if name in base_env}
        env["HOME"] = str(self.directory)  # x11vnc and Xlib look there; nothing of the user's
        number_r, number_w = os.pipe()
        try:
            await self._spawn(
                [
                    xvfb,
                    "-displayfd",
                    str(number_w),
                    "-nolisten",
                    "tcp",
                    "-screen",
                    "0",
                    f"{self.size.width}x{self.size.height}x24",
                    "-auth",
                    str(self._auth_file),
                    "-br",  # black root: an empty screen is all zeros
                ],
                env,
                rlimits,
                pass_fds=(number_w,),
            )
        except BaseException:
            os.close(number_r)
            raise
        finally:
            os.close(number_w)
        self.number = await self._read_display_number(number_r)
        x_env = self._x_env = {**env, **self.env}
        await self._spawn(
            [
                x11vnc,
                "-display",
                f":{self.number}",
                "-auth",
                str(self._auth_file),
                "-unixsock",
                str(self.vnc_socket),
                "-rfbport",
                "0",
                "-rfbportv6",
                "-1",
                "-norc",
                "-forever",
                "-shared",
                "-nopw",
                "-quiet",
                "-nocmds",
                "-noremote",
            ],
            x_env,
            rlimits,
        )
        await self._wait_for_socket()
        log.info(
            "virtual display :%d (%dx%d) is up", self.number, self.size.width, self.size.height
        )
        self._grabber = asyncio.ensure_future(self._grab_while_running())

    async def _spawn(
        self,
        argv: list[str],
        env: Mapping[str, str],
        rlimits: Limits | None,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        process = await exec_in_group(
            argv,
            self._group,
            rlimits,
            "the virtual display",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            cwd=str(self.directory),
            env=dict(env),
            start_new_session=True,
            pass_fds=pass_fds,
        )
        self._processes.append(process)

    async def _read_display_number(self, fd: int) -> int:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
        )
        try:
            line = await asyncio.wait_for(reader.readline(), XVFB_TIMEOUT)
        except asyncio.TimeoutError:
            raise StartError(
                f"the virtual display (Xvfb) did not start within {XVFB_TIMEOUT:.0f} s"
            ) from None
        finally:
            transport.close()
        if not line.strip().isdigit():
            code = self._processes[0].returncode if self._processes else None
            raise StartError(
                "the virtual display (Xvfb) failed to start"
                + (f" (exit code {code})" if code is not None else "")
            )
        return int(line)

    async def _wait_for_socket(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + X11VNC_TIMEOUT
        x11vnc = self._processes[-1]
        while not self.vnc_socket.exists():
            if x11vnc.returncode is not None:
                raise StartError(
                    f"the VNC server (x11vnc) of the virtual display ended at once "
                    f"(exit code {x11vnc.returncode})"
                )
            if loop.time() >= deadline:
                raise StartError(
                    f"the VNC server (x11vnc) did not start within {X11VNC_TIMEOUT:.0f} s"
                )
            await asyncio.sleep(0.01)

    async def open_vnc(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new RFB connection to x11vnc; raises ``OSError`` when it does not answer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONNECT_TIMEOUT
        while True:
            try:
                return await asyncio.open_unix_connection(str(self.vnc_socket))
            except (ConnectionRefusedError, FileNotFoundError):
                if self._closed or loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.05)

    # ------------------------------------------------------------ the last screen

    async def _grab(self) -> Any:
        """The whole screen as a PIL RGB image, or None when xwd gave none in time."""
        with proctree.MANAGED_CHILDREN.starting():
            process = await asyncio.create_subprocess_exec(
                *(self._xwd, "-root", "-silent", "-display", f":{self.number}"),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                env=self._x_env,
            )
            proctree.MANAGED_CHILDREN.add(process.pid)
        try:
            dump, _ = await asyncio.wait_for(process.communicate(), GRAB_TIMEOUT)
        except asyncio.TimeoutError:
            log.info("display :%s gave no screen within %.0f s", self.number, GRAB_TIMEOUT)
            return None
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        if process.returncode != 0:
            return None
        return image_from_xwd(dump)

    async def capture(self) -> None:
        """Grab the screen now; keep it as the last screen when it shows anything."""
        if self.number is None or self._closed:
            return
        async with self._grab_lock:  # the periodic grab and the one before a stop
            image = await self._grab()
        if image is not None and image.getbbox() is not None:  # all black shows nothing
            self._last_screen = image

    async def _grab_while_running(self) -> None:
        while True:
            await asyncio.sleep(GRAB_INTERVAL)
            await self.capture()

    def final_frame(self) -> bytes | None:
        """The last screen that showed anything as JPEG bytes; None when nothing was drawn."""
        if self._last_screen is None:
            return None
        buffer = io.BytesIO()
        self._last_screen.convert("RGB").save(buffer, "JPEG", quality=JPEG_QUALITY)
        return buffer.getvalue()

    async def finish(self) -> bytes | None:
        """Stop grabbing and return ``final_frame()``: call once the program has ended."""
        await self._stop_grabbing()
        return await asyncio.get_running_loop().run_in_executor(None, self.final_frame)

    async def _stop_grabbing(self) -> None:
        if self._grabber is not None:
            self._grabber.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._grabber
            self._grabber = None

    # ------------------------------------------------------------------- end

    async def close(self) -> None:
        """End Xvfb and x11vnc (TERM, then KILL), remove the cgroup and files; idempotent."""
        self._closed = True
        await self._stop_grabbing()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for process in self._processes:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.send_signal(sig)
            if self._group is not None:
                if sig == signal.SIGKILL:
                    self._group.kill()
                else:
                    self._group.signal(sig)
            waits = [p.wait() for p in self._processes if p.returncode is None]
            if not waits:
                break
            timeout = TERM_GRACE if sig == signal.SIGTERM else HELPER_TIMEOUT
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(w) for w in waits], timeout=timeout
            )
            for task in pending:
                task.cancel()
            if not pending:
                break
        if self._group is not None:
            group, self._group = self._group, None
            await group.remove_async()
        shutil.rmtree(self.directory, ignore_errors=True)


async def open_display(
    run_dir: Path,
    width: int | None,
    height: int | None,
    xvfb: str,
    base_env: Mapping[str, str],
    run_group: RunGroup | None,
    rlimits: Limits | None,
) -> VirtualDisplay:
    """A started display for the run whose private directory is ``run_dir``.

    ``width``/``height`` in pixels (None: the default); ``xvfb`` is the X
    server's command (Config.xvfb); ``base_env`` the programs' environment
    (its PATH finds the tools). Raises ``StartError``.
    """
    display = VirtualDisplay(run_dir / DISPLAY_DIR, DisplaySize.choose(width, height))
    await display.start(GuiTools(xvfb=xvfb), base_env, run_group, rlimits)
    return display


def env_on_display(env: Mapping[str, str], display: VirtualDisplay) -> dict[str, str]:
    """``env`` for a program whose windows belong on ``display``, not on the desktop."""
    own = {name: value for name, value in env.items() if name != "WAYLAND_DISPLAY"}
    own.update(display.env)
    return own


def image_from_xwd(dump: bytes) -> Any:
    """A PIL RGB image from ``xwd`` output of a 24/32-bit TrueColor screen; None otherwise.

    Only what our own Xvfb (``-screen 0 WxHx24``) produces is read: a ZPixmap of
    32 bits per pixel with 8-bit red, green and blue masks.
    """
    from PIL import Image

    if len(dump) < XWD_HEADER.size:
        return None
    fields = XWD_HEADER.unpack_from(dump)
    header_size, version, pixmap_format, _depth, width, height = fields[:6]
    byte_order, bits_per_pixel, bytes_per_line = fields[7], fields[11], fields[12]
    masks, colours = fields[14:17], fields[19]
    if (
        version != XWD_VERSION
        or pixmap_format != XWD_ZPIXMAP
        or bits_per_pixel != 32
        or masks != (0xFF0000, 0x00FF00, 0x0000FF)
    ):
        return None
    offset = header_size + colours * XWD_COLOUR_BYTES
    if len(dump) < offset + bytes_per_line * height:
        return None
    # LSBFirst (0) stores 0x00RRGGBB as B, G, R, X; MSBFirst as X, R, G, B.
    raw_mode = "BGRX" if byte_order == 0 else "XRGB"
    return Image.frombuffer(
        "RGB", (width, height), dump[offset:], "raw", raw_mode, bytes_per_line, 1
    ).copy()
