"""All settings, read once from the environment and flags into one frozen object.

No other module reads ``os.environ``: the snapshot taken here (``program_env``)
is also the base environment of every program the server runs.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from further_link.errors import ConfigError
from further_link.system.accounts import AccountBook, choose_account

MiB = 1024 * 1024
DEFAULT_PORT = 8028
# The Further coding site may open websockets to devices by default; it still
# needs the device token, obtained by pairing.
DEFAULT_ORIGINS = ("https://further.pi-top.com",)
# Programs run with the python3 a learner gets in a terminal, with every Debian
# package (numpy, gpiozero, picamera2, ...), not with the server's virtualenv.
SYSTEM_PYTHON = "/usr/bin/python3"
# Seconds of silence from a client before it is pinged; it then has half as long to answer.
DEFAULT_HEARTBEAT = 5.0


@dataclass(frozen=True)
class RunAs:
    """The account programs run under, and whether the server must drop to it."""

    name: str
    uid: int
    gid: int
    home: Path
    # True when the server was started as root: it drops to this account for
    # good before serving (privsep.py), and then runs programs as itself.
    drop: bool
    reason: str = "it is the server's own account"  # why, in words for the start-up log


@dataclass(frozen=True)
class Config:
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    work_dir: Path = Path.home() / "further"
    config_dir: Path = Path.home() / ".config" / "further-link"
    ssl: bool = True
    cert_file: Path | None = None
    key_file: Path | None = None
    run_as: RunAs | None = None
    python: str = SYSTEM_PYTHON
    kill_grace: float = 1.0
    heartbeat: float = DEFAULT_HEARTBEAT
    max_message_bytes: int = 16 * MiB
    max_source_bytes: int = 16 * MiB
    max_upload_files: int = 1000
    max_upload_bytes: int = 100 * MiB
    max_download_bytes: int = 100 * MiB
    output_queue_bytes: int = 1 * MiB
    auth: bool = True
    pool_size: int = 2
    # Modules waiting interpreters import ahead; a default list drops missing ones quietly.
    pool_preload: tuple[str, ...] = ()
    pool_preload_is_default: bool = False
    containment: str = "auto"  # "auto" (cgroups when the machine offers them) or "best-effort"
    max_memory_bytes: int = 0  # per run; 0 = no limit (load_config defaults to half the RAM)
    max_tasks: int = 256  # processes and threads per run; 0 = no limit
    cpu_weight: int = 100  # per run, cgroup v2 scale 1..10000
    origins: tuple[str, ...] = DEFAULT_ORIGINS
    # Where X displays' sockets are (only tests look elsewhere).
    x11_socket_dir: Path = Path("/tmp/.X11-unix")
    # The X server of GUI runs' virtual displays (novncOptions), a name on PATH or a path.
    xvfb: str = "Xvfb"
    program_env: Mapping[str, str] = field(default_factory=dict)
    # Names besides the device's own that requests may carry in Host.
    hosts: tuple[str, ...] = ()
    # Hosts, addresses and CIDR networks url uploads may reach despite the policy.
    download_allow: tuple[str, ...] = ()
    quota_bytes: int = 1024 * MiB
    # The quota's running total is checked against the disk at most this often.
    quota_recount_seconds: float = 60.0
    max_connections: int = 512
    max_connections_per_address: int = 32
    # Seconds an unauthenticated peer may take for its TLS handshake and headers.
    header_timeout: float = 10.0
    # Seconds a connection's outgoing queue may stay full before the client is cut off.
    stall_timeout: float = 60.0
    # v5 /run (Further IDE): FURTHER_LINK_AUTH=origin lets allowed origins in without a token.
    origin_auth: bool = False
    temp_dir: Path = Path("/tmp")  # default `path` of /run starts (FURTHER_LINK_TEMP_DIR)
    venv: Path | None = None  # FURTHER_VENV: the python3 runner's virtualenv
    miniscreen_projects_dir: Path | None = None  # FURTHER_LINK_MINISCREEN_PROJECTS_DIR
    # Announce the device on the local network (mDNS/DNS-SD) for teachers' tools.
    advertise: bool = True  # FURTHER_LINK_ADVERTISE
    device_name: str = ""  # FURTHER_LINK_DEVICE_NAME; "" is the host name
    # Ed25519 public keys (base64) of teachers this device obeys: config dir's teachers file.
    teacher_keys: tuple[str, ...] = ()
    # Detach and re-attach (issue 13): seconds a run outlives its connection when
    # `start` names no keepAlive; the most a client may ask for; how many runs may
    # wait detached at once; the output each keeps for whoever attaches.
    keep_alive: float = 0.0
    max_keep_alive: float = 3600.0
    max_detached_runs: int = 16
    kept_output_bytes: int = 1 * MiB
    # One program at a time on the device: further starts queue (FURTHER_LINK_EXCLUSIVE).
    exclusive: bool = False

    def with_overrides(self, **changes: Any) -> Config:
        """A copy with some fields replaced (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def cache_dir(self) -> Path:
        return self.work_dir / ".flcache"


_FALSE_WORDS = {"", "0", "false", "no", "off"}
CONTAINMENT_MODES = ("auto", "best-effort")
_SIZE_SUFFIXES = {"": 1, "K": 1024, "M": MiB, "G": 1024 * MiB}


def _size(environ: Mapping[str, str], name: str, default: int) -> int:
    """Bytes, with an optional K, M or G suffix (powers of 1024)."""
    raw = environ.get(name, "").strip().upper().removesuffix("B").removesuffix("I")
    if not raw:
        return default
    digits, suffix = (raw[:-1], raw[-1]) if raw[-1] in _SIZE_SUFFIXES else (raw, "")
    try:
        value = int(digits) * _SIZE_SUFFIXES[suffix]
    except ValueError:
        raise ConfigError(f"{name}={environ[name]!r} is not a size such as 512M or 2G") from None
    if value < 0:
        raise ConfigError(f"{name}={environ[name]!r} must not be negative")
    return value


def _half_the_ram() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() not in _FALSE_WORDS


# Heavy libraries learners' programs start with; preloaded only with enough memory,
# as each waiting interpreter then holds them (numpy + Pillow: ~25 MiB each).
DEFAULT_PRELOAD = ("numpy", "PIL.Image")
PRELOAD_MIN_MEMORY = 1024 * MiB


def device_memory() -> int:
    """The machine's RAM in bytes (0 when unknown)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def _preload(raw: str | None) -> tuple[tuple[str, ...], bool]:
    """``FURTHER_LINK_POOL_PRELOAD``: module names separated by commas or spaces."""
    if raw is None:
        default = DEFAULT_PRELOAD if device_memory() >= PRELOAD_MIN_MEMORY else ()
        return default, True
    names = tuple(name for name in raw.replace(",", " ").split() if name.lower() != "none")
    for name in names:
        if not all(part.isidentifier() for part in name.split(".")):
            raise ConfigError(
                f"FURTHER_LINK_POOL_PRELOAD: {name[:80]!r} is not a module name "
                "(give names such as numpy,PIL.Image)"
            )
    return names, False


def _number(environ: Mapping[str, str], name: str, default: float, kind: type = int) -> Any:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    if value < 0:
        raise ConfigError(f"{name}={raw!r} must not be negative")
    return value


def _list(environ: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in environ.get(name, "").split(",") if item.strip())


def resolve_run_as(
    requested: str | None, euid: int | None = None, book: AccountBook | None = None
) -> RunAs:
    """Pick the account programs run as; never root.

    Started as root, programs run as ``requested`` (FURTHER_LINK_USER / --user),
    or else as ``accounts.choose_account`` finds (``pi``, the auto-login
    account, the first regular account, else the dedicated system account,
    created then). Started as anyone else, programs run as that same user.
    Raises ConfigError for an unknown account, root, or a switch only root can make.
    """
    euid = os.geteuid() if euid is None else euid
    me = pwd.getpwuid(euid)
    if euid != 0:
        if requested and requested != me.pw_name:
            raise ConfigError(
                f"cannot run programs as {requested!r}: only root can switch users "
                f"(the server runs as {me.pw_name!r})"
            )
        return RunAs(me.pw_name, me.pw_uid, me.pw_gid, Path(me.pw_dir), drop=False)
    book = book or AccountBook()
    if requested:
        account = book.find(requested)
        if account is None:
            raise ConfigError(f"user {requested!r} to run programs as does not exist")
        reason = "FURTHER_LINK_USER / --user names it"
    else:
        choice = choose_account(book)
        account, reason = choice.account, choice.reason
    if account.uid == 0:
        raise ConfigError(f"programs never run as root, and user {account.name!r} is root")
    return RunAs(account.name, account.uid, account.gid, account.home, drop=True, reason=reason)


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


# The Debian package's service keeps its certificate and token here (root only).
SYSTEM_CONFIG_DIR = Path("/etc/further-link")


def resolve_config_dir(
    environ: Mapping[str, str],
    override: str | None = None,
    server: bool = False,
    euid: int | None = None,
) -> Path:
    """Where the certificate and device token live (no other setting needed).

    ``server``: for the server and ``further-link token``, root with no
    FURTHER_LINK_CONFIG_DIR or XDG_CONFIG_HOME uses the package's
    /etc/further-link when it exists, so ``sudo further-link token`` shows the
    token the installed service uses.
    """
    raw = override or environ.get("FURTHER_LINK_CONFIG_DIR")
    if raw:
        return Path(raw).expanduser().absolute()
    euid = os.geteuid() if euid is None else euid
    config_home = environ.get("XDG_CONFIG_HOME")
    if server and euid == 0 and not config_home and SYSTEM_CONFIG_DIR.is_dir():
        return SYSTEM_CONFIG_DIR
    config_home = config_home or str(Path.home() / ".config")
    return (Path(config_home) / "further-link").absolute()


def listen_address(environ: Mapping[str, str]) -> tuple[str, int]:
    """(host, port) the server listens on, from FURTHER_LINK_HOST and FURTHER_LINK_PORT.

    Raises ConfigError for a port that is not a number from 0 to 65535.
    """
    port = _number(environ, "FURTHER_LINK_PORT", DEFAULT_PORT)
    if port > 65535:
        raise ConfigError(f"FURTHER_LINK_PORT={port} is not a port number")
    return environ.get("FURTHER_LINK_HOST") or "0.0.0.0", int(port)


def uses_tls(environ: Mapping[str, str]) -> bool:
    """False when FURTHER_LINK_NOSSL asks for plain HTTP."""
    return not _flag(environ, "FURTHER_LINK_NOSSL")


def resolve_python(environ: Mapping[str, str]) -> str:
    """The interpreter programs run with: FURTHER_LINK_PYTHON, FURTHER_VENV's, or the system's."""
    if environ.get("FURTHER_LINK_PYTHON"):
        return environ["FURTHER_LINK_PYTHON"]
    if environ.get("FURTHER_VENV"):
        return str(Path(environ["FURTHER_VENV"]).expanduser().absolute() / "bin" / "python3")
    return SYSTEM_PYTHON


TEACHERS_FILE = "teachers"


def read_teacher_keys(config_dir: Path) -> tuple[str, ...]:
    """The keys in ``<config dir>/teachers``: the first word of each line, ``#`` comments left out.

    Read while the server is still root (the config dir is root's alone); a
    missing file trusts no teacher. Raises ConfigError for an unreadable file.
    """
    try:
        text = (config_dir / TEACHERS_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return ()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {config_dir / TEACHERS_FILE}: {exc}") from None
    return teacher_keys_in(text)


def teacher_keys_in(text: str) -> tuple[str, ...]:
    """The keys a teachers file's ``text`` lists: each line's first word, ``#`` comments out."""
    words = (line.split("#", 1)[0].split() for line in text.splitlines())
    return tuple(line[0] for line in words if line)


def load_config(
    environ: Mapping[str, str] | None = None,
    accounts: AccountBook | None = None,
    **overrides: Any,
) -> Config:
    """Build the config from environment variables, then apply flag overrides.

    ``accounts`` is where the program account is looked up (the system's by default).
    Raises ConfigError for any setting that cannot work.
    """
    env = dict(os.environ if environ is None else environ)
    run_as = resolve_run_as(
        overrides.pop("user", None) or env.get("FURTHER_LINK_USER") or None, book=accounts
    )

    work_dir_raw = overrides.pop("work_dir", None) or env.get("FURTHER_LINK_WORK_DIR")
    if not work_dir_raw and not run_as.home.is_dir():
        # Root would otherwise create the missing home (e.g. nobody's /nonexistent).
        raise ConfigError(
            f"programs run as {run_as.name!r}, whose home {run_as.home} does not exist: "
            "set FURTHER_LINK_WORK_DIR (or --work-dir) to a directory for their files"
        )
    work_dir = Path(work_dir_raw).expanduser() if work_dir_raw else run_as.home / "further"

    config_dir = resolve_config_dir(env, overrides.pop("config_dir", None), server=True)

    no_ssl = overrides.pop("no_ssl", False) or not uses_tls(env)
    no_auth = overrides.pop("no_auth", False) or env.get(
        "FURTHER_LINK_AUTH", "on"
    ).strip().lower() in _FALSE_WORDS - {""}
    # Anything but off/origin keeps the token: a typo never opens the device.
    auth_mode = env.get("FURTHER_LINK_AUTH", "on").strip().lower()
    venv_raw = env.get("FURTHER_VENV")
    miniscreen_raw = env.get("FURTHER_LINK_MINISCREEN_PROJECTS_DIR")
    origins_raw = env.get("FURTHER_LINK_ORIGINS")
    origins = (
        DEFAULT_ORIGINS
        if origins_raw is None
        else tuple(o.strip() for o in origins_raw.split(",") if o.strip())
    )
    cert = overrides.pop("cert_file", None) or env.get("FURTHER_LINK_CERT")
    key = overrides.pop("key_file", None) or env.get("FURTHER_LINK_KEY")
    if bool(cert) != bool(key):
        raise ConfigError("give both a certificate and a key (FURTHER_LINK_CERT, FURTHER_LINK_KEY)")

    preload, preload_is_default = _preload(
        overrides.pop("pool_preload", None) or env.get("FURTHER_LINK_POOL_PRELOAD")
    )
    host, port = listen_address(env)
    hosts = _list(env, "FURTHER_LINK_HOSTS")
    download_allow = _list(env, "FURTHER_LINK_DOWNLOAD_ALLOW")

    config = Config(
        host=host,
        port=port,
        work_dir=work_dir.absolute(),
        config_dir=config_dir,
        ssl=not no_ssl,
        cert_file=Path(cert) if cert else None,
        key_file=Path(key) if key else None,
        run_as=run_as,
        python=resolve_python(env),
        kill_grace=_number(env, "FURTHER_LINK_KILL_GRACE", 1.0, float),
        # A robot must stop soon after the laptop's Wi-Fi drops: a client silent
        # for 5 s is pinged and dropped 2.5 s later, unless it is still reading
        # output (its pong is then only behind that output; see liveness.py).
        heartbeat=_number(env, "FURTHER_LINK_HEARTBEAT", DEFAULT_HEARTBEAT, float),
        x11_socket_dir=Path(env.get("FURTHER_LINK_X11_SOCKET_DIR") or "/tmp/.X11-unix"),
        xvfb=env.get("FURTHER_LINK_XVFB") or "Xvfb",
        max_message_bytes=_number(env, "FURTHER_LINK_MAX_MESSAGE_BYTES", 16 * MiB),
        max_source_bytes=_number(env, "FURTHER_LINK_MAX_SOURCE_BYTES", 16 * MiB),
        max_upload_files=_number(env, "FURTHER_LINK_MAX_UPLOAD_FILES", 1000),
        max_upload_bytes=_number(env, "FURTHER_LINK_MAX_UPLOAD_BYTES", 100 * MiB),
        max_download_bytes=_number(env, "FURTHER_LINK_MAX_DOWNLOAD_BYTES", 100 * MiB),
        output_queue_bytes=_number(env, "FURTHER_LINK_OUTPUT_QUEUE_BYTES", 1 * MiB),
        auth=not no_auth,
        pool_size=_number(env, "FURTHER_LINK_POOL_SIZE", 2),
        pool_preload=preload,
        pool_preload_is_default=preload_is_default,
        containment=(env.get("FURTHER_LINK_CONTAINMENT") or "auto").strip().lower(),
        max_memory_bytes=_size(env, "FURTHER_LINK_MAX_MEMORY", _half_the_ram()),
        max_tasks=_number(env, "FURTHER_LINK_MAX_TASKS", 256),
        cpu_weight=_number(env, "FURTHER_LINK_CPU_WEIGHT", 100),
        origins=origins,
        program_env=env,
        hosts=hosts,
        download_allow=download_allow,
        quota_bytes=_number(env, "FURTHER_LINK_QUOTA_BYTES", 1024 * MiB),
        quota_recount_seconds=_number(env, "FURTHER_LINK_QUOTA_RECOUNT_SECONDS", 60.0, float),
        max_connections=_number(env, "FURTHER_LINK_MAX_CONNECTIONS", 512),
        max_connections_per_address=_number(env, "FURTHER_LINK_MAX_CONNECTIONS_PER_ADDRESS", 32),
        header_timeout=_number(env, "FURTHER_LINK_HEADER_TIMEOUT", 10.0, float),
        stall_timeout=_number(env, "FURTHER_LINK_STALL_TIMEOUT", 60.0, float),
        origin_auth=auth_mode == "origin" and not no_auth,
        temp_dir=Path(env.get("FURTHER_LINK_TEMP_DIR") or "/tmp").absolute(),
        venv=Path(venv_raw).absolute() if venv_raw else None,
        miniscreen_projects_dir=(
            Path(miniscreen_raw).expanduser().absolute()
            if miniscreen_raw
            else run_as.home / "Desktop" / "Projects" / "Further"
        ),
        advertise=_flag(env, "FURTHER_LINK_ADVERTISE") if "FURTHER_LINK_ADVERTISE" in env else True,
        device_name=env.get("FURTHER_LINK_DEVICE_NAME", "").strip(),
        teacher_keys=read_teacher_keys(config_dir),
        keep_alive=_number(env, "FURTHER_LINK_KEEP_ALIVE", 0.0, float),
        max_keep_alive=_number(env, "FURTHER_LINK_MAX_KEEP_ALIVE", 3600.0, float),
        max_detached_runs=_number(env, "FURTHER_LINK_MAX_DETACHED_RUNS", 16),
        kept_output_bytes=_size(env, "FURTHER_LINK_KEPT_OUTPUT_BYTES", 1 * MiB),
        exclusive=_flag(env, "FURTHER_LINK_EXCLUSIVE"),
    )
    config = config.with_overrides(**overrides)
    if not 0 <= config.port <= 65535:
        raise ConfigError(f"port {config.port} is not a port number (0 to 65535)")
    if config.containment not in CONTAINMENT_MODES:
        raise ConfigError(
            f"FURTHER_LINK_CONTAINMENT={config.containment!r}: use one of "
            + ", ".join(CONTAINMENT_MODES)
        )
    if not 0 <= config.cpu_weight <= 10000:
        raise ConfigError(f"FURTHER_LINK_CPU_WEIGHT={config.cpu_weight} is not in 1..10000")
    if any(ch in config.host for ch in "\r\n\0 "):
        raise ConfigError(f"host {config.host!r} is not an address")
    return config
