"""How ``further-link token --rotate`` reaches a server that can no longer read the token file.

A server started as root reads the device token while root, then drops to
the program user, who must never read the token file; so a rotated token
cannot be re-read from disk. Instead, while still root, the server binds a
unix socket in ``<config dir>/control/`` (root-only, mode 0700): only root
can connect to it by path, and the listening socket keeps accepting after
the drop. ``token --rotate`` (run as root) writes the new token file, then
hands the new token to every server listening there. The server also checks
the peer is root (SO_PEERCRED), so nothing else can talk to it even through
a leaked descriptor.

Wire format: the client sends ``token <TOKEN>\\n``; the server answers ``ok\\n``.
``further-link token`` also asks ``generation\\n`` and gets ``generation <N>\\n``:
the pairing code's generation (pairing.py), which a dropped server can no
longer record in the root-only config dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable
from pathlib import Path
from typing import Callable

from further_link.trust.pairing import read_generation

log = logging.getLogger(__name__)

CONTROL_DIR = "control"
MAX_LINE = 256
# How long the server waits for the command line; how long the command waits for
# the server, which answers once it has ended every connection (programs may
# take their grace period and more to stop).
READ_TIMEOUT = 10.0
REPLY_TIMEOUT = 60.0
# Token characters: token_urlsafe's alphabet.
TOKEN_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")

TokenHandler = Callable[[str], Awaitable[None]]
GenerationSource = Callable[[], int]


def control_dir(config_dir: Path) -> Path:
    return config_dir / CONTROL_DIR


def bind_control_socket(config_dir: Path) -> socket.socket:
    """A listening socket at ``<config dir>/control/<pid>.sock``; call while root.

    The directory is made root-only; sockets of servers that are gone are
    removed. Raises OSError when the socket cannot be made.
    """
    directory = control_dir(config_dir)
    config_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory.mkdir(exist_ok=True, mode=0o700)
    info = os.lstat(directory)
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise OSError(f"{directory} must belong to root alone (mode 0700)")
    for stale in directory.glob("*.sock"):
        if not _answers(stale):
            with contextlib.suppress(OSError):
                stale.unlink()
    path = directory / f"{os.getpid()}.sock"
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(8)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


async def serve_control(
    sock: socket.socket, on_token: TokenHandler, generation: GenerationSource
) -> asyncio.AbstractServer:
    """Accept rotated tokens from root on ``sock`` and tell it the pairing code's generation.

    The returned server must be closed.
    """

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = writer.get_extra_info("socket")
            if peer is None or peer_uid(peer) != 0:
                log.warning("refused a control connection from a process that is not root")
                return
            line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
            word, _, token = line[:MAX_LINE].decode("ascii", "replace").strip().partition(" ")
            if word == "generation" and not token:
                writer.write(f"generation {generation()}\n".encode("ascii"))
                await writer.drain()
                return
            if word != "token" or not token or not set(token) <= TOKEN_CHARACTERS:
                writer.write(b"error: expected 'token TOKEN' or 'generation'\n")
                return
            await on_token(token)
            writer.write(b"ok\n")
            await writer.drain()
        except (OSError, asyncio.TimeoutError) as exc:
            log.info("a control connection ended early: %s", exc)
        finally:
            writer.close()

    return await asyncio.start_unix_server(accept, sock=sock)


def notify_servers(config_dir: Path, token: str) -> int:
    """Hand ``token`` to every running server of this config dir; returns how many took it.

    Sockets of servers that are gone are removed. Needs root (the directory is root-only).
    """
    directory = control_dir(config_dir)
    told = 0
    try:
        paths = sorted(directory.glob("*.sock"))
    except OSError:
        return 0
    for path in paths:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(REPLY_TIMEOUT)
            try:
                sock.connect(str(path))
            except (ConnectionRefusedError, FileNotFoundError):
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            except OSError as exc:
                log.warning("cannot reach the server at %s: %s", path, exc)
                continue
            try:
                sock.sendall(f"token {token}\n".encode("ascii"))
                reply = sock.recv(MAX_LINE)
            except OSError as exc:
                log.warning("the server at %s did not take the new token: %s", path, exc)
                continue
            if reply.strip() == b"ok":
                told += 1
    return told


def ask_generation(config_dir: Path) -> int | None:
    """The highest pairing-code generation the running servers of this config dir report.

    None when no server answers (then the generation file is the truth). Needs root.
    """
    answers: list[int] = []
    try:
        paths = sorted(control_dir(config_dir).glob("*.sock"))
    except OSError:
        return None
    for path in paths:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(READ_TIMEOUT)
            try:
                sock.connect(str(path))
                sock.sendall(b"generation\n")
                reply = sock.recv(MAX_LINE).decode("ascii", "replace").split()
            except OSError:
                continue
        if len(reply) == 2 and reply[0] == "generation" and reply[1].isdigit():
            answers.append(int(reply[1]))
    return max(answers) if answers else None


def current_generation(config_dir: Path) -> int:
    """The pairing code's generation as the device shows it: a running server's, else the file's."""
    generation = ask_generation(config_dir)
    return read_generation(config_dir) if generation is None else generation
