"""The ``further-link`` command: argument parsing, logging, starting the server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys

from aiohttp import web

from . import __version__
from .config import Config, load_config
from .errors import FurtherLinkError
from .server import create_app
from .tls import server_ssl_context

log = logging.getLogger(__name__)

COMMANDS = ("serve",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="further-link",
        description="Run learners' Python programs on this device from a browser.",
    )
    parser.add_argument("--version", action="version", version=f"further-link {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the server (the default command)")
    serve.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port (default 8028, env FURTHER_LINK_PORT)")
    serve.add_argument("--work-dir", help="where uploads go (env FURTHER_LINK_WORK_DIR)")
    serve.add_argument("--no-ssl", action="store_true", help="plain HTTP (env FURTHER_LINK_NOSSL)")
    serve.add_argument("--cert", help="TLS certificate file (env FURTHER_LINK_CERT)")
    serve.add_argument("--key", help="TLS private key file (env FURTHER_LINK_KEY)")
    serve.add_argument("--user", help="account programs run as, when started as root")
    serve.add_argument("--config-dir", help="where the certificate is kept")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def _with_default_command(argv: list[str]) -> list[str]:
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        return ["serve", *argv]
    return argv


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(
        _with_default_command(list(sys.argv[1:] if argv is None else argv))
    )
    if args.command is None:
        build_parser().print_help()
        return 2
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_config(
            host=args.host,
            port=args.port,
            work_dir=args.work_dir,
            no_ssl=args.no_ssl,
            cert_file=args.cert,
            key_file=args.key,
            user=args.user,
            config_dir=args.config_dir,
        )
        asyncio.run(serve(config))
    except FurtherLinkError as exc:
        log.error("%s", exc.message)
        return 1
    except OSError as exc:
        log.error("cannot start the server: %s", exc)
        return 1
    return 0


async def serve(config: Config) -> None:
    """Serve until SIGTERM or SIGINT, then end every run and exit."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = create_app(config)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        ssl_context = server_ssl_context(config) if config.ssl else None
        site = web.TCPSite(runner, config.host, config.port, ssl_context=ssl_context)
        await site.start()
        host, port = runner.addresses[0][:2]
        scheme = "https" if ssl_context else "http"
        shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
        log.info(
            "further-link %s serving %s://%s:%d/ "
            "(listening on %s:%d, work dir %s, programs run as %s)",
            __version__,
            scheme,
            shown,
            port,
            host,
            port,
            config.work_dir,
            config.run_as.name if config.run_as else "this user",
        )
        await stop.wait()
        log.info("stopping: ending all programs")
    finally:
        await runner.cleanup()
