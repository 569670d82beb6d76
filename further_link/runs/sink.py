"""Where run control sends its events: an interface, so runs know nothing of the wire.

The server's ``Outbox`` is one: it orders, bounds, coalesces and encodes. A
run holds its sink as a plain attribute, so a later owner can hand it another.
"""

from __future__ import annotations

from typing import Protocol

from further_link.protocol.events import Event, ProgramOutput


class SinkClosed(Exception):
    """Nobody is receiving any more; program output has nowhere to go."""


class EventSink(Protocol):
    def put(self, event: Event) -> None:
        """Queue a control event (``Started``, ``Stopped``, ``ErrorEvent``...); never waits."""

    async def put_output(self, event: ProgramOutput) -> None:
        """Queue program output, waiting while the receiver is behind.

        That wait is what pauses reading the program's pipes. Raises
        ``SinkClosed`` when the receiver has gone.
        """
