"""The teacher's class: one link per device, each with its own timeouts.

A ``DeviceLink`` talks to one device's own authenticated API, as
``further-link run`` does (client/commands.py: pinned certificates, the
stored token, /run-py): it pairs with the teacher's key, polls ``/device``,
pushes a project, runs a program on a websocket it keeps, forwards input,
stops it, and sends the teacher's signed lock and unlock. The ``Classroom``
fans each command out to every selected link at once (asyncio), so a device
that is slow or gone costs its own timeout and never stalls the others.
Nothing here knows about the teacher's page: it reads ``snapshot`` and
``output_since``, and waits on ``changed``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any, Callable

import aiohttp

from further_link.client.commands import (
    Device,
    Project,
    TlsOption,
    check_pin,
    describe_connect_failure,
    expect_message,
    open_run_py,
    read_certificate_fingerprint,
    receive_message,
)
from further_link.client.hosts import HostStore, fingerprint_bytes
from further_link.errors import ClientError
from further_link.fleet.discovery import FoundDevice
from further_link.fleet.teacherkey import TeacherKey

log = logging.getLogger(__name__)

# Per device: a device that does not answer within these is shown as failing, alone.
REQUEST_TIMEOUT = 5.0
START_TIMEOUT = 15.0
POLL_INTERVAL = 2.0
# Output kept per device for the page (characters); older output is dropped.
OUTPUT_KEPT = 64 * 1024


@dataclass(frozen=True)
class Outcome:
    """What one device made of a command: ``ok``, else ``error`` says why."""

    name: str
    ok: bool
    error: str | None = None
    seconds: float = 0.0


class DeviceLink:
    """Everything the teacher's tool knows and does about one device."""

    def __init__(
        self,
        found: FoundDevice,
        http: aiohttp.ClientSession,
        store: HostStore,
        key: TeacherKey | None,
        changed: Callable[[], None],
    ) -> None:
        self.found = found
        self.device = Device(found.host, found.port, found.tls)
        self._http = http
        self._store = store
        self._key = key
        self._changed = changed
        self._tls: TlsOption | None = None
        self._seen_fingerprint: str | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._stopped.set()
        # What the page shows.
        self.online: bool | None = None
        self.error: str | None = None
        self.running: str | None = None
        self.exit_code: int | None = None
        self.locked = False
        self.status: dict[str, Any] = {}
        self.output = ""  # the last OUTPUT_KEPT characters
        self.output_total = 0  # characters ever received; the page asks from an offset

    @property
    def name(self) -> str:
        return self.found.name

    @property
    def paired(self) -> bool:
        return self._store.get(self.device.key).token is not None

    def snapshot(self) -> dict[str, Any]:
        battery = self.status.get("battery") or {}
        return {
            "name": self.name,
            "address": self.device.key,
            "online": self.online,
            "paired": self.paired,
            "error": self.error,
            "running": self.running,
            "exitCode": self.exit_code,
            "locked": self.locked,
            "version": self.status.get("version") or self.found.version,
            "battery": battery.get("percent"),
            "charging": battery.get("charging"),
            "temperature": self.status.get("cpuTemperatureCelsius"),
            "outputTotal": self.output_total,
        }

    def output_since(self, offset: int) -> tuple[int, str]:
        """(offset the text starts at, text) of output after ``offset``, as far as kept."""
        start = max(offset, self.output_total - len(self.output))
        return start, self.output[len(self.output) - (self.output_total - start) :]

    def update(self, found: FoundDevice) -> None:
        """A new announcement for this name: the device may have a new address."""
        if (found.host, found.port, found.tls) != (
            self.found.host,
            self.found.port,
            self.found.tls,
        ):
            self._tls = None
        self.found = found
        self.device = Device(found.host, found.port, found.tls)
        self._changed()

    def _append(self, text: str) -> None:
        self.output = (self.output + text)[-OUTPUT_KEPT:]
        self.output_total += len(text)
        self._changed()

    def _fail(self, message: str) -> None:
        self.error = message
        self._changed()

    # ------------------------------------------------------------ trust

    async def _trust(self) -> TlsOption:
        """Pin the certificate (checked against the announced one) before sending anything."""
        if self._tls is not None:
            return self._tls
        if not self.device.tls:
            self._tls = True
            return self._tls
        seen = await read_certificate_fingerprint(self.device)
        announced = self.found.fingerprint
        if announced is not None and announced != seen:
            raise ClientError(
                f"{self.device.key} shows a certificate other than the one it announced; "
                "nothing was sent to it"
            )
        check_pin(self._store, self.device, seen, False, lambda text: log.info("%s", text))
        self._seen_fingerprint = seen
        self._tls = aiohttp.Fingerprint(fingerprint_bytes(seen))
        return self._tls

    def _token(self) -> str:
        token = self._store.get(self.device.key).token
        if token is None:
            raise ClientError(
                f"not paired with {self.name}: pair the class with the teacher key "
                "(`further-link class pair`) or run " + self.device.pair_command()
            )
        return token

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token()}"}

    async def _json(self, method: str, path: str, **options: Any) -> tuple[int, Any]:
        tls = await self._trust()
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        try:
            async with self._http.request(
                method, self.device.url(path), ssl=tls, timeout=timeout, **options
            ) as response:
                text = await response.text()
                status = response.status
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise ClientError(describe_connect_failure(self.device, exc)) from None
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, {"error": text.strip()[:200]}

    async def _signed(self, action: str, params: dict[str, Any]) -> dict[str, Any]:
        """A teacher-only command: fetch a challenge, sign it for this device, send it."""
        if self._key is None:
            raise ClientError("no teacher key: run `further-link teacher-key` first")
        status, body = await self._json("GET", "/teacher/challenge")
        challenge = body.get("challenge") if isinstance(body, dict) else None
        if status != 200 or not isinstance(challenge, str):
            raise ClientError(f"{self.name} cannot take teacher commands (HTTP {status})")
        command = self._key.command(challenge, self._seen_fingerprint, action, params)
        status, body = await self._json("POST", "/teacher", json=command)
        if status != 200 or not isinstance(body, dict):
            error = body.get("error") if isinstance(body, dict) else None
            raise ClientError(f"{self.name} refused the teacher's {action}: {error or status}")
        return body

    # --------------------------------------------------------- commands

    async def pair(self) -> None:
        """Trade the teacher's signature for the device token, stored as `pair` does."""
        body = await self._signed("pair", {})
        token = body.get("token")
        if not isinstance(token, str) or not token:
            raise ClientError(f"{self.name} sent no token")
        self._store.save_token(self.device.key, token)
        self._changed()

    async def poll(self) -> None:
        """Refresh online/offline and the device's health (battery, temperature)."""
        try:
            status, body = await self._json("GET", "/device", headers=self._auth())
            if status == 401:
                raise ClientError(f"{self.name} refused the stored token: pair again")
            if status != 200 or not isinstance(body, dict):
                raise ClientError(f"{self.name} answered /device with HTTP {status}")
            self.status = body
            if self.online is not True or self.error is not None:
                self.online, self.error = True, None
            _, lock = await self._json("GET", "/teacher/lock", headers=self._auth())
            if isinstance(lock, dict):
                self.locked = bool(lock.get("locked"))
        except ClientError as exc:
            self.online = False
            self.error = exc.message
        self._changed()

    async def push(self, project: Project) -> None:
        """Upload ``project`` into its own directory on the device."""
        ws = await self._connect()
        try:
            await self._send(ws, project.upload_message())
            await self._expect(ws, "uploaded")
        finally:
            await ws.close()

    async def run(self, start: dict[str, Any], label: str, project: Project | None) -> None:
        """Start a program (after uploading ``project``); returns once the device said ``started``.

        The link keeps the websocket: output, ``stopped`` and errors arrive
        in the background until the program ends or ``stop`` is called.
        """
        await self.close_run()
        ws = await self._connect()
        try:
            if project is not None:
                await self._send(ws, project.upload_message())
                await self._expect(ws, "uploaded")
            await self._send(ws, {"type": "start", "data": start})
            await self._expect(ws, "started")
        except BaseException:
            await ws.close()
            raise
        self._ws = ws
        self._stopped.clear()
        self.running, self.exit_code, self.error = label, None, None
        self._append(f"\n--- {label} ---\n" if self.output_total else f"--- {label} ---\n")
        self._reader = asyncio.ensure_future(self._read(ws))

    async def stop(self) -> None:
        """Ask the running program to stop; returns once the device said ``stopped``."""
        ws = self._ws
        if ws is None or self._stopped.is_set():
            return
        await self._send(ws, {"type": "stop"})
        try:
            await asyncio.wait_for(self._stopped.wait(), START_TIMEOUT)
        except asyncio.TimeoutError:
            raise ClientError(f"{self.name} did not stop within {START_TIMEOUT:.0f} s") from None

    async def stdin(self, text: str) -> None:
        ws = self._ws
        if ws is None or self._stopped.is_set():
            raise ClientError(f"nothing is running on {self.name} to read this input")
        await self._send(ws, {"type": "stdin", "data": {"input": text}})

    async def lock(self, message: str) -> None:
        body = await self._signed("lock", {"message": message})
        self.locked = bool(body.get("locked"))
        self._changed()

    async def unlock(self) -> None:
        body = await self._signed("unlock", {})
        self.locked = bool(body.get("locked"))
        self._changed()

    async def close_run(self) -> None:
        """Drop the run's websocket (the device then ends the program) and its reader."""
        ws, reader = self._ws, self._reader
        self._ws = self._reader = None
        if ws is not None:
            await ws.close()
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        self._stopped.set()

    # ------------------------------------------------------- websocket

    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        tls = await self._trust()
        token = self._token()
        return await open_run_py(self._http, self.device, token, "stored", tls, REQUEST_TIMEOUT)

    async def _send(self, ws: aiohttp.ClientWebSocketResponse, message: dict[str, Any]) -> None:
        try:
            await ws.send_str(json.dumps(message))
        except ConnectionError:
            raise ClientError(f"the connection to {self.name} is closed") from None

    async def _receive(self, ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
        return await receive_message(ws, self.device)

    async def _expect(self, ws: aiohttp.ClientWebSocketResponse, kind: str) -> None:
        try:
            await asyncio.wait_for(expect_message(ws, self.device, kind), START_TIMEOUT)
        except asyncio.TimeoutError:
            raise ClientError(
                f"{self.name} sent no {kind!r} within {START_TIMEOUT:.0f} s"
            ) from None

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            while True:
                message = await self._receive(ws)
                kind, data = message["type"], message.get("data") or {}
                if kind in ("stdout", "stderr"):
                    self._append(str(data.get("output", "")))
                elif kind == "stopped":
                    self.exit_code = int(data.get("exitCode", -1))
                    self.running = None
                    self._stopped.set()
                    self._changed()
                elif kind == "error":
                    self._fail(str(data.get("message")))
        except ClientError as exc:
            if not self._stopped.is_set():
                self.running = None
                self._fail(exc.message)
        finally:
            self._stopped.set()


class Classroom:
    """Every device of the class, by name, and commands to all or some of them."""

    def __init__(self, store: HostStore, key: TeacherKey | None) -> None:
        self._store = store
        self._key = key
        self._http: aiohttp.ClientSession | None = None
        self.links: dict[str, DeviceLink] = {}
        self.changed = asyncio.Event()
        self._poller: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Classroom:
        # No connection limit: thirty (or three hundred) devices at once.
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        await asyncio.gather(*(link.close_run() for link in self.links.values()))
        if self._http is not None:
            await self._http.close()

    def _mark_changed(self) -> None:
        self.changed.set()

    def add(self, found: FoundDevice) -> DeviceLink:
        """Take a device into the class (or refresh its address when already known)."""
        link = self.links.get(found.name)
        if link is not None:
            link.update(found)
            return link
        assert self._http is not None, "use the Classroom as an async context manager"
        link = DeviceLink(found, self._http, self._store, self._key, self._mark_changed)
        self.links[found.name] = link
        self._mark_changed()
        return link

    def gone(self, name: str) -> None:
        """The device said goodbye on the network: shown offline until it is back."""
        link = self.links.get(name)
        if link is not None:
            link.online = False
            link.error = "the device left the network"
            self._mark_changed()

    def select(self, names: Iterable[str] | None) -> list[DeviceLink]:
        """The named links (all when ``names`` is None); raises ClientError for unknown names."""
        if names is None:
            return list(self.links.values())
        chosen = []
        for name in names:
            if name not in self.links:
                raise ClientError(f"no device called {name!r} in this class")
            chosen.append(self.links[name])
        return chosen

    def start_polling(self) -> None:
        if self._poller is None:
            self._poller = asyncio.ensure_future(self._poll_forever())

    async def _poll_forever(self) -> None:
        while True:
            await self.each(None, DeviceLink.poll)
            await asyncio.sleep(POLL_INTERVAL)

    async def each(
        self,
        names: Iterable[str] | None,
        action: Callable[[DeviceLink], Awaitable[None]],
    ) -> list[Outcome]:
        """Run ``action`` on every selected device at once; one failure is that device's alone."""
        links = self.select(names)

        async def one(link: DeviceLink) -> Outcome:
            began = time.monotonic()
            try:
                await action(link)
            except ClientError as exc:
                link.error = exc.message
                self._mark_changed()
                return Outcome(link.name, False, exc.message, time.monotonic() - began)
            return Outcome(link.name, True, None, time.monotonic() - began)

        return list(await asyncio.gather(*(one(link) for link in links)))

    def snapshot(self) -> list[dict[str, Any]]:
        return [self.links[name].snapshot() for name in sorted(self.links)]
