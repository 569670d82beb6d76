"""``GET /device``: what a paired client may know about this device's health.

Every field comes from the system as it is now; a field the system does not
report (no temperature sensor, no battery) is left out, never guessed. The
reads touch /proc, /sys and the disk, so they run in a thread, off the loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import shlex
import shutil
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import psutil
from aiohttp import web

from further_link import PACKAGE_VERSION
from further_link.compat import app_key
from further_link.config import Config
from further_link.runs import proctree
from further_link.runs.detach import RunBook
from further_link.server.access import check_paired, preflight

log = logging.getLogger(__name__)

OS_RELEASE_FILES = (Path("/etc/os-release"), Path("/usr/lib/os-release"))
UPTIME_FILE = Path("/proc/uptime")
PYTHON_VERSION_TIMEOUT = 10.0
# Sensor groups that measure the CPU itself: Raspberry Pi, Intel, AMD, other SoCs.
CPU_SENSORS = ("cpu_thermal", "cpu-thermal", "coretemp", "k10temp", "zenpower", "soc_thermal")
PREFERRED_LABELS = ("Package id 0", "Tctl", "Tdie")


class Temperature(Protocol):
    """A reading as psutil.sensors_temperatures() gives it."""

    @property
    def label(self) -> str: ...
    @property
    def current(self) -> float: ...


class Battery(Protocol):
    """psutil.sensors_battery(); power_plugged is None when the system cannot tell."""

    @property
    def percent(self) -> float: ...
    @property
    def power_plugged(self) -> bool | None: ...


def os_pretty_name(files: Sequence[Path] = OS_RELEASE_FILES) -> str | None:
    """PRETTY_NAME from os-release(5), the first of its two places that exists."""
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        for line in text.splitlines():
            name, _, value = line.partition("=")
            if name.strip() == "PRETTY_NAME":
                try:
                    value = " ".join(shlex.split(value))  # the shell-style quoting
                except ValueError:
                    value = value.strip().strip("\"'")
                return value or None
        return None
    return None


def uptime_seconds(path: Path = UPTIME_FILE) -> float | None:
    """Seconds since boot from the kernel's clock, unaffected by clock changes."""
    try:
        return round(float(path.read_text().split()[0]), 1)
    except (OSError, ValueError, IndexError):
        return None


def cpu_temperature(sensors: Mapping[str, Sequence[Temperature]]) -> float | None:
    """The CPU's temperature in °C, if one of the sensors is known to measure it."""
    for name in CPU_SENSORS:
        readings = [r for r in sensors.get(name, ()) if r.current is not None]
        if not readings:
            continue
        preferred = [r for r in readings if r.label in PREFERRED_LABELS]
        return round(float((preferred or readings)[0].current), 1)
    return None


def battery_status(battery: Battery | None) -> dict[str, Any] | None:
    if battery is None or battery.percent is None:
        return None
    status: dict[str, Any] = {"percent": round(float(battery.percent), 1)}
    if battery.power_plugged is not None:
        status["charging"] = bool(battery.power_plugged)
    return status


def _psutil_sensor(name: str) -> Any:
    """``psutil.sensors_<name>()`` where this platform has it; None when it cannot tell."""
    read = getattr(psutil, f"sensors_{name}", None)
    if read is None:
        return None
    try:
        return read()
    except OSError as exc:
        log.debug("cannot read sensors_%s: %s", name, exc)
        return None


def collect_status(work_dir: Path) -> dict[str, Any]:
    """The blocking part: every reading, fields the system lacks left out."""
    status: dict[str, Any] = {"hostname": socket.gethostname(), "version": PACKAGE_VERSION}
    pretty_name = os_pretty_name()
    if pretty_name:
        status["os"] = pretty_name
    uptime = uptime_seconds()
    if uptime is not None:
        status["uptimeSeconds"] = uptime
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        pass
    else:
        status["loadAverage"] = {
            "1min": round(one, 2),
            "5min": round(five, 2),
            "15min": round(fifteen, 2),
        }
    cpus = os.cpu_count()
    if cpus:
        status["cpuCount"] = cpus
    memory = psutil.virtual_memory()
    status["memory"] = {"totalBytes": memory.total, "availableBytes": memory.available}
    try:
        disk = shutil.disk_usage(work_dir)
    except OSError as exc:
        log.debug("cannot measure the disk of %s: %s", work_dir, exc)
    else:
        status["disk"] = {"path": str(work_dir), "freeBytes": disk.free, "totalBytes": disk.total}
    temperature = cpu_temperature(_psutil_sensor("temperatures") or {})
    battery = battery_status(_psutil_sensor("battery"))
    if temperature is not None:
        status["cpuTemperatureCelsius"] = temperature
    if battery is not None:
        status["battery"] = battery
    return status


class DeviceStatus:
    """Collects the status; remembers the program interpreter's version once known."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._python_version: str | None = None
        self.containment: str | None = None  # "cgroup" or "best-effort", once the server runs
        self.runs: RunBook | None = None  # the server's runs: claims and the exclusive queue

    async def python_version(self) -> str | None:
        """The version of the Python that runs programs (FURTHER_LINK_PYTHON)."""
        if self._python_version is not None:
            return self._python_version
        if os.path.realpath(self._config.python) == os.path.realpath(sys.executable):
            self._python_version = platform.python_version()
            return self._python_version
        try:
            with proctree.MANAGED_CHILDREN.starting():  # asyncio waits for it, not the reaper
                process = await asyncio.create_subprocess_exec(
                    self._config.python,
                    "-I",
                    "-c",
                    "import platform; print(platform.python_version())",
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.DEVNULL,
                )
                proctree.MANAGED_CHILDREN.add(process.pid)
        except OSError as exc:
            log.warning("cannot run %s to learn its version: %s", self._config.python, exc)
            return None
        try:
            out, _ = await asyncio.wait_for(process.communicate(), PYTHON_VERSION_TIMEOUT)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()
            return None
        version = out.decode("ascii", "replace").strip()
        if process.returncode == 0 and version:
            self._python_version = version
        return self._python_version

    async def collect(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        status = await loop.run_in_executor(None, collect_status, self._config.work_dir)
        python = await self.python_version()
        if python:
            status["python"] = python
        if self.containment is not None:
            status["containment"] = self.containment
        if self.runs is not None:
            status["claims"] = self.runs.claims.snapshot()
            status["queue"] = self.runs.queue()
        return status


DEVICE_STATUS = app_key("device_status", DeviceStatus)


async def device(request: web.Request) -> web.Response:
    headers = check_paired(request)
    status = await request.app[DEVICE_STATUS].collect()
    return web.json_response(status, headers={**headers, "Cache-Control": "no-store"})


def setup_device(app: web.Application, config: Config) -> None:
    """Serve ``GET /device`` (paired clients only) and its CORS preflight."""
    app[DEVICE_STATUS] = DeviceStatus(config)
    app.router.add_get("/device", device)
    app.router.add_route("OPTIONS", "/device", preflight("GET", "Authorization"))
