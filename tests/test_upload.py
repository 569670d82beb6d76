"""Uploads: text and url files materialised under the work dir."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import Client, FileServer, RunningServer


def text_file(text: str) -> dict[str, Any]:
    return {"type": "text", "content": {"text": text}}


def url_file(url: str, bucket: str, name: str) -> dict[str, Any]:
    return {"type": "url", "content": {"url": url, "bucketName": bucket, "fileName": name}}


async def upload(client: Client, name: str, files: dict[str, Any]) -> dict[str, Any]:
    await client.send("upload", {"directory": {"name": name, "files": files}})
    return await client.receive()


async def test_text_files_including_nested_aliases(client: Client, server: RunningServer) -> None:
    reply = await upload(
        client,
        "proj",
        {"main.py": text_file("print('main')\n"), "lib/util.py": text_file("X = 'é'\n")},
    )
    assert reply["type"] == "uploaded" and isinstance(reply["data"]["version"], str)
    project = server.config.work_dir / "proj"
    assert (project / "main.py").read_text() == "print('main')\n"
    assert (project / "lib" / "util.py").read_text(encoding="utf-8") == "X = 'é'\n"


async def test_uploaded_project_runs_and_imports(client: Client) -> None:
    files = {
        "some_lib.py": text_file("def call_some_lib():\n    return 'some lib called'\n"),
        "data.txt": text_file("42\n"),
    }
    name = "5f3542eec089508fd258e631"
    assert (await upload(client, name, files))["type"] == "uploaded"
    script = "from some_lib import call_some_lib\nprint(call_some_lib(), open('data.txt').read())"
    result = await client.run({"sourceScript": script, "directoryName": name})
    assert result.stdout == "some lib called 42\n\n"
    path_run = await client.run({"sourcePath": "5f3542eec089508fd258e631/some_lib.py"})
    assert path_run.exit_code == 0


async def test_reupload_replaces_the_directory(client: Client, server: RunningServer) -> None:
    await upload(client, "proj", {"old.py": text_file("old")})
    await upload(client, "proj", {"new.py": text_file("new")})
    project = server.config.work_dir / "proj"
    assert sorted(p.name for p in project.iterdir()) == ["new.py"]


async def test_url_file_is_downloaded_once_and_reused(
    client: Client, server: RunningServer, file_server: FileServer
) -> None:
    file_server.bodies["cereal.csv"] = b"name,calories\ncorn flakes,100\n"
    files = {"data/cereal.csv": url_file(file_server.url("cereal.csv"), "further-files", "c1.csv")}
    assert (await upload(client, "one", files))["type"] == "uploaded"
    assert (await upload(client, "two", files))["type"] == "uploaded"
    assert file_server.hits["cereal.csv"] == 1
    work = server.config.work_dir
    for name in ("one", "two"):
        assert (work / name / "data" / "cereal.csv").read_bytes() == file_server.bodies[
            "cereal.csv"
        ]
    assert (work / ".flcache" / "further-files" / "c1.csv").is_file()
    result = await client.run(
        {
            "sourceScript": "print(open('data/cereal.csv').readline().strip())",
            "directoryName": "two",
        }
    )
    assert result.stdout == "name,calories\n"


async def test_binary_url_file_is_byte_exact(
    client: Client, server: RunningServer, file_server: FileServer
) -> None:
    body = bytes(range(256)) * 1000
    file_server.bodies["blob.bin"] = body
    reply = await upload(
        client, "bin", {"blob.bin": url_file(file_server.url("blob.bin"), "b", "blob.bin")}
    )
    assert reply["type"] == "uploaded"
    assert (server.config.work_dir / "bin" / "blob.bin").read_bytes() == body


async def test_failed_download_keeps_previous_upload(
    client: Client, server: RunningServer, file_server: FileServer
) -> None:
    await upload(client, "proj", {"keep.py": text_file("kept")})
    reply = await upload(
        client,
        "proj",
        {"new.py": text_file("new"), "x.csv": url_file(file_server.url("broken"), "b", "x.csv")},
    )
    assert reply["type"] == "error"
    assert "HTTP 500" in reply["data"]["message"]
    project = server.config.work_dir / "proj"
    assert sorted(p.name for p in project.iterdir()) == ["keep.py"]
    assert not (server.config.work_dir / ".flcache" / "b" / "x.csv").exists()
    leftovers = [p.name for p in server.config.work_dir.iterdir() if p.name.startswith(".flupload")]
    assert leftovers == []


@pytest.mark.loopback_downloads
async def test_unreachable_url_is_a_clear_error(client: Client) -> None:
    reply = await upload(client, "p", {"a": url_file("http://127.0.0.1:9/x", "b", "a")})
    assert reply["type"] == "error"
    assert "could not connect" in reply["data"]["message"]


async def test_non_http_url_is_refused(client: Client, tmp_path: Path) -> None:
    reply = await upload(client, "p", {"a": url_file(f"file://{tmp_path}/x", "b", "a")})
    assert reply["data"]["message"] == f"url 'file://{tmp_path}/x' is not http or https"


async def test_names_that_leave_the_work_dir_are_refused(
    client: Client, server: RunningServer
) -> None:
    cases = {
        "../escape": ("proj", "upload directory name '../escape' contains '..'"),
        "/etc": ("proj", "upload directory name '/etc' is an absolute path"),
        "": ("proj", "upload directory name is empty"),
    }
    for name, (_, expected) in cases.items():
        reply = await upload(client, name, {"a.py": text_file("x")})
        assert reply["type"] == "error" and expected in reply["data"]["message"], reply
    reply = await upload(client, "ok", {"../../outside.py": text_file("x")})
    assert "upload file name '../../outside.py' contains '..'" in reply["data"]["message"]
    reply = await upload(client, "ok", {"x": url_file("http://127.0.0.1:9/x", "..", "x")})
    assert "bucketName '..'" in reply["data"]["message"]
    reply = await upload(client, "ok", {"x": url_file("http://127.0.0.1:9/x", "b", "a/b")})
    assert "fileName 'a/b' must not contain '/'" in reply["data"]["message"]
    assert not (server.config.work_dir / "ok").exists()
    assert not (server.config.work_dir.parent / "outside.py").exists()
    assert not (server.config.work_dir.parent / "escape").exists()


async def test_cache_name_is_reserved(client: Client) -> None:
    reply = await upload(client, ".flcache", {"a": text_file("x")})
    assert (
        reply["data"]["message"] == "upload directory name '.flcache' is reserved by further-link"
    )
