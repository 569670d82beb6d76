"""Glue between a browser asking to pair and the device's own screen (system/miniscreen.py).

A browser asks to pair when it is refused for want of the token (the page
then shows its pairing form) and when it sends ``POST /pair``. On a pi-top
with the SDK the current code then appears on the miniscreen; elsewhere
``setup_pair_screen`` installs nothing and asking costs nothing.
"""

from __future__ import annotations

import ipaddress
import socket

from aiohttp import web

from further_link.compat import app_key
from further_link.system.addresses import local_addresses
from further_link.system.miniscreen import PairingScreen, PitopDisplay, pitop_available

PAIR_SCREEN = app_key("pair_screen", PairingScreen)


def setup_pair_screen(app: web.Application) -> None:
    """A ``PairingScreen`` on the pi-top SDK's miniscreen, when ``pitop`` is importable."""
    if not pitop_available():
        return
    screen = PairingScreen(PitopDisplay)
    app[PAIR_SCREEN] = screen

    async def close(app: web.Application) -> None:
        await screen.close()

    app.on_cleanup.append(close)


def show_on_device(request: web.Request, code: str) -> None:
    """Show ``code`` with this device's name and the address the browser reached."""
    screen = request.app.get(PAIR_SCREEN)
    if screen is not None:
        screen.request(code, socket.gethostname(), device_address(request))


def device_address(request: web.Request) -> str:
    """``host:port`` a browser on the network opens: the address this request came in on,
    or this machine's first network address when that was loopback or a wildcard."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    host, port = (str(sockname[0]), int(sockname[1])) if sockname else ("", 0)
    try:
        reachable = not ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        reachable = False
    if not reachable:
        found = local_addresses(ipv6=False)
        host = found[0] if found else socket.gethostname()
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}" if port else shown
