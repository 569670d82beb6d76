"""Who may run code on this device: the device token, pairing codes, origins.

The token is a random secret kept in the config dir (mode 0600). A person
proves they can see the device by typing its pairing code, which is derived
from the token and the current 10-minute window (like a TOTP), so the server
and ``further-link token`` agree on it without sharing state, and rotating the
token changes every code. Wrong codes are rate-limited per client address.
Nothing here touches sockets.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

TOKEN_FILE = "token"
CODE_WINDOW_SECONDS = 600
CODE_DIGITS = 6
# A code read just before its window ends is still accepted this long after.
CODE_GRACE_SECONDS = 60
MAX_WRONG_CODES = 5
LOCK_SECONDS = 60.0
COOKIE_NAME = "further_link_token"


class TokenStore:
    """The device token on disk; re-read when the file changes (``--rotate``).

    A server that drops root calls ``hold()`` first: from then on the token
    lives only in its memory and changes only through ``replace_held`` (see
    control.py), since the program user must not read the file.
    """

    def __init__(self, config_dir: Path) -> None:
        self.path = config_dir / TOKEN_FILE
        self._cached: tuple[float, str] | None = None
        self._held: str | None = None

    @property
    def held(self) -> bool:
        return self._held is not None

    def hold(self) -> str:
        """Read (or create) the token now and never read the file again."""
        self._held = self.load_or_create()
        return self._held

    def replace_held(self, token: str) -> bool:
        """Take a rotated token handed over by root; True when it differs from the held one."""
        changed = token != self._held
        self._held = token
        return changed

    def load_or_create(self) -> str:
        try:
            return self.current()
        except FileNotFoundError:
            return self.rotate()

    def current(self) -> str:
        if self._held is not None:
            return self._held
        mtime = self.path.stat().st_mtime
        if self._cached is None or self._cached[0] != mtime:
            token = self.path.read_text(encoding="ascii").strip()
            self._cached = (mtime, token)
        return self._cached[1]

    def rotate(self) -> str:
        """Replace the token: every paired client must pair again."""
        token = secrets.token_urlsafe(24)
        while token.startswith("-"):  # it is typed after --token on command lines
            token = secrets.token_urlsafe(24)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial = self.path.with_name(self.path.name + ".partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(token + "\n")
        os.replace(partial, self.path)
        self._cached = None
        return token

    def matches(self, candidate: str | None) -> bool:
        if not candidate:
            return False
        return hmac.compare_digest(candidate.encode(), self.current().encode())


@dataclass(frozen=True)
class PairingCode:
    code: str
    expires_at: float  # unix time

    def seconds_left(self, now: float | None = None) -> int:
        return max(0, int(self.expires_at - (time.time() if now is None else now)))


def pairing_code(token: str, now: float | None = None) -> PairingCode:
    """The code for the window containing ``now``."""
    now = time.time() if now is None else now
    window = int(now // CODE_WINDOW_SECONDS)
    return PairingCode(_code_for(token, window), (window + 1) * CODE_WINDOW_SECONDS)


def _code_for(token: str, window: int) -> str:
    digest = hmac.new(token.encode(), window.to_bytes(8, "big"), hashlib.sha256).digest()
    number = int.from_bytes(digest[:8], "big") % 10**CODE_DIGITS
    return f"{number:0{CODE_DIGITS}d}"


def code_is_valid(token: str, candidate: str, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    window = int(now // CODE_WINDOW_SECONDS)
    valid = [_code_for(token, window)]
    if now - window * CODE_WINDOW_SECONDS < CODE_GRACE_SECONDS:
        valid.append(_code_for(token, window - 1))
    return any(hmac.compare_digest(candidate.encode(), code.encode()) for code in valid)


class PairingLocked(Exception):
    def __init__(self, seconds_left: float) -> None:
        super().__init__(f"locked for {seconds_left:.0f} s")
        self.seconds_left = seconds_left


class PairingLimiter:
    """Counts wrong codes per client address; locks an address for a minute after five."""

    def __init__(
        self, max_wrong: int = MAX_WRONG_CODES, lock_seconds: float = LOCK_SECONDS
    ) -> None:
        self._max_wrong = max_wrong
        self._lock_seconds = lock_seconds
        self._wrong: dict[str, int] = {}
        self._locked_until: dict[str, float] = {}

    def check(self, address: str, now: float | None = None) -> None:
        """Raise ``PairingLocked`` while ``address`` is locked out."""
        now = time.monotonic() if now is None else now
        until = self._locked_until.get(address)
        if until is None:
            return
        if now < until:
            raise PairingLocked(until - now)
        del self._locked_until[address]
        self._wrong.pop(address, None)

    def wrong(self, address: str, now: float | None = None) -> int:
        """Record a wrong code; returns how many tries are left before the lock."""
        now = time.monotonic() if now is None else now
        count = self._wrong.get(address, 0) + 1
        self._wrong[address] = count
        if count >= self._max_wrong:
            self._locked_until[address] = now + self._lock_seconds
            log.warning("pairing locked for %s after %d wrong codes", address, count)
            return 0
        return self._max_wrong - count

    def succeeded(self, address: str) -> None:
        self._wrong.pop(address, None)


def normalise_origin(origin: str) -> str:
    """``scheme://host[:port]`` in lower case, default ports dropped."""
    parts = urlsplit(origin.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    default = {"http": 80, "https": 443}.get(scheme)
    return f"{scheme}://{host}" if port in (None, default) else f"{scheme}://{host}:{port}"


def origin_listed(origin: str | None, listed: Iterable[str]) -> bool:
    """Whether a browser Origin is named in ``listed`` itself (``*`` names nobody)."""
    if not origin:
        return False
    return normalise_origin(origin) in {normalise_origin(o) for o in listed if o != "*"}


def origin_allowed(origin: str | None, own_origins: Iterable[str], allowed: Iterable[str]) -> bool:
    """Non-browser clients send no Origin; browsers must come from a known page."""
    if origin is None:
        return True
    allowed = list(allowed)
    if "*" in allowed:
        return True
    candidate = normalise_origin(origin)
    return candidate in {normalise_origin(o) for o in [*own_origins, *allowed]}
