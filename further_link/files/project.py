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
folder it owns with a symbolic link at any moment. ``write_script`` writes the
v5 runners' ``code`` scripts (runs/runners.py) the same way.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
from collections.abc import Iterable
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


class ScriptFile:
    """A script the server wrote for one run (an inline script, v5 ``code``); ``remove``
    deletes it when the run ends.

    Owns ``dir_fd`` (closed by ``remove``), so the file is found again even if
    the directory was renamed meanwhile (an upload replacing the project).
    """

    def __init__(self, dir_fd: int, directory: Path, name: str) -> None:
        self._dir_fd: int | None = dir_fd
        self.name = name
        self.path = directory / name

    def remove(self) -> None:
        """Delete the file (if still there) and release the directory; idempotent."""
        if self._dir_fd is None:
            return
        try:
            os.unlink(self.name, dir_fd=self._dir_fd)
        except FileNotFoundError:
            pass  # the project was replaced or removed meanwhile
        except OSError as exc:
            log.warning("could not remove %s: %s", self.path, exc.strerror)
        finally:
            os.close(self._dir_fd)
            self._dir_fd = None


def write_script(
    dir_fd: int, directory: Path, names: Iterable[str], text: str, mode: int, where: str
) -> ScriptFile:
    """A new file holding ``text`` with exactly ``mode`` (whatever the umask), named by
    the first of ``names`` still free in ``directory``, whose descriptor ``dir_fd`` is.

    Takes over ``dir_fd``: the returned ``ScriptFile`` closes it, or this on failure.
    The file is created afresh (``O_EXCL | O_NOFOLLOW``). Raises ``StartError``
    naming ``where`` (the directory, in the learner's words) when it cannot be written.
    """
    data = text.encode("utf-8")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        for name in names:
            try:
                fd = os.open(name, flags, mode, dir_fd=dir_fd)
            except FileExistsError:
                continue
            break
        else:
            raise StartError(f"no free script name in {where}; remove old scripts")
    except BaseException as exc:
        os.close(dir_fd)
        if isinstance(exc, OSError):
            raise StartError(f"cannot write a script into {where}: {exc.strerror}") from None
        raise
    script = ScriptFile(dir_fd, directory, name)
    try:
        with open(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            out.write(data)
    except BaseException as exc:
        script.remove()
        if isinstance(exc, OSError):
            raise StartError(f"cannot write a script into {where}: {exc.strerror}") from None
        raise
    return script


def write_project_script(dir_fd: int, directory: Path, source: str) -> ScriptFile:
    """An inline script, hidden and randomly named, in its project directory (``dir_fd``,
    taken over as ``write_script`` does); raises ``StartError``."""
    names = (f"{SCRIPT_PREFIX}{os.urandom(4).hex()}.py" for _ in range(NAME_ATTEMPTS))
    return write_script(dir_fd, directory, names, source, 0o644, "directoryName")


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
