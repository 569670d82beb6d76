"""The quota check of one upload: a walk of the whole work dir against the running total.

    python benchmarks/quota_walk.py

Builds a work dir of 200 projects of 100 files in a temporary directory and
prints how long one upload's quota check takes each way: figures only.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from further_link.files.quota import WorkDirUsage, disk_usage

PROJECTS = 200
FILES = 100
ROUNDS = 100


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="quota-bench-"))
    try:
        for project in range(PROJECTS):
            folder = root / f"project{project}"
            folder.mkdir()
            for file in range(FILES):
                (folder / f"file{file}.txt").write_bytes(b"x" * 100)
        started = time.perf_counter()
        disk_usage(root)
        walk = time.perf_counter() - started
        usage = WorkDirUsage(root, recount_seconds=3600)
        usage.current()
        started = time.perf_counter()
        for _ in range(ROUNDS):
            # What an upload replacing one project does: count that project only.
            delta = FILES * 100 - disk_usage(root / "project0")
            assert usage.reserve(delta, 10**12, lambda need: 0) == 0
            usage.settle(delta, in_place=False)
        running = (time.perf_counter() - started) / ROUNDS
        print(
            f"quota check of one upload, work dir of {PROJECTS * FILES:,} files: "
            f"whole walk {walk * 1000:.1f} ms, running total {running * 1000:.2f} ms"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
