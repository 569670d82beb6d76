"""Turning an ``upload`` command into a directory under the work dir.

The directory is built in a staging directory beside its target and swapped
in only when every file is in place, so a failed upload leaves the previous
one untouched. ``url`` files are streamed to disk into the shared cache
(``.flcache/<bucketName>/<fileName>``) once, then copied from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import aiohttp

from .errors import DownloadError, LimitExceededError, UploadError
from .paths import confine_path
from .protocol import TextFile, UploadCommand, UrlFile

log = logging.getLogger(__name__)

CACHE_DIR_NAME = ".flcache"
STAGING_PREFIX = ".flupload-"
DOWNLOAD_CHUNK = 64 * 1024
DOWNLOAD_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=30)


@dataclass(frozen=True)
class UploadLimits:
    max_files: int
    max_bytes: int
    max_download_bytes: int


@dataclass(frozen=True)
class Owner:
    """Account that must own materialised files (when the server runs as root)."""

    uid: int
    gid: int


class UrlCache:
    """Downloads each (bucketName, fileName) once; shared by all connections."""

    def __init__(self, cache_dir: Path, http: aiohttp.ClientSession, max_bytes: int) -> None:
        self.cache_dir = cache_dir
        self._http = http
        self._max_bytes = max_bytes
        self._locks: dict[Path, asyncio.Lock] = {}

    async def fetch(self, file: UrlFile) -> Path:
        """The cached copy of ``file``, downloading it first if needed."""
        scheme = urlsplit(file.url).scheme.lower()
        if scheme not in ("http", "https"):
            raise DownloadError(f"url {file.url!r} is not http or https")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        bucket = confine_path(self.cache_dir, file.bucket_name, "bucketName", nested=False)
        bucket.mkdir(exist_ok=True)
        target = confine_path(bucket, file.file_name, "fileName", nested=False)
        lock = self._locks.setdefault(target, asyncio.Lock())
        async with lock:
            if target.is_file():
                log.debug("cache hit for %s", target)
                return target
            await self._download(file.url, target)
        self._locks.pop(target, None)
        return target

    async def _download(self, url: str, target: Path) -> None:
        fd, partial = tempfile.mkstemp(dir=target.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out:
                await self._stream_into(url, out)
            os.replace(partial, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
            raise
        log.info("downloaded %s into the cache", url)

    async def _stream_into(self, url: str, out: BinaryIO) -> None:
        try:
            async with self._http.get(url, timeout=DOWNLOAD_TIMEOUT) as response:
                if response.status != 200:
                    raise DownloadError(
                        f"downloading {url} failed: the server answered HTTP {response.status}"
                    )
                declared = response.content_length
                if declared is not None and declared > self._max_bytes:
                    raise LimitExceededError(
                        f"{url} is {declared} bytes, over the download limit of "
                        f"{self._max_bytes} bytes"
                    )
                received = 0
                async for chunk in response.content.iter_chunked(DOWNLOAD_CHUNK):
                    received += len(chunk)
                    if received > self._max_bytes:
                        raise LimitExceededError(
                            f"{url} is larger than the download limit of {self._max_bytes} bytes"
                        )
                    out.write(chunk)
                if declared is not None and received != declared:
                    raise DownloadError(
                        f"downloading {url} failed: got {received} of {declared} bytes"
                    )
        except aiohttp.ClientError as exc:
            raise DownloadError(
                f"downloading {url} failed: {_describe_client_error(exc)}"
            ) from None
        except asyncio.TimeoutError:
            raise DownloadError(f"downloading {url} failed: the server stopped answering") from None


def _describe_client_error(exc: aiohttp.ClientError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"could not connect ({exc.os_error.strerror or exc.os_error})"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the connection closed before the whole file arrived"
    if isinstance(exc, aiohttp.InvalidURL):
        return "the url is not valid"
    return str(exc) or type(exc).__name__


async def materialise_upload(
    command: UploadCommand,
    work_dir: Path,
    cache: UrlCache,
    limits: UploadLimits,
    owner: Owner | None = None,
) -> Path:
    """Create or replace ``work_dir/<name>`` with the uploaded files; return its path."""
    if len(command.files) > limits.max_files:
        raise LimitExceededError(
            f"upload has {len(command.files)} files; the limit is {limits.max_files}"
        )
    text_bytes = sum(
        len(f.text.encode("utf-8")) for f in command.files.values() if isinstance(f, TextFile)
    )
    if text_bytes > limits.max_bytes:
        raise LimitExceededError(
            f"upload is {text_bytes} bytes of text; the limit is {limits.max_bytes} bytes"
        )
    work_dir.mkdir(parents=True, exist_ok=True)
    target = confine_path(work_dir, command.name, "upload directory name")
    top = Path(os.path.relpath(target, os.path.realpath(work_dir))).parts[0]
    if top == CACHE_DIR_NAME or top.startswith(STAGING_PREFIX):
        raise UploadError(f"upload directory name {command.name!r} is reserved by further-link")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=STAGING_PREFIX))
    try:
        total = text_bytes
        for alias, file in command.files.items():
            destination = confine_path(staging, alias, "upload file name")
            destination.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(file, TextFile):
                destination.write_text(file.text, encoding="utf-8")
                continue
            cached = await cache.fetch(file)
            total += cached.stat().st_size
            if total > limits.max_bytes:
                raise LimitExceededError(
                    f"upload is over {limits.max_bytes} bytes with {alias!r}; "
                    "the limit is the total of all its files"
                )
            await asyncio.get_running_loop().run_in_executor(
                None, shutil.copyfile, cached, destination
            )
        if owner is not None:
            _chown_tree(staging, owner)
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("uploaded %d file(s) into %s", len(command.files), target)
    return target


def _chown_tree(root: Path, owner: Owner) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            os.chown(os.path.join(dirpath, name), owner.uid, owner.gid, follow_symlinks=False)
    os.chown(root, owner.uid, owner.gid)
    os.chmod(root, 0o755)


def _swap_in(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target``; the old directory is removed only afterwards."""
    os.chmod(staging, 0o755)
    if not os.path.lexists(target):
        os.rename(staging, target)
        return
    if target.is_symlink() or not target.is_dir():
        raise UploadError(f"{target.name!r} exists in the work dir and is not a directory")
    retired = Path(tempfile.mkdtemp(dir=target.parent, prefix=STAGING_PREFIX))
    os.rename(target, retired / "old")
    os.rename(staging, target)
    shutil.rmtree(retired, ignore_errors=True)
