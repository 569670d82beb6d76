"""Who may run code on this device: the device token, pairing codes, origins.

The token is a random secret kept in the config dir (mode 0600). A person
proves they can see the device by typing its pairing code, which is derived
from the token, the current 10-minute window (like a TOTP) and the code's
generation (raised when wrong codes spent a code, see pairing.py), so the
server and ``further-link token`` agree on it, and rotating the token changes
every code.
Nothing here touches sockets.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from further_link.trust.secretfile import write_secret

log = logging.getLogger(__name__)

TOKEN_FILE = "token"
CODE_WINDOW_SECONDS = 600
# Nine digits: README's pairing arithmetic needs 10**9 codes (shown as 123-456-789).
CODE_DIGITS = 9
# A code read just before its window ends is still accepted this long after.
CODE_GRACE_SECONDS = 60
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
        write_secret(self.path, (token + "\n").encode("ascii"))
        self._cached = None
        return token

    def matches(self, candidate: str | None) -> bool:
        if not candidate:
            return False
        # "replace": a client's lone surrogate is a wrong token, not a crash.
        return hmac.compare_digest(candidate.encode("utf-8", "replace"), self.current().encode())


@dataclass(frozen=True)
class PairingCode:
    code: str  # CODE_DIGITS digits
    expires_at: float  # unix time

    @property
    def shown(self) -> str:
        """The code in groups of three, as people read it: ``123-456-789``."""
        return "-".join(self.code[i : i + 3] for i in range(0, len(self.code), 3))

    def seconds_left(self, now: float | None = None) -> int:
        return max(0, int(self.expires_at - (time.time() if now is None else now)))


def pairing_code(token: str, now: float | None = None, generation: int = 0) -> PairingCode:
    """The code for the window containing ``now`` (unix time) and ``generation``."""
    now = time.time() if now is None else now
    window = int(now // CODE_WINDOW_SECONDS)
    return PairingCode(_code_for(token, window, generation), (window + 1) * CODE_WINDOW_SECONDS)


def _code_for(token: str, window: int, generation: int) -> str:
    message = window.to_bytes(8, "big") + generation.to_bytes(8, "big")
    digest = hmac.new(token.encode(), message, hashlib.sha256).digest()
    number = int.from_bytes(digest[:8], "big") % 10**CODE_DIGITS
    return f"{number:0{CODE_DIGITS}d}"


def normalise_code(candidate: str) -> str:
    """What a person typed, without the spaces and dashes they may group it with."""
    return "".join(ch for ch in candidate if ch not in " -\t")


def code_is_valid(
    token: str, candidate: str, now: float | None = None, generation: int = 0
) -> bool:
    """True for this window's code, or the last window's within the grace period."""
    now = time.time() if now is None else now
    window = int(now // CODE_WINDOW_SECONDS)
    valid = [_code_for(token, window, generation)]
    if now - window * CODE_WINDOW_SECONDS < CODE_GRACE_SECONDS:
        valid.append(_code_for(token, window - 1, generation))
    typed = normalise_code(candidate).encode("utf-8", "replace")
    return any(hmac.compare_digest(typed, code.encode()) for code in valid)


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
