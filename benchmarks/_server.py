"""Starting the real further-link server for a benchmark, and looking at it.

The server is a subprocess on loopback with an ephemeral port, a temporary
work dir and config dir, and its log in a file (a pipe nobody drains would
stall the server's logging after a few hundred runs). Its memory, open files
and threads are read from /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

LISTENING = re.compile(r"listening on [^\s:]+:(\d+)")
TOKEN_CHARS = r"[A-Za-z0-9_\-]+"  # hex or urlsafe base64
TOKEN = re.compile(rf"token=({TOKEN_CHARS})")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
POLL_INTERVAL = 0.02
TOKEN_ENV = "FURTHER_LINK_BENCH_TOKEN"
TOKEN_FILE = "token"  # the device token, in the server's config dir, once auth exists
# Warnings the benchmark causes on purpose (it turns auth off), not worth reporting.
EXPECTED_WARNINGS = ("FURTHER_LINK_AUTH=off",)


class ServerError(RuntimeError):
    """The server did not start, or behaved in a way the benchmark cannot measure."""


@dataclass(frozen=True)
class ProcessFootprint:
    rss_bytes: int
    threads: int
    fds: int


def read_footprint(pid: int) -> ProcessFootprint:
    """Resident memory (VmRSS), thread count and open file descriptors of ``pid``."""
    rss_kib = threads = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return ProcessFootprint(rss_kib * 1024, threads, fds)


@dataclass(frozen=True)
class RunningServer:
    process: asyncio.subprocess.Process
    port: int
    token: str | None
    log_path: Path
    work_dir: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def run_url(self) -> str:
        url = f"ws://127.0.0.1:{self.port}/run-py"
        return f"{url}?token={quote(self.token)}" if self.token else url

    def footprint(self) -> ProcessFootprint:
        return read_footprint(self.pid)

    def log_problems(self) -> list[str]:
        """Log lines at WARNING or above, and tracebacks, except those we cause."""
        text = self.log_path.read_text(errors="replace")
        return [
            line
            for line in text.splitlines()
            if (" WARNING " in line or " ERROR " in line or line.startswith("Traceback"))
            and not any(expected in line for expected in EXPECTED_WARNINGS)
        ]


@contextlib.asynccontextmanager
async def running_server(
    python: str, repo_root: Path, settings: Mapping[str, str]
) -> AsyncIterator[RunningServer]:
    """A freshly started server; stopped with SIGTERM (then SIGKILL) on exit.

    ``settings`` are environment variables on top of ours (FURTHER_LINK_*).
    """
    with tempfile.TemporaryDirectory(prefix="further-link-bench-") as scratch:
        os.chmod(scratch, 0o755)  # programs may run as another account
        # Started as root, the server drops to the program user and then makes
        # its work dir itself, in a directory of that user's (as in its home).
        home = Path(scratch) / "home"
        home.mkdir()
        user = settings.get("FURTHER_LINK_USER")
        if user and os.geteuid() == 0:
            shutil.chown(home, user)
        work_dir = home / "work"
        config_dir = Path(scratch) / "config"
        log_path = Path(scratch) / "server.log"
        # Every benchmark client comes from 127.0.0.1: lift the per-address connection cap.
        env = {**os.environ, "FURTHER_LINK_MAX_CONNECTIONS_PER_ADDRESS": "1024", **settings}
        with open(log_path, "wb") as log_file:
            process = await asyncio.create_subprocess_exec(
                python,
                "-m",
                "further_link",
                "--no-ssl",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--work-dir",
                str(work_dir),
                "--config-dir",  # keeps the device token and certificate in here too
                str(config_dir),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                cwd=str(repo_root),
                env=env,
            )
        try:
            port, logged_token = await _wait_until_listening(process, log_path)
            token = os.environ.get(TOKEN_ENV) or logged_token or _read_token(config_dir)
            yield RunningServer(process, port, token, log_path, work_dir)
        finally:
            await stop_process(process)


def _read_token(config_dir: Path) -> str | None:
    """The device token the server keeps, should auth stay on despite FURTHER_LINK_AUTH."""
    try:
        token = (config_dir / TOKEN_FILE).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return token if re.fullmatch(TOKEN_CHARS, token) else None


async def _wait_until_listening(
    process: asyncio.subprocess.Process, log_path: Path
) -> tuple[int, str | None]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT
    for _ in range(int(START_TIMEOUT / POLL_INTERVAL) + 1):
        text = log_path.read_text(errors="replace")
        match = LISTENING.search(text)
        if match:
            token = TOKEN.search(text)
            return int(match.group(1)), token.group(1) if token else None
        if process.returncode is not None or loop.time() > deadline:
            break
        await asyncio.sleep(POLL_INTERVAL)
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
    state = (
        f"exited with {process.returncode}"
        if process.returncode is not None
        else f"did not log 'listening on' within {START_TIMEOUT:.0f} s"
    )
    raise ServerError(f"the server {state}; its log ends with:\n{tail}")


async def stop_process(process: asyncio.subprocess.Process) -> None:
    """SIGTERM, wait, then SIGKILL: the caller started it, the caller ends it."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
