"""What exactly to run for a ``start`` command: file, working dir, argv, env.

Kept apart from the session so that the rules (relative paths, the import
path, which variables a program sees) are in one place and testable without
starting anything.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from .channel import SOCKET_ENV_VAR
from .config import Config
from .errors import StartError, UnsafePathError
from .paths import confine_path, describe_kind
from .process import ProgramSpec
from .protocol import StartCommand

SCRIPT_NAME = "main.py"
SOCKET_NAME = "io.sock"
DEFAULT_SCRIPT_CWD = Path("/tmp")


def resolve_directory(config: Config, name: str) -> Path:
    """The uploaded directory ``name`` inside the work dir, which must exist."""
    try:
        directory = confine_path(config.work_dir, name, "directoryName")
    except UnsafePathError as exc:
        raise StartError(str(exc)) from None
    try:
        mode = directory.stat().st_mode
    except FileNotFoundError:
        raise StartError(
            f"directoryName {name!r} does not exist in the work dir; upload it first"
        ) from None
    except OSError as exc:
        raise StartError(f"directoryName {name!r} cannot be used: {exc.strerror}") from None
    if not stat.S_ISDIR(mode):
        raise StartError(
            f"directoryName {name!r} is {describe_kind(mode)} in the work dir, not a directory"
        )
    return directory


def resolve_source_path(config: Config, raw: str) -> Path:
    """An existing regular file, absolute or relative to the work dir, within the size cap."""
    if "\0" in raw:
        raise StartError(f"sourcePath {raw!r} contains a NUL character")
    path = Path(raw)
    if not path.is_absolute():
        path = config.work_dir / path
    try:
        info = path.stat()
    except FileNotFoundError:
        where = "" if Path(raw).is_absolute() else f" (looked for {str(path)!r} in the work dir)"
        raise StartError(f"sourcePath {raw!r} does not exist{where}") from None
    except OSError as exc:
        raise StartError(f"sourcePath {raw!r} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise StartError(
            f"sourcePath {raw!r} is {describe_kind(info.st_mode)}; give the path of a Python file"
        )
    if info.st_size > config.max_source_bytes:
        raise StartError(
            f"sourcePath {raw!r} is {info.st_size} bytes; "
            f"the limit is {config.max_source_bytes} bytes"
        )
    return path


def program_env(
    config: Config, library_dir: Path, run_dir: Path, import_dir: Path | None
) -> dict[str, str]:
    """The environment a program sees: the server's, minus its own settings, plus ours."""
    env = {k: v for k, v in config.program_env.items() if not k.startswith("FURTHER_LINK_")}
    python_path = [str(library_dir)]
    if import_dir is not None:
        python_path.insert(0, str(import_dir))
    if env.get("PYTHONPATH"):
        python_path.append(env["PYTHONPATH"])
    env.update(
        PYTHONPATH=os.pathsep.join(python_path),
        PYTHONUNBUFFERED="1",
        PYTHONIOENCODING="utf-8",
    )
    env[SOCKET_ENV_VAR] = str(run_dir / SOCKET_NAME)
    run_as = config.run_as
    if run_as is not None and run_as.drop:
        # The server's own environment still names root's account.
        env.update(HOME=str(run_as.home), USER=run_as.name, LOGNAME=run_as.name)
    return env


def plan_program(
    command: StartCommand, config: Config, library_dir: Path, run_dir: Path
) -> ProgramSpec:
    """Build the spec; writes an inline script into ``run_dir``."""
    directory = (
        None
        if command.directory_name is None
        else resolve_directory(config, command.directory_name)
    )
    if command.source_path is not None:
        script = resolve_source_path(config, command.source_path)
        cwd = directory or script.parent
        import_dir = directory
    else:
        script = run_dir / SCRIPT_NAME
        _write_new_file(script, (command.source_script or "").encode("utf-8"))
        cwd = directory or DEFAULT_SCRIPT_CWD
        import_dir = directory
    return ProgramSpec(
        argv=[config.python, "-u", str(script)],
        cwd=cwd,
        env=program_env(config, library_dir, run_dir, import_dir),
    )


def _write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` afresh: never through a link or into a file someone put there first."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# Modules a user program needs for `import further_link`; they import only the
# standard library, so they work under any Python 3 the programs run with.
CLIENT_MODULES = ("__init__.py", "channel.py", "keyboard.py")
# Read at import: a server that drops root may not read its own installation later.
CLIENT_SOURCES = {name: (Path(__file__).parent / name).read_bytes() for name in CLIENT_MODULES}


def prepare_library_dir(parent: Path | None = None) -> Path:
    """A directory holding a copy of the client package, readable by every user.

    Copied rather than linked so that programs running as another account can
    import it even when the server is installed somewhere only root can read.
    """
    root = Path(tempfile.mkdtemp(prefix="further-link-lib-", dir=parent))
    package = root / "further_link"
    package.mkdir()
    for name, source in CLIENT_SOURCES.items():
        (package / name).write_bytes(source)
        os.chmod(package / name, 0o644)
    os.chmod(package, 0o755)
    os.chmod(root, 0o755)
    return root
