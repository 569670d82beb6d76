"""What all runs of one server share: config, caches, the pool, run dirs, containment."""

from __future__ import annotations

import errno
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from further_link.config import Config
from further_link.errors import StartError
from further_link.files.upload import UrlCache
from further_link.runs.claims import ClaimRegistry
from further_link.runs.containment import BEST_EFFORT, Containment, Limits, RunGroup
from further_link.runs.detach import RunBook
from further_link.runs.gui import DisplayRegistry
from further_link.runs.pool import WarmPool
from further_link.runs.process import Launcher, cold_launch
from further_link.runs.rundirs import RunPlace, RunPlaces, make_run_place

if TYPE_CHECKING:
    from further_link.runs.run import Run

# The device itself is short of something: the session says so, not "could not prepare the run".
SHORTAGES = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSPC, errno.EDQUOT, errno.ENOBUFS}
)

# Called with every run about to start, of either API: raise a ``FurtherLinkError``
# to refuse it, or wait to hold it back (the run's sink is where to say why).
Admission = Callable[["Run"], Awaitable[None]]


@dataclass(frozen=True)
class Services:
    """What all sessions of one server share."""

    config: Config
    cache: UrlCache
    library_dir: Path  # holds the `further_link` client package; on every program's import path
    pool: WarmPool | None = None  # pre-started interpreters, when the pool is on
    run_places: RunPlaces | None = None  # run directories made ahead
    containment: Containment | None = None  # per-run cgroups; None: best-effort tracking
    admission: Admission | None = None  # None: every start goes ahead
    displays: DisplayRegistry = field(default_factory=DisplayRegistry)  # GUI runs' (gui.py)
    # Every run of the server, detached ones, the exclusive queue and the claims (detach.py).
    runs: RunBook = field(default_factory=lambda: RunBook(ClaimRegistry(), False, 16))

    @property
    def launcher(self) -> Launcher:
        return self.pool.launch if self.pool is not None else cold_launch

    def take_run_place(self) -> RunPlace:
        """A directory (and side-channel socket) for a new run; raises ``OSError``."""
        if self.run_places is not None:
            return self.run_places.take()
        return make_run_place()


def contain_run(services: Services) -> tuple[RunGroup | None, Limits | None]:
    """A new run's own cgroup, or the limits to set as rlimits (best-effort).

    Raises ``StartError`` when the cgroup cannot be made.
    """
    containment = services.containment
    if containment is None:
        return None, None
    if containment.mode == BEST_EFFORT:
        return None, containment.rlimits
    try:
        return containment.new_run(), None
    except OSError as exc:
        raise StartError(f"could not create the program's cgroup: {exc.strerror}") from None
