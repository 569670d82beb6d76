"""Announcing this device on the local network: mDNS/DNS-SD ``_further-link._tcp``.

A teacher's ``further-link devices`` (fleet/discovery.py) finds every device
on the school network this way. The TXT record carries what a teacher's tool
needs before it connects: the device's name, port, whether it serves TLS,
its version and its certificate's SHA-256 fingerprint (so the tool pins the
certificate it then sees against the one announced).

Started after the server dropped root: multicast DNS needs no privilege
(port 5353 is shared with SO_REUSEPORT). ``FURTHER_LINK_ADVERTISE=0`` turns
it off. A server listening on one address announces and answers on that
address's interface only; one listening on every address announces the
device's reachable IPv4 addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from zeroconf import IPVersion, NonUniqueNameException
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from further_link import PACKAGE_VERSION, __version__
from further_link.config import Config
from further_link.system.addresses import WILDCARDS, device_addresses

log = logging.getLogger(__name__)

SERVICE_TYPE = "_further-link._tcp.local."
# DNS labels hold at most 63 bytes.
MAX_NAME_BYTES = 63


def device_name(config: Config) -> str:
    """The name teachers see: FURTHER_LINK_DEVICE_NAME, else the host name."""
    name = config.device_name or socket.gethostname().split(".")[0] or "further-link"
    return name.encode("utf-8")[:MAX_NAME_BYTES].decode("utf-8", "ignore")


def txt_record(config: Config, port: int, fingerprint: str | None) -> dict[str, str]:
    """What the announcement says besides the address: every value a short string."""
    record = {
        "name": device_name(config),
        "port": str(port),
        "tls": "on" if config.ssl else "off",
        "version": PACKAGE_VERSION,
        "api": __version__,
    }
    if fingerprint:
        record["fingerprint"] = fingerprint
    return record


class Advertiser:
    """One announcement; ``start`` returns at once, ``close`` says goodbye on the network."""

    def __init__(self, config: Config, port: int, fingerprint: str | None) -> None:
        self._config = config
        self._port = port
        self._fingerprint = fingerprint
        self._zeroconf: AsyncZeroconf | None = None
        self._registering: asyncio.Task[None] | None = None

    def _addresses(self) -> tuple[list[str], list[str] | None]:
        """(addresses announced, interfaces used; None: zeroconf's default interfaces)."""
        host = self._config.host
        if host in WILDCARDS:
            return device_addresses(), None
        return [host], [host]

    def start(self) -> None:
        addresses, interfaces = self._addresses()
        if not addresses:
            log.info("not announced on the network: this device has no reachable IPv4 address")
            return
        try:
            if interfaces is None:
                self._zeroconf = AsyncZeroconf(ip_version=IPVersion.V4Only)
            else:
                self._zeroconf = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        except OSError as exc:
            log.warning("cannot announce this device on the network (mDNS): %s", exc)
            return
        name = device_name(self._config)
        info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{name}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(address) for address in addresses],
            port=self._port,
            properties=txt_record(self._config, self._port, self._fingerprint),
        )
        self._registering = asyncio.ensure_future(self._register(info))

    async def _register(self, info: AsyncServiceInfo) -> None:
        assert self._zeroconf is not None
        try:
            # Probing takes about a second; another device with the same name gets "-2".
            waiting = await self._zeroconf.async_register_service(info, allow_name_change=True)
            await waiting
        except (OSError, NonUniqueNameException) as exc:
            log.warning("cannot announce this device on the network (mDNS): %s", exc)
            return
        log.info("announced on the network as %r (%s)", info.name, SERVICE_TYPE)

    async def close(self) -> None:
        if self._registering is not None:
            self._registering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._registering
        if self._zeroconf is not None:
            # Unregistering sends the goodbye packets: teachers see the device leave at once.
            await self._zeroconf.async_unregister_all_services()
            await self._zeroconf.async_close()
