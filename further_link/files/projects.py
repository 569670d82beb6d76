"""Projects on the device: directories directly under the work dir, listed and read back.

A project is what the learner saved (an upload whose directory name is the
project's name) plus whatever its programs wrote there since. Everything is
reached from the work dir one component at a time through directory
descriptors with ``O_NOFOLLOW``: programs own these directories and may plant
symbolic links, FIFOs or deep trees in them at any moment, and none of that
may make the server read outside the work dir, block, or walk without end.
Links and other non-regular entries are left out; so are ``__pycache__``
folders and the run scripts of inline programs (project.py), which programs
and runs make and remove by themselves.

A project's *version* is a digest of the names, sizes and modification times
of its files: it changes whenever a file is added, removed or rewritten
(by an upload or by a program), and saving with an old version is refused
(upload.py), so two tabs never silently overwrite each other.

Everything here is blocking file system work, for a thread.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from further_link.errors import LimitExceededError, ProjectNotFoundError, excerpt
from further_link.files.project import SCRIPT_PATTERN

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted under a file's name must not hang the reading thread.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
LEFT_OUT_DIRS = frozenset({"__pycache__"})
# A program can create millions of entries: no walk visits more than this many.
WALK_LIMIT = 20_000
MAX_PROJECTS = 1_000


@dataclass(frozen=True)
class ProjectSummary:
    name: str
    modified: float  # unix seconds: the newest of the directory and its files
    size: int  # bytes in its files
    files: int


@dataclass(frozen=True)
class ProjectContents:
    name: str
    version: str
    files: dict[str, bytes]  # relative path with '/' -> content


@dataclass(frozen=True)
class _Entry:
    path: str  # relative to the project, '/'-separated
    parent_fd: int
    name: str
    info: os.stat_result


def is_project_name(name: str) -> bool:
    """Names the listing shows: not hidden, so not ``.flcache`` nor staging dirs."""
    return bool(name) and not name.startswith(".") and "/" not in name and "\0" not in name


def _open_dir(name: str, parent_fd: int) -> int | None:
    """A descriptor of the directory ``name``, or None if it is not one (any longer)."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EACCES):
            return None
        raise


def _walk(dir_fd: int, strict: bool = False) -> Iterator[_Entry]:
    """The regular files below ``dir_fd``, at most ``WALK_LIMIT`` entries visited.

    Past the limit the walk stops, or with ``strict`` raises ``LimitExceededError``.
    Descriptors of sub-directories are closed when the walk moves on; an
    entry's ``parent_fd`` is valid only while it is being looked at.
    """
    visited = 0
    pending: list[tuple[str, int]] = [("", os.dup(dir_fd))]
    try:
        while pending:
            prefix, fd = pending.pop()
            try:
                with os.scandir(fd) as entries:
                    listed = list(entries)
                for entry in sorted(listed, key=lambda e: e.name):
                    visited += 1
                    if visited > WALK_LIMIT:
                        if strict:
                            raise LimitExceededError(
                                f"the project holds more than {WALK_LIMIT} files and folders; "
                                "remove some of them on the device"
                            )
                        return
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if stat.S_ISDIR(info.st_mode):
                        if entry.name in LEFT_OUT_DIRS:
                            continue
                        inner = _open_dir(entry.name, fd)
                        if inner is not None:
                            pending.append((f"{prefix}{entry.name}/", inner))
                    elif stat.S_ISREG(info.st_mode) and not SCRIPT_PATTERN.fullmatch(entry.name):
                        yield _Entry(f"{prefix}{entry.name}", fd, entry.name, info)
            finally:
                os.close(fd)
    finally:
        for _, fd in pending:
            os.close(fd)


def _version_of(entries: list[tuple[str, int, int]]) -> str:
    digest = hashlib.sha256()
    for path, size, mtime_ns in sorted(entries):
        digest.update(f"{path}\0{size}\0{mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:32]


def _open_project(work_dir: Path, name: str) -> int | None:
    """A descriptor of the project directory ``work_dir/name`` (None when missing)."""
    if not is_project_name(name):
        raise ProjectNotFoundError(f"{excerpt(name)} is not a project name")
    return open_confined_dir(work_dir, Path(name))


def directory_version(directory_fd: int | None) -> str:
    """The version of the directory ``directory_fd`` (of an empty one when None)."""
    if directory_fd is None:
        return _version_of([])
    return _version_of([(e.path, e.info.st_size, e.info.st_mtime_ns) for e in _walk(directory_fd)])


def open_confined_dir(work_dir: Path, relative: Path) -> int | None:
    """A descriptor of ``work_dir/relative`` reached without following links (None if missing)."""
    fd: int | None = os.open(work_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in relative.parts:
            assert fd is not None
            inner = _open_dir(part, fd)
            os.close(fd)
            fd = inner
            if fd is None:
                return None
        return fd
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise


def version_at(work_dir: Path, relative: Path) -> str:
    """The version of the directory ``work_dir/relative`` (``relative`` from confine_path)."""
    fd = open_confined_dir(work_dir, relative)
    try:
        return directory_version(fd)
    finally:
        if fd is not None:
            os.close(fd)


def list_projects(work_dir: Path) -> list[ProjectSummary]:
    """Every project directory directly under ``work_dir``, by name."""
    try:
        work_fd = os.open(work_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    summaries: list[ProjectSummary] = []
    try:
        with os.scandir(work_fd) as entries:
            names = sorted(e.name for e in entries if is_project_name(e.name))
        for name in names[:MAX_PROJECTS]:
            fd = _open_dir(name, work_fd)
            if fd is None:
                continue
            try:
                modified = os.fstat(fd).st_mtime
                size = count = 0
                for entry in _walk(fd):
                    size += entry.info.st_size
                    count += 1
                    modified = max(modified, entry.info.st_mtime)
            finally:
                os.close(fd)
            summaries.append(ProjectSummary(name, modified, size, count))
    finally:
        os.close(work_fd)
    return summaries


def read_project(work_dir: Path, name: str, max_files: int, max_bytes: int) -> ProjectContents:
    """The files of project ``name`` and its version, within the upload caps.

    Raises ``ProjectNotFoundError`` and ``LimitExceededError`` (more files or bytes
    than an upload may hold, so it could not be saved back either).
    """
    fd = _open_project(work_dir, name)
    if fd is None:
        raise ProjectNotFoundError(f"there is no project {excerpt(name)} on this device")
    files: dict[str, bytes] = {}
    stamps: list[tuple[str, int, int]] = []
    total = 0
    try:
        for entry in _walk(fd, strict=True):
            read = _read_file(entry)
            if read is None:
                continue
            content, info = read
            total += len(content)
            if len(files) >= max_files or total > max_bytes:
                raise LimitExceededError(
                    f"project {excerpt(name)} holds more than {max_files} files or "
                    f"{max_bytes} bytes (FURTHER_LINK_MAX_UPLOAD_FILES, "
                    "FURTHER_LINK_MAX_UPLOAD_BYTES); remove some of its files on the device"
                )
            files[entry.path] = content
            # The stamps of what was read, so the version matches the content sent.
            stamps.append((entry.path, info.st_size, info.st_mtime_ns))
    finally:
        os.close(fd)
    return ProjectContents(name, _version_of(stamps), files)


def _read_file(entry: _Entry) -> tuple[bytes, os.stat_result] | None:
    """The file's bytes and status, or None when it is no longer a regular file."""
    try:
        fd = os.open(entry.name, _FILE_FLAGS, dir_fd=entry.parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.EACCES, errno.ENXIO):
            return None
        raise
    with contextlib.closing(os.fdopen(fd, "rb")) as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        return file.read(), info
