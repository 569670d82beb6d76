"""Browser keys as buttons, program side: ``KeyboardButton('ArrowUp')``.

Mirrors ``pitop.KeyboardButton``: ``when_pressed`` / ``when_released``
callbacks and ``is_pressed``. Creating a button asks the client (the Further
IDE on ``/run``) to forward that key; its ``keydown`` / ``keyup`` events then
arrive over the run's private side channel and call the callbacks, in one
listener thread shared by all buttons. Standard library only.
"""

from __future__ import annotations

import socket
import sys
import threading
from typing import Callable, Optional

from further_link.channel import (
    KIND_KEY_EVENT,
    KIND_KEY_SUBSCRIBE,
    KIND_KEYLISTEN,
    ChannelError,
    _connection,
    decode_key_event,
    open_subscription,
    receive_events,
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
    """The one thread per program that receives key events and calls the buttons."""

    def __init__(self) -> None:
        self._buttons: dict[str, list[KeyboardButton]] = {}
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._available = True

    def add(self, button: KeyboardButton) -> None:
        with self._lock:
            if not self._subscribe():
                return
            self._buttons.setdefault(button.key, []).append(button)
        try:
            _connection.send(KIND_KEYLISTEN, button.key.encode("utf-8"))
        except ChannelError as exc:
            print(f"Warning: further_link keyboard is not available: {exc}", file=sys.stderr)

    def _subscribe(self) -> bool:
        """Connect once, before the first keylisten, so no event can be missed."""
        if self._sock is not None or not self._available:
            return self._available
        try:
            sock = open_subscription(KIND_KEY_SUBSCRIBE)
        except ChannelError as exc:
            self._available = False
            print(f"Warning: further_link keyboard is not available: {exc}", file=sys.stderr)
            return False
        self._sock = sock
        threading.Thread(
            target=self._serve, args=(sock,), name="further_link keys", daemon=True
        ).start()
        return True

    def _serve(self, sock: socket.socket) -> None:
        for payload in receive_events(sock, KIND_KEY_EVENT):
            key, event = decode_key_event(payload)
            with self._lock:
                buttons = list(self._buttons.get(key, ()))
            for button in buttons:
                button._on_event(event)


_listener = _KeyListener()
