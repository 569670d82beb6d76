"""``further-link teach``: the teacher's page and its API, on this machine only.

The server listens on 127.0.0.1 alone and answers only to the names
``127.0.0.1`` and ``localhost`` (a web page elsewhere cannot rebind a name
to it). Every ``/api/`` request carries the session key, a random secret
made at start: the page gets it in the address ``teach`` prints (after
``#``, never sent in a request line), the ``class`` commands read it from
``<config dir>/teach.json`` (mode 0600). Other web pages cannot read either,
and their requests carrying a foreign Origin are refused.

API (JSON bodies; ``devices`` is a list of names, or null for all):
``GET /api/state`` -> ``{"devices": [snapshot...]}``;
``POST /api/pair|push|run|stop|lock|unlock`` -> ``{"results": [{"name", "ok",
"error", "seconds"}], "seconds": float}`` (push and run take ``"project":
{"name", "files": {path: text}}``; run also ``"main": path`` or ``"script":
text``; lock ``"message"``); ``POST /api/stdin {"device", "text"}``;
``GET /api/events?key=`` a websocket of ``{"devices": [changed snapshots],
"output": {name: [offset, text]}}`` about 20 times a second; the page sends
``{"watch": name}`` to get all of one device's output (others get the last lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Callable

from aiohttp import WSMsgType, web

from further_link.client.commands import Project
from further_link.compat import app_key
from further_link.errors import ClientError
from further_link.fleet.classroom import Classroom, DeviceLink, Outcome
from further_link.trust.secretfile import write_secret

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"
PAGE_FILES = {"/": "teach.html", "/teach.js": "teach.js", "/teach.css": "teach.css"}
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
# The page's one inline rule: nothing from anywhere but this server.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
TEACH_FILE = "teach.json"
KEY_HEADER = "X-Teach-Key"
FRAME_SECONDS = 0.05
# Output sent per flush for a device the page only shows in the grid.
TILE_CHARS = 2048
MAX_BODY = 128 * 1024 * 1024

CLASSROOM = app_key("classroom", Classroom)
SESSION_KEY = app_key("session_key", str)
PORT = app_key("port", int)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _page_files() -> dict[str, bytes]:
    return {route: (WEB_DIR / name).read_bytes() for route, name in PAGE_FILES.items()}


@web.middleware
async def local_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Only this machine's own names, only this page's origin, and the key for the API."""
    port = request.app[PORT]
    own = {f"127.0.0.1:{port}", f"localhost:{port}"}
    if request.host not in own:
        raise web.HTTPMisdirectedRequest(text="the teacher's page answers on 127.0.0.1 only\n")
    origin = request.headers.get("Origin")
    if origin is not None and origin not in {f"http://{name}" for name in own}:
        raise web.HTTPForbidden(text="another web page may not use the teacher's page\n")
    if request.path.startswith("/api/"):
        presented = request.headers.get(KEY_HEADER) or request.query.get("key") or ""
        if not hmac.compare_digest(presented.encode(), request.app[SESSION_KEY].encode()):
            raise web.HTTPUnauthorized(text="open the address `further-link teach` printed\n")
    return await handler(request)


def _selection(body: dict[str, Any]) -> list[str] | None:
    devices = body.get("devices")
    if devices is None:
        return None
    if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
        raise web.HTTPBadRequest(text="devices must be a list of names, or null for all\n")
    return devices


def _project(body: dict[str, Any]) -> Project | None:
    raw = body.get("project")
    if raw is None:
        return None
    files = raw.get("files") if isinstance(raw, dict) else None
    name = raw.get("name") if isinstance(raw, dict) else None
    if (
        not isinstance(name, str)
        or not name
        or not isinstance(files, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())
    ):
        raise web.HTTPBadRequest(text='project must be {"name": str, "files": {path: text}}\n')
    return Project(name, dict(files))


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="send a JSON object\n")
    return body


def _answer(outcomes: list[Outcome], began: float) -> web.Response:
    results = [
        {"name": o.name, "ok": o.ok, "error": o.error, "seconds": round(o.seconds, 4)}
        for o in outcomes
    ]
    return web.json_response({"results": results, "seconds": round(time.monotonic() - began, 4)})


def run_request(body: dict[str, Any]) -> tuple[dict[str, Any], str, Project | None]:
    """(the ``start`` data, a label for the grid, the project to upload first)."""
    project = _project(body)
    script, main = body.get("script"), body.get("main")
    if project is not None:
        if not isinstance(main, str) or main not in project.files:
            python = sorted(p for p in project.files if p.endswith(".py"))
            main = "main.py" if "main.py" in project.files else (python[0] if python else None)
        if main is None:
            raise web.HTTPBadRequest(text="the project holds no .py file to run\n")
        start = {"sourceScript": project.files[main], "directoryName": project.name}
        return start, f"{project.name}/{main}", project
    if not isinstance(script, str):
        raise web.HTTPBadRequest(text="give a project or a script\n")
    label = body.get("name") if isinstance(body.get("name"), str) else "script"
    return {"sourceScript": script}, str(label), None


async def command(request: web.Request) -> web.Response:
    classroom = request.app[CLASSROOM]
    action = request.match_info["action"]
    body = await _body(request)
    names = _selection(body)
    began = time.monotonic()
    try:
        if action == "pair":
            outcomes = await classroom.each(names, DeviceLink.pair)
        elif action == "push":
            pushed = _project(body)
            if pushed is None:
                raise web.HTTPBadRequest(text="push needs a project\n")
            outcomes = await classroom.each(names, lambda link: link.push(pushed))
        elif action == "run":
            start, label, project = run_request(body)
            outcomes = await classroom.each(names, lambda link: link.run(start, label, project))
        elif action == "stop":
            outcomes = await classroom.each(names, DeviceLink.stop)
        elif action == "lock":
            message = body.get("message") if isinstance(body.get("message"), str) else ""
            outcomes = await classroom.each(names, lambda link: link.lock(str(message)))
        elif action == "unlock":
            outcomes = await classroom.each(names, DeviceLink.unlock)
        else:
            raise web.HTTPNotFound(text=f"no action {action!r}\n")
    except ClientError as exc:
        raise web.HTTPBadRequest(text=exc.message + "\n") from None
    return _answer(outcomes, began)


async def stdin(request: web.Request) -> web.Response:
    body = await _body(request)
    name, text = body.get("device"), body.get("text")
    if not isinstance(name, str) or not isinstance(text, str):
        raise web.HTTPBadRequest(text='send {"device": name, "text": str}\n')
    try:
        (link,) = request.app[CLASSROOM].select([name])
        await link.stdin(text)
    except ClientError as exc:
        raise web.HTTPConflict(text=exc.message + "\n") from None
    return web.json_response({"ok": True})


async def state(request: web.Request) -> web.Response:
    return web.json_response({"devices": request.app[CLASSROOM].snapshot()})


async def events(request: web.Request) -> web.WebSocketResponse:
    """Changed tiles and new output, batched: the page redraws at most once a frame."""
    classroom = request.app[CLASSROOM]
    ws = web.WebSocketResponse(heartbeat=10.0)
    await ws.prepare(request)
    watched: list[str | None] = [None]
    sent: dict[str, dict[str, Any]] = {}
    offsets: dict[str, int] = {}

    async def listen() -> None:
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                try:
                    wanted = json.loads(message.data).get("watch")
                except (ValueError, AttributeError):
                    continue
                watched[0] = wanted if isinstance(wanted, str) else None

    listener = asyncio.ensure_future(listen())
    try:
        while not ws.closed and not listener.done():
            update = _changes(classroom, sent, offsets, watched[0])
            if update is not None:
                await ws.send_str(json.dumps(update))
            classroom.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(classroom.changed.wait(), 1.0)
            await asyncio.sleep(FRAME_SECONDS)
    except ConnectionError:
        pass
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
    return ws


def _changes(
    classroom: Classroom,
    sent: dict[str, dict[str, Any]],
    offsets: dict[str, int],
    watched: str | None,
) -> dict[str, Any] | None:
    devices = []
    output: dict[str, list[Any]] = {}
    for link in classroom.links.values():
        snapshot = link.snapshot()
        if sent.get(link.name) != snapshot:
            sent[link.name] = snapshot
            devices.append(snapshot)
        offset = offsets.get(link.name, 0)
        if link.output_total > offset:
            start, text = link.output_since(offset)
            if link.name != watched and len(text) > TILE_CHARS:
                start, text = start + len(text) - TILE_CHARS, text[-TILE_CHARS:]
            output[link.name] = [start, text]
            offsets[link.name] = link.output_total
    if not devices and not output:
        return None
    return {"devices": devices, "output": output}


def create_teach_app(classroom: Classroom, session_key: str, port: int) -> web.Application:
    """The page and API for ``classroom``, to be served on 127.0.0.1:``port`` only."""
    app = web.Application(middlewares=[local_only], client_max_size=MAX_BODY)
    app[PORT] = port
    app[CLASSROOM] = classroom
    app[SESSION_KEY] = session_key
    files = _page_files()

    def page(route: str) -> Handler:
        async def serve(request: web.Request) -> web.Response:
            content_type = CONTENT_TYPES[Path(PAGE_FILES[route]).suffix]
            headers = {"Content-Security-Policy": CSP, "Cache-Control": "no-store"}
            return web.Response(body=files[route], content_type=content_type, headers=headers)

        return serve

    for route in PAGE_FILES:
        app.router.add_get(route, page(route))
    app.router.add_get("/api/state", state)
    app.router.add_get("/api/events", events)
    app.router.add_post("/api/stdin", stdin)
    app.router.add_post("/api/{action}", command)
    return app


def new_session_key() -> str:
    return secrets.token_urlsafe(24)


def write_teach_file(config_dir: Path, port: int, key: str) -> Path:
    """Where the ``class`` commands find the running teacher's page (0600: it holds the key)."""
    config_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = config_dir / TEACH_FILE
    write_secret(path, json.dumps({"port": port, "key": key}).encode())
    return path


def read_teach_file(config_dir: Path) -> tuple[int, str]:
    """(port, key) of the running ``further-link teach``; raises ClientError when none runs."""
    path = config_dir / TEACH_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        port, key = int(document["port"]), str(document["key"])
    except FileNotFoundError:
        raise ClientError(
            "no teacher's page is running: start `further-link teach` first"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ClientError(f"cannot read {path}: {exc}; restart `further-link teach`") from None
    return port, key
