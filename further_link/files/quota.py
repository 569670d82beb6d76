"""The work dir's total size: what uploads and the url cache may hold together.

The quota counts the apparent sizes (``st_size``) of every regular file in
the work dir, found without following links: uploads, url cache entries, and
whatever programs wrote there; not the staging directories of uploads in
progress. Walking the whole work dir on every upload costs time in
proportion to everything ever stored, so ``WorkDirUsage`` keeps a running
total instead: counted by one walk when first needed, moved exactly by
uploads (the new directory's bytes less the one it replaces), downloads and
evictions, and counted again from the disk when it is older than the
recount interval, which catches what programs wrote or deleted meanwhile.
When an upload would take the work dir over its quota, url cache entries go
first, least recently used first (an entry's modification time is refreshed
each time it is used); if that is not enough the upload is refused with a
message naming the quota. Everything here is blocking file system work, for
a thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path

# Directories of uploads in progress (upload.py) and partial downloads: not stored yet.
STAGING_PREFIX = ".flupload-"
PARTIAL_PREFIX = ".part-"


def record_name(bucket_name: str, file_name: str) -> str:
    """The file name of a cache entry's url record."""
    return hashlib.sha256(f"{bucket_name}\0{file_name}".encode()).hexdigest()


def disk_usage(root: Path) -> int:
    """Bytes in regular files under ``root`` (0 when it does not exist).

    Uploads and downloads in progress are left out.
    """
    total = 0
    pending = [str(root)]
    while pending:
        directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(info.st_mode):
                if not entry.name.startswith(STAGING_PREFIX):
                    pending.append(entry.path)
            elif stat.S_ISREG(info.st_mode) and not entry.name.startswith(PARTIAL_PREFIX):
                total += info.st_size
    return total


class WorkDirUsage:
    """A running total of ``disk_usage(root)``, safe to use from several threads.

    ``reserve`` is the quota check and the booking in one step, so two
    uploads at once cannot both fit into the same free bytes; the booking is
    held apart from the counted total until ``settle`` (the upload is in
    place, or failed), so a recount in between loses nothing.
    """

    def __init__(
        self,
        root: Path,
        recount_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self._recount_seconds = recount_seconds
        self._clock = clock
        self._total: int | None = None
        self._reserved = 0  # booked by uploads not yet in place
        self._counted_at = 0.0
        self._lock = threading.Lock()

    def current(self) -> int:
        """The total with the bookings, counted again from the disk when it is stale."""
        with self._lock:
            return self._fresh_total() + self._reserved

    def add(self, delta: int) -> None:
        """Book bytes written (positive) or removed (negative) by the server itself."""
        with self._lock:
            if self._total is not None:
                self._total += delta

    def reserve(self, delta: int, quota: int, free: Callable[[int], int]) -> int:
        """Book ``delta`` bytes if the total stays within ``quota``; return the bytes over.

        When over, ``free(need)`` is asked to remove files and return the bytes
        it removed; 0 means the booking was made, anything else that it was not.
        """
        with self._lock:
            over = self._fresh_total() + self._reserved + delta - quota
            if over > 0:
                freed = free(over)
                assert self._total is not None
                self._total -= freed
                over -= freed
            if over > 0:
                return over
            self._reserved += delta
            return 0

    def settle(self, delta: int, in_place: bool) -> None:
        """End a booking of ``reserve``: its bytes are now on disk, or never will be."""
        with self._lock:
            self._reserved -= delta
            if in_place and self._total is not None:
                self._total += delta

    def _fresh_total(self) -> int:
        now = self._clock()
        if self._total is None or now - self._counted_at >= self._recount_seconds:
            self._total = disk_usage(self.root)
            self._counted_at = now
        return self._total


def evict_least_recent(cache_dir: Path, records_dir: str, need: int, busy: Collection[Path]) -> int:
    """Delete cache entries, least recently used first, until ``need`` bytes are freed.

    Entries in ``busy`` (being fetched or copied) are kept. Returns the bytes freed.
    """
    entries: list[tuple[float, int, Path, Path]] = []
    with contextlib.suppress(OSError):
        for bucket in os.scandir(cache_dir):
            if bucket.name == records_dir or not bucket.is_dir(follow_symlinks=False):
                continue
            for item in os.scandir(bucket.path):
                info = item.stat(follow_symlinks=False)
                if not stat.S_ISREG(info.st_mode) or item.name.startswith(".part-"):
                    continue
                path = Path(item.path)
                if path in busy:
                    continue
                record = cache_dir / records_dir / record_name(bucket.name, item.name)
                entries.append((info.st_mtime, info.st_size, path, record))
    entries.sort(key=lambda entry: entry[0])
    freed = 0
    for _, size, path, record in entries:
        if freed >= need:
            break
        with contextlib.suppress(FileNotFoundError):
            record.unlink()
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        freed += size
    return freed
