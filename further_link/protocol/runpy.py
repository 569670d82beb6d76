"""The /run-py message format, without any IO.

Text from the websocket becomes a typed command or a ``ProtocolError`` whose
message names the field and what was wrong; typed events become text. The
shapes follow the 2020 README that existing clients already speak:
``{"type": str, "data": {...}}`` in both directions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Union

from further_link.errors import ProtocolError, excerpt

COMMAND_TYPES = ("start", "stop", "stdin", "upload", "ping", "attach")
MAX_RUN_ID_CHARS = 64


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


@dataclass(frozen=True)
class StopCommand:
    """End the running program and everything it started."""


@dataclass(frozen=True)
class StdinCommand:
    """Text for the program's stdin; ``eof`` then closes it, as Ctrl-D would."""

    input: str
    eof: bool = False


@dataclass(frozen=True)
class PingCommand:
    """Liveness check from the client; answered with ``pong``."""


@dataclass(frozen=True)
class TextFile:
    text: str


@dataclass(frozen=True)
class UrlFile:
    url: str
    bucket_name: str
    file_name: str


UploadFile = Union[TextFile, UrlFile]


@dataclass(frozen=True)
class UploadCommand:
    """Create (or replace) ``name`` under the work dir with ``files``.

    Keys of ``files`` are the aliases: relative paths inside the directory.
    """

    name: str
    files: dict[str, UploadFile] = field(default_factory=dict)


Command = Union[StartCommand, StopCommand, StdinCommand, PingCommand, UploadCommand, AttachCommand]


# ------------------------------------------------------------------ events
# Shared by both wire APIs: ``process`` is the v5 /run process id (None on /run-py).


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
    """The program wants browser key events for ``key`` (v5 /run only)."""

    key: str
    process: str | None = None


@dataclass(frozen=True)
class Queued:
    """A run waits: for a claimed ``resource`` held by run ``held_by``, or (exclusive
    mode, ``resource`` None) for its turn to start. ``position`` 1 is next."""

    position: int
    resource: str | None = None
    held_by: str | None = None
    process: str | None = None

    def data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"position": self.position}
        if self.resource is not None:
            data.update(resource=self.resource, heldBy=self.held_by)
        return data


@dataclass(frozen=True)
class Uploaded:
    pass


@dataclass(frozen=True)
class Pong:
    pass


@dataclass(frozen=True)
class ErrorEvent:
    message: str
    process: str | None = None


Event = Union[Started, Stopped, Output, Video, KeyListen, Queued, Uploaded, Pong, ErrorEvent]


def encode_event(event: Event) -> str:
    """Serialise an event as the JSON text frame /run-py clients expect."""
    kind: str
    data: dict[str, Any]
    if isinstance(event, (Output, Video)):
        # The hot path under heavy output: the same text json.dumps would give,
        # built around the C string encoder without a dict per message.
        kind = event.stream if isinstance(event, Output) else "video"
        text = event.output
        # isascii() is O(1) in CPython, and the ASCII encoder is twice as fast.
        encoded = _json_ascii_string(text) if text.isascii() else _json_string(text)
        return f'{{"type": "{kind}", "data": {{"output": {encoded}}}}}'
    if isinstance(event, Stopped):
        kind, data = "stopped", {"exitCode": event.exit_code}
        if event.signal is not None:
            data["signal"] = event.signal
    elif isinstance(event, ErrorEvent):
        kind, data = "error", {"message": event.message}
    elif isinstance(event, Started):
        kind, data = "started", {} if event.run_id is None else {"runId": event.run_id}
    elif isinstance(event, Queued):
        kind, data = "queued", event.data()
    elif isinstance(event, Uploaded):
        kind, data = "uploaded", {}
    elif isinstance(event, Pong):
        kind, data = "pong", {}
    else:  # pragma: no cover - KeyListen exists only on /run
        raise TypeError(f"not a /run-py event: {event!r}")
    return json.dumps({"type": kind, "data": data}, ensure_ascii=False)


_json_string = json.encoder.encode_basestring  # type: ignore[attr-defined]
_json_ascii_string = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


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
        raise ProtocolError(f"message must be a JSON object with a 'type', not {_kind_of(message)}")
    kind = message.get("type")
    if kind is None:
        raise ProtocolError("message has no 'type'; expected one of " + _known_types())
    if not isinstance(kind, str):
        raise ProtocolError(f"'type' must be a string, not {_kind_of(kind)}")
    data = message.get("data")
    if data is None:
        data = {}
    elif not isinstance(data, dict):
        raise ProtocolError(f"'data' of a {kind} message must be an object, not {_kind_of(data)}")

    if kind == "start":
        return _parse_start(data)
    if kind == "stop":
        return StopCommand()
    if kind == "stdin":
        eof = data.get("eof", False)
        if not isinstance(eof, bool):
            raise ProtocolError(f"stdin: data.eof must be true or false, not {_kind_of(eof)}")
        if eof and data.get("input") is None:
            return StdinCommand(input="", eof=True)
        return StdinCommand(input=_required_str(data, "input", "stdin"), eof=eof)
    if kind == "upload":
        return _parse_upload(data)
    if kind == "ping":
        return PingCommand()
    if kind == "attach":
        return AttachCommand(parse_run_id(data, "attach"))
    _check_text(kind, "type")
    raise ProtocolError(f"unknown message type {excerpt(kind)}; expected one of {_known_types()}")


def _parse_start(data: dict[str, Any]) -> StartCommand:
    script = _optional_str(data, "sourceScript", "start")
    path = _optional_str(data, "sourcePath", "start")
    directory = _optional_str(data, "directoryName", "start")
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


def parse_keep_alive(data: dict[str, Any], command: str) -> float | None:
    """``data.keepAlive``: seconds (a number, 0 or more), or None when absent."""
    value = data.get("keepAlive")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ProtocolError(
            f"{command}: data.keepAlive must be a number of seconds, 0 or more, "
            f"not {_describe(value) if not isinstance(value, (int, float)) else value}"
        )
    return float(min(value, 1e9))  # JSON may hold numbers no timer takes


def parse_run_id(data: dict[str, Any], command: str) -> str:
    """``data.runId`` as ``started`` gave it."""
    value = _required_str(data, "runId", command)
    if not value or len(value) > MAX_RUN_ID_CHARS:
        raise ProtocolError(
            f"{command}: data.runId must be the runId a 'started' message gave "
            f"(1 to {MAX_RUN_ID_CHARS} characters)"
        )
    return value


def _parse_upload(data: dict[str, Any]) -> UploadCommand:
    directory = data.get("directory")
    if not isinstance(directory, dict):
        raise ProtocolError(
            "upload needs data.directory, an object with 'name' and 'files'"
            + ("" if directory is None else f", not {_kind_of(directory)}")
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
            f"not {_kind_of(files_in)}"
        )
    files: dict[str, UploadFile] = {}
    for alias, spec in files_in.items():
        _check_text(alias, "data.directory.files key")
        where = f"data.directory.files[{excerpt(alias)}]"
        if not isinstance(spec, dict):
            raise ProtocolError(f"upload: {where} must be an object, not {_kind_of(spec)}")
        file_type = spec.get("type")
        content = spec.get("content")
        if not isinstance(content, dict):
            raise ProtocolError(
                f"upload: {where}.content must be an object, not {_kind_of(content)}"
            )
        if file_type == "text":
            files[alias] = TextFile(
                text=_required_str(content, "text", "upload", prefix=f"{where}.content.")
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
                f"upload: {where}.type must be 'text' or 'url', not {_describe(file_type)}"
            )
    return UploadCommand(name=name, files=files)


# ----------------------------------------------------------------- helpers


def _known_types() -> str:
    return ", ".join(COMMAND_TYPES)


def _kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__  # pragma: no cover - json yields no other types


def _describe(value: Any) -> str:
    return repr(value) if isinstance(value, str) else _kind_of(value)


def _check_text(value: str, where: str) -> None:
    """Refuse strings that cannot be encoded as UTF-8 (lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = value[exc.start]
        raise ProtocolError(
            f"{where} contains a lone surrogate (\\u{ord(bad):04x}) at position {exc.start}, "
            "which is not valid text"
        ) from None


def _optional_str(data: dict[str, Any], key: str, command: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError(f"{command}: data.{key} must be a string, not {_kind_of(value)}")
    _check_text(value, f"{command}: data.{key}")
    return value


def _required_str(data: dict[str, Any], key: str, command: str, prefix: str = "data.") -> str:
    value = data.get(key)
    if value is None:
        raise ProtocolError(f"{command} needs {prefix}{key}")
    if not isinstance(value, str):
        raise ProtocolError(f"{command}: {prefix}{key} must be a string, not {_kind_of(value)}")
    _check_text(value, f"{command}: {prefix}{key}")
    return value
