"""``POST /upload`` (the v5 API): the body is the directory object of a websocket upload.

Further sends it without a Content-Type, so none is required. The upload is
the same as the websocket ``upload`` (upload.py: confinement, caps, atomic
replacement, url cache), with upstream's two additions:

* a url file whose host refuses or cannot be reached is skipped, and the
  answer says ``"fetched_urls": false``: "offline" is decided per download,
  never by probing some public host;
* when the files include a top-level ``project.cfg``, the directory is also
  made in the pi-top miniscreen's projects folder
  (``<FURTHER_LINK_MINISCREEN_PROJECTS_DIR>/<username before @>/<name>``).

An optional ``"version"`` beside ``name`` and ``files`` is the project's
version the page last saw (``GET /projects/{name}``): when the directory
changed since, nothing is written and the answer is 409.

Answers: ``200 {"success": true, "fetched_urls": bool, "version": str}``;
otherwise ``{"success": false, "error": "<what was wrong>"}`` with 400 (not a
valid directory object, unsafe name), 409 (version conflict), 413 (over a
cap) or 500 (download or disk failure).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

from further_link.config import Config
from further_link.errors import (
    FurtherLinkError,
    LimitExceededError,
    ProtocolError,
    UnreachableError,
    UnsafePathError,
    UploadError,
    VersionConflictError,
)
from further_link.files.paths import confine_path
from further_link.files.upload import UploadLimits, materialise_upload
from further_link.protocol.runpy import UploadCommand, UrlFile, _parse_upload
from further_link.runs.runners import close_dir, open_directory
from further_link.runs.services import Services
from further_link.server.access import check_origin, check_token

log = logging.getLogger(__name__)

PROJECT_CONFIG = "project.cfg"
UNKNOWN_USER = "unknown"


def _answer(status: int, **fields: Any) -> web.Response:
    return web.json_response(fields, status=status)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refusing (413) more than ``limit`` bytes before reading them all."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise LimitExceededError(
            f"the upload is {declared} bytes; the limit is {limit} bytes "
            "(FURTHER_LINK_MAX_MESSAGE_BYTES)"
        )
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise LimitExceededError(
                f"the upload is over the limit of {limit} bytes (FURTHER_LINK_MAX_MESSAGE_BYTES)"
            )
    return bytes(body)


def parse_directory(body: bytes) -> tuple[UploadCommand, str]:
    """The upload and its ``username`` (for the miniscreen copy); raises ``ProtocolError``."""
    try:
        directory = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError(
            'the body must be JSON text: {"name": "<dir>", "files": {"<path>": {...}}}'
        ) from None
    if not isinstance(directory, dict):
        raise ProtocolError('the body must be a JSON object: {"name": ..., "files": {...}}')
    command = _parse_upload({"directory": directory, "version": directory.get("version")})
    username = directory.get("username")
    return command, username if isinstance(username, str) else ""


def make_upload_handler(services_key: web.AppKey[Services]) -> Any:
    async def upload(request: web.Request) -> web.Response:
        check_origin(request)
        check_token(request)
        services = request.app[services_key]
        config = services.config
        if request.query.get("user") not in (None, "", *_run_as_names(config)):
            return _answer(
                400,
                success=False,
                error=f"this device keeps files for {_run_as_names(config)[0]!r} only; "
                "leave out ?user=",
            )
        try:
            body = await read_body(request, config.max_message_bytes)
            command, username = parse_directory(body)
            fetched, version = await upload_skipping_offline(services, command, config.work_dir)
            if PROJECT_CONFIG in command.files:
                await copy_to_miniscreen(services, replace(command, version=None), username)
        except (ProtocolError, UnsafePathError) as exc:
            return _answer(400, success=False, error=exc.message)
        except VersionConflictError as exc:
            return _answer(409, success=False, error=exc.message)
        except LimitExceededError as exc:
            return _answer(413, success=False, error=exc.message)
        except FurtherLinkError as exc:
            status = 400 if type(exc) is UploadError else 500
            return _answer(status, success=False, error=exc.message)
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            return _answer(500, success=False, error=f"upload failed: {exc.strerror}{where}")
        return _answer(200, success=True, fetched_urls=fetched, version=version)

    return upload


def _run_as_names(config: Config) -> list[str]:
    return [config.run_as.name] if config.run_as is not None else []


async def upload_skipping_offline(
    services: Services, command: UploadCommand, work_dir: Path
) -> tuple[bool, str]:
    """Materialise the upload; url files whose host is unreachable are left out.

    Returns whether every url file was fetched, and the directory's new
    version. Each unreachable url is tried once: the upload is retried without
    it, so caps and atomic replacement hold as for any upload.
    """
    limits = UploadLimits.from_config(services.config)
    skipped: set[str] = set()
    while True:
        files = {
            alias: file
            for alias, file in command.files.items()
            if not (isinstance(file, UrlFile) and file.url in skipped)
        }
        try:
            result = await materialise_upload(
                replace(command, files=files), work_dir, services.cache, limits
            )
        except UnreachableError as exc:
            if exc.url in skipped:  # pragma: no cover - a skipped url is never fetched again
                raise
            log.info("skipping a url file: %s", exc.message)
            skipped.add(exc.url)
            continue
        return not skipped, result.version


async def copy_to_miniscreen(services: Services, command: UploadCommand, username: str) -> None:
    """The project again under the miniscreen's projects folder, for its Projects menu."""
    config = services.config
    base = config.miniscreen_projects_dir
    if base is None:
        return
    user_dir_name = username.split("@", 1)[0] or UNKNOWN_USER
    close_dir(open_directory(base, create=True))
    user_dir = confine_path(base, user_dir_name, "username", nested=False)
    close_dir(open_directory(user_dir, create=True))
    try:
        await upload_skipping_offline(services, command, user_dir)
    except OSError as exc:
        raise UploadError(f"copying the project for the miniscreen failed: {exc.strerror}") from exc
