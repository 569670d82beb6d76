"""Projects that survive a reload, binary files, and saving without overwriting another tab."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Callable

import aiohttp
from PIL import Image

from conftest import Client, RunningServer, give_to_program_user

StartServer = Callable[..., Awaitable[RunningServer]]
Connect = Callable[..., Awaitable[Client]]


def text_file(text: str) -> dict[str, Any]:
    return {"type": "text", "content": {"text": text}}


def base64_file(data: bytes) -> dict[str, Any]:
    return {"type": "base64", "content": {"data": base64.b64encode(data).decode("ascii")}}


def red_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 4), (255, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


async def upload(
    client: Client, name: str, files: dict[str, Any], version: str | None = None
) -> dict[str, Any]:
    data: dict[str, Any] = {"directory": {"name": name, "files": files}}
    if version is not None:
        data["version"] = version
    await client.send("upload", data)
    return await client.receive()


async def get(
    http: aiohttp.ClientSession, server: RunningServer, path: str, token: bool = True
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {server.token}"} if token else {}
    async with http.get(
        server.base_url + path, headers=headers, ssl=server.ssl_client or True
    ) as response:
        text = await response.text()
        return response.status, json.loads(text) if text.startswith("{") else text


async def post_upload(
    http: aiohttp.ClientSession, server: RunningServer, body: dict[str, Any]
) -> tuple[int, Any]:
    async with http.post(
        server.base_url + "/upload",
        data=json.dumps(body),
        headers={"Authorization": f"Bearer {server.token}"},
        ssl=server.ssl_client or True,
    ) as response:
        return response.status, await response.json()


async def test_a_png_uploaded_as_base64_is_read_back_byte_exact(
    client: Client, server: RunningServer, http: aiohttp.ClientSession
) -> None:
    png = red_png()
    reply = await upload(
        client, "pictures", {"logo.png": base64_file(png), "main.py": text_file("print(1)\n")}
    )
    assert reply["type"] == "uploaded", reply
    script = (
        "import hashlib\nfrom PIL import Image\n"
        "data = open('logo.png', 'rb').read()\n"
        "print(hashlib.sha256(data).hexdigest(), Image.open('logo.png').getpixel((0, 0)))\n"
    )
    result = await client.run({"sourceScript": script, "directoryName": "pictures"})
    assert result.stdout == f"{hashlib.sha256(png).hexdigest()} (255, 0, 0)\n", result.stderr
    status, project = await get(http, server, "/projects/pictures")
    assert status == 200
    assert project["files"]["logo.png"] == base64_file(png)
    assert project["files"]["main.py"] == text_file("print(1)\n")


async def test_base64_that_is_not_base64_is_refused_and_nothing_written(
    client: Client, server: RunningServer
) -> None:
    bad = {"type": "base64", "content": {"data": "not base64!"}}
    reply = await upload(client, "broken", {"a.bin": bad})
    assert reply["type"] == "error"
    assert "not valid base64" in reply["data"]["message"]
    assert not (server.config.work_dir / "broken").exists()


async def test_base64_files_count_their_decoded_bytes_against_the_cap(
    start_server: StartServer, connect: Connect
) -> None:
    server = await start_server(environ={"FURTHER_LINK_MAX_UPLOAD_BYTES": "300"})
    client = await connect(server)
    # 400 base64 characters are 300 bytes: exactly the cap.
    assert (await upload(client, "fits", {"a.bin": base64_file(bytes(300))}))["type"] == "uploaded"
    reply = await upload(client, "over", {"a.bin": base64_file(bytes(301))})
    assert reply["type"] == "error"
    assert "301 bytes" in reply["data"]["message"] and "300" in reply["data"]["message"]
    assert not (server.config.work_dir / "over").exists()


async def test_listing_shows_project_directories_only(
    client: Client, server: RunningServer, http: aiohttp.ClientSession
) -> None:
    before = time.time()
    await upload(client, "alpha", {"main.py": text_file("print('a')\n"), "lib/x.py": text_file("")})
    await upload(client, "beta", {"pic.png": base64_file(red_png())})
    work = server.config.work_dir
    (work / ".hidden").mkdir()
    (work / "loose-file.txt").write_text("not a project")
    os.symlink("/etc", work / "linked")
    status, listing = await get(http, server, "/projects")
    assert status == 200
    projects = {p["name"]: p for p in listing["projects"]}
    assert sorted(projects) == ["alpha", "beta"]
    assert (projects["alpha"]["files"], projects["alpha"]["size"]) == (2, len("print('a')\n"))
    assert (projects["beta"]["files"], projects["beta"]["size"]) == (1, len(red_png()))
    assert before - 5 <= projects["beta"]["modified"] <= time.time() + 5


async def test_a_project_reopens_with_the_version_the_upload_answered(
    client: Client, server: RunningServer, http: aiohttp.ClientSession
) -> None:
    files = {"main.py": text_file("print('hi')\n"), "data/d.bin": base64_file(b"\x00\xff")}
    reply = await upload(client, "keep", files)
    version = reply["data"]["version"]
    assert isinstance(version, str) and version
    status, project = await get(http, server, "/projects/keep")
    assert status == 200
    assert project == {"name": "keep", "version": version, "files": files}


async def test_unknown_and_hidden_projects_are_404_with_a_reason(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    (server.config.work_dir / ".flcache").mkdir(parents=True)
    for path in ("/projects/nothing-here", "/projects/.flcache", "/projects/%2Fetc"):
        status, body = await get(http, server, path)
        assert status == 404, (path, body)
        if isinstance(body, dict):
            assert "project" in body["error"]


async def test_projects_need_the_token(server: RunningServer, http: aiohttp.ClientSession) -> None:
    assert (await get(http, server, "/projects", token=False))[0] == 401
    assert (await get(http, server, "/projects/any", token=False))[0] == 401


async def test_a_stale_version_is_refused_and_nothing_is_written(
    connect: Connect, server: RunningServer
) -> None:
    tab_a, tab_b = await connect(), await connect()
    opened = (await upload(tab_a, "shared", {"data.csv": text_file("1,2\n")}))["data"]["version"]
    saved_b = await upload(
        tab_b, "shared", {"data.csv": text_file("1,2\n"), "b.py": text_file("")}, opened
    )
    assert saved_b["type"] == "uploaded" and saved_b["data"]["version"] != opened
    refused = await upload(tab_a, "shared", {"a.py": text_file("")}, opened)
    assert refused["type"] == "error"
    assert "changed on the device since it was opened" in refused["data"]["message"]
    project = server.config.work_dir / "shared"
    assert sorted(p.name for p in project.iterdir()) == ["b.py", "data.csv"]


async def test_v5_upload_answers_409_on_a_stale_version(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    first = {"name": "v5proj", "files": {"main.py": text_file("print(1)\n")}}
    status, body = await post_upload(http, server, first)
    assert (status, body["success"]) == (200, True)
    version = body["version"]
    status, project = await get(http, server, "/projects/v5proj")
    assert project["version"] == version
    second = {
        "name": "v5proj",
        "version": version,
        "files": {"main.py": text_file("print(2)\n"), "pic.png": base64_file(red_png())},
    }
    status, body = await post_upload(http, server, second)
    assert (status, body["success"]) == (200, True), body
    stale = {**second, "files": {"main.py": text_file("print(3)\n")}}
    status, body = await post_upload(http, server, stale)
    assert status == 409 and body["success"] is False
    assert "changed on the device" in body["error"]
    main = server.config.work_dir / "v5proj" / "main.py"
    assert main.read_text() == "print(2)\n"
    assert (server.config.work_dir / "v5proj" / "pic.png").read_bytes() == red_png()


async def test_a_file_a_program_writes_changes_the_version(
    client: Client, server: RunningServer, http: aiohttp.ClientSession
) -> None:
    version = (await upload(client, "writes", {"main.py": text_file("")}))["data"]["version"]
    script = "open('out.txt', 'w').write('made by the program')\n"
    result = await client.run({"sourceScript": script, "directoryName": "writes"})
    assert result.exit_code == 0, result.stderr
    status, project = await get(http, server, "/projects/writes")
    assert status == 200 and project["version"] != version
    # The run's own script and Python's caches are not the learner's files.
    assert sorted(project["files"]) == ["main.py", "out.txt"]
    refused = await upload(client, "writes", {"main.py": text_file("x = 1\n")}, version)
    assert refused["type"] == "error"
    assert (server.config.work_dir / "writes" / "out.txt").exists()
    saved = await upload(client, "writes", {"main.py": text_file("x = 1\n")}, project["version"])
    assert saved["type"] == "uploaded", saved


async def test_links_and_fifos_planted_by_a_program_are_not_followed(
    client: Client, server: RunningServer, http: aiohttp.ClientSession, sandbox: Path
) -> None:
    outside = sandbox / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("SECRET outside the work dir")
    give_to_program_user(outside)
    await upload(client, "planted", {"main.py": text_file("print(1)\n")})
    script = (
        "import os\n"
        f"os.symlink({str(outside / 'secret.txt')!r}, 'secret.txt')\n"
        f"os.symlink({str(outside)!r}, 'outside')\n"
        "os.symlink('/etc', 'etc')\n"
        "os.mkfifo('pipe')\n"
        "os.makedirs('sub/deeper')\n"
        f"os.symlink({str(outside)!r}, 'sub/deeper/up')\n"
        "print('planted')\n"
    )
    result = await client.run({"sourceScript": script, "directoryName": "planted"})
    assert result.stdout == "planted\n", result.stderr
    status, project = await asyncio.wait_for(get(http, server, "/projects/planted"), 30)
    assert status == 200
    assert sorted(project["files"]) == ["main.py"]
    assert "SECRET" not in json.dumps(project)
    status, listing = await get(http, server, "/projects")
    planted = next(p for p in listing["projects"] if p["name"] == "planted")
    assert (planted["files"], planted["size"]) == (1, len("print(1)\n"))
    # A link in the work dir itself is no project, even when it points at one.
    os.symlink(outside, server.config.work_dir / "escape")
    assert (await get(http, server, "/projects/escape"))[0] == 404


async def test_a_project_over_the_upload_caps_is_refused_with_413(
    start_server: StartServer, connect: Connect, http: aiohttp.ClientSession
) -> None:
    server = await start_server(environ={"FURTHER_LINK_MAX_UPLOAD_BYTES": "1000"})
    client = await connect(server)
    await upload(client, "big", {"main.py": text_file("print(1)\n")})
    result = await client.run(
        {"sourceScript": "open('big.bin', 'wb').write(bytes(5000))\n", "directoryName": "big"}
    )
    assert result.exit_code == 0, result.stderr
    status, body = await get(http, server, "/projects/big")
    assert status == 413
    assert "FURTHER_LINK_MAX_UPLOAD_BYTES" in body["error"]


async def test_two_tabs_saving_the_same_version_at_once_cannot_both_win(
    connect: Connect, server: RunningServer
) -> None:
    tab_a, tab_b = await connect(), await connect()
    opened = (await upload(tab_a, "race", {"main.py": text_file("0\n")}))["data"]["version"]
    files_a = {"main.py": text_file("a\n"), "big.txt": text_file("a" * 200_000)}
    files_b = {"main.py": text_file("b\n"), "big.txt": text_file("b" * 200_000)}
    for data, tab in ((files_a, tab_a), (files_b, tab_b)):
        await tab.send("upload", {"version": opened, "directory": {"name": "race", "files": data}})
    replies = [await tab_a.receive(), await tab_b.receive()]
    assert sorted(reply["type"] for reply in replies) == ["error", "uploaded"], replies
    winner = "a" if replies[0]["type"] == "uploaded" else "b"
    assert (server.config.work_dir / "race" / "main.py").read_text() == f"{winner}\n"
