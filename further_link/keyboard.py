"""Browser keys as buttons, program side: ``KeyboardButton('ArrowUp')``.

Mirrors ``pitop.KeyboardButton``: ``when_pressed`` / ``when_released``
callbacks and ``is_pressed``. Creating a button asks the client (the Further
IDE on ``/run``) to forward that key; its ``keydown`` / ``keyup`` events then
arrive over the run's private side channel and call the callbacks, in one
listener thread shared by all buttons. Standard library only.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

from further_link.channel import (
    KIND_KEY_EVENT,
    KIND_KEY_SUBSCRIBE,
    KIND_KEYLISTEN,
    Subscription,
    decode_key_event,
)

Callback = Optional[Callable[[], object]]


class KeyboardButton:
    """A key of the browser's keyboard (``KeyboardEvent.key``: ``"a"``, ``" "``, ``"ArrowUp"``).

    Outside a program run by further-link the button never fires; a warning
    says so on stderr.
    """

    def __init__(self, key: str) -> None:
        if not isinstance(key, str) or not key:
            raise ValueError("KeyboardButton needs a key name such as 'ArrowUp' or 'a'")
        self.key = key
        self.when_pressed: Callback = None
        self.when_released: Callback = None
        self._pressed = False
        _listener.add(self)

    @property
    def is_pressed(self) -> bool:
        return self._pressed

    def _on_event(self, event: str) -> None:
        if event == "keydown":
            self._pressed = True
            callback = self.when_pressed
        elif event == "keyup":
            self._pressed = False
            callback = self.when_released
        else:
            return
        if callback is not None:
            callback()


class _KeyListener:
    """Calls the buttons of each key event, in the one thread that receives them."""

    def __init__(self) -> None:
        self._buttons: dict[str, list[KeyboardButton]] = {}
        self._lock = threading.Lock()
        self._events = Subscription(KIND_KEY_SUBSCRIBE, KIND_KEY_EVENT, "keyboard is", self._on_key)

    def add(self, button: KeyboardButton) -> None:
        if not self._events.start():
            return
        with self._lock:
            self._buttons.setdefault(button.key, []).append(button)
        self._events.announce(KIND_KEYLISTEN, button.key.encode("utf-8"))

    def _on_key(self, payload: bytes) -> None:
        key, event = decode_key_event(payload)
        with self._lock:
            buttons = list(self._buttons.get(key, ()))
        for button in buttons:
            button._on_event(event)


_listener = _KeyListener()
