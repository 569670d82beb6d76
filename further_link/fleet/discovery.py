"""Finding the class's devices: mDNS/DNS-SD browsing, and a device list file.

``browse`` listens for ``_further-link._tcp`` announcements (server/advertise.py)
for a bounded time; ``read_device_list`` reads a file of names or addresses,
one a line, for networks that block multicast. ``Browser`` keeps listening
while the teacher's page is open, so devices that come back reappear.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from further_link.config import DEFAULT_PORT
from further_link.errors import ClientError

log = logging.getLogger(__name__)

SERVICE_TYPE = "_further-link._tcp.local."
# `further-link devices` answers within 2 s: listen this long, then resolve what is left.
BROWSE_SECONDS = 1.5
RESOLVE_MS = 1500


@dataclass(frozen=True)
class FoundDevice:
    """A device the teacher may drive: from an announcement or from the list file."""

    name: str
    host: str
    port: int
    tls: bool
    version: str | None = None
    fingerprint: str | None = None  # as announced; checked against the certificate seen
    source: str = "mdns"  # or "list"


def parse_device_line(line: str) -> FoundDevice | None:
    """One line of a device list: ``HOST``, ``HOST:PORT`` or ``http://HOST:PORT``
    (plain HTTP), then an optional name; ``#`` starts a comment.

    Raises ClientError for a line that names no device.
    """
    words = line.split("#", 1)[0].split()
    if not words:
        return None
    where = words[0] if "://" in words[0] else f"https://{words[0]}"
    try:
        parts = urlsplit(where)
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ClientError(f"{line.strip()!r} is not HOST, HOST:PORT or http://HOST:PORT") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        raise ClientError(f"{line.strip()!r} is not HOST, HOST:PORT or http://HOST:PORT")
    name = " ".join(words[1:]) or parts.hostname
    return FoundDevice(name, parts.hostname, port, parts.scheme == "https", source="list")


def read_device_list(path: Path) -> list[FoundDevice]:
    """Every device in the list file; raises ClientError when it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ClientError(f"cannot read the device list {path}: {exc}") from None
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            device = parse_device_line(line)
        except ClientError as exc:
            raise ClientError(f"{path} line {number}: {exc.message}") from None
        if device is not None:
            found.append(device)
    return found


def from_service_info(info: AsyncServiceInfo) -> FoundDevice | None:
    """The device an announcement describes; None when it lacks an IPv4 address."""
    addresses = info.parsed_addresses(IPVersion.V4Only)
    if not addresses or not info.port:
        return None
    properties = {
        key.decode("utf-8", "replace"): (value or b"").decode("utf-8", "replace")
        for key, value in info.properties.items()
    }
    name = properties.get("name") or info.name.removesuffix("." + SERVICE_TYPE)
    return FoundDevice(
        name=name,
        host=addresses[0],
        port=info.port,
        tls=properties.get("tls", "on") != "off",
        version=properties.get("version") or None,
        fingerprint=properties.get("fingerprint") or None,
    )


def matches(device: FoundDevice, pattern: str | None) -> bool:
    """Whether a class filter (a shell pattern on the name, e.g. ``7b-*``) takes the device."""
    return pattern is None or fnmatch.fnmatchcase(device.name, pattern)


class Browser:
    """Listens for announcements until closed; calls ``on_found`` / ``on_gone`` by name.

    ``interfaces``: the addresses whose interfaces are used (None: zeroconf's
    default, every interface); a list keeps the queries on those interfaces.
    """

    def __init__(
        self,
        on_found: Callable[[FoundDevice], None],
        on_gone: Callable[[str], None],
        interfaces: list[str] | None = None,
    ) -> None:
        self._on_found = on_found
        self._on_gone = on_gone
        self._interfaces = interfaces
        self._zeroconf: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._names: dict[str, str] = {}  # announcement name -> device name

    async def start(self) -> None:
        """Raises ClientError when multicast DNS cannot be used here."""
        try:
            if self._interfaces is None:
                self._zeroconf = AsyncZeroconf(ip_version=IPVersion.V4Only)
            else:
                self._zeroconf = AsyncZeroconf(
                    interfaces=self._interfaces, ip_version=IPVersion.V4Only
                )
        except OSError as exc:
            raise ClientError(f"cannot look for devices with mDNS here: {exc}") from None
        self._browser = AsyncServiceBrowser(
            self._zeroconf.zeroconf, SERVICE_TYPE, handlers=[self._changed]
        )

    def _changed(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            if name in self._names:
                self._on_gone(self._names.pop(name))
            return
        task = asyncio.ensure_future(self._resolve(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str) -> None:
        assert self._zeroconf is not None
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._zeroconf.zeroconf, RESOLVE_MS):
            log.debug("announcement %s could not be resolved", name)
            return
        device = from_service_info(info)
        if device is not None:
            self._names[name] = device.name
            self._on_found(device)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._browser is not None:
            with contextlib.suppress(Exception):  # zeroconf may already be closing
                await self._browser.async_cancel()
        if self._zeroconf is not None:
            await self._zeroconf.async_close()


async def browse(
    seconds: float = BROWSE_SECONDS, interfaces: list[str] | None = None
) -> list[FoundDevice]:
    """Every device announced within ``seconds``, by name."""
    found: dict[str, FoundDevice] = {}
    browser = Browser(lambda d: found.__setitem__(d.name, d), lambda _: None, interfaces)
    await browser.start()
    try:
        await asyncio.sleep(seconds)
    finally:
        await browser.close()
    return sorted(found.values(), key=lambda d: d.name)
