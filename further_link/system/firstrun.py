"""``further-link setup``: make what the service needs before its first start.

The Debian package's postinst runs it as root with the service's settings:
it chooses the program account (creating the dedicated one if nothing else
fits), and makes the config dir, the device token and the certificate, so
the first start only serves. Running it again changes nothing.
"""

from __future__ import annotations

import argparse
import os

from further_link.config import load_config
from further_link.trust.auth import TokenStore
from further_link.trust.tls import ensure_self_signed


def add_setup_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``setup`` with the ``further-link`` command."""
    parser = commands.add_parser(
        "setup",
        help="choose the program account, make the token and certificate (run as root)",
        description="What the service needs before its first start, made now with the "
        "same FURTHER_LINK_* settings: the program account, the config dir, the device "
        "token and the certificate. The Debian package runs it at install.",
    )
    parser.add_argument("--config-dir", help="where the certificate and token are kept")
    parser.add_argument("--user", help="account programs run as, when run as root")
    parser.set_defaults(handler=_setup_command)


def _setup_command(args: argparse.Namespace) -> int:
    config = load_config(config_dir=args.config_dir, user=args.user)
    if config.run_as is not None:
        print(f"further-link: programs run as {config.run_as.name!r}: {config.run_as.reason}")
    config.config_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(config.config_dir, 0o700)
    TokenStore(config.config_dir).load_or_create()
    made = "the device token is"
    if config.ssl and config.cert_file is None:
        ensure_self_signed(config.config_dir)
        made = "the device token and certificate are"
    print(f"further-link: {made} in {config.config_dir}")
    return 0
