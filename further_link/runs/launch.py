"""What exactly to run for a ``start`` command: file, working dir, argv, env.

Kept apart from the session so that the rules (relative paths, the import
path, which variables a program sees) are in one place and testable without
starting anything.
"""

from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from further_link.channel import SOCKET_ENV_VAR
from further_link.config import Config
from further_link.errors import StartError, UnsafePathError
from further_link.files.paths import confine_path, describe_kind
from further_link.files.project import ScriptFile, open_project_dir, write_project_script
from further_link.files.upload import CACHE_DIR_NAME, STAGING_PREFIX
from further_link.protocol.runpy import StartCommand
from further_link.runs.display import graphical_session
from further_link.runs.process import ProgramSpec
from further_link.runs.rundirs import SOCKET_NAME, RunPlace

MPL_BACKEND = "module://further_link.mpl_backend"
DEFAULT_SCRIPT_CWD = Path("/tmp")


def open_directory(config: Config, name: str) -> tuple[Path, int]:
    """The project ``name`` inside the work dir and a descriptor of it; created if missing."""
    try:
        directory = confine_path(config.work_dir, name, "directoryName")
    except UnsafePathError as exc:
        raise StartError(str(exc)) from None
    work_dir_real = Path(os.path.realpath(config.work_dir))
    parts = directory.relative_to(work_dir_real).parts
    if parts[0] == CACHE_DIR_NAME or any(part.startswith(STAGING_PREFIX) for part in parts):
        raise StartError(f"directoryName {name!r} is reserved by further-link")
    try:
        return directory, open_project_dir(work_dir_real, directory, f"directoryName {name!r}")
    except OSError as exc:
        raise StartError(f"directoryName {name!r} cannot be used: {exc.strerror}") from None


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
    # Figures go to the browser (further_link/mpl_backend.py), whatever backend the
    # server's own environment names; a program may still choose one with matplotlib.use().
    env["MPLBACKEND"] = MPL_BACKEND
    run_as = config.run_as
    if run_as is not None and run_as.drop:
        # The server's own environment still names root's account.
        env.update(HOME=str(run_as.home), USER=run_as.name, LOGNAME=run_as.name)
    return env


@dataclass
class Plan:
    """What to start, and the inline script in a project that the run must remove."""

    spec: ProgramSpec
    project_script: ScriptFile | None = None


def plan_program(command: StartCommand, config: Config, library_dir: Path, place: RunPlace) -> Plan:
    """Build the spec; writes an inline script into its project, else into ``place``."""
    run_dir = place.directory
    directory: Path | None = None
    dir_fd: int | None = None
    if command.directory_name is not None:
        directory, dir_fd = open_directory(config, command.directory_name)
    project_script = None
    if command.source_path is not None:
        if dir_fd is not None:
            os.close(dir_fd)
        script = resolve_source_path(config, command.source_path)
        cwd = directory or script.parent
    elif directory is not None and dir_fd is not None:
        project_script = write_project_script(dir_fd, directory, command.source_script or "")
        script = project_script.path
        cwd = directory
    else:
        script = place.write_script((command.source_script or "").encode("utf-8"))
        cwd = DEFAULT_SCRIPT_CWD
    try:
        spec = _spec(config, script, cwd, program_env(config, library_dir, run_dir, directory))
    except BaseException:
        if project_script is not None:
            project_script.remove()
        raise
    return Plan(spec, project_script)


def _spec(config: Config, script: Path, cwd: Path, env: dict[str, str]) -> ProgramSpec:
    env["PWD"] = str(cwd)  # as a shell that changed into it sets it, not the server's own
    run_as = config.run_as
    env.update(
        graphical_session(
            env,
            run_as.uid if run_as is not None else os.getuid(),
            run_as.home if run_as is not None else None,
            config.x11_socket_dir,
        )
    )
    return ProgramSpec(argv=[config.python, "-u", str(script)], cwd=cwd, env=env)


# Modules a user program needs for `import further_link`; they import only the
# standard library, so they work under any Python 3 the programs run with.
CLIENT_MODULES = (
    "__init__.py",
    "channel.py",
    "keyboard.py",
    "controls.py",
    "mpl_backend.py",
    "sharing.py",
)
# Read at import: a server that drops root may not read its own installation later.
CLIENT_SOURCES = {
    name: (Path(__file__).parent.parent / name).read_bytes() for name in CLIENT_MODULES
}


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
