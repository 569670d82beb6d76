"""The ``further-link`` command: argument parsing, logging, and each sub-command.

``further-link`` alone (or with serve's flags) runs the server, as the seed's
``python3 server.py`` did; other sub-commands are small tools around it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Callable

from aiohttp import web

from further_link import PACKAGE_VERSION, __version__
from further_link.client.commands import add_client_commands
from further_link.config import Config, listen_address, load_config, resolve_config_dir, uses_tls
from further_link.errors import FurtherLinkError
from further_link.fleet.commands import add_fleet_commands
from further_link.server.access import GUARD
from further_link.server.advertise import Advertiser
from further_link.server.app import bind_listener, create_app
from further_link.server.netguard import GuardedSite, raise_fd_limit
from further_link.server.teacher import served_certificate_fingerprint
from further_link.system.addresses import server_urls
from further_link.system.firstrun import add_setup_command
from further_link.system.memory import map_large_blocks
from further_link.system.privsep import drop_privileges
from further_link.system.service import add_service_command
from further_link.trust.auth import TokenStore, pairing_code
from further_link.trust.control import bind_control_socket, current_generation, notify_servers
from further_link.trust.pairing import PairingGuard
from further_link.trust.tls import server_ssl_context

log = logging.getLogger(__name__)

PAIRING_CODE_CHECK_INTERVAL = 2.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="further-link",
        description="Run learners' Python programs on this device from a browser.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"further-link {PACKAGE_VERSION} (Further-Link API {__version__})",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the server (the default command)")
    serve.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port (default 8028, env FURTHER_LINK_PORT)")
    serve.add_argument("--work-dir", help="where uploads go (env FURTHER_LINK_WORK_DIR)")
    serve.add_argument("--no-ssl", action="store_true", help="plain HTTP (env FURTHER_LINK_NOSSL)")
    serve.add_argument("--cert", help="TLS certificate file (env FURTHER_LINK_CERT)")
    serve.add_argument("--key", help="TLS private key file (env FURTHER_LINK_KEY)")
    serve.add_argument("--user", help="account programs run as, when started as root")
    serve.add_argument("--config-dir", help="where the certificate and token are kept")
    serve.add_argument(
        "--pool-preload",
        metavar="MODULES",
        help="modules waiting interpreters import ahead, e.g. numpy,PIL.Image, or none "
        "(env FURTHER_LINK_POOL_PRELOAD; default by memory)",
    )
    serve.add_argument(
        "--no-auth",
        action="store_true",
        help="accept clients without the device token (env FURTHER_LINK_AUTH=off)",
    )
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.set_defaults(handler=_serve_command)

    token = commands.add_parser("token", help="print the device token and pairing code")
    token.add_argument("--rotate", action="store_true", help="replace the token (re-pair all)")
    token.add_argument("--config-dir", help="where the token is kept")
    token.set_defaults(handler=_token_command)

    add_client_commands(commands)
    add_fleet_commands(commands)
    add_service_command(commands)
    add_setup_command(commands)
    return parser


def _with_default_command(argv: list[str]) -> list[str]:
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        return ["serve", *argv]
    return argv


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_with_default_command(list(sys.argv[1:] if argv is None else argv)))
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except FurtherLinkError as exc:
        log.error("%s", exc.message)
        return 1


def _serve_command(args: argparse.Namespace) -> int:
    config = load_config(
        host=args.host,
        port=args.port,
        work_dir=args.work_dir,
        no_ssl=args.no_ssl,
        cert_file=args.cert,
        key_file=args.key,
        user=args.user,
        config_dir=args.config_dir,
        no_auth=args.no_auth or None,
        pool_preload=args.pool_preload,
    )
    try:
        asyncio.run(serve(config))
    except OSError as exc:
        log.error("cannot start the server: %s", exc)
        return 1
    return 0


def _token_command(args: argparse.Namespace) -> int:
    config_dir = resolve_config_dir(os.environ, args.config_dir, server=True)
    store = TokenStore(config_dir)
    token = store.rotate() if args.rotate else store.load_or_create()
    code = pairing_code(token, generation=current_generation(config_dir))
    if args.rotate:
        print("new token created: every paired browser and client must pair again")
        # Servers that dropped root cannot re-read the file: hand it to them.
        told = notify_servers(config_dir, token)
        if told:
            print(f"told {told} running server(s): their connections were closed")
    print(f"token: {token}")
    print(f"pairing code: {code.shown} (valid for {code.seconds_left() // 60 + 1} more minutes)")
    print("pair a browser with either: the page's pairing box takes the code or the token")
    host, port = listen_address(os.environ)
    for url in server_urls("https" if uses_tls(os.environ) else "http", host, port):
        print(f"open: {url}")
    return 0


async def serve(config: Config) -> None:
    """Serve until SIGTERM or SIGINT, then end every run and exit.

    Started as root, it first does what needs root — reads the token and the
    TLS key, binds its sockets — then drops to the program user for good
    (privsep.py) before accepting a connection. Raises PrivilegeError when it
    cannot drop.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tokens = TokenStore(config.config_dir)
    ssl_context = server_ssl_context(config) if config.ssl else None
    log.debug("open-file limit: %d", raise_fd_limit())
    map_large_blocks()  # a flood of big messages must not pin the heap (memory.py)
    listener = bind_listener(config.host, config.port)
    fingerprint = served_certificate_fingerprint(config)  # the config dir is root's
    control = None
    run_as = config.run_as
    if run_as is not None and run_as.drop:
        tokens.hold()
        control = bind_control_socket(config.config_dir)
        drop_privileges(run_as)
    else:
        tokens.load_or_create()
    app = create_app(config, tokens, control, fingerprint)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    announcer: asyncio.Task[None] | None = None
    advertiser: Advertiser | None = None
    try:
        site = GuardedSite(runner, config, ssl_context, sock=listener)
        await site.start()
        host, port = runner.addresses[0][:2]
        scheme = "https" if ssl_context else "http"
        urls = server_urls(scheme, config.host, port)
        log.info(
            "further-link %s serving %s (listening on %s:%d, work dir %s)",
            PACKAGE_VERSION,
            urls[0],
            host,
            port,
            config.work_dir,
        )
        for url in urls[1:]:
            log.info("also at %s", url)
        if config.advertise:
            advertiser = Advertiser(config, port, fingerprint)
            advertiser.start()
        if config.run_as is not None:
            log.info("programs run as %r: %s", config.run_as.name, config.run_as.reason)
        _warn_about_open_doors(config)
        if config.auth:
            # Never the token: this log is read, kept and pasted into chats.
            log.info("pair at %s with the code below; `further-link token` shows it too", urls[0])
            announcer = asyncio.ensure_future(_announce_pairing_codes(tokens, app[GUARD]))
        await stop.wait()
        log.info("stopping: ending all programs")
    finally:
        if advertiser is not None:
            await advertiser.close()
        if announcer is not None:
            announcer.cancel()
            await asyncio.gather(announcer, return_exceptions=True)
        await runner.cleanup()


def _warn_about_open_doors(config: Config) -> None:
    if not config.auth:
        log.warning(
            "pairing is OFF (FURTHER_LINK_AUTH=off / --no-auth): anyone who can reach this "
            "port can run code on this device; use this only on a trusted network"
        )
    if config.auth and config.origin_auth:
        log.warning(
            "pairing by ORIGIN (FURTHER_LINK_AUTH=origin): connections claiming an origin in "
            "FURTHER_LINK_ORIGINS (%s) need no token; any program on the network can claim one, "
            "so use this only on a network you trust",
            ", ".join(config.origins),
        )
    if "*" in config.origins:
        log.warning(
            "FURTHER_LINK_ORIGINS contains '*': web pages from any site may connect "
            "(they still need the token unless pairing is off)"
        )


async def _announce_pairing_codes(tokens: TokenStore, guard: PairingGuard) -> None:
    """Log the pairing code now and whenever it changes (new window, rotated token, spent code)."""
    shown = ""
    while True:
        try:
            code = pairing_code(tokens.current(), generation=guard.generation)
        except OSError as exc:
            log.warning("cannot read the device token: %s", exc)
        else:
            if code.code != shown:
                shown = code.code
                log.info("pairing code: %s (valid for %d s)", code.shown, code.seconds_left())
        await asyncio.sleep(PAIRING_CODE_CHECK_INTERVAL)
