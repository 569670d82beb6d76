"""An attacker on the school network, tried for real: TLS and pairing on, loopback only.

Many source addresses are 127.0.x.y (all of 127.0.0.0/8 is loopback on Linux);
every client socket binds one of them as its local address. Every loop is
bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import threading
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Callable

import aiohttp
import psutil
import pytest
from test_cli import ServerProcess

from further_link.access import GUARD
from further_link.auth import pairing_code
from further_link.netguard import raise_fd_limit
from further_link.pairing import BURST, WRONG_PER_CODE, PairingPolicy, read_generation

from conftest import (
    PROGRAM_SETTINGS,
    TIMEOUT,
    Client,
    RunningServer,
    alive,
    write_pid_code,
)

StartServer = Callable[..., Awaitable[RunningServer]]
MiB = 1024 * 1024


def source_addresses(count: int) -> list[str]:
    """``count`` loopback addresses other than 127.0.0.1: 127.0.1.1, 127.0.1.2, ..."""
    return [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(count)]


def wrong_codes(server: RunningServer, count: int) -> list[str]:
    """``count`` distinct codes, none of them valid now (whatever the generation)."""
    valid = {
        pairing_code(server.token, generation=g).code
        for g in range(read_generation(server.config.config_dir) + 200)
    }
    codes: list[str] = []
    n = 0
    while len(codes) < count:
        candidate = f"{n:09d}"
        if candidate not in valid:
            codes.append(candidate)
        n += 7919
    return codes


async def post_pair(
    session: aiohttp.ClientSession, server: RunningServer, body: dict[str, Any]
) -> int:
    async with session.post(
        server.base_url + "/pair", json=body, ssl=server.ssl_client or True
    ) as response:
        await response.read()
        return response.status


# --------------------------------------------------------------- pairing


async def test_brute_force_from_400_addresses_is_held_to_the_device_budget(
    start_server: StartServer,
) -> None:
    server = await start_server(no_ssl=False)
    addresses = source_addresses(400)
    codes = wrong_codes(server, 2 * len(addresses))
    statuses: list[int] = []
    sessions = [
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(local_addr=(address, 0), force_close=True)
        )
        for address in addresses
    ]
    started = time.monotonic()
    try:
        # Two waves of one guess from every address: 800 guesses, all at once.
        for wave in range(2):
            statuses += await asyncio.wait_for(
                asyncio.gather(
                    *(
                        post_pair(session, server, {"code": codes[wave * 400 + i]})
                        for i, session in enumerate(sessions)
                    )
                ),
                120,
            )
        elapsed = time.monotonic() - started
        # The right code, from a fresh address, is now refused too: the budget is spent.
        right = pairing_code(
            server.token, generation=read_generation(server.config.config_dir)
        ).code
        assert await post_pair(sessions[0], server, {"code": right}) == 429
    finally:
        await asyncio.gather(*(session.close() for session in sessions))
    judged = statuses.count(403)
    # Only the device-wide burst was judged (a few more may have refilled meanwhile).
    assert BURST <= judged <= BURST + 2, statuses
    assert statuses.count(429) == len(statuses) - judged
    assert 200 not in statuses
    # Judged one at a time, each wrong code held a tenth of a second.
    assert elapsed >= BURST * PairingPolicy().hold_seconds * 0.9
    # The code changed every WRONG_PER_CODE wrong codes.
    assert read_generation(server.config.config_dir) == judged // WRONG_PER_CODE
    # The person at the device can still pair, with the token `further-link token` shows.
    async with aiohttp.ClientSession() as at_device:
        assert await post_pair(at_device, server, {"token": server.token}) == 200


async def open_tls(server: RunningServer, local: str = "127.0.0.1") -> tuple[Any, Any]:
    port = int(server.base_url.rsplit(":", 1)[1])
    return await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=server.ssl_client, local_addr=(local, 0)),
        TIMEOUT,
    )


def pair_head(body: bytes) -> bytes:
    return (
        b"POST /pair HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
    )


async def read_status(reader: asyncio.StreamReader) -> int:
    line = await asyncio.wait_for(reader.readline(), 60)
    return int(line.split()[1])


async def test_held_bodies_are_judged_one_at_a_time_after_they_arrive(
    start_server: StartServer,
) -> None:
    server = await start_server(no_ssl=False)
    assert server.runner is not None
    server.runner.app[GUARD].policy = PairingPolicy(burst=20, hold_seconds=0.05)
    addresses = source_addresses(5)
    codes = wrong_codes(server, 150)
    bodies = [json.dumps({"code": code}).encode() for code in codes]
    connections = []
    for i, body in enumerate(bodies):
        reader, writer = await open_tls(server, addresses[i % len(addresses)])
        writer.write(pair_head(body))
        await writer.drain()
        connections.append((reader, writer, body))
    # 150 heads wait for their bodies: none of that spends anything; the right code pairs.
    async with aiohttp.ClientSession() as person:
        right = pairing_code(server.token).code
        started = time.monotonic()
        assert await post_pair(person, server, {"code": right}) == 200
        assert time.monotonic() - started < 5
    for _, writer, body in connections:
        writer.write(body)
    statuses = await asyncio.gather(*(read_status(reader) for reader, _, _ in connections))
    for _, writer, _ in connections:
        writer.close()
    assert statuses.count(403) == 20, statuses
    assert statuses.count(429) == 130


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,
        b"[" * 4000,
        b'{"code": ' + b"1" * 4000 + b"}",
        b"1" * 5000,
        b'{"code": 1e999}',
        b'{"code": true}',
        b'{"code": 12345678901234567890}',
        b'{"token": 5}',
        b'{"token": "\\udfff"}',
        b"\xff\xfe{}",
        b'{"code": "\\ud800"}',
    ],
)
async def test_pair_answers_4xx_to_anything_without_a_traceback(
    start_server: StartServer, body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(no_ssl=False)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            server.base_url + "/pair",
            data=body,
            headers={"Content-Type": "application/json"},
            ssl=server.ssl_client,
        ) as response,
    ):
        assert 400 <= response.status < 500
        error = (await response.json())["error"]
        assert "code" in error or "token" in error
    assert [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR] == []


# ------------------------------------------------------------------ Host


async def test_a_rebinding_host_is_refused_before_anything_else(
    start_server: StartServer,
) -> None:
    server = await start_server(no_ssl=False, environ={"FURTHER_LINK_HOSTS": "pi.school.test"})
    port = server.base_url.rsplit(":", 1)[1]
    evil = {"Host": f"attacker.test:{port}", "Origin": f"https://attacker.test:{port}"}
    async with aiohttp.ClientSession() as http:
        for method, path in [
            ("POST", "/pair"),
            ("GET", "/run-py"),
            ("GET", "/device"),
            ("GET", "/"),
            ("OPTIONS", "/pair"),
        ]:
            async with http.request(
                method,
                server.base_url + path + f"?token={server.token}",
                headers=evil,
                json={"code": pairing_code(server.token).code},
                ssl=server.ssl_client,
            ) as response:
                assert response.status == 421, path
                assert "FURTHER_LINK_HOSTS" in await response.text()
        # Nothing was judged: the pairing budget is untouched.
        assert server.runner is not None
        assert server.runner.app[GUARD].wrong_left == BURST
        async with http.get(
            server.base_url + "/status", headers=evil, ssl=server.ssl_client
        ) as response:
            assert response.status == 200
        # The device's own names, and names it was given, are its own page.
        for host in ["localhost", "127.0.0.1", "pi.school.test"]:
            own = {"Host": f"{host}:{port}", "Origin": f"https://{host}:{port}"}
            async with http.get(
                server.base_url + f"/device?token={server.token}",
                headers=own,
                ssl=server.ssl_client,
            ) as response:
                assert response.status == 200, host
        # A page elsewhere naming the device correctly in Host is still another origin.
        cross = {"Host": f"127.0.0.1:{port}", "Origin": f"https://attacker.test:{port}"}
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(server.ws_url(), headers=cross, ssl=server.ssl_client)
        assert refused.value.status == 403


# ------------------------------------------------- idle and slow connections


async def test_2000_idle_and_slow_connections_leave_a_paired_client_served(
    start_server: StartServer,
    connect: Callable[..., Awaitable[Client]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    raise_fd_limit()  # this process holds both ends of every connection
    server = await start_server(no_ssl=False, environ={"FURTHER_LINK_HEADER_TIMEOUT": "5"})
    client = await connect(server)
    port = int(server.base_url.rsplit(":", 1)[1])
    addresses = source_addresses(400)
    caplog.clear()
    idle: list[asyncio.StreamWriter] = []
    readers: list[asyncio.StreamReader] = []
    # 1,600 peers that connect and say nothing (not even a TLS hello)...
    for i in range(1600):
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(addresses[i % 400], 0)),
            TIMEOUT,
        )
        idle.append(writer)
        readers.append(reader)
    # ...and 400 that finish TLS, then send half a request head and stop.
    for i in range(400):
        reader, writer = await open_tls(server, addresses[i])
        writer.write(b"POST /pair HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        idle.append(writer)
        readers.append(reader)
    try:
        started = time.monotonic()
        result = await client.run({"sourceScript": "print('hi')"})
        took = time.monotonic() - started
        assert result.stdout == "hi\n" and result.exit_code == 0
        assert took < 1.0, f"print('hi') took {took:.2f} s among 2,000 idle connections"
        # The server hangs up on every one of them once their time is up.
        deadline = time.monotonic() + 5 + TIMEOUT
        closed = 0
        for reader in readers:
            remaining = max(0.1, deadline - time.monotonic())
            # A timeout here fails the test: the server kept the connection.
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await asyncio.wait_for(reader.read(), remaining)
            closed += 1
        assert closed == 2000
        # A new client is served once they are gone, and the log stayed quiet.
        again = await connect(server)
        assert (await again.run({"sourceScript": "print('again')"})).stdout == "again\n"
    finally:
        for writer in idle:
            writer.transport.abort()
    noisy = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert noisy == []
    assert len(caplog.records) < 20


async def test_connection_caps_answer_503_and_429(start_server: StartServer) -> None:
    server = await start_server(
        environ={
            "FURTHER_LINK_MAX_CONNECTIONS": "40",
            "FURTHER_LINK_MAX_CONNECTIONS_PER_ADDRESS": "10",
        }
    )
    port = int(server.base_url.rsplit(":", 1)[1])
    held = []

    async def attempt(local: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(local, 0))
        held.append(writer)
        writer.write(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        return await asyncio.wait_for(reader.readline(), TIMEOUT)

    try:
        one = source_addresses(1)[0]
        answers = [await attempt(one) for _ in range(11)]
        assert answers[:10] == [b"HTTP/1.1 200 OK\r\n"] * 10
        assert answers[10].startswith(b"HTTP/1.1 429")
        others = source_addresses(5)[1:]
        answers = [await attempt(address) for address in others for _ in range(8)]
        assert answers.count(b"HTTP/1.1 200 OK\r\n") == 30
        assert all(a.startswith(b"HTTP/1.1 503") for a in answers[30:])
    finally:
        for writer in held:
            writer.transport.abort()


# ------------------------------------------------------ non-reading client


def server_process(sandbox: Path, **settings: str) -> ServerProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FURTHER_LINK_")}
    env.update(PROGRAM_SETTINGS, FURTHER_LINK_CONFIG_DIR=str(sandbox / "cfg"), **settings)
    args = ["--host", "127.0.0.1", "--port", "0", "--work-dir", str(sandbox / "w")]
    server = ServerProcess(args, env)
    stdout = server.proc.stdout
    assert stdout is not None
    # Keep reading its log, so a full pipe never blocks the server.
    threading.Thread(target=lambda: server.log.extend(stdout), daemon=True).start()
    return server


async def test_a_client_that_floods_but_never_reads_is_dropped_with_bounded_memory(
    sandbox: Path, shared: Path
) -> None:
    server = server_process(
        sandbox, FURTHER_LINK_STALL_TIMEOUT="5", FURTHER_LINK_OUTPUT_QUEUE_BYTES="65536"
    )
    try:
        token = (sandbox / "cfg" / "token").read_text().strip()
        cafile = sandbox / "cfg" / "cert.pem"
        tls = ssl.create_default_context(cafile=str(cafile))
        url = f"wss://127.0.0.1:{server.port}/run-py?token={token}"
        process = psutil.Process(server.proc.pid)
        marker = shared / "flood.pid"
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(url, ssl=tls, max_msg_size=0)
            source = write_pid_code(marker) + "import time\ntime.sleep(300)\n"
            await ws.send_json({"type": "start", "data": {"sourceScript": source}})
            deadline = time.monotonic() + TIMEOUT
            while not marker.exists() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            pid = int(marker.read_text())
            before = process.memory_info().rss
            bad = json.dumps({"type": "x" * MiB})
            ping = json.dumps({"type": "ping"})
            sent = 0
            samples: list[int] = []

            async def flood() -> None:
                nonlocal sent
                with contextlib.suppress(ConnectionError):
                    while sent < 5_000_000:
                        await ws.send_str(bad if sent % 500 == 0 else ping)
                        sent += 1

            async def sample() -> None:
                while True:
                    samples.append(process.memory_info().rss - before)
                    await asyncio.sleep(0.2)

            sampler = asyncio.ensure_future(sample())
            try:
                # Sending blocks once the server stops reading; it ends when the server hangs up.
                await asyncio.wait_for(flood(), 90)
            finally:
                sampler.cancel()
            dropped = ws.closed or ws.exception() is not None or sent < 5_000_000
            await ws.close()
        grown = max(samples)
        assert dropped, f"sent {sent} messages and was never dropped"
        assert grown <= 16 * MiB, f"the server grew by {grown / MiB:.1f} MiB ({sent} sent)"
        deadline = time.monotonic() + TIMEOUT
        while alive(pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not alive(pid)
    finally:
        assert server.stop() == 0
    log = "".join(server.log)
    assert "read nothing for 5 s" in log
    assert max(len(line) for line in server.log) < 1000
    assert "Traceback" not in log
