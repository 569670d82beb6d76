"""The v5 ``/run`` message format (today's Further IDE), without any IO.

Client to server: ``{"type": str, "process": str, "data": {...}}``; ``process``
(a non-empty string) is required for everything but ``ping``, and ``data``
that is not an object counts as ``{}`` (as upstream). Server to client:
always the four keys ``type``, ``data``, ``client``, ``process`` in that order,
``data`` and ``process`` ``null`` when empty, formatted as ``json.dumps`` does.

Unlike upstream, every refusal names what was wrong, and an error about a
process carries that process's id. The commands and events both APIs share
are events.py's; this module only knows the v5 shapes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

from further_link.errors import ProcessMessageError, ProtocolError
from further_link.protocol.events import (
    ErrorEvent,
    Event,
    Output,
    Ping,
    Pong,
    Started,
    Stdin,
    Stop,
    Stopped,
    UseControl,
    Video,
)
from further_link.protocol.wire import (
    SIDE_EVENTS,
    check_text,
    control_value,
    json_string,
    kind_of,
    optional_str,
    output_type_and_data,
    parse_keep_alive,
    parse_run_id,
    side_event_data,
)

RUNNERS = ("python3", "exec", "shell")
COMMAND_TYPES = ("ping", "start", "stdin", "resize", "stop", "keyevent", "control", "attach")
MAX_PROCESS_ID_CHARS = 256
MAX_TERMINAL_CELLS = 65535  # a terminal's rows and columns are unsigned shorts
_TRUE_WORDS = ("1", "true")


# ---------------------------------------------------------------- options


@dataclass(frozen=True)
class RunOptions:
    """The ``/run`` query string: ``?pty=true&user=pi&client=abc``."""

    pty: bool = False
    user: str | None = None
    client: str = ""


def parse_options(query: Mapping[str, str]) -> RunOptions:
    """Query parameters of the websocket URL; anything but ``1``/``true`` means no pty."""
    user = query.get("user") or None
    return RunOptions(
        pty=query.get("pty", "").strip().lower() in _TRUE_WORDS,
        user=user,
        client=query.get("client", ""),
    )


# ---------------------------------------------------------------- commands


# The shared commands, under this module's names (events.py).
RunPing = Ping
RunStop = Stop


def RunStdin(process: str, input: str) -> Stdin:
    """The v5 ``stdin``: text for ``process``, as given (nothing is appended, no eof)."""
    return Stdin(input, process=process)


@dataclass(frozen=True)
class NovncOptions:
    """A virtual display for GUI programs (runs/gui.py); sizes in pixels, None: default."""

    enabled: bool
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class RunStart:
    """Start ``runner`` as ``process``; ``path`` is a directory when ``code`` is given."""

    process: str
    runner: str
    code: str | None = None
    path: str | None = None
    novnc: NovncOptions | None = None
    keep_alive: float | None = None  # seconds the run outlives its connection; None: default


@dataclass(frozen=True)
class RunAttach:
    """Follow the run ``run_id`` on this connection, known here as ``process``."""

    process: str
    run_id: str


@dataclass(frozen=True)
class RunResize:
    """New terminal size in character cells (pty mode only)."""

    process: str
    rows: int
    cols: int


@dataclass(frozen=True)
class RunKeyEvent:
    """A browser key event (``KeyboardEvent.key``, ``keydown``/``keyup``) for the program."""

    process: str
    key: str
    event: str


RunControl = UseControl  # the learner used one of the process's controls
RunCommand = Union[Ping, RunStart, Stdin, RunResize, Stop, RunKeyEvent, RunControl, RunAttach]


# ----------------------------------------------------------------- parsing


def parse_run_command(text: str) -> RunCommand:
    """One websocket text frame as a command.

    Raises ``ProcessMessageError`` (with the process id when the message has a
    usable one) naming the field and what was wrong.
    """
    try:
        message = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProcessMessageError(
            f"message is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
            'send an object like {"type": "start", "process": "1", "data": {...}}'
        ) from None
    except (RecursionError, ValueError):
        raise ProcessMessageError("message is nested too deeply or holds a huge number") from None
    if not isinstance(message, dict):
        raise ProcessMessageError(
            f"message must be a JSON object with a 'type', not {kind_of(message)}"
        )
    kind = message.get("type")
    if not isinstance(kind, str):
        raise ProcessMessageError(
            f"message needs a string 'type' (one of {', '.join(COMMAND_TYPES)}), "
            f"not {kind_of(kind)}"
        )
    if kind == "ping":
        return RunPing()
    process = _process_id(message.get("process"), kind)
    data = message.get("data")
    if not isinstance(data, dict):
        data = {}
    try:
        return _parse_for_process(kind, process, data)
    except ProtocolError as exc:
        raise ProcessMessageError(exc.message, process) from None


def _process_id(value: Any, kind: str) -> str:
    if not isinstance(value, str) or value == "":
        raise ProcessMessageError(
            f"a {kind} message needs 'process', a non-empty string naming the process, "
            f"not {kind_of(value) if value != '' else 'an empty string'}"
        )
    if len(value) > MAX_PROCESS_ID_CHARS:
        raise ProcessMessageError(
            f"'process' is {len(value)} characters long; the limit is {MAX_PROCESS_ID_CHARS}"
        )
    check_text(value, "'process'")
    return value


def _parse_for_process(kind: str, process: str, data: dict[str, Any]) -> RunCommand:
    if kind == "start":
        return _parse_start(process, data)
    if kind == "stdin":
        return RunStdin(process, _string(data, "input", kind))
    if kind == "resize":
        return RunResize(process, _cells(data, "rows"), _cells(data, "cols"))
    if kind == "stop":
        return RunStop(process)
    if kind == "keyevent":
        return RunKeyEvent(process, _string(data, "key", kind), _string(data, "event", kind))
    if kind == "control":
        return RunControl(_string(data, "id", kind), control_value(data, kind), process=process)
    if kind == "attach":
        return RunAttach(process, parse_run_id(data, kind))
    check_text(kind, "type")
    raise ProtocolError(
        f"unknown message type {kind!r}; expected one of {', '.join(COMMAND_TYPES)}"
    )


def _parse_start(process: str, data: dict[str, Any]) -> RunStart:
    runner = data.get("runner")
    if runner not in RUNNERS:
        shown = repr(runner) if isinstance(runner, str) else kind_of(runner)
        raise ProtocolError(f"start needs data.runner, one of {', '.join(RUNNERS)}; got {shown}")
    code = optional_str(data, "code", "start")
    path = optional_str(data, "path", "start")
    if path == "":
        raise ProtocolError("start: data.path is empty; leave it out or name a file or directory")
    if path is not None and "\0" in path:
        raise ProtocolError("start: data.path contains a NUL character")
    return RunStart(
        process,
        runner,
        code,
        path,
        _novnc(data.get("novncOptions")),
        parse_keep_alive(data, "start"),
    )


def _novnc(value: Any) -> NovncOptions | None:
    # As upstream: ignored unless `enabled` is a JSON boolean.
    if not isinstance(value, dict) or not isinstance(value.get("enabled"), bool):
        return None
    width, height = value.get("width"), value.get("height")
    return NovncOptions(
        value["enabled"],
        width if _is_int(width) else None,
        height if _is_int(height) else None,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _string(data: dict[str, Any], key: str, command: str) -> str:
    value = optional_str(data, key, command)
    if value is None:
        raise ProtocolError(f"{command} needs data.{key}, a string")
    return value


def _cells(data: dict[str, Any], key: str) -> int:
    value = data.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_TERMINAL_CELLS:
        return value
    shown = value if _is_int(value) else kind_of(value)
    raise ProtocolError(
        f"resize needs data.{key}, a whole number from 1 to {MAX_TERMINAL_CELLS}; got {shown}"
    )


# ---------------------------------------------------------------- encoding


def encode_run_event(event: Event, client: str) -> str:
    """One event as the v5 text frame: ``{"type", "data", "client", "process"}``."""
    client_json = json_string(client)
    process: str | None = getattr(event, "process", None)  # Pong has none
    process_json = "null" if process is None else json_string(process)
    if isinstance(event, (Output, Video)):
        kind, data_json = output_type_and_data(event)
    else:
        kind, data = _kind_and_data(event)
        data_json = "null" if data is None else json.dumps(data, ensure_ascii=False)
    return (
        f'{{"type": "{kind}", "data": {data_json}, '
        f'"client": {client_json}, "process": {process_json}}}'
    )


def _kind_and_data(event: Event) -> tuple[str, dict[str, Any] | None]:
    if isinstance(event, Started):
        return "started", None if event.run_id is None else {"runId": event.run_id}
    if isinstance(event, Stopped):
        return "stopped", {"exitCode": event.exit_code}
    if isinstance(event, ErrorEvent):
        return "error", {"message": event.message}
    if isinstance(event, Pong):
        return "pong", None
    if isinstance(event, SIDE_EVENTS):
        return side_event_data(event)
    raise TypeError(f"not a /run event: {event!r}")  # Uploaded belongs to /run-py
