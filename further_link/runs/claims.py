"""Who holds which shared resource on this device, and who waits for it, first come first served.

One ``ClaimRegistry`` per server; every run's claims (``further_link.claim`` in
a program, see sharing.py) go through it, whichever connection started the
run. A holder is a run id; one run may hold a name several times (nested
blocks, threads), and it is free again once every hold is released. Waiters
are served in the order they asked; each hears its place in the queue
whenever it changes.

All methods run on the event loop's thread; nothing here blocks.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)

# position (1 = next), the run id holding the resource
QueuedCallback = Callable[[int, str], None]


@dataclass
class _Waiter:
    holder: str
    granted: asyncio.Future[None]
    on_queued: QueuedCallback
    told_position: int = 0


@dataclass
class _Resource:
    holder: str | None = None
    holds: int = 0
    waiters: deque[_Waiter] = field(default_factory=deque)


class ClaimRegistry:
    def __init__(self) -> None:
        self._resources: dict[str, _Resource] = {}

    async def acquire(
        self, name: str, holder: str, on_queued: QueuedCallback, timeout: float | None = None
    ) -> bool:
        """Wait until ``holder`` holds ``name``; False when ``timeout`` seconds pass first.

        ``on_queued(position, held_by)`` is called at once when the name is
        taken, and again whenever the position changes. Cancelling the wait
        leaves the queue as if it had never joined.
        """
        resource = self._resources.setdefault(name, _Resource())
        if resource.holder is None or resource.holder == holder:
            resource.holder = holder
            resource.holds += 1
            return True
        waiter = _Waiter(holder, asyncio.get_running_loop().create_future(), on_queued)
        resource.waiters.append(waiter)
        self._tell_positions(resource)
        try:
            if timeout is None:
                await waiter.granted
            else:
                await asyncio.wait_for(asyncio.shield(waiter.granted), timeout)
            return True
        except asyncio.TimeoutError:
            if waiter.granted.done() and not waiter.granted.cancelled():
                return True  # granted in the same instant the time ran out
            self._leave(name, resource, waiter)
            return False
        except BaseException:
            if waiter.granted.done() and not waiter.granted.cancelled():
                self.release(name, holder)
            else:
                self._leave(name, resource, waiter)
            raise

    def release(self, name: str, holder: str) -> None:
        """Give up one hold of ``name`` by ``holder`` (not holding it: nothing happens)."""
        resource = self._resources.get(name)
        if resource is None or resource.holder != holder:
            return
        resource.holds -= 1
        if resource.holds > 0:
            return
        resource.holder = None
        self._hand_on(name, resource)

    def release_all(self, holder: str) -> None:
        """The run ended: every name it holds is free, and it waits for none."""
        for name, resource in list(self._resources.items()):
            for waiter in [w for w in resource.waiters if w.holder == holder]:
                waiter.granted.cancel()
                self._leave(name, resource, waiter)
            if resource.holder == holder:
                resource.holds = 1
                self.release(name, holder)

    def held_by(self, holder: str) -> list[str]:
        """The names ``holder`` holds, sorted."""
        return sorted(name for name, res in self._resources.items() if res.holder == holder)

    def waiting_for(self, holder: str) -> list[str]:
        """The names ``holder`` waits for, sorted."""
        return sorted(
            name
            for name, res in self._resources.items()
            if any(w.holder == holder for w in res.waiters)
        )

    def snapshot(self) -> dict[str, dict[str, object]]:
        """``{name: {"heldBy": run id, "waiting": [run ids, next first]}}`` of names in use."""
        return {
            name: {"heldBy": res.holder, "waiting": [w.holder for w in res.waiters]}
            for name, res in sorted(self._resources.items())
        }

    # ------------------------------------------------------------ internal

    def _hand_on(self, name: str, resource: _Resource) -> None:
        while resource.waiters:
            waiter = resource.waiters.popleft()
            if waiter.granted.done():
                continue
            resource.holder = waiter.holder
            resource.holds = 1
            waiter.granted.set_result(None)
            log.debug("claim %r handed on", name)
            break
        self._tell_positions(resource)
        self._forget_if_unused(name, resource)

    def _leave(self, name: str, resource: _Resource, waiter: _Waiter) -> None:
        if waiter in resource.waiters:
            resource.waiters.remove(waiter)
        self._tell_positions(resource)
        self._forget_if_unused(name, resource)

    def _tell_positions(self, resource: _Resource) -> None:
        if resource.holder is None:
            return
        for position, waiter in enumerate(resource.waiters, start=1):
            if waiter.told_position != position:
                waiter.told_position = position
                waiter.on_queued(position, resource.holder)

    def _forget_if_unused(self, name: str, resource: _Resource) -> None:
        if resource.holder is None and not resource.waiters:
            self._resources.pop(name, None)


# resource, position (1 = next), the run id holding it
QueuedNotice = Callable[[str, int, str], None]


@dataclass
class RunClaims:
    """One run's door to the registry: claims are made as ``run_id``; ``on_queued``
    tells the run's client (a ``queued`` event) while one of them waits."""

    registry: ClaimRegistry
    run_id: str
    on_queued: QueuedNotice

    async def acquire(self, name: str, tell_program: QueuedCallback, timeout: float | None) -> bool:
        def queued(position: int, held_by: str) -> None:
            tell_program(position, held_by)
            self.on_queued(name, position, held_by)

        return await self.registry.acquire(name, self.run_id, queued, timeout)

    def release(self, name: str) -> None:
        self.registry.release(name, self.run_id)

    def release_all(self) -> None:
        self.registry.release_all(self.run_id)


def new_run_id() -> str:
    """A run's device-wide name: 16 random bytes, so nobody can guess another's run."""
    return secrets.token_hex(16)
