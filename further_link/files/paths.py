"""Confining names that come from a client to the directory they belong in.

Checks are made on resolved real paths with ``os.path.commonpath``, never by
comparing string prefixes, so ``work/../etc`` and symlinks that lead out are
caught as well as plain ``..``. Every link on the way is checked where it is
met, so a path that wanders out through one link and back in through another
is refused too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from further_link.errors import UnsafePathError, excerpt

# Longest file name (one path component) Linux file systems accept, in bytes.
MAX_COMPONENT_BYTES = 255
# Longest path Linux accepts, in bytes (PATH_MAX).
MAX_PATH_BYTES = 4096
# Parts ("a/b/c" has three) an uploaded name may have.
MAX_DEPTH = 64
# Links followed on the way to a base directory before calling it a loop (as Linux does).
MAX_LINKS = 40


def confine_path(base: Path, name: str, what: str, *, nested: bool = True) -> Path:
    """Return the real path of ``name`` inside ``base`` or raise ``UnsafePathError``.

    ``what`` names the field in the message ("upload file name"). With
    ``nested=False`` the name must be a single path component. The walk is
    one ``lstat`` per part (a link found on the way is resolved once), and
    names are capped at ``MAX_DEPTH`` parts and ``MAX_PATH_BYTES`` bytes
    before any of it, so the work grows with the name's length, not its square.
    """
    segments = _checked_segments(name, what, nested)
    _check_links_to(base, f"{what} {excerpt(name)}")
    base_real = os.path.realpath(base)
    resolved = base_real
    for depth, segment in enumerate(segments, start=1):
        candidate = os.path.join(resolved, segment)
        try:
            info = os.lstat(candidate)
        except FileNotFoundError:
            # Nothing below a missing directory exists yet: no link can be on the way.
            return Path(os.path.join(resolved, *segments[depth - 1 :]))
        except NotADirectoryError:
            return Path(os.path.join(resolved, *segments[depth - 1 :]))
        if not stat.S_ISLNK(info.st_mode):
            resolved = candidate
            continue
        prefix = "/".join(segments[:depth])
        resolved = os.path.realpath(candidate)
        if os.path.islink(resolved):
            raise UnsafePathError(
                f"{what} {excerpt(name)} goes through {excerpt(prefix)}, a symbolic link loop"
            )
        if resolved == base_real:
            raise UnsafePathError(
                f"{what} {excerpt(name)} leads back to {base} itself: "
                f"{excerpt(prefix)} is a symbolic link"
            )
        if os.path.commonpath([base_real, resolved]) != base_real:
            raise UnsafePathError(
                f"{what} {excerpt(name)} leads outside {base}: {excerpt(prefix)} is a "
                "symbolic link to somewhere else"
            )
    return Path(resolved)


def _check_links_to(base: Path, what: str) -> None:
    """Walk to ``base`` as the kernel would, refusing links that a program could have made.

    The server may run as root while programs run as another account that owns
    the work dir: if a program replaced the work dir (or a folder it owns above
    it) with a link, following it would let root write wherever the link
    points. Only links owned by root or by the server's own account are followed.
    """
    trusted = (0, os.geteuid())
    pending = [part for part in os.path.abspath(base).split("/") if part]
    reached = "/"
    links_followed = 0
    while pending:
        part = pending.pop(0)
        candidate = os.path.dirname(reached) if part == ".." else os.path.join(reached, part)
        try:
            info = os.lstat(candidate)
        except OSError:
            return  # not there yet: it is created later, below a checked path
        if not stat.S_ISLNK(info.st_mode):
            reached = candidate
            continue
        if info.st_uid not in trusted:
            raise UnsafePathError(
                f"{what} cannot be used: {candidate} is a symbolic link owned by uid "
                f"{info.st_uid}, which a program could have made; further-link does not "
                "follow it"
            )
        links_followed += 1
        if links_followed > MAX_LINKS:
            raise UnsafePathError(
                f"{what} cannot be used: {base} goes through a symbolic link loop"
            )
        target = os.readlink(candidate)
        if target.startswith("/"):
            reached = "/"
        pending[:0] = [step for step in target.split("/") if step not in ("", ".")]


def _checked_segments(name: str, what: str, nested: bool) -> list[str]:
    """The parts of ``name``, refusing anything that is not a plain relative name."""
    if name == "":
        raise UnsafePathError(f"{what} is empty")
    # Caps first, in constant time: everything after is linear in what is left.
    if len(name) > MAX_PATH_BYTES or len(name.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise UnsafePathError(
            f"{what} {excerpt(name)} is longer than {MAX_PATH_BYTES} bytes, "
            "which no file system accepts"
        )
    if name.count("/") >= MAX_DEPTH:
        raise UnsafePathError(
            f"{what} {excerpt(name)} has more than {MAX_DEPTH} parts; "
            "further-link accepts folders at most that deep"
        )
    if "\0" in name:
        raise UnsafePathError(f"{what} {excerpt(name)} contains a NUL character")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePathError(
            f"{what} {excerpt(name)} is not valid text (it contains a lone surrogate)"
        ) from None
    if os.path.isabs(name):
        raise UnsafePathError(f"{what} {excerpt(name)} is an absolute path; give a relative name")
    segments = name.split("/")
    if not nested and len(segments) > 1:
        raise UnsafePathError(f"{what} {excerpt(name)} must not contain '/'")
    for segment in segments:
        if segment == "..":
            raise UnsafePathError(
                f"{what} {excerpt(name)} contains '..', which leaves its directory"
            )
        if segment == ".":
            raise UnsafePathError(f"{what} {excerpt(name)} contains '.'; use a plain relative path")
        if segment == "":
            raise UnsafePathError(
                f"{what} {excerpt(name)} has an empty part ('//' or a trailing '/')"
            )
        if len(segment.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise UnsafePathError(
                f"{what} has a part longer than {MAX_COMPONENT_BYTES} bytes, "
                "which no file system accepts"
            )
    return segments


_KINDS = {
    stat.S_IFREG: "a regular file",
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symbolic link",
}


def describe_kind(mode: int) -> str:
    """What kind of file ``st_mode`` says this is, for messages: 'a FIFO (named pipe)'."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")
