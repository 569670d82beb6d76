"""The complete addresses a browser on the network can open this device at.

A bare host name (``raspberrypi``) rarely resolves from a laptop on a school
network; its mDNS name (``raspberrypi.local``, answered by avahi on Raspberry
Pi OS) or an address does. Further's own page uses the name its DNS gives each
IPv4 address (``further_host_name``), which the certificate (trust/tls.py) and
the ``Host`` check (server/hostnames.py) both take from here.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

import psutil

WILDCARDS = ("0.0.0.0", "::", "")
# Further's DNS points ``a-b-c-d.further-link.pi-top.com`` at the IPv4 address a.b.c.d.
FURTHER_DOMAIN = "further-link.pi-top.com"


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


def further_host_name(address: str) -> str:
    """``192.168.1.20`` -> ``192-168-1-20.further-link.pi-top.com``, the name Further uses."""
    return f"{address.replace('.', '-')}.{FURTHER_DOMAIN}"


def reachable_ipv4(addresses: Iterable[str]) -> list[str]:
    """The IPv4 addresses other machines can reach (no loopback or link-local), sorted."""
    found = set()
    for raw in addresses:
        try:
            address = ipaddress.ip_address(raw)
        except ValueError:
            continue
        if address.version == 4 and not (
            address.is_loopback or address.is_link_local or address.is_unspecified
        ):
            found.add(str(address))
    return sorted(found)


def device_addresses() -> list[str]:
    """This device's IPv4 addresses that other machines can reach (for its certificate and
    its announcement on the network)."""
    return reachable_ipv4(interface_addresses())


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
