"""Which account programs run as when root starts the server, as a person would expect.

Each branch of the choice is tested on a made-up system (passwd, login.defs
and desktop files under a temporary directory); the branches that read or
create real accounts are tested with real throw-away accounts (as root),
removed afterwards. Other suites run at the same time on this machine, so no
test writes /etc or depends on which real accounts exist besides its own.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Callable

import aiohttp
import pytest

from further_link.config import load_config, resolve_run_as
from further_link.errors import ConfigError
from further_link.system.accounts import SYSTEM_ACCOUNT, AccountBook, Choice, choose_account

from conftest import AS_ROOT, Client, RunningServer, read_startup, run_py_stdout

needs_root = pytest.mark.skipif(not AS_ROOT, reason="creates real accounts: root only")


class FakeSystem:
    """A system's /etc under a temporary directory, with homes that really exist."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "etc").mkdir(parents=True)
        self.lines = [
            "root:x:0:0:root:/root:/bin/bash",
            "daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin",
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin",
        ]
        self.write("etc/login.defs", "UID_MIN\t\t\t 1000\nUID_MAX\t\t\t60000\n")

    def add(self, name: str, uid: int, shell: str = "/bin/bash", home: bool = True) -> Path:
        home_dir = self.root / "home" / name
        if home:
            home_dir.mkdir(parents=True)
        self.lines.append(f"{name}:x:{uid}:{uid}::{home_dir}:{shell}")
        return home_dir

    def write(self, relative: str, text: str) -> None:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def book(self) -> AccountBook:
        self.write("etc/passwd", "\n".join(self.lines) + "\n")
        return AccountBook(self.root, self.root / "etc" / "passwd")

    def choose(self) -> Choice:
        """The account this system's files make further-link choose."""
        return choose_account(self.book())


@pytest.fixture
def system(tmp_path: Path) -> FakeSystem:
    return FakeSystem(tmp_path / "sys")


def test_pi_is_chosen_when_it_exists(system: FakeSystem) -> None:
    system.add("alice", 1000)
    system.add("pi", 1001)
    system.write("etc/lightdm/lightdm.conf", "[Seat:*]\nautologin-user=alice\n")
    choice = system.choose()
    assert choice.account.name == "pi"
    assert choice.reason == "the 'pi' account exists"


def test_lightdm_autologin_user_is_chosen_and_drop_ins_override(system: FakeSystem) -> None:
    system.add("alice", 1000)
    system.add("bob", 1001)
    system.add("carol", 1002)
    system.write(
        "etc/lightdm/lightdm.conf", "[Seat:*]\n#autologin-user=alice\nautologin-user=bob\n"
    )
    system.write("etc/lightdm/lightdm.conf.d/50-auto.conf", "[Seat:*]\nautologin-user=carol\n")
    choice = system.choose()
    assert choice.account.name == "carol"
    assert "/etc/lightdm/lightdm.conf.d/50-auto.conf" in choice.reason


def test_gdm_automatic_login_counts_only_when_enabled(system: FakeSystem) -> None:
    system.add("alice", 1000)
    system.add("dave", 1005)
    system.write(
        "etc/gdm3/daemon.conf", "[daemon]\nAutomaticLoginEnable=false\nAutomaticLogin=dave\n"
    )
    assert system.choose().account.name == "alice"
    system.write(
        "etc/gdm3/daemon.conf", "[daemon]\nAutomaticLoginEnable = True\nAutomaticLogin = dave\n"
    )
    choice = system.choose()
    assert choice.account.name == "dave"
    assert "/etc/gdm3/daemon.conf" in choice.reason


def test_raspi_config_console_autologin_is_chosen(system: FakeSystem) -> None:
    system.add("alice", 1000)
    system.add("erin", 1003)
    system.write(
        "etc/systemd/system/getty@tty1.service.d/autologin.conf",
        "[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin erin --noclear %I $TERM\n",
    )
    assert system.choose().account.name == "erin"


def test_autologin_as_root_or_a_missing_account_is_ignored(system: FakeSystem) -> None:
    system.add("alice", 1000)
    system.write("etc/lightdm/lightdm.conf", "[Seat:*]\nautologin-user=root\n")
    system.write(
        "etc/gdm3/custom.conf", "[daemon]\nAutomaticLoginEnable=true\nAutomaticLogin=zed\n"
    )
    assert system.choose().account.name == "alice"


def test_first_regular_account_is_the_lowest_uid_with_a_login_shell_and_a_home(
    system: FakeSystem,
) -> None:
    system.write("etc/login.defs", "# people\nUID_MIN 1500\nUID_MAX 3000\n")
    system.add("service", 1400)  # below UID_MIN
    system.add("locked", 1500, shell="/usr/sbin/nologin")
    system.add("blocked", 1501, shell="/bin/false")
    system.add("homeless", 1502, home=False)
    system.add("frank", 1600)
    system.add("gina", 1503)
    system.add("huge", 3001)  # above UID_MAX
    choice = system.choose()
    assert choice.account.name == "gina"
    assert choice.account.uid == 1503
    assert "first regular account (lowest uid in 1500..3000" in choice.reason


def test_the_configured_user_wins_and_root_is_refused(system: FakeSystem) -> None:
    system.add("pi", 1000)
    system.add("ivy", 1001)
    book = system.book()
    run_as = resolve_run_as("ivy", euid=0, book=book)
    assert (run_as.name, run_as.uid, run_as.drop) == ("ivy", 1001, True)
    assert "FURTHER_LINK_USER" in run_as.reason
    with pytest.raises(ConfigError, match="programs never run as root"):
        resolve_run_as("root", euid=0, book=book)


def test_a_home_that_does_not_exist_is_never_created(tmp_path: Path) -> None:
    """Root running programs as `nobody` (home /nonexistent) refuses with the fix."""
    env = {"HOME": str(tmp_path), "FURTHER_LINK_USER": "nobody"}
    if not AS_ROOT:
        env = {"HOME": str(tmp_path)}
        me = pwd.getpwuid(os.getuid())
        if Path(me.pw_dir).is_dir():
            pytest.skip("needs root or a user without a home")  # pragma: no cover
    assert not Path("/nonexistent").exists()
    with pytest.raises(ConfigError, match=r"home /nonexistent does not exist: set FURTHER_LINK_"):
        load_config(environ=env)
    config = load_config(environ={**env, "FURTHER_LINK_WORK_DIR": str(tmp_path / "w")})
    assert config.work_dir == tmp_path / "w"
    assert not Path("/nonexistent").exists()


# Real accounts, as root.


@pytest.fixture
def real_account(sandbox: Path) -> Iterator[Callable[..., pwd.struct_passwd]]:
    """Factory: a real throw-away account (unique name, home under the sandbox)."""
    made: list[str] = []

    def make(system: bool = False, **_: object) -> pwd.struct_passwd:
        name = f"fl-{uuid.uuid4().hex[:10]}"
        home = sandbox / f"home-{name}"
        command = ["useradd", "--user-group", "--create-home", "--home-dir", str(home)]
        command += (
            ["--system", "--shell", "/usr/sbin/nologin"] if system else ["--shell", "/bin/sh"]
        )
        subprocess.run([*command, name], check=True, timeout=60, capture_output=True)
        made.append(name)
        home.parent.chmod(0o755)
        return pwd.getpwnam(name)

    yield make
    for name in made:
        remove_account(name)


def remove_account(name: str) -> None:
    subprocess.run(["userdel", "--remove", name], timeout=60, capture_output=True)
    subprocess.run(["groupdel", name], timeout=60, capture_output=True)
    with pytest.raises(KeyError):
        pwd.getpwnam(name)


def only_uid(root: Path, uid: int) -> AccountBook:
    """The real account database, with login.defs' range narrowed to one uid."""
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "login.defs").write_text(f"UID_MIN {uid}\nUID_MAX {uid}\n")
    return AccountBook(root)


@needs_root
async def test_real_regular_account_is_chosen_and_runs_the_program(
    real_account: Callable[..., pwd.struct_passwd],
    start_server: Callable[..., Awaitable[RunningServer]],
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    person = real_account()
    assert person.pw_uid >= 1000
    run_as = resolve_run_as(None, euid=0, book=only_uid(tmp_path / "sys", person.pw_uid))
    assert (run_as.name, run_as.uid, run_as.drop) == (person.pw_name, person.pw_uid, True)
    assert "first regular account" in run_as.reason
    # The real server, dropped to that account, runs the program as it.
    server = await start_server(
        environ={"FURTHER_LINK_USER": run_as.name}, work_dir=str(run_as.home / "further")
    )
    async with http.ws_connect(server.ws_url()) as ws:
        result = await Client(ws).run({"sourceScript": "import os\nprint('hi', os.getuid())"})
    assert result.stdout == f"hi {person.pw_uid}\n", result.stderr
    assert (run_as.home / "further").stat().st_uid == person.pw_uid


@needs_root
def test_real_lightdm_autologin_account_is_chosen(
    real_account: Callable[..., pwd.struct_passwd], tmp_path: Path
) -> None:
    person = real_account()
    book = only_uid(tmp_path / "sys", 59999)
    conf = tmp_path / "sys" / "etc" / "lightdm" / "lightdm.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text(f"[Seat:*]\nautologin-user={person.pw_name}\n")
    run_as = resolve_run_as(None, euid=0, book=book)
    assert (run_as.name, run_as.uid, run_as.home) == (
        person.pw_name,
        person.pw_uid,
        Path(person.pw_dir),
    )
    assert "/etc/lightdm/lightdm.conf" in run_as.reason


@needs_root
async def test_dedicated_system_account_is_created_when_nothing_else_fits(
    sandbox: Path,
    tmp_path: Path,
    start_server: Callable[..., Awaitable[RunningServer]],
    http: aiohttp.ClientSession,
) -> None:
    if pwd.getpwall() and any(e.pw_name == "pi" for e in pwd.getpwall()):
        pytest.skip("this machine has a 'pi' account, which comes first")  # pragma: no cover
    name = f"fl-sys-{uuid.uuid4().hex[:8]}"
    home = sandbox / "system-home"
    book = only_uid(tmp_path / "sys", 59999)  # no regular account in range
    server: RunningServer | None = None
    try:
        choice = choose_account(book, system_account=name, system_home=home)
        entry = pwd.getpwnam(name)
        assert choice.account.name == name and choice.account.uid == entry.pw_uid != 0
        assert "created it" in choice.reason
        assert entry.pw_uid < 1000  # a system account, not a person's
        assert entry.pw_shell.endswith("nologin")
        assert home.is_dir() and home.stat().st_uid == entry.pw_uid
        again = choose_account(book, system_account=name, system_home=home)
        assert again.account == choice.account and "created" not in again.reason
        server = await start_server(
            environ={"FURTHER_LINK_USER": name}, work_dir=str(home / "further")
        )
        async with http.ws_connect(server.ws_url()) as ws:
            result = await Client(ws).run({"sourceScript": "import os\nprint(os.getuid())"})
        assert result.stdout == f"{entry.pw_uid}\n", result.stderr
    finally:
        if server is not None:
            await server.stop()  # it and its warm interpreters run as the account
        remove_account(name)


@needs_root
async def test_root_started_command_without_settings_serves_as_an_unprivileged_account(
    sandbox: Path,
) -> None:
    """`further-link` as root with no FURTHER_LINK_USER: the machine's own choice, never root."""
    dedicated_existed = any(e.pw_name == SYSTEM_ACCOUNT for e in pwd.getpwall())
    # The server drops to the account before making its work dir: give it one of its own.
    expected = resolve_run_as(None, euid=0)
    own = sandbox / "own"
    own.mkdir()
    os.chown(own, expected.uid, expected.gid)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FURTHER_LINK_")}
    env.update(
        XDG_CONFIG_HOME=str(sandbox / "config"),
        FURTHER_LINK_WORK_DIR=str(own / "w"),
        FURTHER_LINK_PYTHON="/usr/bin/python3",
        FURTHER_LINK_NOSSL="1",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "further_link", "--host", "127.0.0.1", "--port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        startup = read_startup(proc.stdout)
        entry = pwd.getpwnam(startup.account)
        assert entry.pw_uid != 0 and startup.account == expected.name
        token = (sandbox / "config" / "further-link" / "token").read_text().strip()
        url = f"ws://127.0.0.1:{startup.port}/run-py?token={token}"
        async with aiohttp.ClientSession() as http:
            out = await run_py_stdout(http, url, "import os\nprint('hi', os.getuid())")
        assert out == f"hi {entry.pw_uid}\n"
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
        if not dedicated_existed and any(e.pw_name == SYSTEM_ACCOUNT for e in pwd.getpwall()):
            remove_account(SYSTEM_ACCOUNT)  # made for this test on a machine with no person
