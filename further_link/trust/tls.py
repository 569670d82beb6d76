"""The server's TLS certificate: the configured one, or this device's own.

Without a configured certificate, a self-signed one is generated once for
this device (its hostname, ``localhost`` and loopback addresses) and kept in
the config dir with its key readable only by the server's user. No private
key ever ships in the package.

Further reaches a device as ``https://<a-b-c-d>.further-link.pi-top.com:8028``
(its IPv4 address with dashes), so the certificate also names the device's
addresses that way. When the device gets an address it was not made for, the
certificate is made again (same key) with the new names added.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import socket
import ssl
from collections.abc import Iterable
from pathlib import Path

from further_link.config import Config
from further_link.errors import ConfigError
from further_link.system.addresses import device_addresses, further_host_name
from further_link.trust.secretfile import write_secret

log = logging.getLogger(__name__)

CERT_NAME = "cert.pem"
KEY_NAME = "key.pem"
VALIDITY = datetime.timedelta(days=3650)
# The addresses the certificate names, one a line, so that a start need not
# load cryptography to see whether they are still this device's.
ADDRESSES_NAME = "cert-addresses.txt"
MAX_ADDRESSES = 32


def _recorded_addresses(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        return []


def ensure_self_signed(
    config_dir: Path, addresses: Iterable[str] | None = None
) -> tuple[Path, Path]:
    """Paths of this device's certificate and key, made the first time and again
    (same key) when ``addresses`` (default: the device's own) holds one it lacks."""
    cert_path, key_path = config_dir / CERT_NAME, config_dir / KEY_NAME
    addresses_path = config_dir / ADDRESSES_NAME
    wanted = sorted(set(device_addresses() if addresses is None else addresses))
    recorded = _recorded_addresses(addresses_path)
    exists = cert_path.is_file() and key_path.is_file()
    if exists and set(wanted) <= set(recorded):
        return cert_path, key_path
    # Imported only here: cryptography costs ~8 MB of RSS, needed once per device.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    config_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key: ec.EllipticCurvePrivateKey | None = None
    if exists:
        loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if isinstance(loaded, ec.EllipticCurvePrivateKey):
            key = loaded
        log.info("this device has new addresses (%s): renewing its certificate", ", ".join(wanted))
    if key is None:
        key = ec.generate_private_key(ec.SECP256R1())
    # Earlier addresses stay named: a device moving between networks keeps working.
    named = sorted(set(wanted) | set(recorded), key=wanted.__contains__, reverse=True)
    named = named[:MAX_ADDRESSES]
    hostname = socket.gethostname() or "further-link"
    names: list[x509.GeneralName] = [x509.DNSName(hostname), x509.DNSName("localhost")]
    if "." not in hostname:
        names.append(x509.DNSName(f"{hostname}.local"))
    names += [x509.DNSName(further_host_name(address)) for address in named]
    names += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    names += [x509.IPAddress(ipaddress.ip_address(address)) for address in named]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"further-link {hostname}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_secret(key_path, key_bytes)
    write_secret(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
    write_secret(addresses_path, "".join(f"{a}\n" for a in named).encode("ascii"))
    log.info("created a self-signed certificate for %s in %s", hostname, config_dir)
    return cert_path, key_path


def server_ssl_context(config: Config) -> ssl.SSLContext:
    """The context the server listens with."""
    if config.cert_file is not None and config.key_file is not None:
        cert_path, key_path = config.cert_file, config.key_file
    else:
        cert_path, key_path = ensure_self_signed(config.config_dir)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load certificate {cert_path} / key {key_path}: {exc}") from None
    return context
