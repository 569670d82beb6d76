"""The limits: what the same work costs without further-link in the way.

* ``spawn_hello``: the interpreter the server runs programs with, with the
  same flags (``-u script.py``) and as the same account, spawned through
  asyncio pipes in this process and waited for until it exits.
* ``bare_ws_server``: ``_bare_ws.py`` in its own process, pushing the same
  JSON messages to the same client as the real server would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from _server import ProcessFootprint, read_footprint, stop_process

BENCH_DIR = Path(__file__).resolve().parent
HELLO_SOURCE = "print('hi')\n"
SPAWN_TIMEOUT = 120.0
START_TIMEOUT = 30.0


class BareError(RuntimeError):
    """A bare limit could not be measured."""


@dataclass(frozen=True)
class ProgramAccount:
    """The account the server switches to for programs (only when run as root)."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def first_existing(cls, *names: str) -> ProgramAccount:
        """The first of ``names`` that exists here; ``KeyError`` if none does."""
        for name in names:
            with contextlib.suppress(KeyError):
                entry = pwd.getpwnam(name)
                groups = tuple(os.getgrouplist(name, entry.pw_gid))
                return cls(name, entry.pw_uid, entry.pw_gid, groups)
        raise KeyError(", ".join(names))

    def spawn_arguments(self) -> dict[str, object]:
        """What ``create_subprocess_exec`` needs to start a process as this account."""
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}


async def spawn_hello(
    python: str, script: Path, cwd: Path, account: ProgramAccount | None = None
) -> float:
    """Seconds from spawning ``python -u script`` to its exit, output read to the end."""
    switch = account.spawn_arguments() if account is not None else {}
    began = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        python,
        "-u",
        str(script),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(cwd),
        **switch,  # type: ignore[arg-type]
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), SPAWN_TIMEOUT)
    finally:
        await stop_process(process)
    seconds = time.perf_counter() - began
    if stdout != b"hi\n" or process.returncode != 0:
        raise BareError(
            f"bare spawn gave stdout {stdout!r}, stderr {stderr[-300:]!r}, "
            f"exit code {process.returncode}"
        )
    return seconds


def write_hello_script(directory: Path) -> Path:
    """The bare spawn's script, readable by the program account too."""
    script = directory / "main.py"
    script.write_text(HELLO_SOURCE, encoding="utf-8")
    script.chmod(0o644)
    return script


@dataclass(frozen=True)
class BareServer:
    process: asyncio.subprocess.Process
    port: int

    def url(self, path: str, **query: int) -> str:
        return f"ws://127.0.0.1:{self.port}{path}?{urlencode(query)}"

    def footprint(self) -> ProcessFootprint:
        return read_footprint(self.process.pid)


@contextlib.asynccontextmanager
async def bare_ws_server(python: str) -> AsyncIterator[BareServer]:
    process = await asyncio.create_subprocess_exec(
        python,
        str(BENCH_DIR / "_bare_ws.py"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        cwd=str(BENCH_DIR),
    )
    try:
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT)
        except asyncio.TimeoutError:
            line = b""
        text = line.decode(errors="replace").strip()
        if not text.startswith("listening on "):
            raise BareError(f"the bare websocket server did not start (said {text!r})")
        yield BareServer(process, int(text.rsplit(":", 1)[1]))
    finally:
        await stop_process(process)
