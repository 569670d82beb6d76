"""``further-link install-service``: start the server at boot under systemd.

The unit starts the server as root on purpose, so that the device token and
TLS key stay in a root-only config dir: the server reads them, binds its
sockets, hands its cgroup subtree (``Delegate=yes``) to the program user
(``--user``, else the account config.resolve_run_as chooses), then drops to
that user for good before serving (privsep.py). The bounding set keeps only
what that short root phase needs; ``NoNewPrivileges`` only stops gaining
privileges through ``exec`` (setuid binaries such as ``sudo``), never giving
them up. Programs keep their camera, GPIO, I2C, ``/sys``, X display and home
directory.

Since the unit runs an interpreter as root, install-service refuses one that
anyone but root could change (a user's virtualenv, anything under /tmp, an
editable checkout): whoever can write it could run code as root at the next
start. tests/test_service.py starts a real server under the unit's bounding
set with no_new_privs and checks it drops and still runs programs.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from further_link.config import resolve_run_as
from further_link.errors import ConfigError, ServiceError

SERVICE = "further-link"
UNIT_PATH = Path("etc/systemd/system") / f"{SERVICE}.service"
DEFAULTS_FILE = "/etc/default/further-link"
SYSTEMCTL_TIMEOUT = 120

# Capabilities the server's root phase uses before it drops to the program user
# (after the drop it has none); every other one is gone for it and its programs.
CAPABILITIES = (
    "CAP_SETUID CAP_SETGID",  # drop to the program user and its groups, for good
    "CAP_CHOWN",  # hand the delegated cgroup subtree to that user
    "CAP_NET_BIND_SERVICE",  # a port below 1024, if configured
)

HARDENING = """\
# Started as root so the token and TLS key stay root-only; the server drops to
# the program user before serving. NoNewPrivileges does not stop that (it only
# blocks gaining privileges through exec, e.g. sudo in a learner's program).
NoNewPrivileges=yes
CapabilityBoundingSet={capabilities}
# The server makes one cgroup per run in its own subtree.
Delegate=yes
ProtectSystem=full
ProtectKernelModules=yes
ProtectKernelLogs=yes
LockPersonality=yes
RestrictSUIDSGID=yes
# Not set on purpose: ProtectControlGroups (it would make the delegated subtree
# read-only), PrivateDevices, PrivateTmp, ProtectHome, ProtectKernelTunables,
# ProtectClock. Programs use the camera, GPIO and I2C devices, /sys, the X
# display's socket in /tmp and their user's home directory.
"""


def server_command() -> list[str]:
    """This installation's server: the interpreter running now, so a venv stays a venv."""
    return [os.path.abspath(sys.executable), "-m", "further_link", "serve"]


@dataclass(frozen=True)
class Installation:
    """What the unit would run as root: the interpreter and everything it imports from."""

    executable: Path  # as the unit names it (a venv's bin/python, not its target)
    prefixes: tuple[Path, ...]  # sys.prefix, sys.exec_prefix, sys.base_prefix
    import_paths: tuple[Path, ...]  # sys.path entries that exist
    package_dir: Path  # further_link itself
    editable: bool  # a development checkout (pip install -e, or not installed at all)


def this_installation() -> Installation:
    """The installation running now, which install-service would write into the unit."""
    prefixes = {Path(p) for p in (sys.prefix, sys.exec_prefix, sys.base_prefix)}
    imports = [Path(p).absolute() for p in sys.path if p and os.path.exists(p)]
    return Installation(
        executable=Path(os.path.abspath(sys.executable)),
        prefixes=tuple(sorted(prefixes)),
        import_paths=tuple(dict.fromkeys(imports)),
        package_dir=Path(__file__).resolve().parent.parent,
        editable=_is_editable(),
    )


def _is_editable() -> bool:
    """Whether this further_link is a source tree (pip install -e, or not installed at all).

    An installed copy lives in a site-packages (dist-packages on Debian) directory.
    """
    return Path(__file__).resolve().parent.parent.parent.name not in (
        "site-packages",
        "dist-packages",
    )


def _owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def _path_problem(path: Path) -> str | None:
    """Why someone other than root could change ``path`` itself, or None."""
    try:
        info = os.lstat(path)
    except OSError as exc:
        return f"{path} cannot be checked: {exc.strerror}"
    if info.st_uid != 0:
        return f"{path} belongs to {_owner_name(info.st_uid)}, not root"
    if stat.S_ISLNK(info.st_mode):
        return None  # a link's own bits mean nothing; its directory and target are checked
    if info.st_mode & stat.S_IWOTH:
        kind = "a world-writable directory (like /tmp)" if stat.S_ISDIR(info.st_mode) else ""
        return f"{path} is {kind or 'writable by anyone'}"
    if info.st_mode & stat.S_IWGRP and info.st_gid != 0:
        return f"{path} is writable by group {_group_name(info.st_gid)}"
    return None


def _with_ancestors(path: Path) -> Iterable[Path]:
    """``path``, every directory above it, and the same for where its links lead."""
    absolute = Path(os.path.abspath(path))
    yield absolute
    yield from absolute.parents
    real = Path(os.path.realpath(absolute))
    if real != absolute:
        yield real
        yield from real.parents


def installation_problems(installation: Installation) -> list[str]:
    """Every reason the unit must not run ``installation`` as root ([] when it may).

    A path is safe when it, every directory above it and every file Python
    reads at start-up there (``.pth``) belong to root and only root can write them.
    """
    problems: list[str] = []
    if installation.editable:
        problems.append(
            f"further-link runs from a development checkout ({installation.package_dir}), "
            "whose files are edited in place"
        )
    roots = [
        installation.executable,
        *installation.prefixes,
        *installation.import_paths,
        installation.package_dir,
    ]
    checked: set[Path] = set()
    for root in roots:
        for path in _with_ancestors(root):
            if path in checked:
                continue
            checked.add(path)
            problem = _path_problem(path)
            if problem is not None:
                problems.append(problem)
    for directory in installation.import_paths:
        if directory.is_dir():
            for pth in sorted(directory.glob("*.pth")):
                if pth not in checked:
                    checked.add(pth)
                    problem = _path_problem(pth)
                    if problem is not None:
                        problems.append(problem)
    return problems


def check_installation(installation: Installation) -> None:
    """Raise ServiceError, with the reasons and the fix, if root must not run this installation."""
    problems = installation_problems(installation)
    if not problems:
        return
    shown = "\n  - ".join(problems[:10])
    more = f"\n  - ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    raise ServiceError(
        f"will not start {installation.executable} as root at boot: someone other than root "
        f"could change what it runs, and so run code as root:\n  - {shown}{more}\n"
        "Fix: install further-link where only root can write, e.g.\n"
        "  sudo python3 -m venv /opt/further-link\n"
        "  sudo /opt/further-link/bin/pip install further-link\n"
        "  sudo /opt/further-link/bin/further-link install-service\n"
        "or give --force to install it anyway (whoever can write these paths can then "
        "become root)."
    )


def quote_exec_word(word: str) -> str:
    """One ExecStart= argument, safe from systemd's ``%`` specifiers and ``$`` expansion."""
    escaped = word.replace("%", "%%").replace("$", "$$")
    if escaped and not any(c in escaped for c in " \t\"'\\;"):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_assignment(name: str, value: str) -> str:
    """``"NAME=value"`` for Environment=, quoted so spaces and quotes survive."""
    text = f"{name}={value}".replace("%", "%%").replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def render_unit(command: Sequence[str], environment: Mapping[str, str]) -> str:
    exec_start = " ".join(quote_exec_word(word) for word in command)
    env_lines = "".join(
        f"Environment={quote_assignment(name, value)}\n" for name, value in environment.items()
    )
    hardening = HARDENING.format(capabilities=" ".join(CAPABILITIES))
    return (
        "# Written by `further-link install-service`; "
        "`further-link install-service --uninstall` removes it.\n"
        f"# More FURTHER_LINK_* settings (see the README) can go in {DEFAULTS_FILE}.\n"
        "[Unit]\n"
        "Description=further-link: run learners' Python programs from a browser\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n"
        "\n"
        "[Service]\n"
        "Type=simple\n"
        f"ExecStart={exec_start}\n"
        f"{env_lines}"
        f"EnvironmentFile=-{DEFAULTS_FILE}\n"
        "# Also after a program (same account as the server) kills it.\n"
        "Restart=always\n"
        "RestartSec=2\n"
        "# SIGTERM goes to the server alone: it ends every run's processes itself;\n"
        "# whatever is left after TimeoutStopSec is killed.\n"
        "KillMode=mixed\n"
        "TimeoutStopSec=20\n"
        "StandardOutput=journal\n"
        "StandardError=journal\n"
        f"SyslogIdentifier={SERVICE}\n"
        f"{hardening}"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def environment_from(args: argparse.Namespace) -> dict[str, str]:
    """The FURTHER_LINK_* settings the given flags ask for."""
    environment: dict[str, str] = {}
    if args.user:
        environment["FURTHER_LINK_USER"] = args.user
    if args.host:
        environment["FURTHER_LINK_HOST"] = args.host
    if args.port is not None:
        environment["FURTHER_LINK_PORT"] = str(args.port)
    if args.work_dir:
        environment["FURTHER_LINK_WORK_DIR"] = os.path.abspath(os.path.expanduser(args.work_dir))
    if args.no_ssl:
        environment["FURTHER_LINK_NOSSL"] = "1"
    if args.port is not None and not 0 <= args.port <= 65535:
        raise ServiceError(f"--port {args.port} is not a port number (0 to 65535)")
    for name, value in environment.items():
        if any(ch in value for ch in "\r\n\0") or value != value.strip():
            raise ServiceError(f"{name}={value!r} cannot go in a systemd unit")
    return environment


def systemd_is_running() -> bool:
    """As sd_booted(3) decides it, and with systemctl there to talk to it."""
    return shutil.which("systemctl") is not None and Path("/run/systemd/system").is_dir()


def systemctl(*arguments: str) -> None:
    try:
        result = subprocess.run(
            ["systemctl", *arguments], capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServiceError(f"systemctl {' '.join(arguments)} failed: {exc}") from None
    if result.returncode != 0:
        detail = result.stderr.strip() or f"exit code {result.returncode}"
        raise ServiceError(f"systemctl {' '.join(arguments)} failed: {detail}")


class ServiceInstaller:
    """Writes or removes the unit under ``root`` and, on a live system, tells systemd."""

    def __init__(
        self,
        root: Path | None,
        say: Callable[[str], None],
        euid: int | None = None,
        manage: bool | None = None,
    ) -> None:
        euid = os.geteuid() if euid is None else euid
        if root is None and euid != 0:
            raise ServiceError(
                f"install-service must run as root: it writes /{UNIT_PATH} and the server "
                "must be root to run programs as the program user; run it with sudo "
                "(or give --root DIR to write the unit under DIR)"
            )
        self.unit_path = (root or Path("/")) / UNIT_PATH
        self._say = say
        self._root = root
        self._manage = root is None and (systemd_is_running() if manage is None else manage)

    def install(self, unit: str) -> None:
        existed = self.unit_path.exists()
        self.unit_path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.unit_path.with_name(self.unit_path.name + ".partial")
        partial.write_text(unit, encoding="utf-8")
        partial.chmod(0o644)
        os.replace(partial, self.unit_path)
        self._say(f"{'updated' if existed else 'wrote'} {self.unit_path}")
        if not self._manage:
            self._explain_skip(f"systemctl daemon-reload && systemctl enable --now {SERVICE}")
            return
        systemctl("daemon-reload")
        systemctl("enable", "--now", SERVICE)
        if existed:
            systemctl("restart", SERVICE)
        self._say(
            f"{SERVICE} is enabled and {'restarted' if existed else 'running'}; it starts at "
            f"every boot. Its log, with the pairing code: journalctl -u {SERVICE} -f"
        )

    def uninstall(self) -> None:
        if not self.unit_path.exists():
            self._say(f"not installed: there is no {self.unit_path}")
            return
        if self._manage:
            systemctl("disable", "--now", SERVICE)
        self.unit_path.unlink()
        self._say(f"removed {self.unit_path}")
        if self._manage:
            systemctl("daemon-reload")
            self._say(f"{SERVICE} is stopped and no longer starts at boot")
        else:
            self._explain_skip(f"systemctl disable --now {SERVICE}; systemctl daemon-reload")

    def _explain_skip(self, commands: str) -> None:
        why = "--root was given" if self._root is not None else "systemd is not running here"
        self._say(f"{why}, so systemctl was not run; on the target system run: {commands}")


def add_service_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``install-service`` with the ``further-link`` command."""
    parser = commands.add_parser(
        "install-service",
        help="start the server at boot (systemd; run as root)",
        description=f"Write /{UNIT_PATH}, which starts this further-link at boot, "
        "then enable and start it. Settings given here become Environment= lines; "
        f"others can go in {DEFAULTS_FILE}.",
    )
    parser.add_argument("--uninstall", action="store_true", help="stop, disable and remove it")
    parser.add_argument(
        "--root", metavar="DIR", help="write the unit under DIR and leave systemd alone"
    )
    parser.add_argument(
        "--user",
        help="account programs run as (default: pi, the auto-login account, the first "
        "regular account, else the system account further-link)",
    )
    parser.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port (default 8028)")
    parser.add_argument("--work-dir", help="where uploads go (default ~USER/further)")
    parser.add_argument("--no-ssl", action="store_true", help="serve plain HTTP")
    parser.add_argument(
        "--force",
        action="store_true",
        help="install even when someone other than root can change this installation",
    )
    parser.set_defaults(handler=_install_service_command)


def _install_service_command(args: argparse.Namespace) -> int:
    def say(message: str) -> None:
        print(f"further-link: {message}", flush=True)

    try:
        installer = ServiceInstaller(Path(args.root).absolute() if args.root else None, say)
        if args.uninstall:
            installer.uninstall()
            return 0
        try:
            resolve_run_as(args.user, euid=0)
        except ConfigError as exc:
            raise ServiceError(f"{exc.message} (give --user ACCOUNT)") from None
        if not args.force:
            check_installation(this_installation())
        installer.install(render_unit(server_command(), environment_from(args)))
    except ServiceError as exc:
        print(f"further-link: {exc.message}", file=sys.stderr)
        return 1
    return 0
