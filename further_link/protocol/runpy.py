"""The /run-py message format, without any IO.

Text from the websocket becomes a typed command or a ``ProtocolError`` whose
message names the field and what was wrong; typed events become text. The
shapes follow the 2020 README that existing clients already speak:
``{"type": str, "data": {...}}`` in both directions. The commands and events
both APIs share are events.py's; this module keeps the 2020 shapes of ``start``
and ``upload``.
"""

from __future__ import annotations

import binascii
import json
from base64 import b64decode
from dataclasses import dataclass, field
from typing import Any, Union

from further_link.errors import ProtocolError, excerpt
from further_link.protocol.events import Controls as Controls

# Re-exported: the events (and commands) are shared with v5 /run (events.py).
from further_link.protocol.events import ErrorEvent as ErrorEvent
from further_link.protocol.events import Event as Event
from further_link.protocol.events import KeyListen as KeyListen
from further_link.protocol.events import Novnc as Novnc
from further_link.protocol.events import Output as Output
from further_link.protocol.events import Ping, Stdin, Stop, UseControl
from further_link.protocol.events import Plot as Plot
from further_link.protocol.events import Pong as Pong
from further_link.protocol.events import Queued as Queued
from further_link.protocol.events import Started as Started
from further_link.protocol.events import Stopped as Stopped
from further_link.protocol.events import Uploaded as Uploaded
from further_link.protocol.events import Video as Video
from further_link.protocol.wire import (
    SIDE_EVENTS,
    check_text,
    control_value,
    kind_of,
    optional_str,
    output_type_and_data,
    parse_keep_alive,
    parse_run_id,
    side_event_data,
)

COMMAND_TYPES = ("start", "stop", "stdin", "upload", "ping", "control", "attach")


# ---------------------------------------------------------------- commands


@dataclass(frozen=True)
class StartCommand:
    """Run a program: either inline source or a file on the device."""

    source_script: str | None = None
    source_path: str | None = None
    directory_name: str | None = None
    keep_alive: float | None = None  # seconds the run outlives its connection; None: default


@dataclass(frozen=True)
class AttachCommand:
    """Follow the run ``run_id`` (kept output, then live, then ``stopped``) on this connection."""

    run_id: str


# The shared commands, under the names this module has always given them.
StopCommand = Stop
StdinCommand = Stdin
PingCommand = Ping
ControlCommand = UseControl


@dataclass(frozen=True)
class TextFile:
    text: str


@dataclass(frozen=True)
class UrlFile:
    url: str
    bucket_name: str
    file_name: str


@dataclass(frozen=True)
class Base64File:
    """A binary file (image, sound, spreadsheet), sent base64-encoded; ``data`` is decoded."""

    data: bytes


UploadFile = Union[TextFile, UrlFile, Base64File]


@dataclass(frozen=True)
class UploadCommand:
    """Create (or replace) ``name`` under the work dir with ``files``.

    Keys of ``files`` are the aliases: relative paths inside the directory.
    ``version``, when given, is the project's version the client last saw
    (files/projects.py): the upload is refused if the directory changed since.
    """

    name: str
    files: dict[str, UploadFile] = field(default_factory=dict)
    version: str | None = None


Command = Union[
    StartCommand,
    StopCommand,
    StdinCommand,
    PingCommand,
    UploadCommand,
    ControlCommand,
    AttachCommand,
]


# ---------------------------------------------------------------- encoding


def encode_event(event: Event) -> str:
    """Serialise an event as the JSON text frame /run-py clients expect."""
    kind: str
    data: dict[str, Any]
    if isinstance(event, (Output, Video)):
        kind, data_json = output_type_and_data(event)
        return f'{{"type": "{kind}", "data": {data_json}}}'
    if isinstance(event, Stopped):
        kind, data = "stopped", {"exitCode": event.exit_code}
        if event.signal is not None:
            data["signal"] = event.signal
    elif isinstance(event, ErrorEvent):
        kind, data = "error", {"message": event.message}
    elif isinstance(event, Started):
        kind, data = "started", {} if event.run_id is None else {"runId": event.run_id}
    elif isinstance(event, Uploaded):
        kind, data = "uploaded", {} if event.version is None else {"version": event.version}
    elif isinstance(event, Pong):
        kind, data = "pong", {}
    elif isinstance(event, SIDE_EVENTS):
        # keylisten, plot, controls and queued are not in the 2020 API, whose clients
        # ignore unknown types: as v5 names them. Only v5 starts GUI runs (novnc).
        kind, data = side_event_data(event)
    else:  # pragma: no cover - the Event union holds only the above
        raise TypeError(f"not a /run-py event: {event!r}")
    return json.dumps({"type": kind, "data": data}, ensure_ascii=False)


# ----------------------------------------------------------------- parsing


def parse_command(text: str) -> Command:
    """Turn one websocket text frame into a command, or explain why not."""
    try:
        message = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError(
            f"message is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
            'send an object like {"type": "start", "data": {...}}'
        ) from None
    except RecursionError:
        raise ProtocolError("message is nested too deeply to be a command") from None
    except ValueError:
        # Valid JSON that Python refuses to build: an integer with thousands of digits.
        raise ProtocolError("message contains a number with too many digits to read") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"message must be a JSON object with a 'type', not {kind_of(message)}")
    kind = message.get("type")
    if kind is None:
        raise ProtocolError("message has no 'type'; expected one of " + _known_types())
    if not isinstance(kind, str):
        raise ProtocolError(f"'type' must be a string, not {kind_of(kind)}")
    data = message.get("data")
    if data is None:
        data = {}
    elif not isinstance(data, dict):
        raise ProtocolError(f"'data' of a {kind} message must be an object, not {kind_of(data)}")

    if kind == "start":
        return _parse_start(data)
    if kind == "stop":
        return StopCommand()
    if kind == "stdin":
        eof = data.get("eof", False)
        if not isinstance(eof, bool):
            raise ProtocolError(f"stdin: data.eof must be true or false, not {kind_of(eof)}")
        if eof and data.get("input") is None:
            return StdinCommand(input="", eof=True)
        return StdinCommand(input=_required_str(data, "input", "stdin"), eof=eof)
    if kind == "upload":
        return _parse_upload(data)
    if kind == "ping":
        return PingCommand()
    if kind == "control":
        return ControlCommand(_required_str(data, "id", "control"), control_value(data, "control"))
    if kind == "attach":
        return AttachCommand(parse_run_id(data, "attach"))
    check_text(kind, "type")
    raise ProtocolError(f"unknown message type {excerpt(kind)}; expected one of {_known_types()}")


def _parse_start(data: dict[str, Any]) -> StartCommand:
    script = optional_str(data, "sourceScript", "start")
    path = optional_str(data, "sourcePath", "start")
    directory = optional_str(data, "directoryName", "start")
    if script is None and path is None:
        raise ProtocolError("start needs data.sourceScript or data.sourcePath")
    if script is not None and path is not None:
        raise ProtocolError("start takes data.sourceScript or data.sourcePath, not both")
    if path is not None and path == "":
        raise ProtocolError("start: data.sourcePath is empty; give the path of a .py file")
    return StartCommand(
        source_script=script,
        source_path=path,
        directory_name=directory,
        keep_alive=parse_keep_alive(data, "start"),
    )


def _parse_upload(data: dict[str, Any]) -> UploadCommand:
    directory = data.get("directory")
    if not isinstance(directory, dict):
        raise ProtocolError(
            "upload needs data.directory, an object with 'name' and 'files'"
            + ("" if directory is None else f", not {kind_of(directory)}")
        )
    name = _required_str(directory, "name", "upload", prefix="data.directory.")
    if "files" not in directory:
        raise ProtocolError(
            "upload needs data.directory.files, an object of alias -> file "
            "({} for an empty directory)"
        )
    files_in = directory["files"]
    if not isinstance(files_in, dict):
        raise ProtocolError(
            f"upload: data.directory.files must be an object of alias -> file, "
            f"not {kind_of(files_in)}"
        )
    files: dict[str, UploadFile] = {}
    for alias, spec in files_in.items():
        check_text(alias, "data.directory.files key")
        where = f"data.directory.files[{excerpt(alias)}]"
        if not isinstance(spec, dict):
            raise ProtocolError(f"upload: {where} must be an object, not {kind_of(spec)}")
        file_type = spec.get("type")
        content = spec.get("content")
        if not isinstance(content, dict):
            raise ProtocolError(
                f"upload: {where}.content must be an object, not {kind_of(content)}"
            )
        if file_type == "text":
            files[alias] = TextFile(
                text=_required_str(content, "text", "upload", prefix=f"{where}.content.")
            )
        elif file_type == "base64":
            files[alias] = Base64File(
                data=_decode_base64(
                    _required_str(content, "data", "upload", prefix=f"{where}.content."),
                    f"{where}.content.data",
                )
            )
        elif file_type == "url":
            files[alias] = UrlFile(
                url=_required_str(content, "url", "upload", prefix=f"{where}.content."),
                bucket_name=_required_str(
                    content, "bucketName", "upload", prefix=f"{where}.content."
                ),
                file_name=_required_str(content, "fileName", "upload", prefix=f"{where}.content."),
            )
        else:
            raise ProtocolError(
                f"upload: {where}.type must be 'text', 'base64' or 'url', "
                f"not {_describe(file_type)}"
            )
    version = data.get("version")
    if version is not None and not isinstance(version, str):
        raise ProtocolError(f"upload: data.version must be a string, not {kind_of(version)}")
    return UploadCommand(name=name, files=files, version=version)


def _decode_base64(text: str, where: str) -> bytes:
    try:
        return b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(
            f"upload: {where} is not valid base64 (standard alphabet, '=' padding)"
        ) from None


# ----------------------------------------------------------------- helpers


def _known_types() -> str:
    return ", ".join(COMMAND_TYPES)


def _describe(value: Any) -> str:
    return repr(value) if isinstance(value, str) else kind_of(value)


def _required_str(data: dict[str, Any], key: str, command: str, prefix: str = "data.") -> str:
    value = data.get(key)
    if value is None:
        raise ProtocolError(f"{command} needs {prefix}{key}")
    if not isinstance(value, str):
        raise ProtocolError(f"{command}: {prefix}{key} must be a string, not {kind_of(value)}")
    check_text(value, f"{command}: {prefix}{key}")
    return value
