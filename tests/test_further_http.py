"""What Further's page calls over HTTP: POST /upload, /version/apt, CORS with Private
Network Access, and FURTHER_LINK_AUTH=origin."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Callable

import aiohttp
import pytest

from further_link.cli import _warn_about_open_doors

from conftest import FileServer, RunningServer, make_config
from v5client import V5Connect, connect_run, run_url

__all__ = ["connect_run"]

StartServer = Callable[..., Awaitable[RunningServer]]
FURTHER = "https://further.pi-top.com"


async def post_upload(
    http: aiohttp.ClientSession, server: RunningServer, body: Any, token: bool = True, **kw: Any
) -> tuple[int, dict[str, Any]]:
    """POST the directory object as Further does: no Content-Type at all."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    url = server.base_url + "/upload" + (f"?token={server.token}" if token else "")
    async with http.post(url, data=data, skip_auto_headers=("Content-Type",), **kw) as r:
        assert "Content-Type" not in r.request_info.headers
        return r.status, await r.json()


def text_file(text: str) -> dict[str, Any]:
    return {"type": "text", "content": {"text": text}}


async def test_upload_without_content_type_then_a_python3_run_reads_it(
    http: aiohttp.ClientSession, server: RunningServer, connect_run: V5Connect
) -> None:
    body = {
        "name": "lesson",
        "files": {"data.txt": text_file("hello file"), "sub/x.py": text_file("")},
    }
    status, answer = await post_upload(http, server, body)
    assert isinstance(answer.pop("version"), str)
    assert (status, answer) == (200, {"success": True, "fetched_urls": True})
    client = await connect_run()
    result = await client.run(
        "r", {"runner": "python3", "path": "lesson", "code": "print(open('data.txt').read())"}
    )
    assert (result.stdout, result.exit_code) == ("hello file\n", 0)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_unreachable_url_is_skipped_and_reported(
    http: aiohttp.ClientSession, server: RunningServer, file_server: FileServer
) -> None:
    file_server.bodies["ok.bin"] = b"reachable"
    offline = f"http://127.0.0.1:{closed_port()}/gone.bin"
    body = {
        "name": "mixed",
        "files": {
            "a.txt": text_file("text is kept"),
            "ok.bin": {
                "type": "url",
                "content": {"url": file_server.url("ok.bin"), "bucketName": "b", "fileName": "ok"},
            },
            "gone.bin": {
                "type": "url",
                "content": {"url": offline, "bucketName": "b", "fileName": "gone"},
            },
        },
    }
    status, answer = await post_upload(http, server, body)
    assert isinstance(answer.pop("version"), str)
    assert (status, answer) == (200, {"success": True, "fetched_urls": False})
    project = server.config.work_dir / "mixed"
    assert (project / "a.txt").read_text() == "text is kept"
    assert (project / "ok.bin").read_bytes() == b"reachable"
    assert not (project / "gone.bin").exists()


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"{not json", 400, "JSON"),
        ([1, 2], 400, "JSON object"),
        (
            {"name": "x", "files": {"a": {"type": "zip", "content": {}}}},
            400,
            "'text', 'base64' or 'url'",
        ),
        ({"name": "../outside", "files": {}}, 400, "outside"),
    ],
)
async def test_bad_uploads_say_what_was_wrong(
    http: aiohttp.ClientSession, server: RunningServer, body: Any, status: int, words: str
) -> None:
    got_status, answer = await post_upload(http, server, body)
    assert got_status == status
    assert answer["success"] is False
    assert words in answer["error"], answer


async def test_failed_download_is_a_500_naming_the_url(
    http: aiohttp.ClientSession, server: RunningServer, file_server: FileServer
) -> None:
    url = file_server.url("missing")
    body = {
        "name": "p",
        "files": {
            "m": {"type": "url", "content": {"url": url, "bucketName": "b", "fileName": "m"}}
        },
    }
    status, answer = await post_upload(http, server, body)
    assert status == 500
    assert url in answer["error"] and "404" in answer["error"]


async def test_oversized_upload_is_a_413(
    http: aiohttp.ClientSession, start_server: StartServer
) -> None:
    server = await start_server(environ={"FURTHER_LINK_MAX_MESSAGE_BYTES": "1000"})
    status, answer = await post_upload(
        http, server, {"name": "big", "files": {"a": text_file("x" * 2000)}}
    )
    assert status == 413
    assert "1000 bytes" in answer["error"]
    assert not (server.config.work_dir / "big").exists()


async def test_project_cfg_is_copied_to_the_miniscreen_projects_folder(
    http: aiohttp.ClientSession, start_server: StartServer, sandbox: Path
) -> None:
    projects = sandbox / "shared" / "Projects"
    server = await start_server(environ={"FURTHER_LINK_MINISCREEN_PROJECTS_DIR": str(projects)})
    config = "[project]\ntitle=my project\nstart=python3 -B print.py\n"
    body = {
        "name": "robot",
        "username": "ann@school.example",
        "files": {"project.cfg": text_file(config), "print.py": text_file("print(1)")},
    }
    assert (await post_upload(http, server, body))[0] == 200
    copy = projects / "ann" / "robot"
    assert (copy / "project.cfg").read_text() == config
    assert (copy / "print.py").read_text() == "print(1)"
    run_as = server.config.run_as
    if run_as is not None and run_as.drop:
        assert {(copy / "project.cfg").stat().st_uid, (projects / "ann").stat().st_uid} == {
            run_as.uid
        }


async def test_apt_version_of_python3_and_of_unknown_packages(
    http: aiohttp.ClientSession, server: RunningServer
) -> None:
    async with http.get(server.base_url + "/version/apt/python3") as r:
        assert r.status == 200
        version = (await r.json())["version"]
    assert isinstance(version, str) and version[0].isdigit(), version
    for name in ("no-such-package-further-test", "-o=Dir::x", "UPPER"):
        async with http.get(server.base_url + "/version/apt/" + name) as r:
            assert (r.status, await r.json()) == (200, {"version": None})


@pytest.mark.parametrize("path", ["/upload", "/run", "/version/apt/python3-pitop", "/status"])
async def test_private_network_preflight_is_answered(
    http: aiohttp.ClientSession, server: RunningServer, path: str
) -> None:
    headers = {
        "Origin": FURTHER,
        "Access-Control-Request-Method": "POST" if path == "/upload" else "GET",
        "Access-Control-Request-Private-Network": "true",
        "Access-Control-Request-Headers": "content-type",
    }
    async with http.options(server.base_url + path, headers=headers) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Private-Network"] == "true"
        assert r.headers["Access-Control-Allow-Origin"] == FURTHER
        assert r.headers["Access-Control-Allow-Credentials"] == "true"
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
        assert r.headers["Access-Control-Allow-Headers"] == "content-type"


async def test_preflight_from_an_unknown_origin_is_refused(
    http: aiohttp.ClientSession, server: RunningServer
) -> None:
    headers = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    async with http.options(server.base_url + "/upload", headers=headers) as r:
        assert r.status == 403
        assert "Access-Control-Allow-Origin" not in r.headers


async def test_upload_answer_carries_the_cors_grant(
    http: aiohttp.ClientSession, server: RunningServer
) -> None:
    url = f"{server.base_url}/upload?token={server.token}"
    async with http.post(url, data=b'{"name": "c", "files": {}}', headers={"Origin": FURTHER}) as r:
        assert r.status == 200
        assert r.headers["Access-Control-Allow-Origin"] == FURTHER
        assert r.headers["Access-Control-Allow-Private-Network"] == "true"


async def test_origin_auth_lets_further_in_without_a_token(
    http: aiohttp.ClientSession, start_server: StartServer
) -> None:
    server = await start_server(environ={"FURTHER_LINK_AUTH": "origin"})
    ws = await http.ws_connect(
        run_url(server, "pty=true", token=False), headers={"Origin": FURTHER}
    )
    await ws.send_str('{"type": "ping"}')
    assert json.loads((await ws.receive(timeout=30)).data)["type"] == "pong"
    await ws.close()
    body = json.dumps({"name": "o", "files": {}}).encode()
    async with http.post(server.base_url + "/upload", data=body, headers={"Origin": FURTHER}) as r:
        assert r.status == 200
    # Without an origin (curl, a script) or from another page, the token is still needed.
    for headers, status in (({}, 401), ({"Origin": "https://evil.example"}, 403)):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(run_url(server, token=False), headers=headers)
        assert refused.value.status == status
        async with http.post(server.base_url + "/upload", data=body, headers=headers) as r:
            assert r.status == status


async def test_by_default_further_still_needs_the_token(
    http: aiohttp.ClientSession, server: RunningServer
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(run_url(server, token=False), headers={"Origin": FURTHER})
    assert refused.value.status == 401


def test_origin_auth_warns_at_start(sandbox: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(sandbox, environ={"FURTHER_LINK_AUTH": "origin"})
    assert config.auth and config.origin_auth
    with caplog.at_level(logging.WARNING):
        _warn_about_open_doors(config)
    assert "FURTHER_LINK_AUTH=origin" in caplog.text
    assert "any program on the network can claim" in caplog.text


async def test_the_further_name_of_the_device_passes_the_host_check(
    http: aiohttp.ClientSession, server: RunningServer
) -> None:
    """Further reaches the device as <a-b-c-d>.further-link.pi-top.com (here: loopback's)."""
    url = server.base_url + "/version/apt/python3"
    for host, status in (
        ("127-0-0-1.further-link.pi-top.com:8028", 200),
        ("10-9-8-7.further-link.pi-top.com", 421),  # not one of this device's addresses
        ("further-link.pi-top.com.evil.example", 421),
    ):
        async with http.get(url, headers={"Host": host, "Origin": FURTHER}) as r:
            assert r.status == status, host
