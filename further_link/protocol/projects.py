"""The JSON shapes of ``GET /projects`` and ``GET /projects/{name}``, without any IO.

A file is sent back in the upload's own shape, so a page can save what it
opened unchanged: UTF-8 text without NUL bytes as ``text``, anything else as
``base64``.
"""

from __future__ import annotations

from base64 import b64encode
from collections.abc import Iterable, Mapping
from typing import Any, Protocol


class Summary(Protocol):
    """What the listing says of one project (files/projects.py's ``ProjectSummary``)."""

    @property
    def name(self) -> str: ...
    @property
    def modified(self) -> float: ...
    @property
    def size(self) -> int: ...
    @property
    def files(self) -> int: ...


def encode_listing(projects: Iterable[Summary]) -> dict[str, Any]:
    """``{"projects": [{"name", "modified" (unix s), "size" (bytes), "files"}]}``."""
    return {
        "projects": [
            {"name": p.name, "modified": p.modified, "size": p.size, "files": p.files}
            for p in projects
        ]
    }


def encode_project(name: str, version: str, files: Mapping[str, bytes]) -> dict[str, Any]:
    """``{"name", "version", "files": {path: upload file entry}}``."""
    return {
        "name": name,
        "version": version,
        "files": {path: encode_file(data) for path, data in files.items()},
    }


def encode_file(data: bytes) -> dict[str, Any]:
    """One file as an upload entry: ``text`` when it is text, else ``base64``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and "\0" not in text:
        return {"type": "text", "content": {"text": text}}
    return {"type": "base64", "content": {"data": b64encode(data).decode("ascii")}}
