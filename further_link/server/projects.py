"""``GET /projects`` and ``GET /projects/{name}``: the learner's projects on the device.

Authenticated as ``/device`` is (token or pairing cookie; CORS for allowed
origins). The file-system part (files/projects.py) runs in a thread and never
follows a link out of the work dir; saving goes through the existing upload
with the ``version`` these answers give.

Answers: ``200 {"projects": [...]}`` and ``200 {"name", "version", "files"}``;
``404 {"error"}`` for an unknown project, ``413 {"error"}`` for one over the
upload caps, ``500 {"error"}`` when the disk fails.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from further_link.compat import app_key
from further_link.config import Config
from further_link.errors import LimitExceededError, ProjectNotFoundError
from further_link.files.projects import list_projects, read_project
from further_link.protocol.projects import encode_listing, encode_project
from further_link.server.access import check_paired, preflight

log = logging.getLogger(__name__)

PROJECTS_CONFIG = app_key("projects_config", Config)


def _checked(request: web.Request) -> dict[str, str]:
    """The headers for the answer, once the request may see projects at all."""
    return {**check_paired(request), "Cache-Control": "no-store"}


def _answer(status: int, body: dict[str, Any], headers: dict[str, str]) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


async def projects(request: web.Request) -> web.Response:
    headers = _checked(request)
    config = request.app[PROJECTS_CONFIG]
    loop = asyncio.get_running_loop()
    try:
        listing = await loop.run_in_executor(None, list_projects, config.work_dir)
    except OSError as exc:
        return _answer(500, {"error": f"listing projects failed: {exc.strerror}"}, headers)
    return _answer(200, encode_listing(listing), headers)


async def project(request: web.Request) -> web.Response:
    headers = _checked(request)
    config = request.app[PROJECTS_CONFIG]
    name = request.match_info["name"]
    loop = asyncio.get_running_loop()
    try:
        contents = await loop.run_in_executor(
            None,
            read_project,
            config.work_dir,
            name,
            config.max_upload_files,
            config.max_upload_bytes,
        )
    except ProjectNotFoundError as exc:
        return _answer(404, {"error": exc.message}, headers)
    except LimitExceededError as exc:
        return _answer(413, {"error": exc.message}, headers)
    except OSError as exc:
        return _answer(500, {"error": f"reading the project failed: {exc.strerror}"}, headers)
    body = encode_project(contents.name, contents.version, contents.files)
    return _answer(200, body, headers)


def setup_projects(app: web.Application, config: Config) -> None:
    """Serve ``GET /projects`` and ``GET /projects/{name}`` (paired clients only)."""
    app[PROJECTS_CONFIG] = config
    app.router.add_get("/projects", projects)
    app.router.add_get("/projects/{name}", project)
    for path in ("/projects", "/projects/{name}"):
        app.router.add_route("OPTIONS", path, preflight("GET", "Authorization"))
