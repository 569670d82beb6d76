"""Where ``url`` uploads may be fetched from: the public internet, and what the admin allows.

A learner's url could otherwise make the device fetch from the school's own
private servers, the device's loopback services or a router's link-local page.
Addresses are judged where the connection is made: names go through
``PolicyResolver``, so the very address checked is the one connected to (a
name that resolves once to a public and then to a private address cannot slip
through), and address literals are judged before each request, redirects
included (``UrlCache`` follows redirects itself, one hop at a time).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Union

from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver

from further_link.compat import ResolveResult
from further_link.errors import ConfigError

# Runtime aliases: Union, not "|", which Python 3.9 cannot evaluate.
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class DestinationRefused(OSError):
    """The url's host is an address downloads may not reach."""


class DownloadPolicy:
    """Refuses loopback, link-local, private, multicast, reserved and unspecified addresses.

    ``allow`` (FURTHER_LINK_DOWNLOAD_ALLOW) lists host names, addresses and
    CIDR networks that may be reached anyway, e.g. a school's own mirror.
    Raises ``ConfigError`` for an entry that is none of these.
    """

    def __init__(self, allow: Iterable[str] = ()) -> None:
        self._names: set[str] = set()
        self._networks: list[Network] = []
        for entry in allow:
            entry = entry.strip().lower()
            if not entry:
                continue
            try:
                self._networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            if "/" in entry or " " in entry:
                raise ConfigError(
                    f"FURTHER_LINK_DOWNLOAD_ALLOW entry {entry!r} is not a host name, "
                    "an address or a network such as 10.0.0.0/8"
                )
            self._names.add(entry.rstrip("."))

    def name_allowed(self, host: str) -> bool:
        return host.lower().rstrip(".") in self._names

    def why_refused(self, address: str) -> str | None:
        """``None`` when ``address`` may be reached, else what kind of address it is."""
        try:
            ip: Address = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return "not an address"
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in network for network in self._networks):
            return None
        for kind, flag in (
            ("a loopback address", ip.is_loopback),
            ("an unspecified address", ip.is_unspecified),
            ("a link-local address", ip.is_link_local),
            ("a multicast address", ip.is_multicast),
            ("a private network address", ip.is_private),
            ("a reserved address", ip.is_reserved),
        ):
            if flag:
                return kind
        if not ip.is_global:
            return "not a public address"
        return None

    def check_literal(self, host: str) -> None:
        """Raise ``DestinationRefused`` when ``host`` is an address the policy refuses."""
        try:
            ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
        except ValueError:
            return  # a name: PolicyResolver judges what it resolves to
        if self.name_allowed(host.strip("[]")):
            return
        reason = self.why_refused(host.strip("[]"))
        if reason is not None:
            raise DestinationRefused(_refusal(host, host, reason))


def _refusal(host: str, address: str, reason: str) -> str:
    where = host if host == address else f"{host} ({address})"
    return (
        f"{where} is {reason}; url uploads may reach only public addresses "
        "(the device's admin can allow more with FURTHER_LINK_DOWNLOAD_ALLOW)"
    )


class PolicyResolver(AbstractResolver):
    """aiohttp's resolver, keeping only the addresses ``policy`` allows."""

    def __init__(self, policy: DownloadPolicy) -> None:
        self._policy = policy
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if self._policy.name_allowed(host):
            return results
        kept = [r for r in results if self._policy.why_refused(r["host"]) is None]
        if not kept and results:
            first = results[0]["host"]
            raise DestinationRefused(
                _refusal(host, first, self._policy.why_refused(first) or "refused")
            )
        return kept

    async def close(self) -> None:
        await self._inner.close()
