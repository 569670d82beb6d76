"""HTTP as today's Further IDE needs it: CORS with credentials, Private Network Access,
and ``GET /version/apt/{pkg}``.

Further's page (``https://further.pi-top.com``) calls the device cross-origin
and, being public, reaches a private address: Chrome then asks first
(``Access-Control-Request-Private-Network: true``) and needs
``Access-Control-Allow-Private-Network: true``. Allowed origins
(FURTHER_LINK_ORIGINS) are reflected with credentials, as upstream does; other
origins get no CORS grant (and a 403 on preflights).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

from aiohttp import web

from further_link.compat import app_key
from further_link.server.access import check_origin, cors_headers, origin_is_allowed

log = logging.getLogger(__name__)

# The routes Further calls; each answers preflights and carries the CORS grant.
FURTHER_PATHS = ("/status", "/version", "/upload", "/run", "/run-py")
APT_PREFIX = "/version/apt/"
PRIVATE_NETWORK = {"Access-Control-Allow-Private-Network": "true"}
APT_TIMEOUT = 5.0
# Debian package names (policy 5.6.7), optionally with an architecture.
PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]{0,127}(:[a-z0-9-]{1,32})?")
INSTALLED = re.compile(r"^\s*Installed: (.*)$", re.MULTILINE)
APT_CONCURRENCY = app_key("apt_concurrency", asyncio.Semaphore)


def _is_further_path(path: str) -> bool:
    return path in FURTHER_PATHS or path.startswith(APT_PREFIX)


async def _grant(request: web.Request, response: web.StreamResponse) -> None:
    """Add the CORS grant to every answer of Further's routes (websocket upgrades included)."""
    if not _is_further_path(request.path):
        return
    response.headers.update(PRIVATE_NETWORK)
    if origin_is_allowed(request):
        response.headers.update(cors_headers(request))


async def preflight(request: web.Request) -> web.Response:
    """Allowed origins may call with any method the route has and any headers."""
    check_origin(request)
    headers = {
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Max-Age": "600",
    }
    requested = request.headers.get("Access-Control-Request-Headers")
    if requested:
        headers["Access-Control-Allow-Headers"] = requested
    return web.Response(status=204, headers=headers)


async def apt_version(request: web.Request) -> web.Response:
    """``{"version": "<Installed: of apt-cache policy>"}``, or ``{"version": null}``."""
    check_origin(request)
    package = request.match_info["package"]
    version = None
    if PACKAGE_NAME.fullmatch(package):
        async with request.app[APT_CONCURRENCY]:
            version = await installed_version(package)
    return web.json_response({"version": version})


async def installed_version(package: str) -> str | None:
    """What apt says is installed (``"(none)"`` when known but not installed), or None."""
    try:
        process = await asyncio.create_subprocess_exec(
            "apt-cache",
            "policy",
            "--",
            package,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            # apt's words are translated otherwise, and "Installed:" is what we look for.
            env={"LANG": "C", "LC_ALL": "C", "PATH": "/usr/bin:/bin"},
        )
    except OSError as exc:
        log.info("apt-cache cannot run: %s", exc.strerror)
        return None
    try:
        output, _ = await asyncio.wait_for(process.communicate(), APT_TIMEOUT)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        log.warning("apt-cache policy %s took over %.0f s", package, APT_TIMEOUT)
        return None
    match = INSTALLED.search(output.decode("utf-8", "replace"))
    return match.group(1).strip() if match else None


def setup_further_http(app: web.Application) -> None:
    app[APT_CONCURRENCY] = asyncio.Semaphore(1)
    app.on_response_prepare.append(_grant)
    app.router.add_get(APT_PREFIX + "{package}", apt_version)
    app.router.add_route("OPTIONS", APT_PREFIX + "{package}", preflight)
    for path in FURTHER_PATHS:
        app.router.add_route("OPTIONS", path, preflight)
