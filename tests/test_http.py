"""The plain HTTP endpoints and TLS set-up."""

from __future__ import annotations

import os
import ssl
from collections.abc import Awaitable
from pathlib import Path
from typing import Callable

import aiohttp
from cryptography import x509

import further_link
from further_link.trust.tls import ensure_self_signed

from conftest import RunningServer

StartServer = Callable[..., Awaitable[RunningServer]]


async def test_status_is_ok_with_cors(server: RunningServer, http: aiohttp.ClientSession) -> None:
    async with http.get(
        server.base_url + "/status", headers={"Origin": "https://further.pi-top.com"}
    ) as r:
        assert r.status == 200
        assert await r.text() == "OK"
        # An allowed origin is reflected with credentials, as Further needs (upstream does so).
        assert r.headers["Access-Control-Allow-Origin"] == "https://further.pi-top.com"
        assert r.headers["Access-Control-Allow-Credentials"] == "true"
        assert r.headers["Access-Control-Allow-Private-Network"] == "true"


async def test_version_reports_the_api_level_and_the_package_version(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(server.base_url + "/version") as r:
        assert r.status == 200
        assert await r.json() == {
            "version": further_link.__version__,
            "package": f"further-link {further_link.PACKAGE_VERSION}",
        }
        assert r.headers["Access-Control-Allow-Origin"] == "*"
    # Further's minimum-version checks: 5.3.3 for Further-Link, 4.4.0 for uploads.
    level = tuple(int(part) for part in further_link.__version__.split("."))
    assert level >= (5, 3, 3)


async def test_self_signed_certificate_is_created_once_and_reused(
    start_server: StartServer, http: aiohttp.ClientSession
) -> None:
    first = await start_server(no_ssl=False)
    cert_path = first.config.config_dir / "cert.pem"
    key_path = first.config.config_dir / "key.pem"
    assert os.stat(key_path).st_mode & 0o777 == 0o600
    original = cert_path.read_bytes()
    certificate = x509.load_pem_x509_certificate(original)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)

    second = await start_server(no_ssl=False)
    assert cert_path.read_bytes() == original
    for running in (first, second):
        async with http.get(running.base_url + "/status", ssl=running.ssl_client) as r:
            assert await r.text() == "OK"


async def test_tls_refuses_clients_that_do_not_trust_it(
    start_server: StartServer, http: aiohttp.ClientSession
) -> None:
    secure = await start_server(no_ssl=False)
    strict = ssl.create_default_context()
    try:
        async with http.get(secure.base_url + "/status", ssl=strict):
            raise AssertionError("an untrusted self-signed certificate was accepted")
    except aiohttp.ClientConnectorCertificateError:
        pass


async def test_configured_certificate_is_used(
    start_server: StartServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    own_dir = tmp_path / "own-cert"
    cert, key = ensure_self_signed(own_dir)
    running = await start_server(no_ssl=False, cert_file=str(cert), key_file=str(key))
    client_ssl = ssl.create_default_context(cafile=str(cert))
    async with http.get(running.base_url + "/status", ssl=client_ssl) as r:
        assert await r.text() == "OK"
    assert not (running.config.config_dir / "cert.pem").exists()


def _san_names(cert_path: Path) -> list[str]:
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(names.get_values_for_type(x509.DNSName))


def test_certificate_names_further_host_names_and_follows_new_addresses(tmp_path: Path) -> None:
    cert, key = ensure_self_signed(tmp_path, addresses=["192.168.1.20"])
    assert "192-168-1-20.further-link.pi-top.com" in _san_names(cert)
    first_cert, first_key = cert.read_bytes(), key.read_bytes()
    ensure_self_signed(tmp_path, addresses=["192.168.1.20"])
    assert cert.read_bytes() == first_cert, "same addresses: the certificate is kept"
    ensure_self_signed(tmp_path, addresses=["10.0.0.7"])
    names = _san_names(cert)
    assert "10-0-0-7.further-link.pi-top.com" in names
    assert "192-168-1-20.further-link.pi-top.com" in names, "earlier addresses stay named"
    assert cert.read_bytes() != first_cert
    assert key.read_bytes() == first_key, "renewing keeps the key"


async def test_tls_handshake_under_the_further_name_of_this_device(
    start_server: StartServer, http: aiohttp.ClientSession
) -> None:
    from further_link.system.addresses import device_addresses, further_host_name

    server = await start_server(no_ssl=False)
    names = [further_host_name(address) for address in device_addresses()]
    assert names, "this machine has a non-loopback IPv4 address to name"
    for name in names:
        async with http.get(
            server.base_url + "/status", ssl=server.ssl_client, server_hostname=name
        ) as r:
            assert await r.text() == "OK"
