"""A class of real devices for tests and benchmarks: `further-link serve` processes on
loopback ports, each with its own config and work dir, announced with mDNS on
127.0.0.1's interface only; and the teacher's `further-link teach` process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import sys
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import aiohttp

from conftest import TIMEOUT, RunningServer, start_server_process

TEACH_URL = re.compile(r"http://127\.0\.0\.1:(\d+)/#key=(\S+)")
# Servers start this many at a time: two busy cores start thirty in well under a minute.
START_BATCH = 10


def class_prefix() -> str:
    """Names unique to this test run, so concurrent runs never see each other's class."""
    return f"c{secrets.token_hex(3)}"


@dataclass
class ClassDevice:
    name: str
    root: Path
    environ: dict[str, str]
    server: RunningServer

    @property
    def port(self) -> int:
        return int(self.server.base_url.rsplit(":", 1)[1])


async def start_device(root: Path, name: str, teacher_key: str, advertise: bool) -> ClassDevice:
    """One device whose SD card trusts ``teacher_key`` (its config dir's teachers file)."""
    config_dir = root / "config"
    if not root.exists():
        root.mkdir(mode=0o755)
        config_dir.mkdir(mode=0o700)
        (config_dir / "teachers").write_text(f"{teacher_key} the class teacher\n")
    environ = {
        "FURTHER_LINK_ADVERTISE": "1" if advertise else "0",
        "FURTHER_LINK_DEVICE_NAME": name,
        "FURTHER_LINK_POOL_SIZE": "0",
    }
    server = await start_server_process(root, environ=environ)
    return ClassDevice(name, root, environ, server)


async def start_class(
    sandbox: Path, prefix: str, count: int, teacher_key: str, unannounced: int = 0
) -> list[ClassDevice]:
    """``count`` devices named ``<prefix>-00``...; the last ``unannounced`` do not use mDNS.

    When one cannot start, those that did are stopped before the failure is raised.
    """
    devices: list[ClassDevice] = []
    for first in range(0, count, START_BATCH):
        batch = range(first, min(count, first + START_BATCH))
        started = await asyncio.gather(
            *(
                start_device(
                    sandbox / f"dev{i:03d}",
                    f"{prefix}-{i:03d}",
                    teacher_key,
                    i < count - unannounced,
                )
                for i in batch
            ),
            return_exceptions=True,
        )
        devices += [d for d in started if isinstance(d, ClassDevice)]
        failures = [e for e in started if isinstance(e, BaseException)]
        if failures:
            await stop_class(devices)
            raise failures[0]
    return devices


async def stop_class(devices: list[ClassDevice]) -> None:
    await asyncio.gather(*(d.server.stop() for d in devices), return_exceptions=True)


def further_link_environ(config_dir: Path) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FURTHER_LINK_")}
    environ["FURTHER_LINK_CONFIG_DIR"] = str(config_dir)
    return environ


async def spawn_further_link(config_dir: Path, *args: str) -> asyncio.subprocess.Process:
    """`further-link ARGS` with the teacher's config dir, its output on one pipe."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "further_link",
        *args,
        env=further_link_environ(config_dir),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def further_link(config_dir: Path, *args: str, timeout: float = 120) -> tuple[int, str]:
    """Run a `further-link` command as the teacher would; (exit code, stdout and stderr)."""
    process = await spawn_further_link(config_dir, *args)
    out, _ = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode()


@dataclass
class Teacher:
    """A running `further-link teach` and a client of its API."""

    process: asyncio.subprocess.Process
    port: int
    key: str
    http: aiohttp.ClientSession
    said: list[str] = field(default_factory=list)
    drainer: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def page_url(self) -> str:
        return f"{self.base_url}/#key={self.key}"

    async def api(self, path: str, body: dict[str, Any] | None = None) -> Any:
        method = "GET" if body is None else "POST"
        async with self.http.request(
            method, self.base_url + path, json=body, headers={"X-Teach-Key": self.key}
        ) as response:
            text = await response.text()
            assert response.status == 200, text
            return json.loads(text)

    async def devices(self) -> dict[str, dict[str, Any]]:
        state = await self.api("/api/state")
        return {d["name"]: d for d in state["devices"]}

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), TIMEOUT)
            except asyncio.TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self.drainer is not None:
            await asyncio.gather(self.drainer, return_exceptions=True)


async def start_teacher(config_dir: Path, http: aiohttp.ClientSession, *args: str) -> Teacher:
    """`further-link teach --port 0 ARGS`; waits for the address it prints."""
    process = await spawn_further_link(config_dir, "teach", "--port", "0", *args)
    assert process.stdout is not None
    said: list[str] = []
    while True:
        line = await asyncio.wait_for(process.stdout.readline(), TIMEOUT)
        if not line:
            raise AssertionError("further-link teach ended:\n" + "".join(said))
        said.append(line.decode())
        match = TEACH_URL.search(said[-1])
        if match:
            break
    teacher = Teacher(process, int(match.group(1)), match.group(2), http, said)
    teacher.drainer = asyncio.ensure_future(_drain(process, said))
    return teacher


async def _drain(process: asyncio.subprocess.Process, said: list[str]) -> None:
    """Keep reading the teacher's output so its pipe never fills."""
    assert process.stdout is not None
    while line := await process.stdout.readline():
        said.append(line.decode())


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = 90.0, every: float = 0.25
) -> float:
    """Wait until ``check()`` holds (seconds it took); fails after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    while not await check():
        if loop.time() - began > timeout:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        await asyncio.sleep(every)
    return loop.time() - began


@dataclass
class Consoles:
    """Every device's output as the teacher's page receives it (/api/events)."""

    text: dict[str, str] = field(default_factory=dict)
    messages: int = 0


async def watch_events(teacher: Teacher, watched: str, consoles: Consoles) -> None:
    url = f"ws://127.0.0.1:{teacher.port}/api/events?key={teacher.key}"
    async with teacher.http.ws_connect(url) as ws:
        await ws.send_str(json.dumps({"watch": watched}))
        async for message in ws:
            update = json.loads(message.data)
            consoles.messages += 1
            for name, (offset, text) in update["output"].items():
                kept = consoles.text.get(name, "")
                consoles.text[name] = kept[:offset] + text if offset <= len(kept) else kept + text
