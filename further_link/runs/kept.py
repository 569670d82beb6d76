"""The output a run keeps for whoever attaches to it later: the last N bytes, in order.

A run that may outlive its connection (``keepAlive``) keeps everything it
prints here, so a client that attaches gets it all again before the live
output. The bound is the only place output is ever dropped: the oldest goes
first, and the replay says where and how much in one ``stdout`` line.
"""

from __future__ import annotations

from collections import deque

STDOUT = "stdout"


def utf8_length(text: str) -> int:
    # isascii() is O(1) in CPython: the common case costs no copy.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def dropped_notice(count: int) -> str:
    """The line that stands where ``count`` bytes of output were not kept."""
    return f"\u2026 {count} bytes not kept \u2026\n"


class KeptOutput:
    """At most ``limit_bytes`` (UTF-8) of ``(stream, text)`` chunks, newest last."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._chunks: deque[tuple[str, str, int]] = deque()
        self._bytes = 0
        self.dropped_bytes = 0

    @property
    def kept_bytes(self) -> int:
        return self._bytes

    def add(self, stream: str, text: str) -> None:
        """Keep ``text``; drop the oldest output beyond the limit (never split a character)."""
        size = utf8_length(text)
        self._chunks.append((stream, text, size))
        self._bytes += size
        while self._bytes > self.limit_bytes:
            excess = self._bytes - self.limit_bytes
            old_stream, old_text, old_size = self._chunks.popleft()
            self._bytes -= old_size
            tail, tail_size = _tail(old_text, old_size - excess) if old_size > excess else ("", 0)
            if tail_size:
                self._chunks.appendleft((old_stream, tail, tail_size))
                self._bytes += tail_size
            self.dropped_bytes += old_size - tail_size

    def replay(self) -> list[tuple[str, str]]:
        """Everything kept, oldest first, after the notice of what was dropped (if any)."""
        kept = [(stream, text) for stream, text, _ in self._chunks]
        if self.dropped_bytes:
            kept.insert(0, (STDOUT, dropped_notice(self.dropped_bytes)))
        return kept


def _tail(text: str, most_bytes: int) -> tuple[str, int]:
    """The end of ``text`` in at most ``most_bytes`` UTF-8 bytes, starting on a character."""
    data = text.encode("utf-8", "surrogatepass")[-most_bytes:]
    start = 0
    # Continuation bytes (10xxxxxx) belong to a character whose start was cut off.
    while start < len(data) and data[start] & 0xC0 == 0x80:
        start += 1
    return data[start:].decode("utf-8", "surrogatepass"), len(data) - start
