"""The commands and events both wire APIs share, as small frozen dataclasses.

``runpy.py`` (the 2020 ``/run-py``) and ``run.py`` (the v5 ``/run``) parse
their text into these and encode these into their text; run control
(``further_link.runs``) takes the commands and emits the events without
knowing either format. ``process`` is the v5 process id a message concerns;
``None`` on ``/run-py``, which has one program per connection.

Nothing here reads or writes JSON: that is each API module's own business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

# ---------------------------------------------------------------- commands


@dataclass(frozen=True)
class Ping:
    """Liveness check from the client; answered with ``Pong``."""


@dataclass(frozen=True)
class Stop:
    """End the program (and everything it started): TERM, then KILL after the grace time."""

    process: str | None = None


@dataclass(frozen=True)
class Stdin:
    """Text for the program's input, as given; ``eof`` then closes it, as Ctrl-D would."""

    input: str
    eof: bool = False
    process: str | None = None


@dataclass(frozen=True)
class UseControl:
    """The learner used a control the program declared: a button (``value`` None) or a slider."""

    control_id: str
    value: float | None = None
    process: str | None = None


# ------------------------------------------------------------------ events


@dataclass(frozen=True)
class Started:
    process: str | None = None
    run_id: str | None = None  # names the run device-wide: for attach and GET /runs


@dataclass(frozen=True)
class Stopped:
    exit_code: int
    signal: int | None = None  # the signal that actually ended the program, if one did
    process: str | None = None


@dataclass(frozen=True)
class Output:
    """Text the program wrote; ``stream`` is ``stdout`` or ``stderr``."""

    stream: str
    output: str
    process: str | None = None


@dataclass(frozen=True)
class Video:
    """One JPEG frame, base64-encoded, sent by ``further_link.send_image``."""

    output: str
    process: str | None = None


@dataclass(frozen=True)
class KeyListen:
    """The program wants browser key events for ``key`` (``KeyboardButton(key)``)."""

    key: str
    process: str | None = None


@dataclass(frozen=True)
class Plot:
    """One matplotlib figure the program showed: a base64 PNG of ``width`` x ``height``
    pixels; a later plot with the same ``figure`` number replaces it."""

    figure: int
    png: str
    width: int
    height: int
    process: str | None = None


@dataclass(frozen=True)
class Control:
    """One control a program declared (``further_link.button`` / ``slider``).

    ``kind`` is ``button`` or ``slider``; only sliders have the numbers.
    """

    control_id: str
    kind: str
    label: str
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    value: float | None = None


@dataclass(frozen=True)
class Controls:
    """The whole current set of a run's controls (sent again whenever it changes)."""

    controls: tuple[Control, ...]
    process: str | None = None


@dataclass(frozen=True)
class Novnc:
    """The run's own display: a websocket speaking RFB at ``path`` on ``port`` (runs/gui.py)."""

    port: int
    path: str
    process: str | None = None


@dataclass(frozen=True)
class Queued:
    """A run waits: for a claimed ``resource`` held by run ``held_by``, or (exclusive
    mode, ``resource`` None) for its turn to start. ``position`` 1 is next."""

    position: int
    resource: str | None = None
    held_by: str | None = None
    process: str | None = None


@dataclass(frozen=True)
class Uploaded:
    version: str | None = None  # the directory's new version (files/projects.py)


@dataclass(frozen=True)
class Pong:
    pass


@dataclass(frozen=True)
class ErrorEvent:
    """A refusal or failure, in words the person at the browser can act on."""

    message: str
    process: str | None = None


ProgramOutput = Union[Output, Video, Plot]
Event = Union[
    Started,
    Stopped,
    Output,
    Video,
    KeyListen,
    Plot,
    Controls,
    Novnc,
    Queued,
    Uploaded,
    Pong,
    ErrorEvent,
]
