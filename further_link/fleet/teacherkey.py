"""The teacher's own Ed25519 key, and the signed commands made with it.

The private key stays on the teacher's machine (``<config dir>/teacher-key.pem``,
mode 0600); devices are told the public key once (``further-link
trust-teacher KEY``, or a ``teachers`` file imaged onto their SD cards) and
from then on obey commands it signed (trust/teachers.py says what is signed).
"""

from __future__ import annotations

import base64
import contextlib
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from further_link.errors import ClientError
from further_link.trust.secretfile import write_secret
from further_link.trust.teachers import public_key_text, signed_message

KEY_FILE = "teacher-key.pem"


class TeacherKey:
    """Loads (or makes, the first time) the key in ``config_dir``."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private

    @classmethod
    def load_or_create(cls, config_dir: Path) -> TeacherKey:
        """Raises ClientError when the file exists but is not a key this tool made."""
        path = config_dir / KEY_FILE
        try:
            pem = path.read_bytes()
        except FileNotFoundError:
            private = Ed25519PrivateKey.generate()
            config_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_secret(
                path,
                private.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
            )
            return cls(private)
        except OSError as exc:
            raise ClientError(f"cannot read the teacher key {path}: {exc.strerror}") from None
        loaded: object = None
        with contextlib.suppress(ValueError, TypeError):
            loaded = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(loaded, Ed25519PrivateKey):
            raise ClientError(
                f"{path} is not an Ed25519 private key; move it away to make a new one"
            )
        return cls(loaded)

    @property
    def public(self) -> str:
        """The public key as devices are told it: base64 of its 32 bytes."""
        raw = self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return public_key_text(raw)

    def command(
        self, challenge: str, fingerprint: str | None, action: str, params: dict[str, Any]
    ) -> dict[str, Any]:
        """The body of ``POST /teacher`` for ``action``, signed for this challenge and device."""
        signature = self._private.sign(signed_message(challenge, fingerprint, action, params))
        return {
            "action": action,
            "params": params,
            "key": self.public,
            "challenge": challenge,
            "signature": base64.b64encode(signature).decode("ascii"),
        }
