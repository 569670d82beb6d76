"""The learner programs the benchmarks ask the server to run."""

from __future__ import annotations

from _bare import BENCH_DIR, HELLO_SOURCE

__all__ = ["HELLO_SOURCE", "echo_source", "flood_source", "sleep_source", "throughput_source"]

FLOOD_TOTAL_PREFIX = "flood-total="


def throughput_source(blocks: int) -> str:
    """Writes ``blocks`` 64 KiB blocks of the pattern stream to stdout."""
    return f"""\
import os
import sys
sys.path.insert(0, {str(BENCH_DIR)!r})
from _patterns import pattern_block
for index in range({blocks}):
    view = memoryview(pattern_block(index))
    for _ in range(len(view)):  # a write moves at least one byte
        if not view:
            break
        view = view[os.write(1, view):]
"""


def flood_source(max_blocks: int) -> str:
    """Writes the pattern stream until SIGINT or SIGTERM, then reports how much on stderr.

    The handler only sets a flag, so a write it interrupts is finished first
    and the count is exact; the benchmark compares it with what it received.
    """
    return f"""\
import os
import signal
import sys
sys.path.insert(0, {str(BENCH_DIR)!r})
from _patterns import pattern_block
stopping = []
# `stop` sends SIGINT first (KeyboardInterrupt), then SIGTERM.
signal.signal(signal.SIGINT, lambda signum, frame: stopping.append(signum))
signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
written = 0
for index in range({max_blocks}):
    if stopping:
        break
    view = memoryview(pattern_block(index))
    for _ in range(len(view)):
        if not view:
            break
        count = os.write(1, view)
        written += count
        view = view[count:]
sys.stderr.write("{FLOOD_TOTAL_PREFIX}%d\\n" % written)
"""


def echo_source(lines: int) -> str:
    """Echoes ``lines`` lines of stdin to stdout, one at a time."""
    return f"""\
import sys
for _ in range({lines}):
    line = sys.stdin.readline()
    if not line:
        break
    sys.stdout.write(line)
"""


def sleep_source(seconds: float) -> str:
    return f"import time\ntime.sleep({seconds})\n"
