"""GET /device: this machine's health, for paired clients only, nothing invented."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Awaitable, Mapping
from pathlib import Path
from typing import Any, Callable, NamedTuple

import aiohttp
import psutil

from further_link import PACKAGE_VERSION
from further_link.server.device import (
    battery_status,
    cpu_temperature,
    os_pretty_name,
    uptime_seconds,
)

from conftest import RunningServer

StartServer = Callable[..., Awaitable[RunningServer]]
FURTHER = "https://further.pi-top.com"


class Reading(NamedTuple):
    label: str
    current: float


class Power(NamedTuple):
    percent: float
    power_plugged: bool | None


async def get_device(
    http: aiohttp.ClientSession, server: RunningServer, headers: dict[str, str] | None = None
) -> tuple[int, Any, Mapping[str, str]]:
    async with http.get(
        server.base_url + "/device", headers=headers, ssl=server.ssl_client or True
    ) as response:
        body = await response.json() if response.status == 200 else await response.text()
        return response.status, body, response.headers


def bearer(server: RunningServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.token}"}


async def test_device_reports_this_machine(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    status, body, headers = await get_device(http, server, bearer(server))
    assert status == 200
    assert headers["Cache-Control"] == "no-store"
    assert body["hostname"] == socket.gethostname()
    assert body["version"] == PACKAGE_VERSION
    assert body.get("os") == os_pretty_name()
    if Path("/etc/os-release").exists():
        assert body["os"]
    expected_python = subprocess.run(
        [server.config.python, "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert body["python"] == expected_python
    uptime = uptime_seconds()
    assert uptime is not None and 0 < body["uptimeSeconds"] <= uptime + 1
    assert set(body["loadAverage"]) == {"1min", "5min", "15min"}
    assert all(value >= 0 for value in body["loadAverage"].values())
    memory = body["memory"]
    assert memory["totalBytes"] == psutil.virtual_memory().total
    assert 0 < memory["availableBytes"] <= memory["totalBytes"]
    disk = body["disk"]
    assert disk["path"] == str(server.config.work_dir)
    usage = shutil.disk_usage(server.config.work_dir)
    assert disk["totalBytes"] == usage.total
    assert abs(disk["freeBytes"] - usage.free) < 256 * 1024 * 1024
    # Present exactly when this machine reports them.
    temperature = cpu_temperature(psutil.sensors_temperatures())
    assert body.get("cpuTemperatureCelsius") == temperature
    battery = battery_status(psutil.sensors_battery())
    if battery is None:
        assert "battery" not in body
    else:
        assert body["battery"]["percent"] >= 0


async def test_device_needs_the_token(server: RunningServer, http: aiohttp.ClientSession) -> None:
    status, body, _ = await get_device(http, server)
    assert status == 401
    assert "pair with the code shown on the device" in body
    status, _, _ = await get_device(http, server, {"Authorization": "Bearer guess"})
    assert status == 401
    cookie = {"Cookie": f"further_link_token={server.token}"}
    assert (await get_device(http, server, cookie))[0] == 200


async def test_device_over_tls(start_server: StartServer, http: aiohttp.ClientSession) -> None:
    secure = await start_server(no_ssl=False)
    status, body, _ = await get_device(http, secure, bearer(secure))
    assert status == 200 and body["hostname"] == socket.gethostname()


async def test_device_cors_follows_the_allowed_origins(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    status, _, headers = await get_device(http, server, {**bearer(server), "Origin": FURTHER})
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == FURTHER
    assert headers["Access-Control-Allow-Credentials"] == "true"
    # An allowed page can tell "pair first" from "device down".
    status, _, headers = await get_device(http, server, {"Origin": FURTHER})
    assert status == 401
    assert headers["Access-Control-Allow-Origin"] == FURTHER
    # Other sites get nothing, token or not.
    status, _, headers = await get_device(
        http, server, {**bearer(server), "Origin": "https://evil.test"}
    )
    assert status == 403
    assert "Access-Control-Allow-Origin" not in headers
    async with http.options(
        server.base_url + "/device",
        headers={"Origin": FURTHER, "Access-Control-Request-Headers": "authorization"},
    ) as preflight:
        assert preflight.status == 204
        assert preflight.headers["Access-Control-Allow-Origin"] == FURTHER
        assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    async with http.options(
        server.base_url + "/device", headers={"Origin": "https://evil.test"}
    ) as preflight:
        assert preflight.status == 403


async def test_device_with_auth_off_still_checks_origins(
    start_server: StartServer, http: aiohttp.ClientSession
) -> None:
    legacy = await start_server(environ={"FURTHER_LINK_AUTH": "off"})
    assert (await get_device(http, legacy))[0] == 200
    assert (await get_device(http, legacy, {"Origin": "https://evil.test"}))[0] == 403


def test_cpu_temperature_comes_only_from_cpu_sensors() -> None:
    assert cpu_temperature({}) is None
    assert cpu_temperature({"nvme": [Reading("Composite", 41.0)]}) is None
    assert cpu_temperature({"acpitz": [Reading("", 30.0)]}) is None
    assert cpu_temperature({"cpu_thermal": [Reading("", 48.312)]}) == 48.3
    intel = {"coretemp": [Reading("Core 0", 50.0), Reading("Package id 0", 55.0)]}
    assert cpu_temperature(intel) == 55.0
    assert cpu_temperature({"k10temp": [Reading("Tctl", 61.26)]}) == 61.3


def test_battery_fields_are_omitted_when_unknown() -> None:
    assert battery_status(None) is None
    assert battery_status(Power(87.0, True)) == {"percent": 87.0, "charging": True}
    assert battery_status(Power(12.5, None)) == {"percent": 12.5}


def test_os_release_parsing(tmp_path: Path) -> None:
    release = tmp_path / "os-release"
    release.write_text('NAME="Raspbian"\nPRETTY_NAME="Raspbian GNU/Linux 11 (bullseye)"\n')
    assert os_pretty_name([tmp_path / "missing", release]) == "Raspbian GNU/Linux 11 (bullseye)"
    release.write_text("NAME=Debian\n")
    assert os_pretty_name([release]) is None
    uptime = tmp_path / "uptime"
    uptime.write_text("12345.67 24000.00\n")
    assert uptime_seconds(uptime) == 12345.7
    assert uptime_seconds(tmp_path / "missing") is None
