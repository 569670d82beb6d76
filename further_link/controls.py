"""Buttons and sliders in the browser for a running program, program side.

``further_link.button("Go", on_press=go)`` and
``further_link.slider("speed", 0, 100, on_change=set_speed)`` declare controls
that the client shows for this run (a ``controls`` event); when the learner
uses one, the client's ``control`` message reaches the program over its
private side channel and the callback runs in one listener thread shared by
all controls (as for ``KeyboardButton``). A control's id is its label in
lower case with dashes (``"Go faster"`` -> ``go-faster``); declaring a label
again replaces that control. Standard library only.
"""

from __future__ import annotations

import json
import re
import threading
import traceback
from collections.abc import Mapping
from typing import Callable, Optional, Union

from further_link.channel import (
    KIND_CONTROL,
    KIND_CONTROL_EVENT,
    KIND_CONTROL_SUBSCRIBE,
    Subscription,
    decode_control_event,
)

Number = Union[int, float]
PressCallback = Optional[Callable[[], object]]
ChangeCallback = Optional[Callable[[Number], object]]
MAX_LABEL_CHARS = 100  # as the server accepts (runs/controls.py)


def control_id(label: str) -> str:
    """The id a label gets: ``"Go faster!"`` -> ``go-faster``."""
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:64]
    return slug or "control"


class Button:
    """A push button in the page; ``on_press()`` runs on each press, ``presses`` counts them."""

    def __init__(self, label: str, on_press: PressCallback = None) -> None:
        self.label = _checked_label(label)
        self.id = control_id(label)
        self.on_press = on_press
        self.presses = 0
        _listener.declare(self, {"id": self.id, "kind": "button", "label": self.label})

    def _on_event(self, value: Number | None) -> None:
        self.presses += 1
        if self.on_press is not None:
            self.on_press()


class Slider:
    """A slider in the page from ``minimum`` to ``maximum``; ``value`` is where it stands,
    and ``on_change(value)`` runs whenever the learner moves it."""

    def __init__(
        self,
        label: str,
        minimum: Number,
        maximum: Number,
        on_change: ChangeCallback = None,
        step: Number = 1,
        value: Number | None = None,
    ) -> None:
        self.label = _checked_label(label)
        self.id = control_id(label)
        if not minimum < maximum:
            raise ValueError(f"slider {label!r}: minimum {minimum} must be below maximum {maximum}")
        if not 0 < step <= maximum - minimum:
            raise ValueError(f"slider {label!r}: step must be above 0 and at most the range")
        self.value: Number = minimum if value is None else value
        if not minimum <= self.value <= maximum:
            raise ValueError(f"slider {label!r}: value {value} is outside {minimum}..{maximum}")
        self.minimum, self.maximum, self.step = minimum, maximum, step
        self.on_change = on_change
        shape = {"id": self.id, "kind": "slider", "label": self.label, "min": minimum}
        shape.update({"max": maximum, "step": step, "value": self.value})
        _listener.declare(self, shape)

    def _on_event(self, value: Number | None) -> None:
        if value is None:
            return
        self.value = value
        if self.on_change is not None:
            self.on_change(value)


# ``further_link.button("Go", on_press=go)``: the classes, under the names programs call.
button = Button
slider = Slider


def _checked_label(label: str) -> str:
    if not isinstance(label, str) or len(label) > MAX_LABEL_CHARS:
        raise ValueError(f"a control's label is text of at most {MAX_LABEL_CHARS} characters")
    return label


Control = Union[Button, Slider]


class _ControlListener:
    """Calls the control of each event, in the one thread that receives them."""

    def __init__(self) -> None:
        self._controls: dict[str, Control] = {}
        self._lock = threading.Lock()
        self._events = Subscription(
            KIND_CONTROL_SUBSCRIBE, KIND_CONTROL_EVENT, "controls are", self._on_use
        )

    def declare(self, control: Control, shape: Mapping[str, object]) -> None:
        if not self._events.start():
            return
        with self._lock:
            self._controls[control.id] = control
        self._events.announce(KIND_CONTROL, json.dumps(shape).encode("utf-8"))

    def _on_use(self, payload: bytes) -> None:
        name, value = decode_control_event(payload)
        with self._lock:
            control = self._controls.get(name)
        if control is None:
            return
        try:
            control._on_event(value)
        except Exception:
            # The learner's callback failed: show why, and keep the controls working.
            traceback.print_exc()


_listener = _ControlListener()
