"""Claims on shared hardware, program side: ``with further_link.claim("motors"): ...``.

Only one program at a time holds a name on a device; another program's
``claim`` of that name waits until it is free, so two learners' programs never
drive the same motors at once. Each claim is its own connection to the run's
side channel (see channel.py): the server holds the name for exactly as long as
that connection lives, so a claim ends when the block ends, or when the
program ends however it ends (the kernel closes the socket of a killed program).

Wire (frames as channel.py): program -> server ``C`` with JSON
``{"resource": str, "timeout": seconds | null}``; server -> program zero or
more ``Q`` frames (JSON ``{"position": int, "heldBy": str}``) while waiting,
then ``G`` (granted), ``T`` (timed out) or ``X`` (refused, UTF-8 reason).
Release: program -> server ``R`` (empty), answered with one ACK byte.
Only the standard library is imported here.
"""

from __future__ import annotations

import functools
import json
import socket
import sys
import threading
from typing import Any, Callable, TypeVar

from further_link.channel import HEADER, ChannelError, connect_channel, encode_frame

KIND_CLAIM = b"A"  # program -> server: claim (acquire) a resource (JSON)
KIND_RELEASE = b"R"  # program -> server: release the claim of this connection
KIND_QUEUED = b"Q"  # server -> program: still waiting (JSON position, heldBy)
KIND_GRANTED = b"G"  # server -> program: the resource is this program's
KIND_TIMED_OUT = b"T"  # server -> program: not granted within the timeout
KIND_REFUSED = b"X"  # server -> program: the claim is not allowed (UTF-8 reason)
# Resource names: what a learner would write, bounded so the server's tables stay small.
MAX_RESOURCE_CHARS = 64
MAX_REPLY_BYTES = 4096

F = TypeVar("F", bound=Callable[..., Any])


class ClaimTimeout(TimeoutError):
    """``claim(..., timeout=s)`` was not granted within ``s`` seconds."""


class ClaimError(ChannelError):
    """The server refused the claim (e.g. an unusable name) or went away."""


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ClaimError("further-link closed the side channel during a claim")
        data += chunk
    return data


def _read_reply(sock: socket.socket) -> tuple[bytes, bytes]:
    kind, length = HEADER.unpack(_recv_exactly(sock, HEADER.size))
    if length > MAX_REPLY_BYTES:
        raise ClaimError("further-link sent an oversized claim reply")
    return kind, _recv_exactly(sock, length)


class claim:
    """Hold the device-wide resource ``name`` (e.g. ``"motors"``) while a block runs.

    Use as ``with claim("motors"):``, as a decorator ``@claim("motors")``, or
    with ``timeout`` (seconds; ``None`` waits for as long as it takes). While
    another program holds the name this waits, and says so once on stderr.
    Raises ``ClaimTimeout`` when the timeout passes first, ``ClaimError`` when
    the server refuses the name, ``ChannelError`` outside further-link.
    """

    def __init__(self, name: str, timeout: float | None = None) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ValueError("claim needs a resource name, e.g. claim('motors')")
        if len(name) > MAX_RESOURCE_CHARS:
            raise ValueError(f"claim: a resource name has at most {MAX_RESOURCE_CHARS} characters")
        if timeout is not None and timeout < 0:
            raise ValueError("claim: timeout is a number of seconds, 0 or more")
        self.name = name
        self.timeout = timeout
        # One connection per entry; a decorated function may run in several threads at once.
        self._local = threading.local()

    def __enter__(self) -> claim:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        stack.append(self._acquire())
        return self

    def __exit__(self, *exc_info: object) -> None:
        sock: socket.socket = self._local.stack.pop()
        try:
            sock.sendall(encode_frame(KIND_RELEASE, b""))
            sock.recv(1)  # the ACK: the next program may start once this returns
        except OSError:
            pass  # closing below releases the claim as well
        finally:
            sock.close()

    def __call__(self, function: F) -> F:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self:
                return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    def _acquire(self) -> socket.socket:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        sock = connect_channel()
        request = json.dumps({"resource": self.name, "timeout": self.timeout}).encode("utf-8")
        said_waiting = False
        try:
            sock.sendall(encode_frame(KIND_CLAIM, request))
            while True:
                kind, payload = _read_reply(sock)
                if kind == KIND_GRANTED:
                    return sock
                if kind == KIND_QUEUED:
                    if not said_waiting:
                        said_waiting = True
                        self._say_waiting(json.loads(payload.decode("utf-8")))
                    continue
                if kind == KIND_TIMED_OUT:
                    raise ClaimTimeout(
                        f"claim({self.name!r}): another program still held it after "
                        f"{self.timeout} s"
                    )
                if kind == KIND_REFUSED:
                    raise ClaimError(f"claim({self.name!r}): {payload.decode('utf-8', 'replace')}")
                raise ClaimError(f"claim({self.name!r}): unexpected reply {kind!r}")
        except (ClaimTimeout, ClaimError):
            sock.close()  # both are OSErrors, and say what happened already
            raise
        except OSError as exc:
            sock.close()
            raise ClaimError(f"claim({self.name!r}): side channel failed: {exc}") from None
        except BaseException:
            sock.close()
            raise

    def _say_waiting(self, queued: dict[str, Any]) -> None:
        if sys.stderr is None:
            return
        position = queued.get("position")
        sys.stderr.write(
            f"waiting for {self.name!r}: another program is using it "
            f"(this program is number {position} in the queue)\n"
        )
        sys.stderr.flush()


__all__ = ["ClaimError", "ClaimTimeout", "claim"]
