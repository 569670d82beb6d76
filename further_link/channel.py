"""The side channel between a user's program and the server, program side.

A run's server listens on a unix socket whose path is in ``FURTHER_LINK_IO_SOCKET``.
Each message is a frame: one kind byte, a 4-byte big-endian length, then the
payload. The server answers every frame with one ACK byte once the message is
queued for the client, which keeps frames in order with the program's prints
(see ``Program.sync_output``). Only the standard library is imported here, so
``import further_link`` stays cheap inside user programs; Pillow and numpy
are imported only when an image needs converting.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from typing import Any, Callable

SOCKET_ENV_VAR = "FURTHER_LINK_IO_SOCKET"
KIND_JPEG = b"J"  # program -> server: one JPEG frame
KIND_KEYLISTEN = b"K"  # program -> server: the program listens for this key (UTF-8)
KIND_KEY_SUBSCRIBE = b"S"  # program -> server: send key events on this connection
KIND_KEY_EVENT = b"E"  # server -> program: JSON [key, event]
KIND_PLOT = b"P"  # program -> server: PLOT_HEADER (figure number), then one PNG
KIND_CONTROL = b"U"  # program -> server: declare (or redeclare) one control, JSON
KIND_CONTROL_SUBSCRIBE = b"C"  # program -> server: send control events on this connection
KIND_CONTROL_EVENT = b"V"  # server -> program: JSON {"id": str, "value": number | null}
ACK = b"\x06"
HEADER = struct.Struct("!cI")
PLOT_HEADER = struct.Struct("!i")
JPEG_MAGIC = b"\xff\xd8"


class ChannelError(RuntimeError):
    """The program is not connected to a further-link server, or it went away."""


def encode_frame(kind: bytes, payload: bytes) -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def encode_key_event(key: str, event: str) -> bytes:
    """A key event as the server sends it: any key, the space bar included, survives."""
    return json.dumps([key, event]).encode("utf-8")


def decode_key_event(payload: bytes) -> tuple[str, str]:
    key, event = json.loads(payload.decode("utf-8"))
    return str(key), str(event)


def encode_control_event(control_id: str, value: float | None) -> bytes:
    return json.dumps({"id": control_id, "value": value}).encode("utf-8")


def decode_control_event(payload: bytes) -> tuple[str, float | None]:
    event = json.loads(payload.decode("utf-8"))
    value = event.get("value")
    # A slider's whole numbers stay ints for the program, as the page sent them.
    return str(event["id"]), value if isinstance(value, (int, float)) else None


def decode_control(payload: bytes) -> Any:
    """A control declaration as the program sent it (checked by the server, runs/controls.py)."""
    return json.loads(payload.decode("utf-8"))


def to_jpeg(image: Any, quality: int = 80) -> bytes:
    """Accept JPEG (or other image) bytes, a Pillow image, or a numpy array as OpenCV
    gives it: HxWx3 BGR, HxWx4 BGRA or HxW greyscale, uint8."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if data.startswith(JPEG_MAGIC):
            return data
        from PIL import Image

        image = Image.open(io.BytesIO(data))
    elif not hasattr(image, "save"):
        from PIL import Image

        image = Image.fromarray(_opencv_to_rgb(image))
    if image.mode != "RGB":
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _opencv_to_rgb(array: Any) -> Any:
    """OpenCV orders colour channels blue, green, red; Pillow expects red first."""
    if getattr(array, "ndim", 0) == 3 and array.shape[2] == 3:
        return array[:, :, ::-1].copy()
    if getattr(array, "ndim", 0) == 3 and array.shape[2] == 4:
        return array[:, :, [2, 1, 0, 3]]
    return array


def connect_channel() -> socket.socket:
    """A new connection to this run's side channel; raises ``ChannelError``."""
    path = os.environ.get(SOCKET_ENV_VAR)
    if not path:
        raise ChannelError(
            "send_image, KeyboardButton, button, slider and plots: this works only in a "
            "program started by further-link "
            f"({SOCKET_ENV_VAR} is not set)"
        )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise ChannelError(f"cannot reach further-link at {path}: {exc.strerror}") from None
    return sock


class _Connection:
    """One lazily opened connection per program, shared by its threads."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def send(self, kind: bytes, payload: bytes) -> None:
        with self._lock:
            if self._sock is None:
                self._sock = connect_channel()
            try:
                self._sock.sendall(encode_frame(kind, payload))
                if self._sock.recv(1) != ACK:
                    raise ChannelError("further-link closed the side channel")
            except OSError as exc:
                self._sock.close()
                self._sock = None
                raise ChannelError(f"further-link side channel failed: {exc}") from None


_connection = _Connection()


def open_subscription(kind: bytes) -> socket.socket:
    """A new connection on which the server sends this program events (``kind``:
    ``KIND_KEY_SUBSCRIBE`` or ``KIND_CONTROL_SUBSCRIBE``); raises ``ChannelError``."""
    sock = connect_channel()
    try:
        sock.sendall(encode_frame(kind, b""))
        if sock.recv(1) != ACK:
            raise ChannelError("further-link closed the side channel")
    except OSError as exc:
        sock.close()
        raise ChannelError(f"further-link side channel failed: {exc}") from None
    except ChannelError:
        sock.close()
        raise
    return sock


def receive_events(sock: socket.socket, kind: bytes) -> Iterator[bytes]:
    """The payloads of the server's ``kind`` frames on ``sock``, until the run ends."""
    reader = sock.makefile("rb")
    while True:
        header = reader.read(HEADER.size)
        if len(header) < HEADER.size:
            return  # the run is ending
        got, length = HEADER.unpack(header)
        payload = reader.read(length)
        if got != kind or len(payload) < length:
            return
        yield payload


class Subscription:
    """Events of one kind from the server, read by one daemon thread per program.

    ``start`` connects once, before the program tells the server what it
    listens to, so that no event can be missed; each event's payload goes to
    ``handle`` in that thread. ``what`` names the feature in warnings
    (``"keyboard is"``, ``"controls are"``).
    """

    def __init__(
        self, subscribe_kind: bytes, event_kind: bytes, what: str, handle: Callable[[bytes], None]
    ) -> None:
        self._subscribe_kind = subscribe_kind
        self._event_kind = event_kind
        self._what = what
        self._handle = handle
        self._lock = threading.Lock()
        self._started = False
        self._available = True

    def start(self) -> bool:
        """Connect and start the thread, once; False (with a warning) outside further-link."""
        with self._lock:
            if self._started or not self._available:
                return self._available
            try:
                sock = open_subscription(self._subscribe_kind)
            except ChannelError as exc:
                self._available = False
                self.warn(exc)
                return False
            self._started = True
        name = f"further_link {self._what.split()[0]}"
        threading.Thread(target=self._serve, args=(sock,), name=name, daemon=True).start()
        return True

    def announce(self, kind: bytes, payload: bytes) -> None:
        """Tell the server (and so the client) what the program listens to."""
        try:
            _connection.send(kind, payload)
        except ChannelError as exc:
            self.warn(exc)

    def warn(self, exc: ChannelError) -> None:
        print(f"Warning: further_link {self._what} not available: {exc}", file=sys.stderr)

    def _serve(self, sock: socket.socket) -> None:
        for payload in receive_events(sock, self._event_kind):
            self._handle(payload)


def send_image(image: Any, quality: int = 80) -> None:
    """Show ``image`` in the client as a ``video`` frame.

    Output printed before this call reaches the client first; the call
    returns once the frame is queued, so later prints arrive after it.
    """
    import sys

    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    _connection.send(KIND_JPEG, to_jpeg(image, quality))
