"""Giving a flood's multi-megabyte message buffers back to the system when freed.

A client may send messages of up to ``FURTHER_LINK_MAX_MESSAGE_BYTES``; each
one passes through a few buffers of its size (aiohttp's frame assembly,
its text, its parsed values) that live for microseconds. glibc's malloc
serves blocks above its *mmap threshold* from fresh mappings it unmaps on
``free``, but after the first such block is freed it raises the threshold to
that block's size (up to 32 MiB), so from then on every message buffer comes
from the heap, whose freed middle is never given back: a client sending one
4 MiB message after another keeps the server's resident memory several
buffers higher than anything it holds. Setting the threshold once turns
that adjustment off, as ``MALLOC_MMAP_THRESHOLD_`` in the environment would.

The threshold sits above asyncio's read size (256 KiB: ``sock.recv``,
``os.read`` and the TLS layer's ``SSLObject.read`` each ask for that much,
then shrink the result to what arrived). Below it, every read would be a
mapping of its own, and a shrunk mapping keeps a whole page: a client
sending tiny websocket messages, one TLS record each, made the server hold
a 4 KiB page per 22-byte record, about 25 MiB for one batch of pings. The
server's own connections now read into a buffer (netguard.py), but TLS on
Python 3.9 and 3.10, stream readers (the noVNC proxy) and pipes still read
this way.
Smaller blocks, the vast majority, stay on the heap as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
# Above asyncio's 256 KiB reads (plus their object header), far below a message's
# multi-megabyte buffers.
LARGE_BLOCK_BYTES = 512 * 1024
# The largest piece of program output read from a pipe at once, or merged into
# one message. With JSON's escaping (``\n`` is two characters) and the
# websocket framing, each buffer such a piece passes through (bytes read,
# text, JSON text, frame) stays below LARGE_BLOCK_BYTES and so is reused from
# the heap: above it, every buffer would be a fresh mapping, page-faulted in
# and unmapped per message (measured: 0.38 of the bare websocket's
# throughput with 1 MiB pieces, 0.8-0.9 with these).
OUTPUT_PIECE_BYTES = 120 * 1024


def map_large_blocks(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Serve blocks of ``threshold`` bytes or more from their own mappings, for good.

    Returns False (and changes nothing) where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    log.debug("malloc: blocks of %d bytes or more mapped on their own: %s", threshold, done)
    return done
