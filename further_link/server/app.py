"""aiohttp wiring: routes, one Session and one Outbox per websocket, shutdown.

Nothing here knows what a message means; that is protocol.py and session.py.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Callable, Protocol

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web

from further_link import PACKAGE_VERSION, __version__
from further_link.compat import app_key
from further_link.config import Config
from further_link.errors import ProcessMessageError, ProtocolError
from further_link.files.egress import DownloadPolicy, PolicyResolver
from further_link.files.project import remove_stale_scripts
from further_link.files.upload import UrlCache
from further_link.protocol.events import ErrorEvent
from further_link.protocol.runpy import parse_command
from further_link.runs import proctree
from further_link.runs.claims import ClaimRegistry
from further_link.runs.containment import Containment, Limits
from further_link.runs.detach import RunBook
from further_link.runs.launch import prepare_library_dir, program_env
from further_link.runs.pool import WarmPool
from further_link.runs.rundirs import RunPlaces
from further_link.runs.services import Services
from further_link.runs.session import Session
from further_link.server.access import GUARD, TOKENS, check_origin, check_token, setup_access
from further_link.server.device import DEVICE_STATUS, setup_device
from further_link.server.further_http import setup_further_http
from further_link.server.liveness import bytes_acked, made_progress
from further_link.server.netguard import hold_clock
from further_link.server.novnc_proxy import setup_novnc_proxy
from further_link.server.outbox import Outbox, OutboxClosed
from further_link.server.projects import setup_projects
from further_link.server.run_ws import Wiring, setup_run_api
from further_link.server.runs_http import holds_token, setup_runs_http
from further_link.server.teacher import TEACHING, setup_teacher
from further_link.server.upload_http import make_upload_handler
from further_link.server.webpage import setup_webpage
from further_link.system.interpreter import check_interpreter
from further_link.trust.auth import TokenStore
from further_link.trust.control import serve_control

log = logging.getLogger(__name__)

CONFIG = app_key("config", Config)
SERVICES = app_key("services", Services)
CONNECTIONS = app_key("connections", dict)
CONTROL = app_key("control", socket.socket)

OPEN_CORS = {"Access-Control-Allow-Origin": "*"}


async def status(request: web.Request) -> web.Response:
    return web.Response(text="OK", headers=OPEN_CORS)


async def version(request: web.Request) -> web.Response:
    """``version`` is the Further-Link API level Further checks; ``package`` is our release."""
    return web.json_response(
        {"version": __version__, "package": f"further-link {PACKAGE_VERSION}"}, headers=OPEN_CORS
    )


# aiohttp >= 3.13 can hand over a text message as the bytes it received.
_CAN_KEEP_BYTES = "decode_text" in inspect.signature(web.WebSocketResponse.__init__).parameters


class RunPyWebSocket(web.WebSocketResponse):
    """Says why when aiohttp closes a connection for a message over the size cap.

    aiohttp refuses such a message from its frame header, before reading it,
    but closes with code 1009 and no reason; clients should see which limit.

    Text messages arrive as UTF-8 bytes where aiohttp allows it (see
    ``text_of``): aiohttp decodes while it still holds its own copies of the
    payload, so a 4 MiB message would cost three copies at once, not two.
    """

    def __init__(self, **options: Any) -> None:
        if _CAN_KEEP_BYTES:
            options.setdefault("decode_text", False)
        super().__init__(**options)

    async def close(
        self, *, code: int = WSCloseCode.OK, message: bytes = b"", **options: Any
    ) -> bool:
        # ``options``: ``drain`` on aiohttp >= 3.9; aiohttp 3.8 (Debian 12) has none.
        if code == WSCloseCode.MESSAGE_TOO_BIG and not message:
            message = (
                f"message over the limit of {self._max_msg_size} bytes "
                "(FURTHER_LINK_MAX_MESSAGE_BYTES)"
            ).encode()
        return await super().close(code=code, message=message, **options)

    # aiohttp's heartbeat (its private hooks, present since 3.9): a ping is
    # answered late when it waits behind a flood the client is still reading.
    _acked_at_ping: int | None = None

    def _send_heartbeat(self) -> None:
        self._acked_at_ping = self._bytes_acked()
        super()._send_heartbeat()

    def _pong_not_received(self) -> None:
        if made_progress(self._acked_at_ping, self._bytes_acked()):
            log.debug("a ping is still behind output the client is reading; waiting longer")
            self._reset_heartbeat()
            return
        super()._pong_not_received()

    def _bytes_acked(self) -> int | None:
        # The timers may fire after the stall watchdog aborted the connection.
        # Python 3.11's TLS transport, closed twice, then raises
        # AttributeError from get_extra_info: a closed one is not asked.
        transport = self._writer.transport if self._writer is not None else None
        if transport is None or transport.is_closing():
            return None
        return bytes_acked(transport.get_extra_info("socket"))

    def over_the_limit(self, data: str | bytes) -> bool:
        """Whether a received message is too big although aiohttp let it through.

        aiohttp refuses an uncompressed message of ``max_msg_size`` bytes or
        more, but a permessage-deflate one only when it inflates to more: this
        makes the limit the same with and without compression.
        """
        limit = self._max_msg_size
        if not limit or not self.compress:
            return False
        if isinstance(data, bytes) or len(data) >= limit:
            return len(data) >= limit
        # UTF-8 takes 1 to 4 bytes per character: count only when it matters.
        return len(data) * 4 >= limit and len(data.encode("utf-8", "surrogatepass")) >= limit


async def run_py(request: web.Request) -> web.WebSocketResponse:
    check_origin(request)
    check_token(request)
    app = request.app
    config = app[CONFIG]
    ws = RunPyWebSocket(max_msg_size=config.max_message_bytes, heartbeat=config.heartbeat or None)
    await ws.prepare(request)
    outbox = Outbox(config.output_queue_bytes)
    session = Session(app[SERVICES], outbox)
    session.may_attach = holds_token(request)
    await serve_connection(request, ws, session, outbox, parse_command)
    return ws


class Connection(Protocol):
    """What a websocket's session is to this glue: /run-py's Session, /run's RunSession."""

    async def handle(self, command: Any) -> None: ...
    async def close(self) -> None: ...


async def serve_connection(
    request: web.Request,
    ws: RunPyWebSocket,
    session: Connection,
    outbox: Outbox,
    parse: Callable[[str], Any],
) -> None:
    """Feed the client's messages, parsed by ``parse``, to ``session`` until the
    socket ends, then end it all."""
    app = request.app
    app[CONNECTIONS][session] = ws
    writer = asyncio.ensure_future(_send_events(ws, outbox))
    watchdog = asyncio.ensure_future(
        _cut_off_when_stalled(request, outbox, app[CONFIG].stall_timeout)
    )
    log.debug("client connected from %s to %s", request.remote, request.path)
    try:
        async for message in ws:
            kind, data = message.type, message.data
            # A message may be megabytes: nothing may hold it while the next one is read.
            del message
            if kind in (WSMsgType.TEXT, WSMsgType.BINARY) and ws.over_the_limit(data):
                log.info("closed the connection from %s: message over the limit", request.remote)
                await ws.close(code=WSCloseCode.MESSAGE_TOO_BIG)
                break
            if ws.closed:
                break
            if kind is WSMsgType.TEXT:
                # Rebinding drops the bytes as soon as the text exists.
                data = text_of(data)
                if data is None:
                    log.info("closed the connection from %s: text not in UTF-8", request.remote)
                    await ws.close(code=WSCloseCode.INVALID_TEXT, message=NOT_UTF8)
                    break
                try:
                    command = parse(data)
                except ProtocolError as exc:
                    _refuse(outbox, exc)
                else:
                    del data
                    await session.handle(command)
                    del command
            elif kind is WSMsgType.BINARY:
                outbox.put(
                    ErrorEvent("binary messages are not understood; send JSON as a text message")
                )
            elif kind is WSMsgType.ERROR:
                log.info("closed the connection from %s: %s", request.remote, data)
            data = None
            # Nothing more is taken from a client while its answers pile up unread; the
            # wait holds no message, so aiohttp's assembly of the next is the only big buffer.
            await outbox.wait_room()
    finally:
        app[CONNECTIONS].pop(session, None)
        await session.close()
        outbox.close()
        writer.cancel()
        watchdog.cancel()
        await asyncio.gather(writer, watchdog, return_exceptions=True)
        log.debug("client from %s disconnected", request.remote)


NOT_UTF8 = b"a text message must be UTF-8 (RFC 6455 section 8.1)"


def text_of(data: str | bytes) -> str | None:
    """A text message's payload as ``str``: ``None`` when it is not UTF-8."""
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _refuse(outbox: Outbox, error: ProtocolError) -> None:
    """A message that is no command: say why (on /run, naming its process when it had one)."""
    log.info("refused: %s", error.message)
    process = error.process if isinstance(error, ProcessMessageError) else None
    outbox.put(ErrorEvent(error.message, process=process))


STALL_CHECK_INTERVAL = 1.0


async def _cut_off_when_stalled(request: web.Request, outbox: Outbox, limit: float) -> None:
    """Drop the connection once its queue has been full for ``limit`` seconds.

    The client reads nothing, so a closing handshake would wait behind the
    very data it does not read: the connection is aborted instead, and the
    handler's ``finally`` ends its program as for any disconnect.
    """
    while True:
        await asyncio.sleep(min(STALL_CHECK_INTERVAL, limit / 2) if limit > 0 else 1.0)
        if outbox.stalled_for() >= limit:
            log.info(
                "dropped the connection from %s: it read nothing for %.0f s", request.remote, limit
            )
            outbox.close()
            if request.transport is not None:
                request.transport.abort()
            return


async def _send_events(ws: web.WebSocketResponse, outbox: Outbox) -> None:
    try:
        while True:
            text = await outbox.get()
            await ws.send_str(text)
    except (OutboxClosed, ConnectionError):
        pass
    finally:
        outbox.close()


async def _services(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    await check_interpreter(config.python, config.run_as)
    # Orphans of programs (double-forked daemons) become ours, to kill and reap.
    proctree.become_subreaper()
    _prepare_work_dir(config)
    remove_stale_scripts(config.work_dir)
    containment = _start_containment(config)
    app[DEVICE_STATUS].containment = containment.mode
    library_dir = prepare_library_dir()
    policy = DownloadPolicy(config.download_allow)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=PolicyResolver(policy)))
    pool = _start_pool(config, library_dir, containment)
    run_places = RunPlaces()
    run_places.start()
    app[SERVICES] = Services(
        config=config,
        cache=UrlCache(config.cache_dir, http, config.max_download_bytes, policy),
        library_dir=library_dir,
        pool=pool,
        run_places=run_places,
        containment=containment,
        admission=app[TEACHING].lock.admit,
        runs=RunBook(ClaimRegistry(), config.exclusive, config.max_detached_runs),
    )
    app[DEVICE_STATUS].runs = app[SERVICES].runs
    watcher = asyncio.ensure_future(_watch_token(app)) if config.auth else None
    control = await _serve_control(app) if CONTROL in app else None
    try:
        yield
    finally:
        # Connections are closed by now; what they left detached ends here.
        await app[SERVICES].runs.close()
        if control is not None:
            control.close()
        await app[TEACHING].lock.close()
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        if pool is not None:
            await pool.close()
        run_places.close()
        containment.close()
        await http.close()
        shutil.rmtree(library_dir, ignore_errors=True)


def _start_containment(config: Config) -> Containment:
    limits = Limits(config.max_memory_bytes, config.max_tasks, config.cpu_weight)
    containment = Containment.start(limits, force_best_effort=config.containment == "best-effort")
    log.info("containment of programs: %s", containment.description)
    return containment


def _start_pool(config: Config, library_dir: Path, containment: Containment) -> WarmPool | None:
    if config.pool_size <= 0:
        return None
    # The environment every program shares; per-run variables are applied at launch.
    base_env = program_env(config, library_dir, run_dir=Path("/"), import_dir=None)
    pool = WarmPool(
        config.pool_size,
        config.python,
        base_env,
        preload=config.pool_preload,
        quiet_missing=config.pool_preload_is_default,
        containment=containment,
    )
    pool.start()
    return pool


def _prepare_work_dir(config: Config) -> None:
    # Made by the server as the program user (a root-started server has dropped by now).
    config.work_dir.mkdir(parents=True, exist_ok=True)


TOKEN_CHECK_INTERVAL = 2.0
TOKEN_ROTATED = 4001  # application close code: the client must pair again


async def _watch_token(app: web.Application) -> None:
    """After `further-link token --rotate`, connections opened with the old token end.

    A server that dropped root holds the token in memory and learns of a new
    one over its control socket instead (``_serve_control``).
    """
    tokens = app[TOKENS]
    if tokens.held:
        return
    known = tokens.current()
    while True:
        await asyncio.sleep(TOKEN_CHECK_INTERVAL)
        try:
            current = tokens.current()
        except OSError as exc:
            log.warning("cannot read the device token: %s", exc)
            continue
        if current == known:
            continue
        known = current
        await _token_replaced(app)


async def _serve_control(app: web.Application) -> asyncio.AbstractServer:
    """Take rotated tokens from root over the control socket bound before the drop."""
    tokens = app[TOKENS]

    async def on_token(token: str) -> None:
        if tokens.replace_held(token):
            await _token_replaced(app)

    guard = app[GUARD]
    return await serve_control(app[CONTROL], on_token, lambda: guard.generation)


async def _token_replaced(app: web.Application) -> None:
    log.info("the device token was replaced: closing %d connection(s)", len(app[CONNECTIONS]))
    await _end_connections(app, TOKEN_ROTATED, b"the device token was replaced; pair again")


async def _end_connections(app: web.Application, code: int, reason: bytes) -> None:
    """End every program first, then close every websocket with ``code``."""
    connections = list(app[CONNECTIONS].items())
    await asyncio.gather(*(session.close() for session, _ in connections))
    await asyncio.gather(*(ws.close(code=code, message=reason) for _, ws in connections))


async def _close_connections(app: web.Application) -> None:
    """Server shutdown: end every program, then say goodbye to clients."""
    await _end_connections(app, WSCloseCode.GOING_AWAY, b"server stopping")


def bind_listener(host: str, port: int) -> socket.socket:
    """The listening TCP socket, bound now (a server started as root binds before dropping).

    Raises OSError when the address cannot be bound.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def create_app(
    config: Config,
    tokens: TokenStore | None = None,
    control: socket.socket | None = None,
    fingerprint: str | None = None,
) -> web.Application:
    """The whole server; ``tokens`` defaults to the device token in the config dir.

    ``control`` is the listening control socket of a server that dropped root
    (control.py): rotated tokens arrive there. ``fingerprint``: the served
    certificate's SHA-256 as read before the drop (else read here; teacher.py).
    """
    app = web.Application(middlewares=[hold_clock])
    app[CONFIG] = config
    if control is not None:
        app[CONTROL] = control
    if tokens is None:
        tokens = TokenStore(config.config_dir)
        tokens.load_or_create()
    setup_access(app, config, tokens, dropped=control is not None)
    app[CONNECTIONS] = {}
    app.router.add_get("/status", status)
    app.router.add_get("/version", version)
    app.router.add_get("/run-py", run_py)
    setup_run_api(app, Wiring(CONFIG, SERVICES, RunPyWebSocket, serve_connection))
    setup_novnc_proxy(app, SERVICES)
    app.router.add_post("/upload", make_upload_handler(SERVICES))
    setup_further_http(app)
    setup_webpage(app)
    setup_device(app, config)
    setup_runs_http(app, SERVICES)
    setup_projects(app, config)
    setup_teacher(app, config, fingerprint)
    app.cleanup_ctx.append(_services)
    app.on_shutdown.append(_close_connections)
    return app
