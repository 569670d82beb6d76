"""The work dir's total size: what uploads and the url cache may hold together.

Sizes are apparent sizes (``st_size``) of regular files, found without
following links. When an upload would take the work dir over its quota, url
cache entries go first, least recently used first (an entry's modification
time is refreshed each time it is used); if that is not enough the upload is
refused with a message naming the quota. Everything here is blocking file
system work, for a thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Collection
from pathlib import Path


def record_name(bucket_name: str, file_name: str) -> str:
    """The file name of a cache entry's url record."""
    return hashlib.sha256(f"{bucket_name}\0{file_name}".encode()).hexdigest()


def disk_usage(root: Path) -> int:
    """Bytes in regular files under ``root`` (0 when it does not exist)."""
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
                pending.append(entry.path)
            elif stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total


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
