"""The buttons and sliders one run declared, checked on the server's side.

A program declares controls over its side channel (``further_link.button`` /
``slider``, program side in further_link/controls.py); its declarations are
untrusted data, so each is checked here before the client sees it. A client's
``control`` message is checked against the declared set before it reaches the
program: an unknown id or a value outside a slider's range is refused.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from further_link.channel import decode_control
from further_link.errors import ControlError, excerpt
from further_link.protocol.events import Control

# One program's page panel: more than this is no longer a control panel.
MAX_CONTROLS = 32
MAX_ID_CHARS = 64
MAX_LABEL_CHARS = 100
KINDS = ("button", "slider")


class ControlSet:
    """A run's current controls, in the order first declared."""

    def __init__(self) -> None:
        self._controls: dict[str, Control] = {}

    def current(self) -> tuple[Control, ...]:
        return tuple(self._controls.values())

    def declare(self, payload: bytes) -> None:
        """Add or replace one control from the program's frame; ``ValueError`` when malformed."""
        try:
            control = parse_declaration(decode_control(payload))
        except (UnicodeDecodeError, RecursionError) as exc:
            raise ValueError(f"control declaration is not JSON: {exc}") from None
        if control.control_id not in self._controls and len(self._controls) >= MAX_CONTROLS:
            raise ValueError(f"a program may declare at most {MAX_CONTROLS} controls")
        self._controls[control.control_id] = control

    def use(self, control_id: str, value: float | None) -> float | None:
        """Check a client's use of control ``control_id``; returns the value to pass on.

        Raises ``ControlError`` naming what was wrong. A slider keeps the value as
        its current one, so a later ``controls`` event shows where it stands.
        """
        control = self._controls.get(control_id)
        if control is None:
            known = ", ".join(repr(c) for c in self._controls) or "none"
            raise ControlError(
                f"control: the program has no control {excerpt(control_id)} (it has: {known})"
            )
        if control.kind == "button":
            if value is not None:
                raise ControlError(f"control: {control_id!r} is a button; send no value")
            return None
        if value is None:
            raise ControlError(f"control: slider {control_id!r} needs data.value, a number")
        assert control.minimum is not None and control.maximum is not None
        if not control.minimum <= value <= control.maximum:
            raise ControlError(
                f"control: slider {control_id!r} takes {control.minimum:g} to "
                f"{control.maximum:g}, not {value:g}"
            )
        self._controls[control_id] = dataclasses.replace(control, value=value)
        return value


def parse_declaration(raw: Any) -> Control:
    """A ``Control`` from the program's declaration; ``ValueError`` when it is not one."""
    if not isinstance(raw, dict):
        raise ValueError("control declaration must be an object")
    control_id, kind, label = raw.get("id"), raw.get("kind"), raw.get("label")
    if not isinstance(control_id, str) or not 0 < len(control_id) <= MAX_ID_CHARS:
        raise ValueError(f"control id must be 1 to {MAX_ID_CHARS} characters")
    if kind not in KINDS:
        raise ValueError(f"control kind must be one of {', '.join(KINDS)}")
    if not isinstance(label, str) or len(label) > MAX_LABEL_CHARS:
        raise ValueError(f"control label must be text of at most {MAX_LABEL_CHARS} characters")
    if kind == "button":
        return Control(control_id, kind, label)
    minimum, maximum, step, value = (
        _number(raw, "min"),
        _number(raw, "max"),
        _number(raw, "step"),
        _number(raw, "value"),
    )
    if not minimum < maximum or not 0 < step <= maximum - minimum:
        raise ValueError("slider needs min < max and 0 < step <= max - min")
    if not minimum <= value <= maximum:
        raise ValueError("slider value must lie between min and max")
    return Control(control_id, kind, label, minimum, maximum, step, value)


def _number(raw: dict[str, Any], key: str) -> float:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"slider {key} must be a finite number")
    return value
