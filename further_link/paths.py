"""Confining names that come from a client to the directory they belong in.

Checks are made on resolved real paths with ``os.path.commonpath``, never by
comparing string prefixes, so ``work/../etc`` and symlinks that lead out are
caught as well as plain ``..``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UnsafePathError


def confine_path(base: Path, name: str, what: str, *, nested: bool = True) -> Path:
    """Return the real path of ``name`` inside ``base`` or raise ``UnsafePathError``.

    ``what`` names the field in the message ("upload file name"). With
    ``nested=False`` the name must be a single path component.
    """
    if name == "":
        raise UnsafePathError(f"{what} is empty")
    if "\0" in name:
        raise UnsafePathError(f"{what} {name!r} contains a NUL character")
    if os.path.isabs(name):
        raise UnsafePathError(f"{what} {name!r} is an absolute path; give a relative name")
    segments = name.split("/")
    if not nested and len(segments) > 1:
        raise UnsafePathError(f"{what} {name!r} must not contain '/'")
    for segment in segments:
        if segment == "..":
            raise UnsafePathError(f"{what} {name!r} contains '..', which leaves its directory")
        if segment == ".":
            raise UnsafePathError(f"{what} {name!r} contains '.'; use a plain relative path")
        if segment == "":
            raise UnsafePathError(f"{what} {name!r} has an empty part ('//' or a trailing '/')")
    base_real = os.path.realpath(base)
    candidate = os.path.realpath(os.path.join(base_real, name))
    if candidate == base_real or os.path.commonpath([base_real, candidate]) != base_real:
        raise UnsafePathError(f"{what} {name!r} leads outside {base} (through a symbolic link)")
    return Path(candidate)
