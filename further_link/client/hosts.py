"""What the command-line client remembers about each device: token and certificate.

One JSON file, ``<config dir>/hosts.json`` (mode 0600, as it holds tokens),
keyed by ``host:port``::

    {"hosts": {"raspberrypi:8028": {"token": "...", "certificateSha256": "AB:CD:..."}}}

The fingerprint is the SHA-256 of the device's certificate, written the way
``openssl x509 -noout -fingerprint -sha256`` prints it, so a person can compare
it with what the device shows. Nothing here touches the network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from further_link.errors import ClientError
from further_link.trust.secretfile import write_secret
from further_link.trust.teachers import certificate_sha256

HOSTS_FILE = "hosts.json"


def host_key(host: str, port: int) -> str:
    """``host:port`` in lower case, IPv6 addresses in brackets."""
    host = host.lower()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


certificate_fingerprint = certificate_sha256


def fingerprint_bytes(fingerprint: str) -> bytes:
    return bytes.fromhex(fingerprint.replace(":", ""))


@dataclass(frozen=True)
class HostRecord:
    token: str | None = None
    fingerprint: str | None = None


class HostStore:
    """The hosts file; every change rewrites it atomically, readable only by its owner."""

    def __init__(self, config_dir: Path) -> None:
        self.path = config_dir / HOSTS_FILE

    def get(self, key: str) -> HostRecord:
        entry = self._load().get(key, {})
        token, fingerprint = entry.get("token"), entry.get("certificateSha256")
        return HostRecord(
            token if isinstance(token, str) else None,
            fingerprint if isinstance(fingerprint, str) else None,
        )

    def save_token(self, key: str, token: str) -> None:
        self._update(key, "token", token)

    def pin(self, key: str, fingerprint: str) -> None:
        self._update(key, "certificateSha256", fingerprint)

    def _update(self, key: str, field: str, value: str) -> None:
        hosts = self._load()
        hosts.setdefault(key, {})[field] = value
        self._write({"hosts": hosts})

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ClientError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise self._invalid(f"{exc.msg} at line {exc.lineno}") from None
        hosts = document.get("hosts") if isinstance(document, dict) else None
        if not isinstance(hosts, dict) or not all(isinstance(v, dict) for v in hosts.values()):
            raise self._invalid('expected {"hosts": {"HOST:PORT": {...}}}')
        return hosts

    def _invalid(self, detail: str) -> ClientError:
        return ClientError(
            f"{self.path} is not a further-link hosts file ({detail}); "
            "fix it, or delete it and pair again"
        )

    def _write(self, document: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The file holds device tokens: written as the server's own secrets are.
        text = json.dumps(document, indent=2, sort_keys=True) + "\n"
        write_secret(self.path, text.encode("utf-8"))
