"""JSON pieces both wire formats use: describing a client's value, checking text,
and the fast encoding of program output.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Union

from further_link.errors import ProtocolError
from further_link.protocol.events import Controls, KeyListen, Novnc, Output, Plot, Queued, Video

json_string = json.encoder.encode_basestring  # type: ignore[attr-defined]
_json_ascii_string = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


def output_type_and_data(event: Output | Video) -> tuple[str, str]:
    """``("stdout", '{"output": "..."}')``: the message type and its data as JSON text.

    The hot path under heavy output: the same text ``json.dumps`` would give,
    built around the C string encoder without a dict per message.
    """
    kind = event.stream if isinstance(event, Output) else "video"
    text = event.output
    # isascii() is O(1) in CPython, and the ASCII encoder is twice as fast.
    encoded = _json_ascii_string(text) if text.isascii() else json_string(text)
    return kind, f'{{"output": {encoded}}}'


def kind_of(value: Any) -> str:
    """What a JSON value is, in words: ``"a string"``, ``"null"``, ``"an array"``..."""
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


def check_text(value: str, where: str) -> None:
    """Refuse strings that cannot be encoded as UTF-8 (lone surrogates): ``ProtocolError``."""
    # Searched, not encoded: a 4 MiB value must not cost another 4 MiB copy.
    found = None if value.isascii() else _SURROGATE.search(value)
    if found is not None:
        raise ProtocolError(
            f"{where} contains a lone surrogate (\\u{ord(found.group()):04x}) at position "
            f"{found.start()}, which is not valid text"
        )


_SURROGATE = re.compile("[\ud800-\udfff]")


def optional_str(data: dict[str, Any], key: str, command: str) -> str | None:
    """``data[key]`` as valid text; ``None`` when absent or null; else ``ProtocolError``."""
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError(f"{command}: data.{key} must be a string, not {kind_of(value)}")
    check_text(value, f"{command}: data.{key}")
    return value


# Events whose data both APIs shape alike (``side_event_data``).
SideEvent = Union[Plot, Controls, KeyListen, Novnc, Queued]
SIDE_EVENTS = (Plot, Controls, KeyListen, Novnc, Queued)


def side_event_data(event: SideEvent) -> tuple[str, dict[str, Any]]:
    """The ``type`` and ``data`` of a plot, controls, keylisten, novnc or queued event,
    the same on both APIs: ``("queued", {"position": 1})``."""
    if isinstance(event, Plot):
        return "plot", {
            "figure": event.figure,
            "png": event.png,
            "width": event.width,
            "height": event.height,
        }
    if isinstance(event, KeyListen):
        return "keylisten", {"output": event.key}
    if isinstance(event, Novnc):
        return "novnc", {"port": event.port, "path": event.path}
    if isinstance(event, Queued):
        data: dict[str, Any] = {"position": event.position}
        if event.resource is not None:
            data.update(resource=event.resource, heldBy=event.held_by)
        return "queued", data
    controls = []
    for control in event.controls:
        shape: dict[str, Any] = {"id": control.control_id, "kind": control.kind}
        shape["label"] = control.label
        if control.kind == "slider":
            shape.update(
                min=control.minimum, max=control.maximum, step=control.step, value=control.value
            )
        controls.append(shape)
    return "controls", {"controls": controls}


def control_value(data: dict[str, Any], command: str) -> float | None:
    """``data.value`` of a control message: absent for a button, a finite number for a slider."""
    value = data.get("value")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        shown = repr(value) if isinstance(value, str) else kind_of(value)
        raise ProtocolError(f"{command}: data.value must be a number, not {shown}")
    return value


MAX_RUN_ID_CHARS = 64


def parse_keep_alive(data: dict[str, Any], command: str) -> float | None:
    """``data.keepAlive``: seconds (a number, 0 or more), or None when absent."""
    value = data.get("keepAlive")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        shown = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        raise ProtocolError(
            f"{command}: data.keepAlive must be a number of seconds, 0 or more, "
            f"not {kind_of(value) if shown is None else shown}"
        )
    return float(min(value, 1e9))  # JSON may hold numbers no timer takes


def parse_run_id(data: dict[str, Any], command: str) -> str:
    """``data.runId`` as ``started`` gave it, or ``ProtocolError``."""
    value = optional_str(data, "runId", command)
    if not value or len(value) > MAX_RUN_ID_CHARS:
        raise ProtocolError(
            f"{command} needs data.runId, the runId a 'started' message gave "
            f"(1 to {MAX_RUN_ID_CHARS} characters)"
        )
    return value
