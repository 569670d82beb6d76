"""What exactly to start for a v5 ``/run`` ``start``: runner, file, directory, environment.

The runners are upstream's: ``python3`` (``code`` into a temporary script in
``path``, or the script at ``path``), ``exec`` (``code`` with a shebang, or the
executable at ``path``) and ``shell`` (the program user's login shell in
``path``). Relative paths are under the work dir; without ``path`` the temp
dir (``FURTHER_LINK_TEMP_DIR``, default ``/tmp``) is used.

The server runs as the program user (privsep.py), so it can make nothing a
program could not. Directories are made level by level through directory
descriptors and scripts created afresh (``O_EXCL | O_NOFOLLOW``), so errors
name the level that failed. A user's own file is never chmod-ed.
"""

from __future__ import annotations

import logging
import os
import pwd
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from further_link.config import Config, RunAs
from further_link.errors import StartError
from further_link.files.paths import describe_kind
from further_link.files.project import ScriptFile, write_script
from further_link.protocol.run import RunStart
from further_link.runs.launch import program_env
from further_link.runs.process import ProgramSpec

log = logging.getLogger(__name__)

TERM = "xterm-256color"
FALLBACK_SHELL = "/bin/sh"
# Upstream names temporary scripts <N>.py / exec-<N> with N from 100 to 999.
SCRIPT_NUMBERS = range(100, 1000)
SCRIPT_NAME_TRIES = 50


@dataclass
class PlannedRun:
    spec: ProgramSpec
    script: ScriptFile | None = None  # owned by the caller: remove it when the run ends


def plan_run(command: RunStart, config: Config, library_dir: Path, run_dir: Path) -> PlannedRun:
    """Prepare files and build the spec; raises ``StartError`` naming what is wrong."""
    run_as = config.run_as
    account = _account(run_as)
    shell = login_shell(account)
    target = resolve_path(config, command.path)
    script: ScriptFile | None = None
    if command.runner == "shell":
        close_dir(open_directory(target, create=True))
        cwd, argv = target, [shell]
    elif command.code is not None:
        directory = open_directory(target, create=True)
        python = command.runner == "python3"
        prefix, suffix, mode = ("", ".py", 0o644) if python else ("exec-", "", 0o700)
        names = _numbered(prefix, suffix)
        script = write_script(directory, target, names, command.code, mode, repr(str(target)))
        cwd = target
        argv = [str(script.path)]
    else:
        if command.path is None:
            raise StartError(f"start with runner {command.runner} needs data.code or data.path")
        _check_entrypoint(target, command.runner)
        cwd, argv = target.parent, [str(target)]
    env = program_env(config, library_dir, run_dir, import_dir=None)
    env.update(
        TERM=TERM,
        USER=account.pw_name,
        LOGNAME=account.pw_name,
        HOME=account.pw_dir,
        SHELL=shell,
        PWD=str(cwd),
    )
    runtime_dir = Path(f"/run/user/{account.pw_uid}")
    if runtime_dir.is_dir():
        env["XDG_RUNTIME_DIR"] = str(runtime_dir)
    if command.runner == "python3":
        argv = [_python(config, env), "-u", *argv]
    return PlannedRun(ProgramSpec(argv=argv, cwd=cwd, env=env), script)


def resolve_path(config: Config, raw: str | None) -> Path:
    """``path`` as a normalised absolute path: relative ones are under the work dir."""
    if raw is None:
        return config.temp_dir
    path = Path(raw)
    if not path.is_absolute():
        path = config.work_dir / path
    return Path(os.path.normpath(path))


def _python(config: Config, env: dict[str, str]) -> str:
    """The interpreter for ``python3``: FURTHER_VENV's when it has one (as upstream)."""
    venv = config.venv
    if venv is not None and (venv / "bin" / "python3").is_file():
        env["VIRTUAL_ENV"] = str(venv)
        env["PATH"] = os.pathsep.join(filter(None, [str(venv / "bin"), env.get("PATH")]))
        return str(venv / "bin" / "python3")
    return config.python


def _account(run_as: RunAs | None) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(run_as.name) if run_as is not None else pwd.getpwuid(os.geteuid())
    except KeyError:
        raise StartError("the account programs run as no longer exists") from None


def login_shell(account: pwd.struct_passwd) -> str:
    """The account's shell, or /bin/sh for accounts that may not log in (nologin, false)."""
    shell = account.pw_shell
    if (
        not shell
        or os.path.basename(shell) in ("nologin", "false")
        or not os.access(shell, os.X_OK)
    ):
        return FALLBACK_SHELL
    return shell


def _check_entrypoint(path: Path, runner: str) -> None:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise StartError(f"{str(path)!r} does not exist; upload the project first") from None
    except OSError as exc:
        raise StartError(f"{str(path)!r} cannot be used: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise StartError(f"{str(path)!r} is {describe_kind(info.st_mode)}, not a file to run")
    if runner == "exec" and not info.st_mode & 0o111:
        raise StartError(
            f"{str(path)!r} is not executable: make it so (chmod +x) and give it a shebang "
            "line, or use the python3 runner; further-link never changes a file's mode"
        )


# ------------------------------------------------- files, by descriptor


def open_directory(path: Path, create: bool) -> int:
    """A descriptor of directory ``path``, creating missing levels if ``create``.

    Raises ``StartError`` naming the level that is a file or cannot be made.
    """
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    for depth, part in enumerate(path.parts[1:], start=2):
        fd = _descend(fd, part, Path(*path.parts[:depth]), create)
    return fd


def close_dir(fd: int) -> None:
    os.close(fd)


def _descend(parent: int, name: str, where: Path, create: bool) -> int:
    """The descriptor of ``name`` in ``parent``; always closes ``parent``."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        try:
            return os.open(name, flags, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise StartError(f"directory {str(where)!r} does not exist") from None
        try:
            os.mkdir(name, 0o755, dir_fd=parent)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StartError(f"cannot create {str(where)!r}: {exc.strerror}") from None
        return os.open(name, flags | os.O_NOFOLLOW, dir_fd=parent)
    except NotADirectoryError:
        raise StartError(f"{str(where)!r} is not a directory") from None
    except OSError as exc:
        raise StartError(f"cannot use directory {str(where)!r}: {exc.strerror}") from None
    finally:
        os.close(parent)


def _numbered(prefix: str, suffix: str) -> Iterator[str]:
    """Upstream's names for temporary scripts, ``<prefix><N><suffix>``, in random order."""
    for _ in range(SCRIPT_NAME_TRIES):
        yield f"{prefix}{secrets.choice(SCRIPT_NUMBERS)}{suffix}"
