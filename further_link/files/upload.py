"""Turning an ``upload`` command into a directory under the work dir.

The directory is built in a staging directory beside its target and swapped
in only when every file is in place, so a failed upload leaves the previous
one untouched. ``url`` files are streamed to disk into the shared cache
(``.flcache/<bucketName>/<fileName>``) once, then copied from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from further_link.config import Config
from further_link.errors import (
    DownloadError,
    LimitExceededError,
    UnreachableError,
    UploadError,
    VersionConflictError,
    excerpt,
    shorten,
)
from further_link.files.egress import DestinationRefused, DownloadPolicy
from further_link.files.paths import confine_path, describe_kind
from further_link.files.projects import version_at
from further_link.files.quota import (
    PARTIAL_PREFIX,
    WorkDirUsage,
    disk_usage,
    evict_least_recent,
    record_name,
)
from further_link.files.quota import STAGING_PREFIX as STAGING_PREFIX  # launch.py takes it here
from further_link.protocol.runpy import Base64File, TextFile, UploadCommand, UrlFile

log = logging.getLogger(__name__)

CACHE_DIR_NAME = ".flcache"
DOWNLOAD_CHUNK = 64 * 1024
DOWNLOAD_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=30)
MAX_REDIRECTS = 10
REDIRECTS = frozenset({301, 302, 303, 307, 308})
LOCATION = aiohttp.hdrs.LOCATION
# Beside the buckets in .flcache: one file per entry holding the url it came from.
RECORDS_DIR = ".flurls"


@dataclass(frozen=True)
class UploadLimits:
    max_files: int
    max_bytes: int
    max_download_bytes: int
    quota_bytes: int | None = None  # the whole work dir: uploads and url cache
    quota_recount_seconds: float = 60.0

    @classmethod
    def from_config(cls, config: Config) -> UploadLimits:
        return cls(
            max_files=config.max_upload_files,
            max_bytes=config.max_upload_bytes,
            max_download_bytes=config.max_download_bytes,
            quota_bytes=config.quota_bytes,
            quota_recount_seconds=config.quota_recount_seconds,
        )


@dataclass(frozen=True)
class UploadResult:
    path: Path  # the directory's real path
    version: str  # its version once the upload is in place (files/projects.py)


class DirectoryLocks:
    """One lock per upload target while anyone uploads there, shared by all connections.

    Held from the version check to the swap, so two tabs saving the same
    project with the same version cannot both pass the check.
    """

    def __init__(self) -> None:
        self._locks: dict[Path, asyncio.Lock] = {}
        self._wanted_by: dict[Path, int] = {}

    @contextlib.asynccontextmanager
    async def hold(self, target: Path) -> AsyncIterator[None]:
        lock = self._locks.setdefault(target, asyncio.Lock())
        self._wanted_by[target] = self._wanted_by.get(target, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._wanted_by[target] -= 1
            if self._wanted_by[target] == 0:
                del self._wanted_by[target], self._locks[target]


class UrlCache:
    """Downloads each url once into ``<bucketName>/<fileName>``; shared by all connections.

    The url an entry came from is recorded beside it (``.flurls/<hash>``, whose
    modification time also says when the entry was last used): a later
    upload naming the same entry with another url downloads again. Every
    destination, redirects included, must pass ``policy``; ``http`` must
    resolve names through ``egress.PolicyResolver`` with the same policy.
    """

    def __init__(
        self,
        cache_dir: Path,
        http: aiohttp.ClientSession,
        max_bytes: int,
        policy: DownloadPolicy | None = None,
    ) -> None:
        self.cache_dir = cache_dir
        self._http = http
        self._max_bytes = max_bytes
        self._policy = policy or DownloadPolicy()
        # One lock per cache entry while anyone wants it, so it is fetched once.
        self._locks: dict[Path, asyncio.Lock] = {}
        self._wanted_by: dict[Path, int] = {}
        # Upload targets (not cache entries): every upload goes through this object.
        self.directories = DirectoryLocks()
        self._usage: dict[Path, WorkDirUsage] = {}

    async def fetch_into(self, file: UrlFile, destination: Path) -> int:
        """Copy ``file`` from the cache (downloading it first if needed); return its size.

        The copy is made under the entry's lock, so another upload naming the
        same entry with another url cannot swap the content in between.
        """
        _check_scheme(file.url)
        loop = asyncio.get_running_loop()
        target, record = await loop.run_in_executor(None, self._locate, file)
        lock = self._locks.setdefault(target, asyncio.Lock())
        self._wanted_by[target] = self._wanted_by.get(target, 0) + 1
        try:
            async with lock:
                if await loop.run_in_executor(None, _recorded_for, target, record, file.url):
                    log.debug("cache hit for %s", excerpt(file.file_name))
                else:
                    replaced = await loop.run_in_executor(None, _file_size, target)
                    await self._download(file.url, target)
                    await loop.run_in_executor(None, _record, record, file.url)
                    self._book_download(target.stat().st_size - replaced)
                await loop.run_in_executor(None, shutil.copyfile, target, destination)
                return target.stat().st_size
        finally:
            self._wanted_by[target] -= 1
            if self._wanted_by[target] == 0:
                del self._wanted_by[target], self._locks[target]

    def _locate(self, file: UrlFile) -> tuple[Path, Path]:
        """The real paths of ``file``'s cache entry and of its url record.

        Its bucket is created, nothing outside the cache.
        """
        work_dir = Path(os.path.realpath(self.cache_dir.parent))
        cache = confine_path(work_dir, self.cache_dir.name, "url cache directory", nested=False)
        _make_directories(work_dir, cache, "the url cache directory")
        if file.bucket_name.startswith(".fl"):
            raise UploadError(
                f"bucketName {excerpt(file.bucket_name)} is reserved by further-link "
                "(names starting '.fl')"
            )
        records = confine_path(cache, RECORDS_DIR, "url records directory", nested=False)
        _make_directories(cache, records, "the url records directory")
        bucket = confine_path(cache, file.bucket_name, "bucketName", nested=False)
        _make_directories(cache, bucket, f"bucketName {excerpt(file.bucket_name)}")
        target = confine_path(bucket, file.file_name, "fileName", nested=False)
        if target.is_dir():
            raise UploadError(
                f"fileName {excerpt(file.file_name)} is a directory in the url cache, not a file"
            )
        return target, records / record_name(file.bucket_name, file.file_name)

    def usage(self, work_dir: Path, recount_seconds: float) -> WorkDirUsage:
        """The running total of ``work_dir`` (quota.py), one per directory."""
        root = Path(os.path.realpath(work_dir))
        if root not in self._usage:
            self._usage[root] = WorkDirUsage(root, recount_seconds)
        return self._usage[root]

    def _book_download(self, delta: int) -> None:
        usage = self._usage.get(Path(os.path.realpath(self.cache_dir.parent)))
        if usage is not None:
            usage.add(delta)

    def make_room(self, usage: WorkDirUsage, replaced: Path, staged: int, quota: int) -> int:
        """Book ``staged`` bytes replacing the directory ``replaced``, within ``quota`` (thread).

        Least recently used cache entries are evicted first; raises
        ``LimitExceededError`` when even that is not enough. Returns the bytes
        booked, for ``usage.settle``.
        """
        delta = staged - disk_usage(replaced)
        evicted = 0

        def evict(need: int) -> int:
            nonlocal evicted
            if Path(os.path.realpath(self.cache_dir.parent)) != usage.root:
                return 0  # the cache is in another directory: evicting frees nothing here
            evicted = evict_least_recent(
                Path(os.path.realpath(self.cache_dir)), RECORDS_DIR, need, set(self._locks)
            )
            return evicted

        over = usage.reserve(delta, quota, evict)
        if evicted:
            log.info("evicted %d bytes of url cache entries to stay within the quota", evicted)
        if over > 0:
            raise LimitExceededError(
                f"the work dir would hold {over} bytes more than its quota of "
                f"{quota} bytes (FURTHER_LINK_QUOTA_BYTES); remove old uploads first"
            )
        return delta

    async def _download(self, url: str, target: Path) -> None:
        fd, partial = tempfile.mkstemp(dir=target.parent, prefix=PARTIAL_PREFIX)
        try:
            with os.fdopen(fd, "wb") as out:
                await self._stream_into(url, out)
            os.replace(partial, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
            raise
        log.info("downloaded %s into the cache", shorten(url))

    async def _stream_into(self, url: str, out: BinaryIO) -> None:
        """Follow up to ``MAX_REDIRECTS`` redirects, each checked, then stream the body."""
        for _ in range(MAX_REDIRECTS + 1):
            location = await self._get(url, out)
            if location is None:
                return
            url = location
        raise DownloadError(f"downloading {shorten(url)} failed: over {MAX_REDIRECTS} redirects")

    async def _get(self, url: str, out: BinaryIO) -> str | None:
        """Stream ``url``'s body into ``out``; or return where it redirects to."""
        _check_scheme(url)
        try:
            self._policy.check_literal(URL(url).host or "")
            async with self._http.get(
                url, timeout=DOWNLOAD_TIMEOUT, allow_redirects=False
            ) as response:
                if response.status in REDIRECTS and LOCATION in response.headers:
                    return str(response.url.join(URL(response.headers[LOCATION])))
                if response.status != 200:
                    raise DownloadError(
                        f"downloading {shorten(url)} failed: "
                        f"the server answered HTTP {response.status}"
                    )
                declared = response.content_length
                if declared is not None and declared > self._max_bytes:
                    raise LimitExceededError(
                        f"{shorten(url)} is {declared} bytes, over the download limit of "
                        f"{self._max_bytes} bytes"
                    )
                received = 0
                async for chunk in response.content.iter_chunked(DOWNLOAD_CHUNK):
                    received += len(chunk)
                    if received > self._max_bytes:
                        raise LimitExceededError(
                            f"{shorten(url)} is larger than the download limit "
                            f"of {self._max_bytes} bytes"
                        )
                    out.write(chunk)
                # Compressed bodies are decoded as they arrive, so only a plain body can be
                # compared with Content-Length (aiohttp checks the encoded length itself).
                encoded = response.headers.get(aiohttp.hdrs.CONTENT_ENCODING, "identity").lower()
                if declared is not None and encoded == "identity" and received != declared:
                    raise DownloadError(
                        f"downloading {shorten(url)} failed: got {received} of {declared} bytes"
                    )
                return None
        except DestinationRefused as exc:
            raise DownloadError(f"downloading {shorten(url)} refused: {exc}") from None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, DestinationRefused):
                raise DownloadError(f"downloading {shorten(url)} refused: {exc.os_error}") from None
            # The host refused or could not be reached: offline, for POST /upload.
            raise UnreachableError(
                url, f"downloading {shorten(url)} failed: {_describe_client_error(exc)}"
            ) from None
        except aiohttp.ClientError as exc:
            raise DownloadError(
                f"downloading {shorten(url)} failed: {_describe_client_error(exc)}"
            ) from None
        except asyncio.TimeoutError:
            raise DownloadError(
                f"downloading {shorten(url)} failed: the server stopped answering"
            ) from None


def _check_scheme(url: str) -> None:
    if urlsplit(url).scheme.lower() not in ("http", "https"):
        raise DownloadError(f"url {excerpt(url)} is not http or https")


def _recorded_for(target: Path, record: Path, url: str) -> bool:
    """True when ``target`` holds ``url``'s content; marks the entry as just used."""
    try:
        if not target.is_file() or record.read_text(encoding="utf-8") != url:
            return False
        os.utime(target)  # least recently used entries are evicted first (quota.py)
    except OSError:
        return False
    return True


def _file_size(path: Path) -> int:
    """Bytes in the regular file ``path`` (0 when there is none)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return 0
    return info.st_size if stat.S_ISREG(info.st_mode) else 0


def _record(record: Path, url: str) -> None:
    partial = record.with_name(f".{record.name}.{os.getpid()}.partial")
    partial.write_text(url, encoding="utf-8")
    os.replace(partial, record)


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
) -> UploadResult:
    """Create or replace ``work_dir/<name>`` with the uploaded files.

    Raises ``VersionConflictError`` (nothing written) when ``command.version``
    is given and the directory's current version differs.
    """
    file_bytes = _check_limits(command, limits)
    loop = asyncio.get_running_loop()
    # File-system work runs in threads: one client's slow names stall no other client.
    target, created = await loop.run_in_executor(None, _prepare_target, command, work_dir)
    async with cache.directories.hold(target):
        version = await _put_in_place(command, work_dir, target, created, cache, limits, file_bytes)
    log.info("uploaded %d file(s) into %s", len(command.files), excerpt(str(target)))
    return UploadResult(target, version)


async def _put_in_place(
    command: UploadCommand,
    work_dir: Path,
    target: Path,
    created: list[Path],
    cache: UrlCache,
    limits: UploadLimits,
    file_bytes: int,
) -> str:
    """Fill a staging directory and swap it in at ``target``; return the new version."""
    loop = asyncio.get_running_loop()
    relative = target.relative_to(os.path.realpath(work_dir))
    staging: Path | None = None
    usage = cache.usage(work_dir, limits.quota_recount_seconds)
    booked: int | None = None
    in_place = False
    try:
        if command.version is not None:
            await loop.run_in_executor(None, _check_version, work_dir, relative, command)
        staging = Path(
            await loop.run_in_executor(
                None, functools.partial(tempfile.mkdtemp, dir=target.parent, prefix=STAGING_PREFIX)
            )
        )
        staged = await _fill(staging, command, cache, limits.max_bytes, file_bytes)
        if limits.quota_bytes is not None:
            booked = await loop.run_in_executor(
                None, cache.make_room, usage, target, staged, limits.quota_bytes
            )
        if command.version is not None:  # again: a program may have written meanwhile
            await loop.run_in_executor(None, _check_version, work_dir, relative, command)
        await loop.run_in_executor(None, _swap_in, staging, target)
        in_place = True
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    finally:
        if booked is not None:
            usage.settle(booked, in_place)
    return await loop.run_in_executor(None, version_at, work_dir, relative)


def _check_version(work_dir: Path, relative: Path, command: UploadCommand) -> None:
    if version_at(work_dir, relative) != command.version:
        raise VersionConflictError(
            f"project {excerpt(command.name)} changed on the device since it was opened "
            "(in another tab, or by a program); nothing was saved: open it again, "
            "or save it under another name"
        )


def _prepare_target(command: UploadCommand, work_dir: Path) -> tuple[Path, list[Path]]:
    """The upload's real target path and the directories created above it (outermost first)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    work_real = Path(os.path.realpath(work_dir))
    what = f"upload directory name {excerpt(command.name)}"
    target = confine_path(work_dir, command.name, "upload directory name")
    parts = target.relative_to(work_real).parts
    if parts[0] == CACHE_DIR_NAME or any(part.startswith(STAGING_PREFIX) for part in parts):
        raise UploadError(f"{what} is reserved by further-link")
    if os.path.lexists(target) and not target.is_dir():
        kind = describe_kind(os.lstat(target).st_mode)
        raise UploadError(f"{what} is {kind} in the work dir, not a directory; remove it first")
    created = _make_directories(work_real, target.parent, what)
    return target, created


def _check_limits(command: UploadCommand, limits: UploadLimits) -> int:
    """Refuse an upload over the file-count or size caps; return its bytes of text and binary."""
    if len(command.files) > limits.max_files:
        raise LimitExceededError(
            f"upload has {len(command.files)} files; the limit is {limits.max_files}"
        )
    file_bytes = sum(
        len(f.text.encode("utf-8")) if isinstance(f, TextFile) else len(f.data)
        for f in command.files.values()
        if not isinstance(f, UrlFile)
    )
    if file_bytes > limits.max_bytes:
        raise LimitExceededError(
            f"upload is {file_bytes} bytes of files; the limit is {limits.max_bytes} bytes"
        )
    return file_bytes


async def _fill(
    staging: Path, command: UploadCommand, cache: UrlCache, max_bytes: int, total: int
) -> int:
    """Write every file into ``staging``, keeping the ``total`` bytes within ``max_bytes``.

    Every alias is checked before anything is written or downloaded. Returns
    the bytes written.
    """
    loop = asyncio.get_running_loop()
    destinations = await loop.run_in_executor(None, _write_texts, staging, command)
    for alias, file in command.files.items():
        if not isinstance(file, UrlFile):
            continue
        total += await cache.fetch_into(file, destinations[alias])
        if total > max_bytes:
            raise LimitExceededError(
                f"upload is over {max_bytes} bytes with {excerpt(alias)}; "
                "the limit is the total of all its files"
            )
    return total


def _write_texts(staging: Path, command: UploadCommand) -> dict[str, Path]:
    """Check every name, write the text and base64 files; return where each file goes."""
    destinations = {
        alias: confine_path(staging, alias, "upload file name") for alias in command.files
    }
    _check_collisions(list(command.files))
    for alias, file in command.files.items():
        destination = destinations[alias]
        destination.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(file, TextFile):
            destination.write_text(file.text, encoding="utf-8")
        elif isinstance(file, Base64File):
            destination.write_bytes(file.data)
    return destinations


def _check_collisions(aliases: list[str]) -> None:
    """``a`` and ``a/b`` cannot both be files; say so rather than fail half-way."""
    names = set(aliases)
    for alias in aliases:
        parts = alias.split("/")
        for depth in range(1, len(parts)):
            prefix = "/".join(parts[:depth])
            if prefix in names:
                raise UploadError(
                    f"upload file names {excerpt(prefix)} and {excerpt(alias)} collide: "
                    f"{excerpt(prefix)} cannot be both a file and a directory"
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
        raise UploadError(f"{what} cannot be created: {excerpt(where)} is {kind}, not a directory")
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
