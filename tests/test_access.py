"""Who may connect: the device token, pairing codes, origins (hostile cases)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import Callable

import aiohttp
import pytest
from test_cli import plain_server

from further_link.trust.auth import (
    CODE_WINDOW_SECONDS,
    TokenStore,
    code_is_valid,
    normalise_origin,
    origin_allowed,
    pairing_code,
)
from further_link.trust.control import current_generation
from further_link.trust.pairing import WRONG_PER_CODE

from conftest import AS_ROOT, Client, RunningServer, rotate_token

StartServer = Callable[..., Awaitable[RunningServer]]


async def handshake_status(http: aiohttp.ClientSession, url: str, **kwargs: object) -> int:
    """The HTTP status of a websocket upgrade attempt (101 when it succeeds)."""
    try:
        ws = await http.ws_connect(url, **kwargs)  # type: ignore[arg-type]
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status
    await ws.close()
    return 101


async def current_code(server: RunningServer) -> str:
    # As `further-link token` shows it: asked from the running server, else from the file.
    return pairing_code(server.token, generation=current_generation(server.config.config_dir)).code


# ---------------------------------------------------------------- tokens


async def test_no_token_is_refused_before_upgrade(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    assert await handshake_status(http, server.ws_url(token=False)) == 401
    async with http.get(server.ws_url(token=False).replace("ws", "http", 1)) as response:
        assert response.status == 401
        assert "pair with the code shown on the device" in await response.text()


async def test_wrong_token_is_refused(server: RunningServer, http: aiohttp.ClientSession) -> None:
    url = server.ws_url(token=False) + "?token=guess"
    assert await handshake_status(http, url) == 401
    headers = {"Authorization": "Bearer guess"}
    assert await handshake_status(http, server.ws_url(token=False), headers=headers) == 401


async def test_token_in_query_header_or_cookie_is_accepted(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    assert await handshake_status(http, server.ws_url()) == 101
    headers = {"Authorization": f"Bearer {server.token}"}
    assert await handshake_status(http, server.ws_url(token=False), headers=headers) == 101
    cookie = {"Cookie": f"further_link_token={server.token}"}
    assert await handshake_status(http, server.ws_url(token=False), headers=cookie) == 101


async def test_status_and_version_need_no_token(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    for path in ("/status", "/version"):
        async with http.get(server.base_url + path, headers={"Origin": "https://evil.test"}) as r:
            assert r.status == 200


async def test_auth_off_accepts_legacy_clients(
    start_server: StartServer, connect: Callable[..., Awaitable[Client]]
) -> None:
    legacy = await start_server(environ={"FURTHER_LINK_AUTH": "off"})
    ws = await connect(legacy, token=False)
    result = await ws.run({"sourceScript": "print('legacy')"})
    assert result.stdout == "legacy\n"


# --------------------------------------------------------------- origins


@pytest.mark.parametrize(
    ("origin", "expected"),
    [
        ("https://evil.example", 403),
        ("http://127.0.0.1.evil.example", 403),
        ("null", 403),
        ("https://further.pi-top.com", 101),
        ("HTTPS://Further.pi-top.com:443", 101),
    ],
)
async def test_origin_check(
    server: RunningServer, http: aiohttp.ClientSession, origin: str, expected: int
) -> None:
    status = await handshake_status(http, server.ws_url(), headers={"Origin": origin})
    assert status == expected


async def test_own_origin_is_allowed(server: RunningServer, http: aiohttp.ClientSession) -> None:
    headers = {"Origin": server.base_url}
    assert await handshake_status(http, server.ws_url(), headers=headers) == 101


async def test_forbidden_origin_is_refused_even_with_auth_off(
    start_server: StartServer, http: aiohttp.ClientSession
) -> None:
    legacy = await start_server(environ={"FURTHER_LINK_AUTH": "off"})
    headers = {"Origin": "https://evil.example"}
    assert await handshake_status(http, legacy.ws_url(token=False), headers=headers) == 403


async def test_configured_origins_replace_the_default(
    start_server: StartServer, http: aiohttp.ClientSession
) -> None:
    custom = await start_server(
        environ={"FURTHER_LINK_ORIGINS": "https://ide.school.test, http://x.test:8000"}
    )
    for origin, expected in [
        ("https://ide.school.test", 101),
        ("http://x.test:8000", 101),
        ("http://x.test", 403),
        ("https://further.pi-top.com", 403),
    ]:
        assert await handshake_status(http, custom.ws_url(), headers={"Origin": origin}) == expected
    anyone = await start_server(environ={"FURTHER_LINK_ORIGINS": "*"})
    headers = {"Origin": "https://anything.test"}
    assert await handshake_status(http, anyone.ws_url(), headers=headers) == 101
    assert await handshake_status(http, anyone.ws_url(token=False), headers=headers) == 401


def test_origin_matching_rules() -> None:
    assert normalise_origin("HTTP://Host:80") == "http://host"
    assert normalise_origin("https://h:8028/") == "https://h:8028"
    assert origin_allowed(None, [], [])
    assert not origin_allowed("https://a.test", ["https://b.test"], [])
    assert origin_allowed("https://a.test:443", [], ["https://a.test"])


# --------------------------------------------------------------- pairing


async def test_pairing_code_gives_token_and_cookie(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    jar_session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    async with jar_session:
        code = await current_code(server)
        async with jar_session.post(server.base_url + "/pair", json={"code": code}) as response:
            assert response.status == 200
            assert await response.json() == {"token": server.token}
            cookie = response.cookies["further_link_token"]
            assert cookie.value == server.token
            assert cookie["httponly"] and cookie["samesite"] == "Strict"
        # The cookie alone now opens the websocket.
        async with jar_session.ws_connect(server.ws_url(token=False)) as ws:
            await ws.send_json({"type": "ping"})
            assert (await ws.receive_json(timeout=30))["type"] == "pong"


async def test_wrong_codes_change_the_code(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    good = await current_code(server)
    bad = f"{(int(good) + 1) % 10**9:09d}"
    for _ in range(WRONG_PER_CODE - 1):
        async with http.post(server.base_url + "/pair", json={"code": bad}) as response:
            assert response.status == 403
            assert (await response.json())["error"] == "wrong pairing code"
    async with http.post(server.base_url + "/pair", json={"code": bad}) as response:
        assert response.status == 403
        assert (await response.json())["error"] == (
            "wrong pairing code; the device now shows a new code"
        )
    # The old code is spent; the new one (as `further-link token` shows it) pairs.
    async with http.post(server.base_url + "/pair", json={"code": good}) as response:
        assert response.status == 403
    fresh = await current_code(server)
    assert fresh != good
    async with http.post(
        server.base_url + "/pair", json={"code": fresh[:3] + "-" + fresh[3:]}
    ) as response:
        assert response.status == 200


async def test_the_token_itself_pairs_a_browser(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    async with http.post(server.base_url + "/pair", json={"token": "guess"}) as response:
        assert response.status == 403
        assert "further-link token" in (await response.json())["error"]
    async with http.post(server.base_url + "/pair", json={"token": server.token}) as response:
        assert response.status == 200
        assert response.cookies["further_link_token"].value == server.token


@pytest.mark.parametrize("body", ["not json", '["123456"]', '{"code": ""}', '{"code": null}', "{}"])
async def test_malformed_pair_requests_say_what_to_send(
    server: RunningServer, http: aiohttp.ClientSession, body: str
) -> None:
    async with http.post(
        server.base_url + "/pair", data=body, headers={"Content-Type": "application/json"}
    ) as response:
        assert response.status == 400
        assert (await response.json())["error"] == 'send JSON like {"code": "123456789"}'


@pytest.mark.parametrize(
    ("body", "status"),
    [("x" * 5000, 413), ("{" * 100, 400), ('["pair"]', 400), (b"\xff{}", 400)],
)
async def test_malformed_teacher_commands_are_refused_before_any_check(
    server: RunningServer, http: aiohttp.ClientSession, body: str | bytes, status: int
) -> None:
    async with http.post(
        server.base_url + "/teacher", data=body, headers={"Content-Type": "application/json"}
    ) as response:
        assert response.status == status
        assert (await response.json())["error"].endswith("send a JSON object")


async def test_the_lock_state_refusal_tells_an_allowed_page_to_pair(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    origin = "https://further.pi-top.com"
    url = server.base_url + "/teacher/lock"
    async with http.get(url, headers={"Origin": origin}) as refused:
        assert refused.status == 401
        assert refused.headers["Access-Control-Allow-Origin"] == origin
    headers = {"Origin": origin, "Authorization": f"Bearer {server.token}"}
    async with http.get(url, headers=headers) as response:
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] == origin
        assert (await response.json())["locked"] is False


async def test_pairing_from_an_allowed_site_uses_cors(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    origin = "https://further.pi-top.com"
    async with http.options(
        server.base_url + "/pair",
        headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
    ) as preflight:
        assert preflight.status == 204
        assert preflight.headers["Access-Control-Allow-Origin"] == origin
        assert preflight.headers["Access-Control-Allow-Credentials"] == "true"
    code = await current_code(server)
    async with http.post(
        server.base_url + "/pair", json={"code": code}, headers={"Origin": origin}
    ) as response:
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] == origin
    async with http.post(
        server.base_url + "/pair", json={"code": code}, headers={"Origin": "https://evil.test"}
    ) as response:
        assert response.status == 403


def test_codes_change_every_window_and_with_the_token() -> None:
    token = "device-token"
    start = 1_800_000_000 - (1_800_000_000 % CODE_WINDOW_SECONDS)
    first = pairing_code(token, start + 5)
    assert len(first.code) == 9 and first.code.isdigit()
    assert first.shown == f"{first.code[:3]}-{first.code[3:6]}-{first.code[6:]}"
    assert first.expires_at == start + CODE_WINDOW_SECONDS
    assert pairing_code(token, start + CODE_WINDOW_SECONDS - 1).code == first.code
    later = pairing_code(token, start + CODE_WINDOW_SECONDS + 5)
    assert later.code != first.code  # fixed token and times: deterministic
    assert pairing_code("other-token", start + 5).code != first.code
    assert code_is_valid(token, first.code, start + 5)
    assert code_is_valid(token, first.shown, start + 5)
    assert not code_is_valid(token, "0" * 9 if first.code != "0" * 9 else "1" * 9, start + 5)
    # A spent code's successor differs, and the spent one no longer pairs.
    assert pairing_code(token, start + 5, generation=1).code != first.code
    assert not code_is_valid(token, first.code, start + 5, generation=1)
    # The old code stays valid for a short grace after its window ends, then not.
    assert code_is_valid(token, first.code, start + CODE_WINDOW_SECONDS + 30)
    assert not code_is_valid(token, first.code, start + CODE_WINDOW_SECONDS + 120)


def test_token_file_is_private_and_rotation_replaces_it(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "cfg")
    token = store.load_or_create()
    assert len(token) >= 32
    assert os.stat(store.path).st_mode & 0o777 == 0o600
    assert TokenStore(tmp_path / "cfg").load_or_create() == token
    rotated = store.rotate()
    assert rotated != token and store.matches(rotated) and not store.matches(token)


def test_token_command_prints_token_and_code(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FURTHER_LINK_")}
    env["FURTHER_LINK_CONFIG_DIR"] = str(tmp_path / "cfg")

    def token_command(*extra: str) -> list[str]:
        out = subprocess.run(
            [sys.executable, "-m", "further_link", "token", *extra],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return out.stdout.splitlines()

    lines = token_command()
    token = (tmp_path / "cfg" / "token").read_text().strip()
    assert lines[0] == f"token: {token}"
    assert lines[1].startswith(f"pairing code: {pairing_code(token).shown} (valid for ")
    rotated = token_command("--rotate")
    new_token = (tmp_path / "cfg" / "token").read_text().strip()
    assert new_token != token
    assert f"token: {new_token}" in rotated


async def test_rotating_the_token_locks_out_the_old_one(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    old = server.token
    connected = await http.ws_connect(server.ws_url())
    await connected.send_json({"type": "start", "data": {"sourceScript": "input()"}})
    assert (await connected.receive_json(timeout=30))["type"] == "started"
    # As on a device: `further-link token --rotate`, run as the server's starter (root in CI).
    out = await rotate_token(server.config.config_dir)
    new = TokenStore(server.config.config_dir).current()
    assert f"token: {new}" in out
    if AS_ROOT:  # the dropped server cannot read the file: the command told it
        assert "told 1 running server(s)" in out
    # The connection made with the old token is closed, and its program ended.
    closed = await connected.receive(timeout=30)
    assert (closed.type, closed.data) == (aiohttp.WSMsgType.CLOSE, 4001)
    assert closed.extra == "the device token was replaced; pair again"
    base = server.ws_url(token=False)
    assert await handshake_status(http, f"{base}?token={old}") == 401
    assert await handshake_status(http, f"{base}?token={new}") == 101
    if AS_ROOT:  # the server logs the new pairing code
        for _ in range(100):
            if f"pairing code: {pairing_code(new).shown}" in server.log():
                break
            await asyncio.sleep(0.1)
        assert f"pairing code: {pairing_code(new).shown}" in server.log()


def test_startup_log_shows_pairing_code_never_the_token(sandbox: Path) -> None:
    server = plain_server(sandbox)
    try:
        token = (sandbox / "cfg" / "token").read_text().strip()
        server.read_until("pairing code:")
        log = "".join(server.log)
        assert f"pair at http://127.0.0.1:{server.port}/ with the code below" in log
        assert f"pairing code: {pairing_code(token).shown} (valid for " in log
        assert token not in log
        assert "pairing is OFF" not in log
    finally:
        assert server.stop() == 0

    server = plain_server(sandbox, extra=["--no-auth"])
    try:
        warning = server.read_until("pairing is OFF")
        assert "WARNING" in warning and "anyone who can reach this port" in warning
        assert "?token=" not in "".join(server.log)
    finally:
        assert server.stop() == 0


async def test_unpairing_clears_the_cookie(server: RunningServer) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        code = await current_code(server)
        async with browser.post(server.base_url + "/pair", json={"code": code}) as response:
            assert response.status == 200
        assert await handshake_status(browser, server.ws_url(token=False)) == 101
        async with browser.delete(server.base_url + "/pair") as response:
            assert response.status == 204
        assert await handshake_status(browser, server.ws_url(token=False)) == 401


def test_tokens_never_look_like_a_command_line_option(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "cfg")
    assert not any(store.rotate().startswith("-") for _ in range(300))
