"""The built-in web page: an editor, terminals and camera view for this device.

``GET /`` serves ``web/index.html`` and ``GET /static/<name>`` the other files
of ``web/`` (built from the repository's ``web/`` sources by ``make web``:
``app.js``, ``app.css``, ``LICENSES.txt``...). They hold no secrets, so they
need no token; the page pairs with ``POST /pair`` and then opens ``/run`` like
any other client. The page may load only its own files and talk only to this
server (Content-Security-Policy), and it never sends the ``?token=`` it may be
opened with as a referrer.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from aiohttp import web

WEB_DIR = Path(__file__).parent.parent / "web"

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
}

# Browsers revalidate every time (ETag / Last-Modified), so an upgraded
# further-link is seen at once, and nothing else may read or frame the page.
COMMON_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

# A Host header we are willing to repeat inside the CSP: name or address, port.
_PLAIN_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


# Where index.html wants this answer's style nonce.
NONCE_PLACEHOLDER = b"{{CSP_NONCE}}"


def content_security_policy(host: str, nonce: str) -> str:
    """Only this server's own files, images it sends as data: URLs, its websockets.

    ``nonce`` (URL-safe base64) is the one ``<style>`` elements made by the
    page's own scripts (the editor's and the terminal's) carry; no other inline
    style applies. Websockets may also go to other ports of the same host: a
    GUI program's window comes over its own port (noVNC, ``novnc`` message).
    """
    sockets = ""
    if _PLAIN_HOST.match(host):
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        sockets = f" ws://{host} wss://{host} ws://{name}:* wss://{name}:*"
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            f"style-src 'self' 'nonce-{nonce}'",
            "img-src 'self' data:",
            "font-src 'self'",
            f"connect-src 'self'{sockets}",
            "manifest-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


def static_files(web_dir: Path = WEB_DIR) -> dict[str, bytes]:
    """The files ``/static/`` may serve, by name: a fixed list, no path lookups.

    The page itself is only served at ``/``, with its Content-Security-Policy.
    """
    return {
        path.name: path.read_bytes()
        for path in sorted(web_dir.iterdir())
        if path.is_file() and path.suffix in CONTENT_TYPES and path.suffix != ".html"
    }


# Read at import: a server that drops root (privsep.py) may not read its own
# installation afterwards (e.g. a checkout under /root).
STATIC_FILES = static_files()
INDEX_HTML = (WEB_DIR / "index.html").read_bytes()


def _file_response(name: str, body: bytes) -> web.Response:
    headers = {"Content-Type": CONTENT_TYPES[Path(name).suffix], **COMMON_HEADERS}
    return web.Response(body=body, headers=headers)


async def index(request: web.Request) -> web.Response:
    nonce = secrets.token_urlsafe(18)
    response = _file_response("index.html", INDEX_HTML.replace(NONCE_PLACEHOLDER, nonce.encode()))
    response.headers["Content-Security-Policy"] = content_security_policy(request.host, nonce)
    response.headers["X-Frame-Options"] = "DENY"
    return response


def setup_webpage(app: web.Application) -> None:
    async def static(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = STATIC_FILES.get(name)
        if body is None:
            raise web.HTTPNotFound(text="no such file in further-link's web page\n")
        return _file_response(name, body)

    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
