"""The complete addresses the log and `further-link token` give, never with the token."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from further_link.system.addresses import server_urls


def machine_addresses() -> set[str]:
    return {
        entry.address.split("%", 1)[0]
        for entries in psutil.net_if_addrs().values()
        for entry in entries
        if entry.family in (socket.AF_INET, socket.AF_INET6)
    }


def test_wildcard_gives_the_mdns_name_first_then_each_address() -> None:
    urls = server_urls("https", "0.0.0.0", 8028, hostname="raspberrypi")
    assert urls[0] == "https://raspberrypi.local:8028/"
    assert len(urls) >= 2
    for url in urls[1:]:
        parts = urlsplit(url)
        assert (parts.scheme, parts.port, parts.path) == ("https", 8028, "/")
        address = ipaddress.ip_address(parts.hostname or "")
        assert address.version == 4  # 0.0.0.0 listens on IPv4 only
        assert str(address) in machine_addresses()


def test_dual_stack_lists_ipv6_in_brackets_without_link_local() -> None:
    urls = server_urls("http", "::", 80, hostname="pi.example.org")
    assert urls[0] == "http://pi.example.org:80/"  # a full name is not given .local
    hosts = [urlsplit(url).hostname or "" for url in urls[1:]]
    for url, host in zip(urls[1:], hosts):
        address = ipaddress.ip_address(host)
        assert not (address.version == 6 and address.is_link_local)
        assert (f"[{host}]" in url) == (address.version == 6)
    assert set(hosts) <= machine_addresses()


def test_a_specific_address_is_the_only_url() -> None:
    assert server_urls("https", "127.0.0.1", 9000) == ["https://127.0.0.1:9000/"]
    assert server_urls("https", "::1", 9000) == ["https://[::1]:9000/"]


def test_token_command_prints_complete_urls_without_the_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FURTHER_LINK_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path), FURTHER_LINK_PORT="8123")
    out = subprocess.run(
        [sys.executable, "-m", "further_link", "token"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    token = (tmp_path / "further-link" / "token").read_text().strip()
    opens = [line.removeprefix("open: ") for line in out.splitlines() if line.startswith("open: ")]
    name = socket.gethostname()
    assert opens[0] == f"https://{name if '.' in name else name + '.local'}:8123/"
    assert len(opens) >= 2 and all(u.startswith("https://") and u.endswith(":8123/") for u in opens)
    assert all(token not in line for line in out.splitlines() if not line.startswith("token: "))
