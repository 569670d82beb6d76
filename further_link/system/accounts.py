"""Which account a root-started server runs programs as, found as a person would expect.

The rule, first match wins (``choose_account``):

1. ``pi``, when it exists (pi-top OS, Raspberry Pi OS before 2022);
2. the desktop's auto-login account (lightdm ``autologin-user=``, gdm
   ``AutomaticLogin=``, or raspi-config's console auto-login);
3. the first regular account: the lowest uid in ``UID_MIN..UID_MAX`` of
   /etc/login.defs with a login shell and an existing home, which is the
   account Raspberry Pi OS's first-boot wizard creates;
4. the dedicated system account ``further-link`` (created when missing,
   home /var/lib/further-link, no login shell).

Root is never chosen. The facts come from an ``AccountBook``: the running
system's, or (in tests) files under another directory.
"""

from __future__ import annotations

import configparser
import logging
import pwd
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from further_link.errors import ConfigError

log = logging.getLogger(__name__)

LEGACY_USER = "pi"
SYSTEM_ACCOUNT = "further-link"
SYSTEM_ACCOUNT_HOME = Path("/var/lib/further-link")
NO_LOGIN_SHELLS = ("nologin", "false")
ACCOUNT_TOOL_TIMEOUT = 60

# Where desktops keep their auto-login account, relative to the system root.
LIGHTDM_FILES = ("etc/lightdm/lightdm.conf", "etc/lightdm/lightdm.conf.d/*.conf")
GDM_FILES = ("etc/gdm3/daemon.conf", "etc/gdm3/custom.conf", "etc/gdm/custom.conf")
# raspi-config's "console autologin" is an agetty drop-in for tty1.
GETTY_FILES = ("etc/systemd/system/getty@tty1.service.d/*.conf",)


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: Path
    shell: str

    @property
    def has_login_shell(self) -> bool:
        return not self.shell.rstrip("/").endswith(NO_LOGIN_SHELLS)


@dataclass(frozen=True)
class Choice:
    """The chosen account and the reason, in words for the start-up log."""

    account: Account
    reason: str


class AccountBook:
    """The accounts and desktop settings of a system.

    ``root`` is where /etc is read from; ``passwd`` is a passwd(5) file to read
    the accounts from, or ``None`` for the system's account database (NSS).
    """

    def __init__(self, root: Path = Path("/"), passwd: Path | None = None) -> None:
        self.root = root
        self.passwd = passwd

    def accounts(self) -> list[Account]:
        if self.passwd is None:
            return [
                Account(e.pw_name, e.pw_uid, e.pw_gid, Path(e.pw_dir), e.pw_shell)
                for e in pwd.getpwall()
            ]
        found = []
        for line in self.passwd.read_text(encoding="utf-8").splitlines():
            fields = line.split(":")
            if len(fields) == 7 and fields[2].isdigit() and fields[3].isdigit():
                found.append(
                    Account(fields[0], int(fields[2]), int(fields[3]), Path(fields[5]), fields[6])
                )
        return found

    def find(self, name: str) -> Account | None:
        if self.passwd is None:
            try:
                e = pwd.getpwnam(name)
            except KeyError:
                return None
            return Account(e.pw_name, e.pw_uid, e.pw_gid, Path(e.pw_dir), e.pw_shell)
        return next((a for a in self.accounts() if a.name == name), None)

    def files(self, patterns: tuple[str, ...]) -> list[Path]:
        """Existing files matching the patterns, in the order the tools read them."""
        found: list[Path] = []
        for pattern in patterns:
            found += sorted(p for p in self.root.glob(pattern) if p.is_file())
        return found

    def uid_range(self) -> tuple[int, int]:
        """UID_MIN and UID_MAX of login.defs(5): the uids of people's accounts."""
        limits = {"UID_MIN": 1000, "UID_MAX": 60000}
        path = self.root / "etc/login.defs"
        text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
        for line in text.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] in limits and words[1].isdigit():
                limits[words[0]] = int(words[1])
        return limits["UID_MIN"], limits["UID_MAX"]


def _last_setting(files: list[Path], pattern: str) -> tuple[str, Path] | None:
    """The value the last of ``files`` gives (later files override), with its file."""
    found = None
    regex = re.compile(pattern, re.MULTILINE)
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in regex.finditer(text):
            found = (match.group(1).strip(), path)
    return found


def _gdm_autologin(book: AccountBook) -> tuple[str, Path] | None:
    found = None
    for path in book.files(GDM_FILES):
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        try:
            parser.read_string(path.read_text(encoding="utf-8", errors="replace"))
        except configparser.Error:
            log.warning("cannot read %s: not an ini file; its auto-login is ignored", path)
            continue
        if not parser.has_section("daemon"):
            continue
        enabled = parser.get("daemon", "AutomaticLoginEnable", fallback="false")
        name = parser.get("daemon", "AutomaticLogin", fallback="").strip()
        if enabled.strip().lower() == "true" and name:
            found = (name, path)
    return found


def autologin_account(book: AccountBook) -> tuple[Account, str] | None:
    """The account the desktop (or console) logs in as by itself, with where that is set."""
    candidates = (
        _last_setting(book.files(LIGHTDM_FILES), r"^[ \t]*autologin-user[ \t]*=[ \t]*(\S+)"),
        _gdm_autologin(book),
        _last_setting(book.files(GETTY_FILES), r"^[ \t]*ExecStart=.*--autologin[ \t]+(\S+)"),
    )
    for candidate in candidates:
        if candidate is None:
            continue
        name, path = candidate
        account = book.find(name)
        if account is None or account.uid == 0:
            log.warning("%s logs in automatically as %r, which is not usable here", path, name)
            continue
        return account, str(Path("/") / path.relative_to(book.root))
    return None


def first_regular_account(book: AccountBook) -> Account | None:
    """The lowest-uid person's account: uid in UID_MIN..UID_MAX, login shell, home present."""
    low, high = book.uid_range()
    people = [
        a for a in book.accounts() if low <= a.uid <= high and a.has_login_shell and a.home.is_dir()
    ]
    return min(people, key=lambda a: a.uid, default=None)


def choose_account(
    book: AccountBook | None = None,
    system_account: str = SYSTEM_ACCOUNT,
    system_home: Path = SYSTEM_ACCOUNT_HOME,
) -> Choice:
    """Pick the account programs run as when the server was started as root.

    Creates ``system_account`` (home ``system_home``) when nothing else fits.
    Raises ConfigError when that account cannot be created.
    """
    book = book or AccountBook()
    legacy = book.find(LEGACY_USER)
    if legacy is not None and legacy.uid != 0:
        return Choice(legacy, f"the {LEGACY_USER!r} account exists")
    auto = autologin_account(book)
    if auto is not None:
        return Choice(auto[0], f"the desktop logs in automatically as it ({auto[1]})")
    low, high = book.uid_range()
    person = first_regular_account(book)
    if person is not None:
        return Choice(
            person,
            f"it is the first regular account (lowest uid in {low}..{high} with a login shell)",
        )
    account = book.find(system_account)
    if account is None:
        create_system_account(system_account, system_home)
        account = book.find(system_account)
        if account is None:
            raise ConfigError(f"created the account {system_account!r} but cannot find it")
        why = "created it: there is no 'pi', auto-login or regular account"
    else:
        why = "there is no 'pi', auto-login or regular account"
    if account.uid == 0:
        raise ConfigError(f"programs never run as root, and user {system_account!r} is root")
    return Choice(account, f"the dedicated system account ({why})")


def create_system_account(name: str, home: Path) -> None:
    """A system account and group ``name`` with home ``home`` and no login shell.

    Raises ConfigError (with the command to run by hand) when it cannot be made.
    """
    if shutil.which("adduser"):
        command = ["adduser", "--system", "--group", "--home", str(home), "--quiet", name]
    else:
        command = ["useradd", "--system", "--user-group", "--create-home", "--home-dir"]
        command += [str(home), "--shell", "/usr/sbin/nologin", name]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=ACCOUNT_TOOL_TIMEOUT
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        failure: str | None = str(exc)
    else:
        ok = result.returncode == 0
        failure = None if ok else result.stderr.strip() or f"exit code {result.returncode}"
    if failure is not None:
        raise ConfigError(
            f"no account to run programs as, and creating {name!r} failed ({failure}): "
            "create an unprivileged account and set FURTHER_LINK_USER (or --user) to it"
        )
    log.info("created the system account %r (home %s) to run programs as", name, home)
