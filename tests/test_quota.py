"""The work dir's quota: a running total that uploads move exactly and recounts correct."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Callable

from further_link.files.quota import WorkDirUsage, disk_usage

from conftest import Client, RunningServer

StartServer = Callable[..., Awaitable[RunningServer]]
Connect = Callable[..., Awaitable[Client]]
MiB = 1024 * 1024


def text_file(text: str) -> dict[str, Any]:
    return {"type": "text", "content": {"text": text}}


async def upload(client: Client, name: str, files: dict[str, Any]) -> dict[str, Any]:
    await client.send("upload", {"directory": {"name": name, "files": files}})
    return await client.receive()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_total_follows_bookings_and_is_recounted_only_when_stale(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_bytes(b"x" * 100)
    (tmp_path / ".flupload-abc").mkdir()  # an upload in progress is not stored yet
    (tmp_path / ".flupload-abc" / "staged.txt").write_bytes(b"s" * 50)
    clock = Clock()
    usage = WorkDirUsage(tmp_path, recount_seconds=60, clock=clock)
    assert usage.current() == 100

    def nothing_to_free(need: int) -> int:
        return 0

    assert usage.reserve(30, quota=200, free=nothing_to_free) == 0
    assert usage.current() == 130
    # Written behind its back: not seen until the total is stale...
    (tmp_path / "a" / "program-wrote.bin").write_bytes(b"p" * 40)
    assert usage.current() == 130
    clock.now += 61
    # ...then the disk is counted again, and the booking not yet in place is kept.
    assert usage.current() == 170
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "new.txt").write_bytes(b"n" * 30)
    usage.settle(30, in_place=True)
    assert usage.current() == 170
    clock.now += 61
    assert usage.current() == 170 == disk_usage(tmp_path)
    # Over the quota: the free callback is asked for exactly the bytes over.
    asked: list[int] = []

    def free_some(need: int) -> int:
        asked.append(need)
        return 10

    assert usage.reserve(50, quota=200, free=free_some) == 10
    assert asked == [20]
    assert usage.current() == 160  # the 10 freed bytes are gone; the refused 50 never booked
    usage.add(-60)
    assert usage.current() == 100


async def test_replacing_a_project_again_and_again_stays_within_the_quota(
    start_server: StartServer, connect: Connect
) -> None:
    server = await start_server(environ={"FURTHER_LINK_QUOTA_BYTES": str(3 * MiB // 2)})
    client = await connect(server)
    for round_ in range(6):
        reply = await upload(client, "again", {"big.txt": text_file(str(round_) * MiB)})
        assert reply["type"] == "uploaded", (round_, reply)
    reply = await upload(client, "another", {"big.txt": text_file("y" * MiB)})
    assert reply["type"] == "error"
    assert "(FURTHER_LINK_QUOTA_BYTES)" in reply["data"]["message"]


async def test_what_programs_write_or_delete_counts_from_the_next_recount(
    start_server: StartServer, connect: Connect
) -> None:
    server = await start_server(
        environ={
            "FURTHER_LINK_QUOTA_BYTES": str(2 * MiB),
            "FURTHER_LINK_QUOTA_RECOUNT_SECONDS": "1",
        }
    )
    client = await connect(server)
    assert (await upload(client, "small", {"a.txt": text_file("a" * (MiB // 2))}))[
        "type"
    ] == "uploaded"
    write = f"open('filler.bin', 'wb').write(bytes({3 * MiB // 2}))\n"
    result = await client.run({"sourceScript": write, "directoryName": "scratch"})
    assert result.exit_code == 0, result.stderr
    await asyncio.sleep(1.5)
    refused = await upload(client, "more", {"b.txt": text_file("b" * (MiB // 2))})
    assert refused["type"] == "error", refused
    assert "quota" in refused["data"]["message"]
    remove = "import os\nos.remove('filler.bin')\n"
    result = await client.run({"sourceScript": remove, "directoryName": "scratch"})
    assert result.exit_code == 0, result.stderr
    await asyncio.sleep(1.5)
    accepted = await upload(client, "more", {"b.txt": text_file("b" * (MiB // 2))})
    assert accepted["type"] == "uploaded", accepted
