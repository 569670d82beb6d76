"""Checking at start-up that the program user can run the chosen interpreter.

Without this, a server whose interpreter the program account cannot reach
(a virtualenv under /root, say) starts looking healthy and then fails every
run with "Permission denied". The check runs the interpreter exactly as a
program would be run: as the program account, with ``-c pass``.
"""

from __future__ import annotations

import asyncio

from further_link.config import RunAs
from further_link.errors import ConfigError
from further_link.runs import proctree

CHECK_TIMEOUT = 60.0  # a Raspberry Pi under load may take seconds to start Python
MAX_REASON_CHARS = 300


async def check_interpreter(python: str, run_as: RunAs | None) -> None:
    """Raise ``ConfigError`` naming interpreter, account and fix unless ``run_as`` can run it.

    Takes one interpreter start-up (tens of milliseconds; seconds on a busy
    Raspberry Pi). Runs after any privilege drop (privsep.py), so the server
    already is the program account and starts the check as itself.
    """
    account = run_as.name if run_as is not None else "this user"
    try:
        # Registered, so that no run's orphan reaper takes its exit status.
        with proctree.MANAGED_CHILDREN.starting():
            process = await asyncio.create_subprocess_exec(
                python,
                "-c",
                "pass",
                cwd="/",
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            proctree.MANAGED_CHILDREN.add(process.pid)
    except OSError as exc:
        raise _refusal(python, account, exc.strerror or str(exc)) from None
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), CHECK_TIMEOUT)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        raise _refusal(python, account, f"it did not finish within {CHECK_TIMEOUT:.0f} s") from None
    if process.returncode != 0:
        lines = stderr.decode("utf-8", "replace").strip().splitlines()
        reason = lines[-1] if lines else f"it exited with code {process.returncode}"
        raise _refusal(python, account, reason[:MAX_REASON_CHARS])


def _refusal(python: str, account: str, reason: str) -> ConfigError:
    return ConfigError(
        f"programs would run with {python} as {account!r}, but {account!r} cannot run it "
        f"({reason}); set FURTHER_LINK_PYTHON (or FURTHER_VENV) to an interpreter that "
        f"{account!r} can run, such as the system's /usr/bin/python3, or make {python} and "
        f"the folders above it readable and executable by {account!r}"
    )
