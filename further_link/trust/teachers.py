"""Teachers' keys a device trusts, and the signed commands they send.

A school tells its devices which teachers they trust once (a line in the
config dir's ``teachers`` file, written by ``further-link trust-teacher`` or
imaged onto the SD cards); the teacher's tool then pairs the whole class and
locks or unlocks it without anyone typing a code. Each command is one
Ed25519 signature over::

    further-link teacher v1
    <challenge the device just issued>
    <SHA-256 fingerprint of the device's certificate as the teacher saw it, or "none">
    <action>
    <the command's parameters as canonical JSON>

The challenge (fresh, single use, valid ``CHALLENGE_SECONDS``) stops
replays; the fingerprint stops a machine in the middle from relaying the
signature to the real device under its own certificate. Nothing here touches sockets.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterable
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from further_link.errors import ConfigError, TeacherError

PUBLIC_KEY_BYTES = 32
CHALLENGE_SECONDS = 30.0
SIGNED_PREFIX = b"further-link teacher v1\n"
NO_FINGERPRINT = "none"
ACTIONS = ("pair", "lock", "unlock")
# Spent challenges are remembered until they expire; only genuine teachers spend one.
MAX_SPENT = 10_000


def parse_public_key(text: str) -> bytes:
    """The 32 raw bytes of an Ed25519 public key written as base64 (44 characters).

    Raises ConfigError when ``text`` is not such a key.
    """
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != PUBLIC_KEY_BYTES:
        raise ConfigError(
            f"{text.strip()[:60]!r} is not a teacher's public key "
            "(`further-link teacher-key` prints one: 44 characters of base64)"
        )
    return raw


def public_key_text(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def certificate_sha256(der: bytes) -> str:
    """SHA-256 of a DER certificate as colon-separated upper-case hex, as openssl prints it."""
    return ":".join(f"{byte:02X}" for byte in hashlib.sha256(der).digest())


def signed_message(challenge: str, fingerprint: str | None, action: str, params: Any) -> bytes:
    """The exact bytes a teacher signs for ``action`` with ``params`` (a JSON value)."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    lines = [challenge, fingerprint or NO_FINGERPRINT, action, canonical]
    return SIGNED_PREFIX + "\n".join(lines).encode("utf-8")


class ChallengeBook:
    """Issues challenges without keeping them, and spends each one once.

    A challenge is ``<issued ms>.<nonce>.<mac>``, its MAC keyed by a secret
    this process made: it is checked without a table an unauthenticated
    caller could fill. Only challenges redeemed by a valid signature are
    remembered (until they expire), so only a trusted teacher grows that set.
    """

    def __init__(self, lifetime: float = CHALLENGE_SECONDS) -> None:
        self._secret = secrets.token_bytes(32)
        self._lifetime = lifetime
        self._spent: dict[str, float] = {}

    def issue(self, now: float | None = None) -> str:
        issued = int((time.time() if now is None else now) * 1000)
        body = f"{issued}.{secrets.token_hex(16)}"
        return f"{body}.{self._mac(body)}"

    def check(self, challenge: str, now: float | None = None) -> None:
        """Raise TeacherError unless ``challenge`` is ours, fresh and unspent."""
        now = time.time() if now is None else now
        body, _, mac = challenge.rpartition(".")
        issued_text = body.partition(".")[0]
        if not (mac and issued_text.isdigit() and hmac.compare_digest(mac, self._mac(body))):
            raise TeacherError("the challenge was not issued by this device; ask for a new one")
        age = now - int(issued_text) / 1000
        if not -1.0 <= age <= self._lifetime:
            raise TeacherError(
                f"the challenge is older than {self._lifetime:.0f} s; ask for a new one"
            )
        if challenge in self._spent:
            raise TeacherError("the challenge was already used; ask for a new one")

    def spend(self, challenge: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._spent = {c: t for c, t in self._spent.items() if t > now}
        if len(self._spent) >= MAX_SPENT:
            self._spent.pop(next(iter(self._spent)))
        self._spent[challenge] = now + self._lifetime + 1.0

    def _mac(self, body: str) -> str:
        return hmac.new(self._secret, body.encode("ascii", "replace"), hashlib.sha256).hexdigest()


class TrustedTeachers:
    """The public keys of the teachers this device obeys (from Config.teacher_keys)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = {parse_public_key(key) for key in keys}

    def __len__(self) -> int:
        return len(self._keys)

    def verify(self, key_text: str, message: bytes, signature_text: str) -> None:
        """Raise TeacherError unless ``key_text`` is trusted and signed ``message``."""
        try:
            raw = parse_public_key(key_text)
        except ConfigError:
            raise TeacherError("the teacher's key is not an Ed25519 public key") from None
        if raw not in self._keys:
            raise TeacherError(
                "this device does not trust that teacher's key; on the device run "
                "`further-link trust-teacher KEY` (or add it to the config dir's teachers file)"
            )
        try:
            signature = base64.b64decode(signature_text, validate=True)
            Ed25519PublicKey.from_public_bytes(raw).verify(signature, message)
        except (binascii.Error, ValueError, InvalidSignature):
            raise TeacherError("the teacher's signature does not match") from None
