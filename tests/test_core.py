"""The runs core both APIs share: every start passes one admission hook.

Sessions are driven in-process with typed commands (no JSON), as the server's
glue drives them; their events go to a real Outbox, read as the client would.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from further_link.errors import SessionStateError
from further_link.files.upload import UrlCache
from further_link.protocol.run import RunOptions, RunStart, encode_run_event
from further_link.protocol.runpy import StartCommand
from further_link.runs.launch import prepare_library_dir
from further_link.runs.run import Run
from further_link.runs.run_session import RunSession
from further_link.runs.services import Admission, Services
from further_link.runs.session import Session
from further_link.server.outbox import Outbox

from conftest import TIMEOUT, make_config

LOCKED = "the teacher has paused programs; wait for the go-ahead"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def library_dir() -> Iterator[Path]:
    directory = prepare_library_dir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def services_with(
    sandbox: Path, http: aiohttp.ClientSession, library_dir: Path, admission: Admission
) -> Services:
    config = make_config(sandbox)
    return Services(config, UrlCache(config.cache_dir, http, 1), library_dir, admission=admission)


async def next_message(outbox: Outbox) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(await asyncio.wait_for(outbox.get(), TIMEOUT))
    return decoded


async def messages_until_stopped(outbox: Outbox) -> list[dict[str, Any]]:
    messages = []
    for _ in range(1000):
        messages.append(await next_message(outbox))
        if messages[-1]["type"] == "stopped":
            return messages
    raise AssertionError(f"no stopped among {messages}")


async def test_a_refused_admission_starts_nothing_on_either_api(
    sandbox: Path, shared: Path, http: aiohttp.ClientSession, library_dir: Path
) -> None:
    seen: list[str | None] = []

    async def refuse(run: Run) -> None:
        seen.append(run.process)
        raise SessionStateError(LOCKED)

    services = services_with(sandbox, http, library_dir, refuse)
    marker = shared / "ran"
    code = f"open({str(marker)!r}, 'w').close()"
    outbox = Outbox(1 << 20)
    async with Session(services, outbox) as session:
        await session.handle(StartCommand(source_script=code))
        assert await next_message(outbox) == {"type": "error", "data": {"message": LOCKED}}
    v5_outbox = Outbox(1 << 20, encode=lambda event: encode_run_event(event, "c"))
    async with RunSession(services, v5_outbox, RunOptions()) as run_session:
        await run_session.handle(RunStart("p1", "python3", code=code))
        assert await next_message(v5_outbox) == {
            "type": "error",
            "data": {"message": LOCKED},
            "client": "c",
            "process": "p1",
        }
        assert run_session.process_ids == []  # the id is free again
    assert seen == [None, "p1"]
    assert not marker.exists()
    assert not list(services.config.work_dir.glob("*.py"))


async def test_an_admission_that_waits_holds_the_start_back(
    sandbox: Path, http: aiohttp.ClientSession, library_dir: Path
) -> None:
    go = asyncio.Event()
    waiting = asyncio.Event()

    async def queue(run: Run) -> None:
        waiting.set()
        await go.wait()

    outbox = Outbox(1 << 20)
    async with Session(services_with(sandbox, http, library_dir, queue), outbox) as session:
        starting = asyncio.ensure_future(session.handle(StartCommand(source_script="print(7)")))
        await asyncio.wait_for(waiting.wait(), TIMEOUT)
        with pytest.raises(asyncio.TimeoutError):  # nothing is said while the start waits
            await asyncio.wait_for(outbox.get(), 0.5)
        assert not starting.done()
        go.set()
        await asyncio.wait_for(starting, TIMEOUT)
        messages = await messages_until_stopped(outbox)
    assert messages[0] == {"type": "started", "data": {"runId": messages[0]["data"]["runId"]}}
    assert "".join(m["data"]["output"] for m in messages if m["type"] == "stdout") == "7\n"
    assert messages[-1] == {"type": "stopped", "data": {"exitCode": 0}}
