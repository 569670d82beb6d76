"""Writing files that hold secrets (the device token, the TLS key).

A leftover file from an earlier attempt must never lend its mode to a new
secret, so each write creates a fresh file under a random name with
``O_EXCL`` (never opening something already there, nor following a link),
makes it 0600 with ``fchmod`` before the first byte (the umask cannot widen
it), and renames it over the target only when complete.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

SECRET_MODE = 0o600
_ATTEMPTS = 8


def write_secret(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, readable only by its owner.

    Raises ``OSError`` when the directory cannot be written (or, after a few
    tries, when every fresh name is taken).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    for attempt in range(_ATTEMPTS):
        partial = path.with_name(f".{path.name}.{secrets.token_hex(8)}.partial")
        try:
            fd = os.open(partial, flags, SECRET_MODE)
        except FileExistsError:
            if attempt == _ATTEMPTS - 1:
                raise
            continue
        break
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), SECRET_MODE)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
