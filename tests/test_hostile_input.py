"""Hostile input against a real server: malformed messages, caps, names that try
to leave the work dir, and downloads that go wrong.

Every refusal names what was wrong; the disk is left as it was (nothing outside
the work dir, no half-built uploads, no partial downloads); the connection and
the server stay usable.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import os
import pwd
import shutil
import socket
import struct
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, Callable

import aiohttp
import pytest
from aiohttp import web
from test_upload import text_file, upload, url_file

from conftest import (
    AS_ROOT,
    PROGRAM_USER,
    TIMEOUT,
    Client,
    FileServer,
    RunningServer,
    alive,
    give_to_program_user,
    sleeper_script,
)

ServerFactory = Callable[..., Awaitable[RunningServer]]
ClientFactory = Callable[..., Awaitable[Client]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MiB = 1024 * 1024


async def client_with(
    start_server: ServerFactory, connect: ClientFactory, **settings: str
) -> tuple[RunningServer, Client]:
    """A server started with ``settings`` as environment variables, and a client of it.

    It may download from loopback, where this module's file servers listen.
    """
    server = await start_server(environ={"FURTHER_LINK_DOWNLOAD_ALLOW": "127.0.0.1", **settings})
    return server, await connect(server)


async def error_message(client: Client) -> str:
    reply = await client.receive()
    assert reply["type"] == "error", reply
    message: str = reply["data"]["message"]
    return message


async def assert_usable(client: Client) -> None:
    result = await client.run({"sourceScript": "print('still usable')"})
    assert (result.stdout, result.exit_code) == ("still usable\n", 0)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path below ``root`` with its content (``None`` for directories)."""
    tree: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            tree[os.path.relpath(os.path.join(dirpath, name), root)] = None
        for name in filenames:
            path = Path(dirpath, name)
            tree[os.path.relpath(path, root)] = path.read_bytes()
    return tree


def leftovers(root: Path) -> list[str]:
    """Staging directories and partial downloads anywhere below ``root``."""
    return sorted(
        os.path.relpath(os.path.join(dirpath, name), root)
        for dirpath, dirnames, filenames in os.walk(root)
        for name in [*dirnames, *filenames]
        if name.startswith((".flupload-", ".part-"))
    )


@pytest.fixture
def outside(sandbox: Path) -> Path:
    """A directory beside the work dir that nothing may ever write into."""
    path = sandbox / "outside"
    path.mkdir()
    (path / "precious.txt").write_text("untouched\n")
    return path


def assert_untouched(outside: Path) -> None:
    assert snapshot(outside) == {"precious.txt": b"untouched\n"}


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[str]:
    """A loopback HTTP server answering every ``GET /<name>`` with ``handler``."""
    app = web.Application()
    app.router.add_get("/{name}", handler)
    # A short shutdown for trickling responses; aiohttp 3.8 (Debian 12) takes it on the site.
    new_aiohttp = hasattr(web, "AppKey")
    runner = web.AppRunner(
        app, handle_signals=False, **({"shutdown_timeout": 5} if new_aiohttp else {})
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, **({} if new_aiohttp else {"shutdown_timeout": 5}))
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def raw_http_server(response: bytes) -> AsyncIterator[str]:
    """A loopback server that reads a request, sends ``response`` verbatim and hangs up."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            writer.write(response)
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# ------------------------------------------------------------ malformed messages

NESTED = "[" * 100_000 + "]" * 100_000
MALFORMED = {
    "not JSON": (
        "hello",
        "message is not valid JSON (Expecting value at line 1 column 1); "
        'send an object like {"type": "start", "data": {...}}',
    ),
    "empty text": ("", "message is not valid JSON (Expecting value at line 1 column 1)"),
    "JSON array": ("[1, 2]", "message must be a JSON object with a 'type', not an array"),
    "JSON string": ('"start"', "message must be a JSON object with a 'type', not a string"),
    "JSON null": ("null", "message must be a JSON object with a 'type', not null"),
    "no type": (
        '{"data": {}}',
        "message has no 'type'; expected one of start, stop, stdin, upload, ping",
    ),
    "type a number": ('{"type": 5}', "'type' must be a string, not a number"),
    "type an object": ('{"type": {"start": 1}}', "'type' must be a string, not an object"),
    "data an array": (
        '{"type": "start", "data": [1]}',
        "'data' of a start message must be an object, not an array",
    ),
    "data a string": (
        '{"type": "stdin", "data": "x"}',
        "'data' of a stdin message must be an object, not a string",
    ),
    "unknown type": (
        '{"type": "frobnicate"}',
        "unknown message type 'frobnicate'; expected one of start, stop, stdin, upload, ping",
    ),
    "lone surrogate in stdin": (
        '{"type":"stdin","data":{"input":"\\ud800"}}',
        "stdin: data.input contains a lone surrogate (\\ud800) at position 0, "
        "which is not valid text",
    ),
    "lone surrogate in type": (
        '{"type":"go\\udfff"}',
        "type contains a lone surrogate (\\udfff) at position 2, which is not valid text",
    ),
    "lone surrogate in script": (
        '{"type":"start","data":{"sourceScript":"print(\'\\udc80\')"}}',
        "start: data.sourceScript contains a lone surrogate (\\udc80) at position 7",
    ),
    "deeply nested": (NESTED, "message is nested too deeply to be a command"),
    "deeply nested data": (
        '{"type": "ping", "data": {"x": ' + NESTED + "}}",
        "message is nested too deeply to be a command",
    ),
    "number with 5000 digits": (
        '{"type": "ping", "data": {"n": ' + "9" * 5000 + "}}",
        "message contains a number with too many digits to read",
    ),
}


@pytest.mark.parametrize(("text", "expected"), MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_message_is_explained_and_the_connection_stays_usable(
    client: Client, text: str, expected: str
) -> None:
    await client.ws.send_str(text)
    assert (await error_message(client)).startswith(expected)
    await assert_usable(client)


async def test_binary_frame_is_refused_and_the_connection_stays_usable(client: Client) -> None:
    await client.ws.send_bytes(json.dumps({"type": "ping"}).encode())
    assert await error_message(client) == (
        "binary messages are not understood; send JSON as a text message"
    )
    await assert_usable(client)


async def test_lone_surrogate_in_stdin_leaves_the_program_running(client: Client) -> None:
    await client.send("start", {"sourceScript": "print('got', input())"})
    await client.receive_type("started")
    await client.ws.send_str('{"type": "stdin", "data": {"input": "\\udfff\\n"}}')
    assert "data.input contains a lone surrogate (\\udfff)" in await error_message(client)
    await client.send("stdin", {"input": "fine\n"})
    result = await client.collect()
    assert (result.stdout, result.exit_code) == ("got fine\n", 0)


def url_content(**fields: Any) -> dict[str, Any]:
    content = {"url": "http://127.0.0.1:9/a", "bucketName": "b", "fileName": "a", **fields}
    return {"type": "url", "content": content}


WRONG_FIELDS: dict[str, list[tuple[Any, str]]] = {
    "start": [
        ({}, "start needs data.sourceScript or data.sourcePath"),
        ({"sourceScript": 5}, "start: data.sourceScript must be a string, not a number"),
        ({"sourcePath": ["a.py"]}, "start: data.sourcePath must be a string, not an array"),
        (
            {"sourceScript": "print(1)", "directoryName": True},
            "start: data.directoryName must be a string, not a boolean",
        ),
        (
            {"sourceScript": "print(1)", "sourcePath": "a.py"},
            "start takes data.sourceScript or data.sourcePath, not both",
        ),
        ({"sourcePath": ""}, "start: data.sourcePath is empty; give the path of a .py file"),
    ],
    "stdin": [
        ({}, "stdin needs data.input"),
        ({"input": 7}, "stdin: data.input must be a string, not a number"),
        ({"input": ["a"]}, "stdin: data.input must be a string, not an array"),
    ],
    "upload": [
        ({}, "upload needs data.directory, an object with 'name' and 'files'"),
        (
            {"directory": "proj"},
            "upload needs data.directory, an object with 'name' and 'files', not a string",
        ),
        ({"directory": {"files": {}}}, "upload needs data.directory.name"),
        ({"directory": {"name": 3}}, "upload: data.directory.name must be a string, not a number"),
        (
            {"directory": {"name": "p", "files": ["a.py"]}},
            "upload: data.directory.files must be an object of alias -> file, not an array",
        ),
        (
            {"directory": {"name": "p", "files": {"a.py": "print(1)"}}},
            "upload: data.directory.files['a.py'] must be an object, not a string",
        ),
        (
            {"directory": {"name": "p", "files": {"a.py": {"type": "text"}}}},
            "upload: data.directory.files['a.py'].content must be an object, not null",
        ),
        (
            {"directory": {"name": "p", "files": {"a.py": {"type": "zip", "content": {}}}}},
            "upload: data.directory.files['a.py'].type must be 'text', 'base64' or 'url', "
            "not 'zip'",
        ),
        (
            {"directory": {"name": "p", "files": {"a.py": {"type": 1, "content": {}}}}},
            "upload: data.directory.files['a.py'].type must be 'text', 'base64' or 'url', "
            "not a number",
        ),
        (
            {"directory": {"name": "p", "files": {"a.py": {"type": "text", "content": {}}}}},
            "upload needs data.directory.files['a.py'].content.text",
        ),
        (
            {
                "directory": {
                    "name": "p",
                    "files": {"a.py": {"type": "text", "content": {"text": 3}}},
                }
            },
            "upload: data.directory.files['a.py'].content.text must be a string, not a number",
        ),
        (
            {"directory": {"name": "p", "files": {"a": {"type": "url", "content": {}}}}},
            "upload needs data.directory.files['a'].content.url",
        ),
        (
            {"directory": {"name": "p", "files": {"a": url_content(bucketName=5)}}},
            "upload: data.directory.files['a'].content.bucketName must be a string, not a number",
        ),
        (
            {"directory": {"name": "p", "files": {"a": url_content(fileName={})}}},
            "upload: data.directory.files['a'].content.fileName must be a string, not an object",
        ),
    ],
}


@pytest.mark.parametrize("kind", WRONG_FIELDS)
async def test_wrong_field_types_name_the_field(
    client: Client, server: RunningServer, kind: str
) -> None:
    for data, expected in WRONG_FIELDS[kind]:
        await client.send(kind, data)
        assert await error_message(client) == expected, data
    await assert_usable(client)
    assert sorted(os.listdir(server.config.work_dir)) == []


# ------------------------------------------------------------------ message size


async def assert_refused_as_too_big(client: Client, message: dict[str, Any]) -> None:
    """The server closes with 1009 (message too big), maybe before all of it is sent."""
    # aiohttp 3.8 (Debian 12) reports the reset as ClientOSError, later ones as ConnectionError.
    with contextlib.suppress(ConnectionError, aiohttp.ClientOSError):
        await client.ws.send_str(json.dumps(message))
    closed = await client.ws.receive(timeout=TIMEOUT)
    assert (closed.type, closed.data) == (aiohttp.WSMsgType.CLOSE, 1009), closed
    assert "FURTHER_LINK_MAX_MESSAGE_BYTES" in closed.extra, "the close reason names the limit"


async def test_default_message_cap_is_16_mib_and_a_3_mb_script_runs(
    server: RunningServer, client: Client, connect: ClientFactory
) -> None:
    assert server.config.max_message_bytes == 16 * MiB
    almost = json.dumps({"type": "ping", "data": {"padding": "x" * (16 * MiB - 100)}})
    await client.ws.send_str(almost)
    assert await client.receive() == {"type": "pong", "data": {}}
    script = ("# " + "x" * 98 + "\n") * 30_000 + "print('3 MB ran')\n"
    assert len(script) > 3_000_000
    result = await client.run({"sourceScript": script})
    assert result.stdout == "3 MB ran\n"

    await assert_refused_as_too_big(client, {"type": "ping", "data": {"padding": "x" * 16 * MiB}})
    await assert_usable(await connect())


async def test_message_over_the_cap_closes_with_1009_and_ends_its_program(
    start_server: ServerFactory, connect: ClientFactory, shared: Path
) -> None:
    server = await start_server(environ={"FURTHER_LINK_MAX_MESSAGE_BYTES": "4096"})
    bystander = await connect(server)
    client = await connect(server)
    await client.ws.send_str(json.dumps({"type": "ping", "data": {"padding": "x" * 4000}}))
    assert await client.receive() == {"type": "pong", "data": {}}
    marker = shared / "pid"
    await client.send("start", {"sourceScript": sleeper_script(marker)})
    await client.receive_type("started")
    await client.read_output("up\n")
    pid = int(marker.read_text())

    await assert_refused_as_too_big(client, {"type": "stdin", "data": {"input": "x" * 5000}})
    for _ in range(int(TIMEOUT / 0.05)):
        if not alive(pid):
            break
        await asyncio.sleep(0.05)
    assert not alive(pid)
    await assert_usable(bystander)
    await assert_usable(await connect(server))


async def open_raw_websocket(server: RunningServer) -> tuple[asyncio.StreamReader, Any]:
    port = int(server.base_url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /run-py?token={server.token} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def read_close_code(reader: asyncio.StreamReader) -> int:
    """Skip the server's frames until its close frame; return the close code."""
    for _ in range(100):
        first, second = await asyncio.wait_for(reader.readexactly(2), TIMEOUT)
        length = second & 0x7F
        if length == 126:
            length = struct.unpack("!H", await reader.readexactly(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", await reader.readexactly(8))[0]
        payload = await asyncio.wait_for(reader.readexactly(length), TIMEOUT)
        if first & 0x0F == 0x8:
            code: int = struct.unpack("!H", payload[:2])[0]
            return code
    raise AssertionError("the server sent no close frame")


async def test_oversized_frame_is_refused_from_its_header_alone(
    server: RunningServer, client: Client
) -> None:
    """A frame declaring 1 GiB is refused after its header: the payload is never awaited."""
    reader, writer = await open_raw_websocket(server)
    try:
        header = bytes([0x81, 0x80 | 127]) + struct.pack("!Q", 1 << 30) + os.urandom(4)
        writer.write(header + b"x" * 1024)
        await writer.drain()
        assert await read_close_code(reader) == 1009
    finally:
        writer.close()
    await assert_usable(client)


async def test_text_frame_that_is_not_utf8_closes_with_1007(
    server: RunningServer, client: Client
) -> None:
    """RFC 6455 section 8.1: a text message that is not UTF-8 fails the connection."""
    reader, writer = await open_raw_websocket(server)
    try:
        payload = b'{"type": "\xff"}'
        mask = os.urandom(4)
        masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        writer.write(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
        await writer.drain()
        assert await read_close_code(reader) == 1007
    finally:
        writer.close()
    await assert_usable(client)


# ------------------------------------------------------------------ sourcePath


async def test_source_path_must_be_a_regular_file(client: Client, shared: Path) -> None:
    fifo = shared / "pipe.py"
    os.mkfifo(fifo)
    folder = shared / "folder.py"
    folder.mkdir()
    unix_socket = socket.socket(socket.AF_UNIX)
    unix_socket.bind(str(shared / "sock.py"))
    advice = "give the path of a Python file"
    cases = {
        "/dev/zero": f"sourcePath '/dev/zero' is a character device; {advice}",
        str(fifo): f"sourcePath {str(fifo)!r} is a FIFO (named pipe); {advice}",
        str(folder): f"sourcePath {str(folder)!r} is a directory; {advice}",
        str(shared / "sock.py"): f"sourcePath {str(shared / 'sock.py')!r} is a socket; {advice}",
        "a\0b.py": "sourcePath 'a\\x00b.py' contains a NUL character",
    }
    try:
        for path, expected in cases.items():
            await client.send("start", {"sourcePath": path})
            assert await error_message(client) == expected
    finally:
        unix_socket.close()
    await assert_usable(client)


async def test_source_path_over_the_size_cap_is_refused(
    start_server: ServerFactory, connect: ClientFactory, shared: Path
) -> None:
    _, client = await client_with(start_server, connect, FURTHER_LINK_MAX_SOURCE_BYTES="64")
    at_cap = shared / "at_cap.py"
    at_cap.write_text("print('at the cap')".ljust(63) + "\n")
    over = shared / "over.py"
    over.write_text("print('over')".ljust(64) + "\n")
    await client.send("start", {"sourcePath": str(over)})
    assert (
        await error_message(client)
        == f"sourcePath {str(over)!r} is 65 bytes; the limit is 64 bytes"
    )
    result = await client.run({"sourcePath": str(at_cap)})
    assert result.stdout == "at the cap\n"


# ------------------------------------------------------------------ upload caps


async def test_upload_file_count_cap(start_server: ServerFactory, connect: ClientFactory) -> None:
    server, client = await client_with(start_server, connect, FURTHER_LINK_MAX_UPLOAD_FILES="2")
    three = {f"f{i}.txt": text_file("x") for i in range(3)}
    assert (await upload(client, "proj", three))["data"] == {
        "message": "upload has 3 files; the limit is 2"
    }
    assert not (server.config.work_dir / "proj").exists()
    two = {f"f{i}.txt": text_file("x") for i in range(2)}
    assert (await upload(client, "proj", two))["type"] == "uploaded"


async def test_upload_byte_cap_counts_text_and_downloads(
    start_server: ServerFactory, connect: ClientFactory, file_server: FileServer
) -> None:
    server, client = await client_with(start_server, connect, FURTHER_LINK_MAX_UPLOAD_BYTES="100")
    work = server.config.work_dir
    assert (await upload(client, "proj", {"keep.txt": text_file("kept")}))["type"] == "uploaded"
    before = snapshot(work / "proj")

    reply = await upload(client, "proj", {"a.txt": text_file("é" * 51)})
    assert reply["data"] == {"message": "upload is 102 bytes of files; the limit is 100 bytes"}
    file_server.bodies["data.csv"] = b"y" * 60
    files = {
        "a.txt": text_file("x" * 50),
        "data.csv": url_file(file_server.url("data.csv"), "b", "data.csv"),
    }
    reply = await upload(client, "proj", files)
    assert reply["data"] == {
        "message": "upload is over 100 bytes with 'data.csv'; "
        "the limit is the total of all its files"
    }
    assert snapshot(work / "proj") == before
    assert leftovers(work) == []
    files["a.txt"] = text_file("x" * 40)
    assert (await upload(client, "proj", files))["type"] == "uploaded"


async def test_download_over_the_cap_by_content_length(
    start_server: ServerFactory, connect: ClientFactory, file_server: FileServer
) -> None:
    server, client = await client_with(
        start_server, connect, FURTHER_LINK_MAX_DOWNLOAD_BYTES="1000"
    )
    file_server.bodies["big.bin"] = b"z" * 1001
    file_server.bodies["fits.bin"] = b"z" * 1000
    url = file_server.url("big.bin")
    reply = await upload(client, "proj", {"big.bin": url_file(url, "b", "big.bin")})
    assert reply["data"] == {
        "message": f"{url} is 1001 bytes, over the download limit of 1000 bytes"
    }
    cache = server.config.work_dir / ".flcache"
    assert not (cache / "b" / "big.bin").exists()
    assert leftovers(server.config.work_dir) == []
    fits = url_file(file_server.url("fits.bin"), "b", "fits.bin")
    assert (await upload(client, "proj", {"fits.bin": fits}))["type"] == "uploaded"


async def test_chunked_download_over_the_cap_is_cut_off_while_streaming(
    start_server: ServerFactory, connect: ClientFactory
) -> None:
    server, client = await client_with(
        start_server, connect, FURTHER_LINK_MAX_DOWNLOAD_BYTES="100000"
    )
    offered = 64 * MiB
    sent = 0
    finished = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            while sent < offered:
                await response.write(b"c" * 65536)
                sent += 65536
            await response.write_eof()
        except ConnectionError:
            pass  # the downloader hung up, as it should
        finally:
            finished.set()
        return response

    async with serving(endless) as base:
        url = f"{base}/endless.bin"
        reply = await upload(client, "proj", {"e.bin": url_file(url, "b", "endless.bin")})
        assert reply["data"] == {
            "message": f"{url} is larger than the download limit of 100000 bytes"
        }
        await asyncio.wait_for(finished.wait(), TIMEOUT)
    assert sent < offered
    assert not (server.config.work_dir / ".flcache" / "b" / "endless.bin").exists()
    assert leftovers(server.config.work_dir) == []
    await assert_usable(client)


# ------------------------------------------------------------ names and symlinks


def bad_name_command(field: str, name: str, url: str) -> tuple[str, dict[str, Any]]:
    """A command whose ``field`` is ``name`` and everything else is fine."""
    if field == "directoryName":
        return "start", {"sourceScript": "print(1)", "directoryName": name}
    files: dict[str, Any] = {"a.py": text_file("x")}
    if field == "upload file name":
        files = {name: text_file("x")}
    elif field == "bucketName":
        files = {"a.csv": url_file(url, name, "a.csv")}
    elif field == "fileName":
        files = {"a.csv": url_file(url, "b", name)}
    directory_name = name if field == "upload directory name" else "proj"
    return "upload", {"directory": {"name": directory_name, "files": files}}


@pytest.mark.parametrize(
    "field",
    ["directoryName", "upload directory name", "upload file name", "bucketName", "fileName"],
)
async def test_names_that_are_not_plain_relative_names_are_refused(
    client: Client,
    server: RunningServer,
    file_server: FileServer,
    outside: Path,
    field: str,
) -> None:
    file_server.bodies["a.csv"] = b"a"
    single = field in ("bucketName", "fileName")  # one path component, no '/'
    cases = {
        "": f"{field} is empty",
        ".": f"{field} '.' contains '.'; use a plain relative path",
        "..": f"{field} '..' contains '..', which leaves its directory",
        "../outside": f"{field} '../outside' "
        + ("must not contain '/'" if single else "contains '..', which leaves its directory"),
        str(outside): f"{field} {str(outside)!r} is an absolute path; give a relative name",
        "a\0b": f"{field} 'a\\x00b' contains a NUL character",
    }
    for name, expected in cases.items():
        kind, data = bad_name_command(field, name, file_server.url("a.csv"))
        await client.send(kind, data)
        assert await error_message(client) == expected
    assert_untouched(outside)
    assert file_server.hits == {}
    assert set(os.listdir(server.config.work_dir)) <= {".flcache"}
    await assert_usable(client)


async def test_upload_name_that_is_a_link_out_is_refused(
    client: Client, server: RunningServer, outside: Path
) -> None:
    work = server.config.work_dir
    (work / "escape").symlink_to(outside)
    for name in ("escape", "escape/sub"):
        reply = await upload(client, name, {"main.py": text_file("x")})
        assert reply["data"]["message"] == (
            f"upload directory name {name!r} leads outside {work}: "
            "'escape' is a symbolic link to somewhere else"
        )
    assert_untouched(outside)
    assert leftovers(work) == []


async def test_alias_under_a_linked_subdirectory_never_follows_the_link(
    client: Client, server: RunningServer, outside: Path
) -> None:
    """A program may leave a link inside its uploaded directory; a re-upload replaces it."""
    work = server.config.work_dir
    assert (await upload(client, "proj", {"lib/old.py": text_file("old")}))["type"] == "uploaded"
    (work / "proj" / "lib" / "old.py").unlink()
    (work / "proj" / "lib").rmdir()
    (work / "proj" / "lib").symlink_to(outside)

    reply = await upload(client, "proj/lib", {"new.py": text_file("x")})
    assert reply["data"]["message"] == (
        f"upload directory name 'proj/lib' leads outside {work}: "
        "'proj/lib' is a symbolic link to somewhere else"
    )
    reply = await upload(client, "proj", {"lib/new.py": text_file("new")})
    assert reply["type"] == "uploaded"
    assert not (work / "proj" / "lib").is_symlink()
    assert snapshot(work / "proj") == {"lib": None, "lib/new.py": b"new"}
    assert_untouched(outside)


async def test_directory_name_that_is_a_link_out_is_refused(
    client: Client, server: RunningServer, outside: Path
) -> None:
    work = server.config.work_dir
    (work / "outlink").symlink_to(outside)
    (work / "notes.txt").write_text("n")
    await client.send("start", {"sourceScript": "print(1)", "directoryName": "outlink"})
    assert await error_message(client) == (
        f"directoryName 'outlink' leads outside {work}: 'outlink' is a symbolic link "
        "to somewhere else"
    )
    await client.send("start", {"sourceScript": "print(1)", "directoryName": "notes.txt"})
    assert await error_message(client) == (
        "directoryName 'notes.txt' is a regular file in the work dir, not a directory"
    )
    await assert_usable(client)


async def test_cache_links_out_are_refused(
    client: Client, server: RunningServer, file_server: FileServer, outside: Path
) -> None:
    work = server.config.work_dir
    cache = work / ".flcache"
    file_server.bodies["a.csv"] = b"new data"
    url = file_server.url("a.csv")
    cache.mkdir()
    (cache / "bucket").symlink_to(outside)
    (cache / "files").mkdir()
    (cache / "files" / "a.csv").symlink_to(outside / "precious.txt")
    # Planted as the program user would: the server acts as that user, so what
    # refuses these must be the confinement, not a missing right to write here.
    give_to_program_user(cache)
    cases = {
        ("bucket", "a.csv"): f"bucketName 'bucket' leads outside {cache}: 'bucket' is a",
        ("files", "a.csv"): f"fileName 'a.csv' leads outside {cache / 'files'}: 'a.csv' is a",
    }
    for (bucket, name), expected in cases.items():
        reply = await upload(client, "proj", {"a.csv": url_file(url, bucket, name)})
        assert reply["data"]["message"].startswith(expected)

    (cache / "files" / "a.csv").unlink()
    (cache / "files").rmdir()
    (cache / "bucket").unlink()
    shutil.rmtree(cache)
    cache.symlink_to(outside)
    program_user = pwd.getpwnam(PROGRAM_USER)
    os.lchown(cache, program_user.pw_uid, program_user.pw_gid)  # the link, not where it leads
    reply = await upload(client, "proj", {"a.csv": url_file(url, "bucket", "a.csv")})
    assert reply["data"]["message"] == (
        f"url cache directory '.flcache' leads outside {work}: "
        "'.flcache' is a symbolic link to somewhere else"
    )
    assert file_server.hits == {}
    assert_untouched(outside)
    assert not (work / "proj").exists()


async def test_program_that_swaps_its_directory_for_a_link_cannot_redirect_uploads(
    client: Client, server: RunningServer, outside: Path
) -> None:
    work = server.config.work_dir
    assert (await upload(client, "proj", {"main.py": text_file("v1")}))["type"] == "uploaded"
    swap = (
        "import os, shutil\n"
        "os.chdir('..')\n"
        "shutil.rmtree('proj')\n"
        f"os.symlink({str(outside)!r}, 'proj')\n"
        "print('swapped')\n"
    )
    result = await client.run({"sourceScript": swap, "directoryName": "proj"})
    assert (result.stdout, result.stderr) == ("swapped\n", "")
    assert (work / "proj").is_symlink()

    reply = await upload(client, "proj", {"main.py": text_file("v2")})
    assert reply["data"]["message"] == (
        f"upload directory name 'proj' leads outside {work}: "
        "'proj' is a symbolic link to somewhere else"
    )
    await client.send("start", {"sourceScript": "print(1)", "directoryName": "proj"})
    assert "directoryName 'proj' leads outside" in await error_message(client)
    assert_untouched(outside)
    assert leftovers(work) == []


@pytest.mark.skipif(not AS_ROOT, reason="needs a server started as root and programs as nobody")
async def test_work_dir_replaced_by_a_program_made_link_gains_the_program_nothing(
    client: Client, server: RunningServer, file_server: FileServer, outside: Path
) -> None:
    """The program's account owns the work dir, so it can swap the work dir itself for a
    link (simulated here). The server dropped root and is that account, so through the
    link it can do no more than the program: nothing lands in the root-owned directory."""
    work = server.config.work_dir
    run_as = server.config.run_as
    assert run_as is not None and run_as.drop
    work.rename(work.with_name("work-moved"))
    work.symlink_to(outside)
    os.lchown(work, run_as.uid, run_as.gid)
    reply = await upload(client, "proj", {"main.py": text_file("x")})
    assert reply["type"] == "error" and "Permission denied" in reply["data"]["message"], reply
    file_server.bodies["a.csv"] = b"1,2\n"
    files = {"a.csv": url_file(file_server.url("a.csv"), "b", "a.csv")}
    reply = await upload(client, "data", files)
    assert reply["type"] == "error" and "Permission denied" in reply["data"]["message"], reply
    await client.send("start", {"sourceScript": "print(1)", "directoryName": "precious.txt"})
    assert "not a directory" in await error_message(client)
    assert_untouched(outside)
    assert os.stat(outside).st_uid == 0


# ------------------------------------------------------------- atomic uploads


async def test_failed_uploads_leave_the_previous_directory_exactly_as_it_was(
    start_server: ServerFactory, connect: ClientFactory, file_server: FileServer
) -> None:
    server, client = await client_with(start_server, connect, FURTHER_LINK_MAX_UPLOAD_BYTES="1000")
    work = server.config.work_dir
    original = {"main.py": text_file("print('v1')\n"), "lib/util.py": text_file("X = 1\n")}
    assert (await upload(client, "proj", original))["type"] == "uploaded"
    before = snapshot(work / "proj")
    file_server.bodies["big.csv"] = b"b" * 600
    new = text_file("print('v2')\n")
    failures = {
        "bad file name": ({"main.py": new, "../evil.py": new}, "upload file name '../evil.py'"),
        "collision": ({"main.py": new, "main.py/x": new}, "upload file names 'main.py' and"),
        "download error": (
            {"main.py": new, "x.csv": url_file(file_server.url("broken"), "b", "x.csv")},
            "downloading",
        ),
        "text over the cap": ({"main.py": text_file("x" * 1001)}, "upload is 1001 bytes"),
        "download over the cap": (
            {
                "main.py": text_file("x" * 500),
                "big.csv": url_file(file_server.url("big.csv"), "b", "big.csv"),
            },
            "upload is over 1000 bytes with 'big.csv'",
        ),
    }
    for case, (files, expected) in failures.items():
        reply = await upload(client, "proj", files)
        assert reply["type"] == "error" and reply["data"]["message"].startswith(expected), case
        assert snapshot(work / "proj") == before, case
        assert leftovers(work) == [], case
    assert not (work / "evil.py").exists()
    result = await client.run({"sourcePath": "proj/main.py"})
    assert result.stdout == "v1\n"


async def test_upload_into_a_new_nested_directory_leaves_nothing_when_it_fails(
    client: Client, server: RunningServer
) -> None:
    work = server.config.work_dir
    reply = await upload(client, "new/deeper/proj", {"a": text_file("x"), "a/b": text_file("y")})
    assert reply["data"]["message"] == (
        "upload file names 'a' and 'a/b' collide: 'a' cannot be both a file and a directory"
    )
    assert os.listdir(work) == []
    reply = await upload(client, "new/deeper/proj", {"a/b": text_file("y")})
    assert reply["type"] == "uploaded"
    assert (work / "new" / "deeper" / "proj" / "a" / "b").read_text() == "y"


async def test_alias_that_is_also_a_directory_is_a_clear_error(client: Client) -> None:
    cases = [
        ({"a": text_file("1"), "a/b": text_file("2")}, ("a", "a/b")),
        ({"lib/x/y.py": text_file("1"), "lib/x": text_file("2")}, ("lib/x", "lib/x/y.py")),
    ]
    for files, (first, second) in cases:
        reply = await upload(client, "proj", files)
        assert reply["data"]["message"] == (
            f"upload file names {first!r} and {second!r} collide: "
            f"{first!r} cannot be both a file and a directory"
        )


async def test_upload_over_a_file_in_the_work_dir_is_a_clear_error(
    client: Client, server: RunningServer
) -> None:
    work = server.config.work_dir
    (work / "notes.txt").write_text("notes")
    reply = await upload(client, "notes.txt", {"a.py": text_file("x")})
    assert reply["data"]["message"] == (
        "upload directory name 'notes.txt' is a regular file in the work dir, not a directory; "
        "remove it first"
    )
    reply = await upload(client, "notes.txt/sub", {"a.py": text_file("x")})
    assert reply["data"]["message"] == (
        "upload directory name 'notes.txt/sub' cannot be created: "
        "'notes.txt' is a regular file, not a directory"
    )
    assert (work / "notes.txt").read_text() == "notes"
    assert leftovers(work) == []


# ------------------------------------------------------------------- url files


@pytest.mark.parametrize(
    "url", ["ftp://127.0.0.1/a.csv", "file:///nonexistent/a.csv", "javascript:alert(1)", ""]
)
async def test_only_http_and_https_urls_are_fetched(
    client: Client, server: RunningServer, url: str
) -> None:
    reply = await upload(client, "proj", {"a.csv": url_file(url, "b", "a.csv")})
    assert reply["data"] == {"message": f"url {url!r} is not http or https"}
    assert os.listdir(server.config.work_dir) == []


SHORT_BODY = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nonly the first bytes"


@pytest.mark.parametrize("failure", ["short body", "HTTP 500", "HTTP 404", "refused"])
async def test_failed_download_leaves_no_cache_entry_and_no_partial_file(
    client: Client, server: RunningServer, file_server: FileServer, failure: str
) -> None:
    work = server.config.work_dir
    assert (await upload(client, "proj", {"keep.txt": text_file("kept")}))["type"] == "uploaded"
    expected = {
        "short body": "the connection closed before the whole file arrived",
        "HTTP 500": "the server answered HTTP 500",
        "HTTP 404": "the server answered HTTP 404",
        "refused": "could not connect (",
    }[failure]
    async with raw_http_server(SHORT_BODY) as short_server:
        url = {
            "short body": f"{short_server}/a.csv",
            "HTTP 500": file_server.url("broken"),
            "HTTP 404": file_server.url("missing"),
            "refused": f"http://127.0.0.1:{unused_port()}/a.csv",
        }[failure]
        reply = await upload(client, "proj", {"a.csv": url_file(url, "b", "a.csv")})
    assert reply["data"]["message"].startswith(f"downloading {url} failed: {expected}")
    assert not (work / ".flcache" / "b" / "a.csv").exists()
    assert leftovers(work) == []
    assert snapshot(work / "proj") == {"keep.txt": b"kept"}
    await assert_usable(client)


@pytest.mark.loopback_downloads
async def test_compressed_download_is_stored_decoded(client: Client, server: RunningServer) -> None:
    body = b"name,calories\n" + b"corn flakes,100\n" * 500

    async def gzipped(request: web.Request) -> web.StreamResponse:
        return web.Response(body=gzip.compress(body), headers={"Content-Encoding": "gzip"})

    async with serving(gzipped) as base:
        files = {"c.csv": url_file(f"{base}/c.csv", "b", "c.csv")}
        assert (await upload(client, "proj", files))["type"] == "uploaded"
    assert (server.config.work_dir / "proj" / "c.csv").read_bytes() == body


async def test_slow_download_does_not_hold_up_other_clients(
    connect: ClientFactory, server: RunningServer, file_server: FileServer
) -> None:
    requested = asyncio.Event()
    release = asyncio.Event()
    finished = asyncio.Event()

    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "20"})
        await response.prepare(request)
        try:
            await response.write(b"first half")
            requested.set()
            await asyncio.wait_for(release.wait(), 4 * TIMEOUT)
            await response.write(b", then 10")
            await response.write(b"!")
            await response.write_eof()
        finally:
            finished.set()
        return response

    bucket = server.config.work_dir / ".flcache" / "b"
    async with serving(trickle) as base:
        slow, quick = await connect(), await connect()
        slow_files = {"slow.csv": url_file(f"{base}/slow.csv", "b", "slow.csv")}
        await slow.send("upload", {"directory": {"name": "slow", "files": slow_files}})
        await asyncio.wait_for(requested.wait(), TIMEOUT)

        result = await quick.run({"sourceScript": "print('not held up')"})
        assert result.stdout == "not held up\n"
        file_server.bodies["other.csv"] = b"other"
        other = {"other.csv": url_file(file_server.url("other.csv"), "b", "other.csv")}
        assert (await upload(quick, "quick", other))["type"] == "uploaded"
        assert not finished.is_set(), "the slow download should still be in progress"
        assert not (bucket / "slow.csv").exists()
        assert len(list(bucket.glob(".part-*"))) == 1

        release.set()
        assert (await slow.receive())["type"] == "uploaded"
    assert (server.config.work_dir / "slow" / "slow.csv").read_bytes() == b"first half, then 10!"
    assert leftovers(server.config.work_dir) == []
