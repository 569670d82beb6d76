"""The deterministic output stream used by the throughput and flood benchmarks.

Programs run by the server import ``pattern_block`` from here (the benchmark
puts this directory on their ``sys.path``), and so does the bare websocket
server, so every producer writes exactly the same bytes. ``StreamChecker``
verifies a received text stream against it piece by piece, without keeping
the whole stream in memory. Standard library only, so importing it inside a
program costs next to nothing.
"""

from __future__ import annotations

BLOCK_BYTES = 64 * 1024
_LINE = 64
_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_HEADER = "%07d\n"  # 8 bytes: makes every block unique, so drops and repeats show


def _body() -> str:
    lines = []
    for number in range(BLOCK_BYTES // _LINE):
        start = number % len(_ALPHABET)
        rotated = _ALPHABET[start:] + _ALPHABET[:start]
        lines.append((rotated * 2)[: _LINE - 1] + "\n")
    return "".join(lines)[len(_HEADER % 0) :]


_BODY = _body()


def pattern_text(index: int) -> str:
    """Block ``index`` of the stream: 64 KiB of printable ASCII lines."""
    return _HEADER % (index % 10_000_000) + _BODY


def pattern_block(index: int) -> bytes:
    return pattern_text(index).encode("ascii")


class StreamChecker:
    """Checks that text received so far is exactly the start of the stream."""

    def __init__(self) -> None:
        self.received = 0  # characters (== bytes: the stream is ASCII)
        self.mismatch_at: int | None = None
        self._index = 0
        self._block = pattern_text(0)
        self._offset = 0

    @property
    def ok(self) -> bool:
        return self.mismatch_at is None

    def feed(self, text: str) -> None:
        if self.mismatch_at is not None:
            self.received += len(text)
            return
        position = 0
        # Each pass consumes the rest of a block or the rest of ``text``.
        for _ in range(len(text) // BLOCK_BYTES + 2):
            if position == len(text):
                break
            if self._offset == len(self._block):
                self._index += 1
                self._block = pattern_text(self._index)
                self._offset = 0
            take = min(len(text) - position, len(self._block) - self._offset)
            if text[position : position + take] != self._block[self._offset : self._offset + take]:
                self.mismatch_at = self.received + position
                self.received += len(text)
                return
            position += take
            self._offset += take
        assert position == len(text), "loop bound too small"
        self.received += len(text)
