"""A start's project directory (``directoryName``) and the inline script run inside it.

An inline script started with a ``directoryName`` runs as a file in that
directory, as the 2020 server ran it, so that ``__file__``, ``sys.path[0]``,
tracebacks and files "next to the script" all point at the project. The file
is named ``.further-link-run-<8 hex digits>.py``: hidden from ``ls`` and
``glob('*.py')``, never the name of a learner's file (it is created with
``O_EXCL``, and uploads refuse nothing a learner would choose), different for
two runs in one directory at once, and removed when the run ends. Files of
runs that a crash or kill left behind are removed when the server starts.

The directory is reached from the work dir one component at a time with
``O_NOFOLLOW``, and the file is created through that directory's descriptor:
the server may have more rights than programs, and a program can replace any
folder it owns with a symbolic link at any moment.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
from pathlib import Path

from further_link.errors import StartError
from further_link.files.paths import describe_kind

log = logging.getLogger(__name__)

SCRIPT_PREFIX = ".further-link-run-"
SCRIPT_PATTERN = re.compile(r"\.further-link-run-[0-9a-f]{8}\.py")
# Never searched for stale scripts: the url cache holds only downloads.
SKIPPED_TOP_LEVEL = frozenset({".flcache"})
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NAME_ATTEMPTS = 16


def open_project_dir(work_dir_real: Path, directory: Path, what: str) -> int:
    """A descriptor of ``directory``, creating it and missing parents.

    ``directory`` is a real path inside the real path ``work_dir_real`` (as
    ``confine_path`` returns it); ``what`` names it in messages. No symbolic
    link is followed on the way: a component that is no directory (or became a
    link) raises ``StartError``; other failures raise ``OSError``.
    """
    parts = directory.relative_to(work_dir_real).parts
    fd = os.open(work_dir_real, _DIR_FLAGS)
    try:
        for depth, part in enumerate(parts):
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=fd)
                log.info("created project directory %r", "/".join(parts[: depth + 1]))
            try:
                inner = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                kind = describe_kind(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode)
                if depth == len(parts) - 1:
                    raise StartError(f"{what} is {kind} in the work dir, not a directory") from None
                where = "/".join(parts[: depth + 1])
                raise StartError(
                    f"{what} cannot be created: {where!r} is {kind} in the work dir, "
                    "not a directory"
                ) from None
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


class ProjectScript:
    """An inline script written into its project directory; ``remove`` deletes it.

    Owns ``dir_fd`` (closed by ``remove``), so the file is found again even if
    the directory was renamed meanwhile (an upload replacing the project).
    """

    def __init__(self, dir_fd: int, directory: Path, name: str) -> None:
        self._dir_fd: int | None = dir_fd
        self.path = directory / name
        self._name = name

    @classmethod
    def write(cls, dir_fd: int, directory: Path, source: str) -> ProjectScript:
        """Create a new script file in the directory of ``dir_fd`` (taking ownership of it)."""
        data = source.encode("utf-8")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            for _ in range(NAME_ATTEMPTS):
                name = f"{SCRIPT_PREFIX}{os.urandom(4).hex()}.py"
                try:
                    fd = os.open(name, flags, 0o644, dir_fd=dir_fd)
                except FileExistsError:
                    continue
                break
            else:  # pragma: no cover - 16 clashes of 32 random bits
                raise StartError("could not find a free name for the script in directoryName")
        except OSError as exc:
            os.close(dir_fd)
            raise StartError(
                f"cannot write the script into directoryName: {exc.strerror}"
            ) from None
        script = cls(dir_fd, directory, name)
        try:
            with open(fd, "wb") as out:
                out.write(data)
        except BaseException:
            script.remove()
            raise
        return script

    def remove(self) -> None:
        """Delete the file (if still there) and release the directory; idempotent."""
        if self._dir_fd is None:
            return
        try:
            os.unlink(self._name, dir_fd=self._dir_fd)
        except FileNotFoundError:
            pass  # the project was replaced or removed meanwhile
        except OSError as exc:
            log.warning("could not remove %s: %s", self.path, exc.strerror)
        finally:
            os.close(self._dir_fd)
            self._dir_fd = None


def remove_stale_scripts(work_dir: Path) -> int:
    """Delete scripts that runs left behind under ``work_dir``; return how many.

    Only regular files whose whole name matches ``SCRIPT_PATTERN`` are removed;
    no symbolic link is followed.
    """
    if not work_dir.is_dir():
        return 0
    removed = 0
    for top, dirs, files, dir_fd in os.fwalk(work_dir, follow_symlinks=False):
        if top == str(work_dir):
            dirs[:] = [d for d in dirs if d not in SKIPPED_TOP_LEVEL]
        for name in files:
            if not SCRIPT_PATTERN.fullmatch(name):
                continue
            try:
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if stat.S_ISREG(info.st_mode):
                    os.unlink(name, dir_fd=dir_fd)
                    removed += 1
            except OSError as exc:
                log.warning("could not remove the stale script %s/%s: %s", top, name, exc)
    if removed:
        log.info("removed %d script(s) that earlier runs left in project directories", removed)
    return removed
