"""Telling a client that is busy reading a flood from one that has vanished.

The websocket heartbeat's ping travels behind whatever output is already on
its way, so a client reading a flood over slow Wi-Fi answers it late although
it is alive. Its TCP stack, though, keeps acknowledging the output it reads;
a client whose network is gone acknowledges nothing. Linux counts the bytes
the peer has acknowledged (``tcpi_bytes_acked`` of ``TCP_INFO``, Linux 4.1+).
"""

from __future__ import annotations

import socket
import struct

# struct tcp_info (linux/tcp.h): tcpi_bytes_acked is a u64 at byte 120.
_BYTES_ACKED = struct.Struct("=Q")
_BYTES_ACKED_OFFSET = 120
_TCP_INFO_READ = 256
# More acknowledged than the ping itself (and its TLS record) means output was read.
PROGRESS_BYTES = 256


def bytes_acked(sock: socket.socket | None) -> int | None:
    """Bytes of ours the peer has acknowledged so far; ``None`` where unknown."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_READ)
    except (OSError, AttributeError):
        return None
    if len(info) < _BYTES_ACKED_OFFSET + _BYTES_ACKED.size:
        return None
    value: int = _BYTES_ACKED.unpack_from(info, _BYTES_ACKED_OFFSET)[0]
    return value


def made_progress(before: int | None, now: int | None) -> bool:
    """Whether the peer read output between two ``bytes_acked`` readings."""
    return before is not None and now is not None and now - before > PROGRESS_BYTES
