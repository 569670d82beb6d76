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

from .errors import DownloadError, LimitExceededError, UnreachableError, UploadError
from .paths import confine_path, describe_kind
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


class UrlCache:
    """Downloads each (bucketName, fileName) once; shared by all connections."""

    def __init__(self, cache_dir: Path, http: aiohttp.ClientSession, max_bytes: int) -> None:
        self.cache_dir = cache_dir
        self._http = http
        self._max_bytes = max_bytes
        # One lock per cache entry while anyone wants it, so it is fetched once.
        self._locks: dict[Path, asyncio.Lock] = {}
        self._wanted_by: dict[Path, int] = {}

    async def fetch(self, file: UrlFile) -> Path:
        """The cached copy of ``file``, downloading it first if needed."""
        scheme = urlsplit(file.url).scheme.lower()
        if scheme not in ("http", "https"):
            raise DownloadError(f"url {file.url!r} is not http or https")
        target = self._locate(file)
        lock = self._locks.setdefault(target, asyncio.Lock())
        self._wanted_by[target] = self._wanted_by.get(target, 0) + 1
        try:
            async with lock:
                if target.is_file():
                    log.debug("cache hit for %s", target)
                else:
                    await self._download(file.url, target)
        finally:
            self._wanted_by[target] -= 1
            if self._wanted_by[target] == 0:
                del self._wanted_by[target], self._locks[target]
        return target

    def _locate(self, file: UrlFile) -> Path:
        """The real path of ``file``'s cache entry; its bucket is created, nothing outside."""
        work_dir = Path(os.path.realpath(self.cache_dir.parent))
        cache = confine_path(work_dir, self.cache_dir.name, "url cache directory", nested=False)
        _make_directories(work_dir, cache, "the url cache directory")
        bucket = confine_path(cache, file.bucket_name, "bucketName", nested=False)
        _make_directories(cache, bucket, f"bucketName {file.bucket_name!r}")
        target = confine_path(bucket, file.file_name, "fileName", nested=False)
        if target.is_dir():
            raise UploadError(
                f"fileName {file.file_name!r} is a directory in the url cache, not a file"
            )
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
                # Compressed bodies are decoded as they arrive, so only a plain body can be
                # compared with Content-Length (aiohttp checks the encoded length itself).
                encoded = response.headers.get(aiohttp.hdrs.CONTENT_ENCODING, "identity").lower()
                if declared is not None and encoded == "identity" and received != declared:
                    raise DownloadError(
                        f"downloading {url} failed: got {received} of {declared} bytes"
                    )
        except aiohttp.ClientConnectorError as exc:
            raise UnreachableError(
                url, f"downloading {url} failed: {_describe_client_error(exc)}"
            ) from None
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
) -> Path:
    """Create or replace ``work_dir/<name>`` with the uploaded files; return its path."""
    text_bytes = _check_limits(command, limits)
    work_dir.mkdir(parents=True, exist_ok=True)
    work_real = Path(os.path.realpath(work_dir))
    what = f"upload directory name {command.name!r}"
    target = confine_path(work_dir, command.name, "upload directory name")
    parts = target.relative_to(work_real).parts
    if parts[0] == CACHE_DIR_NAME or any(part.startswith(STAGING_PREFIX) for part in parts):
        raise UploadError(f"{what} is reserved by further-link")
    if os.path.lexists(target) and not target.is_dir():
        kind = describe_kind(os.lstat(target).st_mode)
        raise UploadError(f"{what} is {kind} in the work dir, not a directory; remove it first")
    created = _make_directories(work_real, target.parent, what)
    staging: Path | None = None
    try:
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=STAGING_PREFIX))
        await _fill(staging, command, cache, limits.max_bytes, text_bytes)
        _swap_in(staging, target)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    log.info("uploaded %d file(s) into %r", len(command.files), target)
    return target


def _check_limits(command: UploadCommand, limits: UploadLimits) -> int:
    """Refuse an upload over the file-count or text caps; return its bytes of text."""
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
    return text_bytes


async def _fill(
    staging: Path, command: UploadCommand, cache: UrlCache, max_bytes: int, total: int
) -> None:
    """Write every file into ``staging``, keeping the ``total`` bytes within ``max_bytes``.

    Every alias is checked before anything is written or downloaded.
    """
    destinations = {
        alias: confine_path(staging, alias, "upload file name") for alias in command.files
    }
    _check_collisions(list(command.files))
    for alias, file in command.files.items():
        destination = destinations[alias]
        destination.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(file, TextFile):
            destination.write_text(file.text, encoding="utf-8")
            continue
        cached = await cache.fetch(file)
        total += cached.stat().st_size
        if total > max_bytes:
            raise LimitExceededError(
                f"upload is over {max_bytes} bytes with {alias!r}; "
                "the limit is the total of all its files"
            )
        await asyncio.get_running_loop().run_in_executor(None, shutil.copyfile, cached, destination)


def _check_collisions(aliases: list[str]) -> None:
    """``a`` and ``a/b`` cannot both be files; say so rather than fail half-way."""
    names = set(aliases)
    for alias in aliases:
        parts = alias.split("/")
        for depth in range(1, len(parts)):
            prefix = "/".join(parts[:depth])
            if prefix in names:
                raise UploadError(
                    f"upload file names {prefix!r} and {alias!r} collide: "
                    f"{prefix!r} cannot be both a file and a directory"
                )


def _make_directories(base: Path, path: Path, what: str) -> list[Path]:
    """``mkdir -p`` below ``base`` (both real paths); return what was created, outermost first.

    A file in the way is reported by its name relative to ``base``, not as an OSError.
    """
    missing: list[Path] = []
    existing = path
    while not os.path.lexists(existing) and existing != base:
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        kind = describe_kind(os.lstat(existing).st_mode)
        where = os.path.relpath(existing, base)
        raise UploadError(f"{what} cannot be created: {where!r} is {kind}, not a directory")
    created: list[Path] = []
    try:
        for directory in reversed(missing):
            directory.mkdir()
            created.append(directory)
    except BaseException:
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    return created


def _swap_in(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target``; the old directory is removed only afterwards."""
    os.chmod(staging, 0o755)
    if not os.path.lexists(target):
        os.rename(staging, target)
        return
    retired = Path(tempfile.mkdtemp(dir=target.parent, prefix=STAGING_PREFIX))
    os.rename(target, retired / "old")
    try:
        os.rename(staging, target)
    except OSError:
        # Put the previous upload back rather than lose it with the retired dir.
        os.rename(retired / "old", target)
        os.rmdir(retired)
        raise
    shutil.rmtree(retired, ignore_errors=True)
