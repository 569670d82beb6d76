"""What a program's side-channel frame means for its client, the same on both APIs.

A frame is a camera picture (``video``), a plot (``plot``), a key the program
listens to (``keylisten``) or a change to its controls (``controls``). Plots
come from an untrusted program: one that is not a PNG with a sane header is
dropped here, with a log line, rather than sent to a browser.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import struct

from further_link.channel import KIND_CONTROL, KIND_JPEG, KIND_KEYLISTEN, KIND_PLOT, PLOT_HEADER
from further_link.protocol.events import Controls, Event, KeyListen, Plot, Video
from further_link.runs.sink import EventSink, SinkClosed
from further_link.runs.streams import SideChannel

log = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Signature, then the IHDR chunk: length 13, b"IHDR", width, height (big-endian).
_IHDR = struct.Struct("!I4sII")
# Larger than any screen a learner has; a bigger "plot" is not one.
MAX_PLOT_SIDE = 16384


def frame_event(
    kind: bytes, payload: bytes, channel: SideChannel, process: str | None
) -> Event | None:
    """The event for one frame of ``channel``, or None when there is nothing to send."""
    if kind == KIND_JPEG:
        return Video(base64.b64encode(payload).decode("ascii"), process=process)
    if kind == KIND_PLOT:
        return plot_event(payload, process)
    if kind == KIND_CONTROL:
        return Controls(channel.controls.current(), process=process)
    if kind == KIND_KEYLISTEN:
        return KeyListen(payload.decode("utf-8", "replace"), process=process)
    return None


def plot_event(payload: bytes, process: str | None) -> Plot | None:
    """A ``plot`` from ``PLOT_HEADER`` + PNG; None (logged) when it is not a sane PNG."""
    png = payload[PLOT_HEADER.size :]
    if len(payload) < PLOT_HEADER.size + len(PNG_SIGNATURE) + _IHDR.size:
        log.warning("side channel: a plot too short to be a PNG was dropped")
        return None
    (figure,) = PLOT_HEADER.unpack_from(payload)
    length, chunk, width, height = _IHDR.unpack_from(png, len(PNG_SIGNATURE))
    if not png.startswith(PNG_SIGNATURE) or (length, chunk) != (13, b"IHDR"):
        log.warning("side channel: a plot that is not a PNG was dropped")
        return None
    if not (0 < width <= MAX_PLOT_SIDE and 0 < height <= MAX_PLOT_SIDE):
        log.warning("side channel: a plot of %dx%d pixels was dropped", width, height)
        return None
    return Plot(figure, base64.b64encode(png).decode("ascii"), width, height, process=process)


async def send_frame_event(sink: EventSink, event: Event | None) -> None:
    """Queue a frame's event: pictures wait for room like output, the rest go at once."""
    if isinstance(event, (Video, Plot)):
        with contextlib.suppress(SinkClosed):
            await sink.put_output(event)
    elif event is not None:
        sink.put(event)
