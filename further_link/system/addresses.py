"""The complete addresses a browser on the network can open this device at.

A bare host name (``raspberrypi``) rarely resolves from a laptop on a school
network; its mDNS name (``raspberrypi.local``, answered by avahi on Raspberry
Pi OS) or an address does.
"""

from __future__ import annotations

import ipaddress
import socket

import psutil

WILDCARDS = ("0.0.0.0", "::", "")


def _url(scheme: str, host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}/"


def interface_addresses() -> list[str]:
    """Every IPv4 and IPv6 address of every interface of this machine, loopback and
    link-local ones included (IPv6 zone ids dropped); may repeat one.

    Raises ``OSError`` when the interfaces cannot be listed.
    """
    found = []
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                found.append(entry.address.split("%", 1)[0])
    return found


def local_addresses(ipv6: bool) -> list[str]:
    """This machine's addresses (IPv4 first), without IPv6 link-local ones.

    Loopback addresses are left out unless there is nothing else.
    """
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for raw in interface_addresses():
        try:
            address = ipaddress.ip_address(raw)
        except ValueError:
            continue
        if address.version == 6 and not ipv6:
            continue
        if address.version == 6 and address.is_link_local:
            continue  # needs a %interface suffix that browsers do not accept
        if address not in found:
            found.append(address)
    outside = [a for a in found if not a.is_loopback]
    chosen = outside or found
    return [str(a) for a in sorted(chosen, key=lambda a: (a.version, int(a)))]


def server_urls(scheme: str, host: str, port: int, hostname: str | None = None) -> list[str]:
    """``scheme://NAME.local:PORT/`` then one URL per local address, for a wildcard ``host``.

    A specific ``host`` gives just its own URL. ``hostname`` defaults to this machine's.
    """
    if host not in WILDCARDS:
        return [_url(scheme, host, port)]
    name = hostname if hostname is not None else socket.gethostname()
    urls = []
    if name:
        urls.append(_url(scheme, name if "." in name else f"{name}.local", port))
    urls += [_url(scheme, a, port) for a in local_addresses(ipv6=host == "::")]
    return urls
