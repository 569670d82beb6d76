"""``further-link run`` and ``further-link pair``: a terminal for a device.

``run`` uploads a project directory (optional), starts a file on the device,
writes the program's output here as it arrives, forwards this terminal's input
line by line, stops the program on Ctrl-C (a second Ctrl-C leaves at once) and
exits with the program's exit code. ``pair`` trades the code the device shows
for its token and remembers it.

Trust: over TLS the device's certificate is pinned on first use (hosts.py) and
checked before anything, the token included, is sent; the token travels in an
``Authorization`` header, never in a URL.

A network blip does not end the run: ``start`` asks the device to keep the
program for ``KEEP_ALIVE`` seconds without a connection, and ``run`` reconnects
and attaches to it again, showing only output it has not shown yet.

Exit codes of ``run``: the program's own; 128+N when signal N ended it (143
after Ctrl-C); 130 when a second Ctrl-C left without waiting; 255, like ssh,
when further-link itself could not run the program (connection, pairing,
certificate, upload or start refused).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import codecs
import concurrent.futures
import contextlib
import json
import os
import re
import select
import signal
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import aiohttp

from further_link.client.hosts import (
    HostStore,
    certificate_fingerprint,
    fingerprint_bytes,
    host_key,
)
from further_link.config import DEFAULT_PORT, resolve_config_dir
from further_link.errors import ClientError, ConnectionLost

MiB = 1024 * 1024
EXIT_FAILED = 255
EXIT_INTERRUPTED = 128 + signal.SIGINT
PAIR_FAILED = 1
CONNECT_TIMEOUT = 15.0
# The device pings a silent client after 5 s; this notices a device that vanished.
HEARTBEAT = 30.0
# Seconds a second Ctrl-C waits for the websocket to close politely.
LEAVE_GRACE = 1.0
MAX_RECEIVED_MESSAGE = 64 * MiB
INPUT_CHUNK = 64 * 1024
# Guards against uploading a home directory by mistake; the device has its own caps.
MAX_PROJECT_FILES = 10_000
MAX_PROJECT_BYTES = 256 * MiB
# Seconds the device keeps a program whose connection broke; `run` reconnects within them.
KEEP_ALIVE = 60.0
RECONNECT_INTERVAL = 1.0
# What the device says in place of output it did not keep for an attach (runs/kept.py).
NOT_KEPT = re.compile("\\A\u2026 (\\d+) bytes not kept \u2026\n")
# Close codes that mean the connection broke rather than the device ending it.
BROKEN_CLOSE_CODES = (None, aiohttp.WSCloseCode.ABNORMAL_CLOSURE)

TlsOption = Union[bool, aiohttp.Fingerprint]


@dataclass(frozen=True)
class Device:
    host: str
    port: int
    tls: bool

    @property
    def key(self) -> str:
        return host_key(self.host, self.port)

    def url(self, path: str, websocket: bool = False) -> str:
        scheme = "https" if self.tls else "http"
        if websocket:
            scheme = scheme.replace("http", "ws")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}{path}"

    def pair_command(self) -> str:
        flags = "" if self.port == DEFAULT_PORT else f" --port {self.port}"
        flags += "" if self.tls else " --no-ssl"
        return f"further-link pair {self.host}{flags} CODE"


# ------------------------------------------------------------------ terminal


def write_all(fd: int, data: bytes) -> None:
    """Write every byte now, even to a descriptor someone else made non-blocking."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[written:]


class Terminal:
    """Where output goes and input comes from: file descriptors, unbuffered."""

    def __init__(self, stdin_fd: int | None = 0, stdout_fd: int = 1, stderr_fd: int = 2) -> None:
        self.stdin_fd = stdin_fd
        self.fds = {"stdout": stdout_fd, "stderr": stderr_fd}

    def write(self, stream: str, text: str) -> None:
        write_all(self.fds[stream], text.encode("utf-8"))

    def say(self, message: str) -> None:
        """A message from further-link itself, on stderr."""
        with contextlib.suppress(BrokenPipeError):
            self.write("stderr", f"further-link: {message}\n")


class InputReader:
    """Reads a file descriptor in a daemon thread and hands its lines to the event loop.

    A thread, because a tty cannot be read without blocking unless it is made
    non-blocking, which would change the terminal for every program sharing
    it; a daemon thread stuck in ``read`` never keeps the client from exiting.
    ``os.read``, not ``sys.stdin``, whose lock would trip interpreter shutdown.
    """

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        self._fd = fd
        self._loop = loop
        self._lines: asyncio.Queue[str | None] = asyncio.Queue(maxsize=8)

    def start(self) -> None:
        threading.Thread(target=self._read, name="further-link-stdin", daemon=True).start()

    async def next_line(self) -> str | None:
        """The next line (with its newline, except a last one), or ``None`` at end of input."""
        return await self._lines.get()

    def _read(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        while True:
            try:
                chunk = os.read(self._fd, INPUT_CHUNK)
            except OSError:
                chunk = b""
            pending += decoder.decode(chunk, final=not chunk)
            cut = pending.rfind("\n") + 1
            lines: list[str | None] = [line + "\n" for line in pending[:cut].split("\n")[:-1]]
            pending = pending[cut:]
            if len(pending) >= INPUT_CHUNK:
                lines.append(pending)  # a very long line goes in pieces
                pending = ""
            if not chunk:
                lines += [pending] if pending else []
                lines.append(None)  # end of input: the program's stdin is closed too
            for line in lines:
                if not self._hand_over(line):
                    return
            if not chunk:
                return

    def _hand_over(self, line: str | None) -> bool:
        """Queue ``line`` on the loop, waiting for room; False once the loop is gone."""
        try:
            asyncio.run_coroutine_threadsafe(self._lines.put(line), self._loop).result()
        except (RuntimeError, concurrent.futures.CancelledError):
            return False
        return True


# --------------------------------------------------------------------- trust


async def read_certificate_fingerprint(device: Device) -> str:
    """The device's certificate fingerprint, fetched without trusting or sending anything."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(device.host, device.port, ssl=context), CONNECT_TIMEOUT
        )
    except (OSError, asyncio.TimeoutError) as exc:
        raise ClientError(describe_connect_failure(device, exc)) from None
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    finally:
        writer.transport.abort()
    if not der:
        raise ClientError(f"{device.key} sent no certificate")
    return certificate_fingerprint(der)


def check_pin(
    store: HostStore, device: Device, seen: str, trust_new: bool, say: Callable[[str], None]
) -> None:
    """Pin ``seen`` on first use; refuse a different one unless told to trust it."""
    pinned = store.get(device.key).fingerprint
    if pinned == seen:
        return
    if pinned is None:
        store.pin(device.key, seen)
        say(
            f"pinned the certificate of {device.key} on first use (SHA-256 {seen}); "
            "a different certificate will be refused"
        )
        return
    if not trust_new:
        raise ClientError(certificate_changed(device, pinned, seen))
    store.pin(device.key, seen)
    say(f"now trusting the NEW certificate of {device.key} (SHA-256 {seen}) instead of {pinned}")


def certificate_changed(device: Device, pinned: str, seen: str) -> str:
    return (
        f"WARNING: the certificate of {device.key} has CHANGED since it was pinned, "
        "and nothing was sent to it.\n"
        f"  pinned: {pinned}\n"
        f"  now:    {seen}\n"
        "Either the device made a new certificate (it was reinstalled, or its config dir "
        "was reset), or someone is intercepting the connection. To check, run on the device:\n"
        "  openssl x509 -noout -fingerprint -sha256 -in ~/.config/further-link/cert.pem\n"
        "(in the server's config dir: /root/.config/further-link when it runs as a service).\n"
        'If it shows the "now" fingerprint, run again with --trust-new-certificate.'
    )


async def trust_device(
    device: Device, store: HostStore, trust_new: bool, say: Callable[[str], None]
) -> TlsOption:
    """What to pass aiohttp as ``ssl=``: the pinned fingerprint, checked before any request."""
    if not device.tls:
        return True  # plain http://; aiohttp ignores it
    seen = await read_certificate_fingerprint(device)
    check_pin(store, device, seen, trust_new, say)
    return aiohttp.Fingerprint(fingerprint_bytes(seen))


# -------------------------------------------------------------- refusals


def describe_connect_failure(device: Device, exc: BaseException) -> str:
    """One line saying why the device could not be reached, and what to try."""
    where = device.key
    if isinstance(exc, aiohttp.ServerFingerprintMismatch):
        return f"the certificate of {where} changed while connecting; run again to see it"
    if isinstance(exc, aiohttp.ClientConnectorError) and not isinstance(
        exc, aiohttp.ClientSSLError
    ):
        exc = exc.os_error
    if isinstance(exc, (ssl.SSLError, aiohttp.ClientSSLError)):
        hint = "; if the device serves plain HTTP (--no-ssl), add --no-ssl" if device.tls else ""
        return f"TLS with {where} failed ({getattr(exc, 'reason', None) or exc}){hint}"
    if isinstance(exc, ConnectionRefusedError):
        return (
            f"cannot connect to {where}: connection refused; "
            f"is further-link running there, on port {device.port}?"
        )
    if isinstance(exc, socket.gaierror):
        return f"cannot find the device {device.host!r}: {exc.strerror}"
    if isinstance(exc, asyncio.TimeoutError):
        return f"{where} did not answer within {CONNECT_TIMEOUT:.0f} s"
    if isinstance(exc, (aiohttp.ServerDisconnectedError, ConnectionResetError)):
        hint = "" if device.tls else "; if the device serves TLS, leave out --no-ssl"
        return f"{where} closed the connection{hint}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot connect to {where}: {exc.strerror}"
    return f"cannot connect to {where}: {exc}"


def describe_refusal(device: Device, status: int, token_from: str | None) -> str:
    """Why the websocket upgrade was answered ``status`` instead of 101."""
    if status == 401:
        pair = (
            f"run {device.pair_command()} with the pairing code the device shows "
            "(`further-link token` prints it there)"
        )
        if token_from is None:
            return f"not paired with {device.key}: {pair}"
        return f"not paired: {device.key} refused the {token_from} token; {pair}"
    if status == 403:
        return f"{device.key} refused this client (HTTP 403: its origin is not allowed)"
    if status == 404:
        return f"{device.key} has no /run-py: is it a further-link device?"
    return f"{device.key} refused the connection (HTTP {status})"


def describe_close(device: Device, code: int | None) -> str:
    if code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG:
        return (
            f"{device.key} closed the connection: a message was larger than it accepts "
            "(FURTHER_LINK_MAX_MESSAGE_BYTES there); upload fewer or smaller files"
        )
    if code == aiohttp.WSCloseCode.GOING_AWAY:
        return f"further-link on {device.key} is shutting down; the program was ended"
    return f"the connection to {device.key} closed before the program ended (code {code})"


def exit_status(exit_code: int) -> int:
    """A shell's view of the program's end: negative codes are signals."""
    return 128 - exit_code if exit_code < 0 else exit_code


# ------------------------------------------------------------------ upload


@dataclass(frozen=True)
class Project:
    """A directory to upload: its name on the device and its files by alias.

    Text files are ``str``; binary ones (images, sounds) ``bytes``, sent as base64.
    """

    name: str
    files: dict[str, str | bytes]

    def upload_message(self) -> dict[str, Any]:
        files = {alias: _upload_entry(content) for alias, content in self.files.items()}
        return {"type": "upload", "data": {"directory": {"name": self.name, "files": files}}}


def _upload_entry(content: str | bytes) -> dict[str, Any]:
    if isinstance(content, str):
        return {"type": "text", "content": {"text": content}}
    return {"type": "base64", "content": {"data": base64.b64encode(content).decode("ascii")}}


def _left_out(name: str) -> bool:
    """Hidden entries (.git, .DS_Store ...) and Python's caches are not the project."""
    return name == "__pycache__" or name.startswith(".")


def _as_text(data: bytes) -> str | None:
    """The file's text, or None for a binary file (not UTF-8, or holding NUL bytes)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\0" in text else text


def read_project(directory: Path) -> Project:
    """Every file under ``directory``, by its path relative to it with '/'."""
    root = directory.resolve()
    if not root.is_dir():
        raise ClientError(f"--files {directory}: not a directory")
    if not root.name:
        raise ClientError(f"--files {directory}: give a project directory, not /")
    files: dict[str, str | bytes] = {}
    special: list[str] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _left_out(d))
        for name in sorted(f for f in filenames if not _left_out(f)):
            path = Path(dirpath, name)
            alias = path.relative_to(root).as_posix()
            try:
                if not stat.S_ISREG(path.stat().st_mode):
                    special.append(alias)
                    continue
                data = path.read_bytes()
            except OSError as exc:
                raise ClientError(f"cannot read {path}: {exc.strerror}") from None
            total += len(data)
            if len(files) >= MAX_PROJECT_FILES or total > MAX_PROJECT_BYTES:
                raise ClientError(
                    f"--files {directory} holds more than {MAX_PROJECT_FILES} files or "
                    f"{MAX_PROJECT_BYTES // MiB} MiB: is it the right directory?"
                )
            text = _as_text(data)
            files[alias] = data if text is None else text
    if special:
        raise ClientError(_unsendable(directory, special))
    return Project(root.name, files)


def _unsendable(directory: Path, special: list[str]) -> str:
    more = f" and {len(special) - 10} more" if len(special) > 10 else ""
    listed = ", ".join(special[:10]) + more
    return (
        f"cannot upload {directory}: entries that are not regular files: {listed}; "
        "move them out of the directory"
    )


# --------------------------------------------------------------------- run


class Interrupts:
    """Ctrl-C: the first asks the program to stop, the second leaves at once."""

    def __init__(self, leave: Callable[[], None]) -> None:
        self.count = 0
        self.leave = leave
        self.on_first: Callable[[], None] | None = None

    def __call__(self) -> None:
        self.count += 1
        if self.count == 1 and self.on_first is not None:
            self.on_first()
        else:
            self.leave()


class RunSession:
    """One program on one websocket: upload, start, stream, forward input, stop."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, terminal: Terminal, device: Device):
        self._ws = ws
        self._terminal = terminal
        self._device = device
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop_sent = False
        self._stdout_open = True
        self._told_about_video = False
        self.run_id: str | None = None  # from `started`: what to attach to after a blip
        self._shown_bytes = 0  # of the program's output (both streams), in UTF-8
        self._repeated_bytes: int | None = 0  # of output to come that was shown already

    async def run(self, script: str, project: Project | None, interrupts: Interrupts) -> int:
        """Upload, start and follow the program; raises ``ConnectionLost`` on a blip."""
        if project is not None:
            await self._send(project.upload_message())
            await expect_message(self._ws, self._device, "uploaded")
        start: dict[str, Any] = {"sourceScript": script, "keepAlive": KEEP_ALIVE}
        if project is not None:
            start["directoryName"] = project.name
        await self._send({"type": "start", "data": start})
        started = await expect_message(self._ws, self._device, "started")
        run_id = (started.get("data") or {}).get("runId")
        self.run_id = run_id if isinstance(run_id, str) else None
        interrupts.on_first = self.request_stop
        if self._terminal.stdin_fd is not None:
            reader = InputReader(self._terminal.stdin_fd, asyncio.get_running_loop())
            reader.start()
            self._spawn(self._forward_input(reader))
        return await self._show_output()

    async def resume(self, ws: aiohttp.ClientWebSocketResponse) -> int:
        """Attach to the run again on a new connection and follow it to its end.

        The device replays the output it kept; what was shown already is skipped.
        """
        assert self.run_id is not None
        self._ws = ws
        self._repeated_bytes = None  # the first output says how much was not kept
        await self._send({"type": "attach", "data": {"runId": self.run_id}})
        if self._stop_sent:
            await self._send({"type": "stop"})
        return await self._show_output()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def request_stop(self, announce: bool = True) -> None:
        if self._stop_sent:
            return
        self._stop_sent = True
        if announce:
            self._terminal.say("stopping the program (Ctrl-C again to leave at once)")
        self._spawn(self._send({"type": "stop"}))

    async def _show_output(self) -> int:
        while True:
            message = await receive_message(self._ws, self._device)
            kind, data = message["type"], message.get("data") or {}
            if kind in ("stdout", "stderr"):
                self._write(kind, self._not_yet_shown(kind, str(data.get("output", ""))))
            elif kind == "stopped":
                return exit_status(int(data["exitCode"]))
            elif kind == "error" and self._repeated_bytes is None:
                # Refused the attach (the run ended and was forgotten, or the device restarted).
                raise ClientError(str(data.get("message")))
            elif kind == "error":
                self._terminal.say(str(data.get("message")))
            elif kind == "queued" and "resource" in data:
                self._terminal.say(
                    f"the program waits for {data['resource']!r}, which another program holds "
                    f"(number {data.get('position')} in the queue)"
                )
            elif kind == "video" and not self._told_about_video:
                self._told_about_video = True
                self._terminal.say("the program sends images, which only a browser can show")

    def _not_yet_shown(self, stream: str, text: str) -> str:
        """``text`` without what an attach replayed that this terminal showed before the blip."""
        if self._repeated_bytes is None:
            match = NOT_KEPT.match(text) if stream == "stdout" else None
            not_kept = int(match.group(1)) if match else 0
            text = text[match.end() :] if match else text
            self._repeated_bytes = self._shown_bytes - not_kept
            if self._repeated_bytes < 0:
                self._terminal.say(f"{-self._repeated_bytes} bytes of output were lost in the blip")
                self._shown_bytes = not_kept
                self._repeated_bytes = 0
        data = text.encode("utf-8", "surrogatepass")
        skip = min(self._repeated_bytes, len(data))
        self._repeated_bytes -= skip
        self._shown_bytes += len(data) - skip
        return data[skip:].decode("utf-8", "surrogatepass") if skip else text

    def _write(self, stream: str, text: str) -> None:
        if not text:
            return
        if stream == "stdout" and not self._stdout_open:
            return
        try:
            self._terminal.write(stream, text)
        except BrokenPipeError:
            # Whoever read our output is gone (`| head`): the program need not go on.
            if stream == "stdout":
                self._stdout_open = False
            self.request_stop(announce=False)

    async def _forward_input(self, reader: InputReader) -> None:
        while True:
            line = await reader.next_line()
            if line is None:
                await self._send({"type": "stdin", "data": {"input": "", "eof": True}})
                return
            await self._send({"type": "stdin", "data": {"input": line}})

    async def _send(self, message: dict[str, Any]) -> None:
        # A closed connection is reported by the receive loop.
        with contextlib.suppress(ConnectionError):
            await self._ws.send_str(json.dumps(message))

    def _spawn(self, coroutine: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


@dataclass(frozen=True)
class RunRequest:
    device: Device
    script: str
    project: Project | None
    token: str | None
    token_from: str | None  # "given" or "stored", for messages
    trust_new: bool


async def run_remote(request: RunRequest, store: HostStore, terminal: Terminal) -> int:
    """Run the program; Ctrl-C stops it, a second Ctrl-C leaves without waiting."""
    loop = asyncio.get_running_loop()
    leave = asyncio.Event()
    interrupts = Interrupts(leave.set)
    loop.add_signal_handler(signal.SIGINT, interrupts)
    work = asyncio.ensure_future(_connect_and_run(request, store, terminal, interrupts))
    leaving = asyncio.ensure_future(leave.wait())
    try:
        await asyncio.wait({work, leaving}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        # Closing the websocket ends the program on the device; don't wait long for it.
        for _ in range(2):
            work.cancel()
            done, _ = await asyncio.wait({work}, timeout=LEAVE_GRACE)
            if done:
                break
        return EXIT_INTERRUPTED
    finally:
        leaving.cancel()
        loop.remove_signal_handler(signal.SIGINT)


async def _connect_and_run(
    request: RunRequest, store: HostStore, terminal: Terminal, interrupts: Interrupts
) -> int:
    """Run the program; after a blip, reconnect and attach until ``KEEP_ALIVE`` runs out."""
    device = request.device
    tls = await trust_device(device, store, request.trust_new, terminal.say)
    session: RunSession | None = None
    give_up_at: float | None = None
    async with aiohttp.ClientSession() as http:
        try:
            while True:
                try:
                    ws = await open_run_py(http, device, request.token, request.token_from, tls)
                except ConnectionLost:
                    if give_up_at is None or time.monotonic() >= give_up_at:
                        raise
                    await asyncio.sleep(RECONNECT_INTERVAL)
                    continue
                try:  # not ``async with ws``: aiohttp 3.8 (Debian 12) lacks it
                    if session is None:
                        session = RunSession(ws, terminal, device)
                        return await session.run(request.script, request.project, interrupts)
                    terminal.say(f"reconnected to {device.key}; following the program again")
                    return await session.resume(ws)
                except ConnectionLost as exc:
                    if session is None or session.run_id is None:
                        raise
                    if give_up_at is None:
                        give_up_at = time.monotonic() + KEEP_ALIVE
                    terminal.say(f"{exc.message}; reconnecting (for up to {KEEP_ALIVE:.0f} s)")
                finally:
                    await ws.close()
        finally:
            if session is not None:
                await session.close()


# --------------------------------------------------------------- websocket


async def open_run_py(
    http: aiohttp.ClientSession,
    device: Device,
    token: str | None,
    token_from: str | None,
    tls: TlsOption,
    timeout: float | None = None,
) -> aiohttp.ClientWebSocketResponse:
    """The /run-py websocket, sending ``token`` (``token_from``: "given" or "stored", for
    messages) and checking the pinned certificate ``tls``; ``timeout`` in seconds, None: none.

    Raises ``ClientError`` when the device refuses the upgrade (not paired, origin,
    no /run-py), ``ConnectionLost`` when it cannot be reached.
    """
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    connecting = http.ws_connect(
        device.url("/run-py", websocket=True),
        headers=headers,
        ssl=tls,
        heartbeat=HEARTBEAT,
        max_msg_size=MAX_RECEIVED_MESSAGE,
    )
    try:
        return await asyncio.wait_for(connecting, timeout)
    except aiohttp.WSServerHandshakeError as exc:
        raise ClientError(describe_refusal(device, exc.status, token_from)) from None
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        raise ConnectionLost(describe_connect_failure(device, exc)) from None


async def receive_message(ws: aiohttp.ClientWebSocketResponse, device: Device) -> dict[str, Any]:
    """The device's next message, a JSON object with a string ``type``.

    Raises ``ClientError`` for anything else or when the device closed the
    connection, ``ConnectionLost`` when the connection broke.
    """
    while True:
        message = await ws.receive()
        if message.type is aiohttp.WSMsgType.TEXT:
            try:
                decoded = json.loads(message.data)
            except json.JSONDecodeError:
                decoded = None
            if not isinstance(decoded, dict) or not isinstance(decoded.get("type"), str):
                raise ClientError(f"{device.key} sent something that is not a message")
            return decoded
        if message.type in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSING,
            aiohttp.WSMsgType.CLOSED,
            aiohttp.WSMsgType.ERROR,
        ):
            code = ws.close_code
            broken = message.type is aiohttp.WSMsgType.ERROR or code in BROKEN_CLOSE_CODES
            error = ConnectionLost if broken else ClientError
            raise error(describe_close(device, code))


async def expect_message(
    ws: aiohttp.ClientWebSocketResponse, device: Device, kind: str
) -> dict[str, Any]:
    """The next message of type ``kind``, skipping others; the device's ``error`` instead
    raises ``ClientError`` with its message (as do the failures of ``receive_message``)."""
    while True:
        message = await receive_message(ws, device)
        if message["type"] == kind:
            return message
        if message["type"] == "error":
            raise ClientError(str((message.get("data") or {}).get("message")))


# -------------------------------------------------------------------- pair


async def pair_with(
    device: Device, code: str, store: HostStore, trust_new: bool, say: Callable[[str], None]
) -> None:
    """Trade the pairing code for the device token and store it."""
    tls = await trust_device(device, store, trust_new, say)
    timeout = aiohttp.ClientTimeout(total=60, sock_connect=CONNECT_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        try:
            async with http.post(device.url("/pair"), json={"code": code}, ssl=tls) as response:
                status, text = response.status, await response.text()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise ClientError(describe_connect_failure(device, exc)) from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        body = None
    body = body if isinstance(body, dict) else {}
    token = body.get("token")
    if status == 200 and isinstance(token, str) and token:
        store.save_token(device.key, token)
        return
    error = body.get("error")
    reason = error if isinstance(error, str) else f"HTTP {status}: {text.strip()[:200]}"
    raise ClientError(f"pairing with {device.key} failed: {reason}")


# ---------------------------------------------------------------- commands


def add_client_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``run`` and ``pair`` with the ``further-link`` command."""
    run = commands.add_parser(
        "run",
        help="run a Python file on a device, here in this terminal",
        description="Run FILE on a further-link device; its output and input are this "
        "terminal's. Ctrl-C stops it; exits with its exit code (255 if it could not run).",
    )
    run.add_argument("file", metavar="FILE", help="the Python file to run")
    run.add_argument("--token", help="the device token (default: the one `pair` stored)")
    run.add_argument(
        "--files",
        metavar="DIR",
        help="upload DIR's files first (binary ones as base64), as a directory of the same name, "
        "and run FILE in it (hidden files and folders and __pycache__ are left out)",
    )
    _add_device_flags(run, with_host=True)
    run.set_defaults(handler=_run_command)

    pair = commands.add_parser(
        "pair",
        help="pair with a device using the code it shows",
        description="Pair with a further-link device: CODE is the 9-digit pairing code "
        "it logs (or `further-link token` prints there). The token is kept for `run`.",
    )
    pair.add_argument("host", metavar="HOST", help="the device's name or address")
    pair.add_argument("code", metavar="CODE", help="the pairing code the device shows")
    _add_device_flags(pair, with_host=False)
    pair.set_defaults(handler=_pair_command)


def _add_device_flags(parser: argparse.ArgumentParser, with_host: bool) -> None:
    if with_host:
        parser.add_argument("--host", default="localhost", help="the device (default localhost)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"its port (default {DEFAULT_PORT})"
    )
    parser.add_argument("--no-ssl", action="store_true", help="the device serves plain HTTP")
    parser.add_argument(
        "--trust-new-certificate",
        action="store_true",
        help="accept and pin the device's certificate when it changed",
    )
    parser.add_argument(
        "--config-dir",
        help="where tokens and pinned certificates are kept (default ~/.config/further-link)",
    )


def _run_command(args: argparse.Namespace) -> int:
    terminal = Terminal(stdin_fd=_readable_stdin())
    try:
        store = HostStore(resolve_config_dir(os.environ, args.config_dir))
        device = Device(args.host, args.port, not args.no_ssl)
        token, token_from = args.token, "given" if args.token else None
        if token is None:
            token = store.get(device.key).token
            token_from = "stored" if token else None
        request = RunRequest(
            device=device,
            script=_read_script(Path(args.file)),
            project=read_project(Path(args.files)) if args.files else None,
            token=token,
            token_from=token_from,
            trust_new=args.trust_new_certificate,
        )
        return asyncio.run(run_remote(request, store, terminal))
    except ClientError as exc:
        terminal.say(exc.message)
        return EXIT_FAILED
    except KeyboardInterrupt:  # before the Ctrl-C handler was in place
        return EXIT_INTERRUPTED


def _pair_command(args: argparse.Namespace) -> int:
    terminal = Terminal(stdin_fd=None)
    store = HostStore(resolve_config_dir(os.environ, args.config_dir))
    device = Device(args.host, args.port, not args.no_ssl)
    try:
        asyncio.run(
            pair_with(device, args.code.strip(), store, args.trust_new_certificate, terminal.say)
        )
    except ClientError as exc:
        terminal.say(exc.message)
        return PAIR_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    host_flag = "" if device.host == "localhost" else f" --host {device.host}"
    port_flag = "" if device.port == DEFAULT_PORT else f" --port {device.port}"
    ssl_flag = "" if device.tls else " --no-ssl"
    print(f"paired with {device.key}; its token is stored in {store.path}")
    print(f"run programs there with: further-link run FILE{host_flag}{port_flag}{ssl_flag}")
    return 0


def _read_script(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ClientError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ClientError(f"{path} is not UTF-8 text") from None


def _readable_stdin() -> int | None:
    """Descriptor 0 when it is open for reading (it may be closed, e.g. under some daemons)."""
    try:
        os.fstat(0)
    except OSError:
        return None
    return 0
