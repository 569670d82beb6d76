"""The teacher's lock: while it holds, no program starts on this device.

One per server. The teacher's signed ``lock`` command (server/teacher.py)
sets it and stops every run; every start, from either wire API, asks
``check_start`` first, so a learner's page gets the teacher's message as the
reason its program did not start.
"""

from __future__ import annotations

import logging
import time

from further_link.errors import ClassLockedError

log = logging.getLogger(__name__)

DEFAULT_MESSAGE = "Your teacher has paused the class: wait for the teacher to unlock it"
MAX_MESSAGE_CHARS = 200


class ClassLock:
    """Locked or not, with the teacher's message and since when (unix seconds)."""

    def __init__(self) -> None:
        self.locked = False
        self.message = ""
        self.since: float | None = None

    def lock(self, message: str) -> None:
        """Lock with ``message`` (cut to ``MAX_MESSAGE_CHARS``; empty: a default text)."""
        self.locked = True
        self.message = message.strip()[:MAX_MESSAGE_CHARS] or DEFAULT_MESSAGE
        self.since = time.time()
        log.info("the teacher locked this device")

    def unlock(self) -> None:
        if self.locked:
            log.info("the teacher unlocked this device")
        self.locked = False
        self.message = ""
        self.since = None

    def check_start(self) -> None:
        """Raise ClassLockedError, with the teacher's message, while locked."""
        if self.locked:
            raise ClassLockedError(self.message)

    def state(self) -> dict[str, object]:
        """``{"locked": bool, "message": str, "since": unix seconds | None}``."""
        return {"locked": self.locked, "message": self.message, "since": self.since}
