"""The teacher's lock: while it holds, no program starts on this device.

One per server. It is the runs' admission (``Services.admission``), which
every start of either wire API passes, so a learner's page gets the
teacher's message as the reason its program did not start; it remembers the
runs it admitted, so the teacher's signed ``lock`` (server/teacher.py) stops
every one of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import TYPE_CHECKING

from further_link.errors import ClassLockedError
from further_link.runs.run import RunState

if TYPE_CHECKING:
    from further_link.runs.run import Run

log = logging.getLogger(__name__)

DEFAULT_MESSAGE = "Your teacher has paused the class: wait for the teacher to unlock it"
MAX_MESSAGE_CHARS = 200
# A run admitted just before the lock may still be launching; it is stopped once up.
LAUNCH_WAIT_SECONDS = 30.0
LAUNCH_POLL_SECONDS = 0.05


class ClassLock:
    """Locked or not, with the teacher's message and since when (unix seconds)."""

    def __init__(self) -> None:
        self.locked = False
        self.message = ""
        self.since: float | None = None
        self._runs: weakref.WeakSet[Run] = weakref.WeakSet()
        self._waiters: set[asyncio.Task[None]] = set()

    async def admit(self, run: Run) -> None:
        """The runs' admission: refuse while locked, else remember the run."""
        self.check_start()
        self._runs.add(run)

    def check_start(self) -> None:
        """Raise ClassLockedError, with the teacher's message, while locked."""
        if self.locked:
            raise ClassLockedError(self.message)

    def lock(self, message: str) -> int:
        """Lock with ``message`` (cut to ``MAX_MESSAGE_CHARS``; empty: a default text)
        and stop every run; returns how many runs were told to stop."""
        self.locked = True
        self.message = message.strip()[:MAX_MESSAGE_CHARS] or DEFAULT_MESSAGE
        self.since = time.time()
        stopped = 0
        for run in list(self._runs):
            if run.state is RunState.RUNNING:
                run.stop()
                stopped += 1
            elif run.state is RunState.STARTING:
                waiter = asyncio.ensure_future(self._stop_when_up(run))
                self._waiters.add(waiter)
                waiter.add_done_callback(self._waiters.discard)
                stopped += 1
        log.info("the teacher locked this device: %d program(s) stopped", stopped)
        return stopped

    async def _stop_when_up(self, run: Run) -> None:
        for _ in range(int(LAUNCH_WAIT_SECONDS / LAUNCH_POLL_SECONDS)):
            if run.state is not RunState.STARTING:
                break
            await asyncio.sleep(LAUNCH_POLL_SECONDS)
        run.stop()

    def unlock(self) -> None:
        if self.locked:
            log.info("the teacher unlocked this device")
        self.locked = False
        self.message = ""
        self.since = None

    async def close(self) -> None:
        """Server shutdown: no waiter outlives it."""
        for waiter in list(self._waiters):
            waiter.cancel()
        await asyncio.gather(*self._waiters, return_exceptions=True)

    def state(self) -> dict[str, object]:
        """``{"locked": bool, "message": str, "since": unix seconds | None}``."""
        return {"locked": self.locked, "message": self.message, "since": self.since}
