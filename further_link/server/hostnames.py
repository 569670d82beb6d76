"""The names and addresses this device answers to, for the ``Host`` check.

A web page can point a name it owns at the device (DNS rebinding) and then
send that name as ``Host`` and ``Origin``; only names the device knows as its
own are trusted, among them the public name Further gives each IPv4 address
(``192-168-1-20.further-link.pi-top.com``, which its DNS points at that
address). Nothing here touches a request.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Iterable

from further_link.system.addresses import further_host_name, interface_addresses

# Addresses change (DHCP, a new network); the list is rebuilt this often.
REFRESH_SECONDS = 30.0
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def own_names(hostname: str, addresses: Iterable[str], extra: Iterable[str]) -> frozenset[str]:
    """Lower-case host names (no port, no brackets) requests may carry in ``Host``."""
    names = {*LOOPBACK_NAMES, *(normalise_host(name) for name in extra)}
    if hostname:
        short = hostname.lower().rstrip(".")
        names.update({short, f"{short}.local", f"{short.split('.')[0]}.local"})
    addresses = list(addresses)
    names.update(normalise_host(address) for address in addresses)
    names.update(further_host_name(a) for a in addresses if "." in a and ":" not in a)
    names.discard("")
    return frozenset(names)


def normalise_host(host: str) -> str:
    """``Host`` header value -> bare lower-case name or address; ``""`` when unusable.

    ``Name.Local.:8028`` -> ``name.local``; ``[::1]:8028`` -> ``::1``.
    """
    host = host.strip().lower()
    if host.startswith("["):
        inside, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not rest[1:].isdigit()) or (rest and rest[0] != ":"):
            return ""
        try:
            return str(ipaddress.IPv6Address(inside))
        except ValueError:
            return ""
    if host.count(":") > 1:  # a bare IPv6 address without brackets
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            return ""
    name, colon, port = host.partition(":")
    if colon and not port.isdigit():
        return ""
    return name.rstrip(".")


class OwnNames:
    """The device's names, rebuilt every ``REFRESH_SECONDS`` (addresses come and go)."""

    def __init__(self, extra: Iterable[str]) -> None:
        self._extra = tuple(extra)
        self._names: frozenset[str] = frozenset()
        self._built = -REFRESH_SECONDS

    def current(self) -> frozenset[str]:
        now = time.monotonic()
        if now - self._built >= REFRESH_SECONDS:
            try:
                addresses = interface_addresses()
            except OSError:
                addresses = []
            self._names = own_names(socket.gethostname(), addresses, self._extra)
            self._built = now
        return self._names

    def allows(self, host_header: str | None) -> bool:
        """True when ``Host`` names this device (a missing ``Host`` never does)."""
        if not host_header:
            return False
        name = normalise_host(host_header)
        return bool(name) and name in self.current()
