"""Runs that outlive their connection, and the device-wide book of runs.

A run started with ``keepAlive`` (or under ``FURTHER_LINK_KEEP_ALIVE``) sends
its events through a ``RunRelay``: everything it prints is kept (runs/kept.py)
and passed on to whichever connection is attached. When that connection
goes, the run is *detached*: it goes on running for ``keepAlive`` seconds,
its output kept, until a client ``attach``es, which gets the kept output,
then the live output, then ``stopped``, exactly once and in order. With
nobody attached when the time runs out, the run is ended; so is every
detached run when the server stops.

The ``RunBook`` lists every run of the server (``GET /runs``), finds a run by
its id for ``attach``, and, in exclusive mode, holds back each start until no
other program runs (``queued {position}`` meanwhile).

States of an entry::

    queued --its turn--> running --connection gone--> detached --attach--> running
                            |                            |
                            +---- program ended: forgotten (detached: after keepAlive)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from further_link.errors import SessionStateError
from further_link.protocol.events import (
    ErrorEvent,
    Event,
    KeyListen,
    Output,
    ProgramOutput,
    Queued,
    Stopped,
)
from further_link.runs.claims import ClaimRegistry
from further_link.runs.kept import KeptOutput
from further_link.runs.sink import EventSink, SinkClosed

if TYPE_CHECKING:
    from further_link.runs.run import Run

log = logging.getLogger(__name__)

# The name exclusive mode queues whole runs under, apart from programs' own claims.
DEVICE_TURN = "the device"
# Keys a program listens to, replayed on attach; a program making endless
# KeyboardButtons cannot grow this beyond it.
MAX_REPLAYED_KEYS = 256


class RunRelay:
    """A detachable run's sink: keeps its output and passes events to the attached sink.

    ``process`` is the id the attached connection knows the run under (v5
    /run; None on /run-py): events are re-addressed to it.
    """

    def __init__(self, target: EventSink, process: str | None, kept_bytes: int) -> None:
        self.kept = KeptOutput(kept_bytes)
        self._target: EventSink | None = target
        self._process = process
        self._keys: dict[str, None] = {}  # keys the program listens to, for a later attach
        self._ended: Stopped | None = None
        # Held while output is passed on or replayed: an attach's replay is never
        # overtaken by live output.
        self._lock = asyncio.Lock()

    @property
    def attached(self) -> bool:
        return self._target is not None

    def put(self, event: Event) -> None:
        if isinstance(event, Stopped):
            self._ended = event
        elif isinstance(event, KeyListen) and len(self._keys) < MAX_REPLAYED_KEYS:
            self._keys[event.key] = None
        target = self._target
        if target is not None:
            target.put(self._addressed(event))

    async def put_output(self, event: ProgramOutput) -> None:
        async with self._lock:
            if isinstance(event, Output):
                self.kept.add(event.stream, event.output)
            target = self._target
            if target is None:
                return  # detached: kept only (frames are not kept)
            try:
                await target.put_output(self._addressed(event))
            except SinkClosed:
                # The connection went; the session detaches (or ends) the run.
                if self._target is target:
                    self._target = None

    def detach(self) -> None:
        """The connection is gone: keep output for a later attach only."""
        self._target = None

    async def attach(self, target: EventSink, process: str | None) -> EventSink | None:
        """Replay the kept output (and keys, and ``stopped`` if it came) to ``target``,
        then pass on live events. Returns the sink that was attached before.

        When ``target``'s connection goes during the replay, the run stays
        unattached; its new owner's closing detaches it again."""
        async with self._lock:
            previous, self._target = self._target, None
            try:
                for stream, text in self.kept.replay():
                    await target.put_output(Output(stream, text, process=process))
            except SinkClosed:
                return previous
            for key in self._keys:
                target.put(KeyListen(key, process=process))
            self._target, self._process = target, process
            if self._ended is not None:
                target.put(self._addressed(self._ended))
        return previous

    def _addressed(self, event: Any) -> Any:
        if getattr(event, "process", None) == self._process:
            return event
        return dataclasses.replace(event, process=self._process)


@dataclass
class BookEntry:
    run: Run
    phase: str = "running"  # queued or running (GET /runs: "detached" while detached)
    started_at: float = field(default_factory=time.time)
    expiry: asyncio.Task[None] | None = None  # detached: ends the run when its keepAlive passes
    ended: bool = False  # the program ended (a detached entry stays for an attach)

    @property
    def detached(self) -> bool:
        """Its connection went and it waits for an attach: exactly while it has an expiry."""
        return self.expiry is not None

    def describe(self, claims: ClaimRegistry) -> dict[str, Any]:
        run = self.run
        relay = run.relay
        return {
            "runId": run.run_id,
            "state": "detached" if self.detached else self.phase,
            "startedAt": self.started_at,
            "attached": 0 if self.detached or (relay and not relay.attached) else 1,
            "claims": claims.held_by(run.run_id),
            "waitingFor": claims.waiting_for(run.run_id),
            "keepAlive": run.keep_alive,
            "ended": self.ended,
        }


class RunBook:
    """Every run of this server, by run id (``Services.runs``); all on the event loop."""

    def __init__(self, claims: ClaimRegistry, exclusive: bool, max_detached: int) -> None:
        self.claims = claims
        self.exclusive = exclusive
        self.max_detached = max_detached
        self._entries: dict[str, BookEntry] = {}
        self._turns = ClaimRegistry()  # exclusive mode: the device is one resource

    # ------------------------------------------------------------ starting

    def enlist(self, run: Run) -> bool:
        """List a run about to start. True (listed as ``queued``) when it must wait for its
        turn: exclusive mode, and another run holds the device or others wait before it."""
        waits = self.exclusive and self._turns.snapshot().get(DEVICE_TURN) is not None
        self._entries[run.run_id] = BookEntry(run, "queued" if waits else "running")
        return waits

    async def take_turn(self, run: Run) -> None:
        """Exclusive mode: wait until no other run holds the device (``queued`` meanwhile).

        Cancelling the wait (``stop`` on a queued run) removes it from the queue.
        """
        if not self.exclusive:
            return

        def queued(position: int, held_by: str) -> None:
            run.sink.put(Queued(position, process=run.process))

        await self._turns.acquire(DEVICE_TURN, run.run_id, queued)
        entry = self._entries.get(run.run_id)
        if entry is not None and entry.phase == "queued":
            entry.phase = "running"

    def forget(self, run: Run) -> None:
        """``run`` ended (or never started): it leaves the book, its turn and its claims."""
        self._turns.release_all(run.run_id)
        self.claims.release_all(run.run_id)
        entry = self._entries.get(run.run_id)
        if entry is None or entry.run is not run:
            return
        entry.ended = True
        if not entry.detached:
            del self._entries[run.run_id]
        # else: detached; kept until its keepAlive passes, for an attach to see the end

    # ------------------------------------------------------------ detach / attach

    def detach(self, run: Run) -> bool:
        """The owner's connection is gone. True: the run goes on, detached, for its
        keepAlive; False: end it now (no keepAlive, or too many runs detached already)."""
        entry = self._entries.get(run.run_id)
        relay = run.relay
        if entry is None or relay is None or entry.detached:
            return False
        detached = sum(1 for e in self._entries.values() if e.detached)
        if detached >= self.max_detached:
            log.warning(
                "%d runs are detached already (FURTHER_LINK_MAX_DETACHED_RUNS): ending one",
                detached,
            )
            return False
        relay.detach()
        run.on_ended = run.on_taken = None
        entry.expiry = asyncio.ensure_future(self._expire(entry, run.keep_alive))
        log.info("a run detached; kept for %.0f s", run.keep_alive)
        return True

    async def attach(
        self,
        run_id: str,
        target: EventSink,
        process: str | None,
        forget: Callable[[Run], None],
        paired: bool,
    ) -> Run:
        """Hand the run ``run_id`` to a new connection: replay, then live events.

        ``forget`` is the new owner's hook for the run's end and for its being
        attached elsewhere later. Raises ``SessionStateError`` when the connection
        is not ``paired`` (it presented no device token) or no such detachable
        run is on the device.
        """
        if not paired:
            raise SessionStateError(
                "attach needs a connection with the device token (pairing), "
                "not one let in by its origin alone"
            )
        entry = self._entries.get(run_id)
        run = entry.run if entry is not None else None
        if entry is None or run is None or run.relay is None:
            raise SessionStateError(
                "attach: no run with this runId is on the device any more (it ended and its "
                "keepAlive passed, it was started without keepAlive, or the device restarted)"
            )
        if entry.expiry is not None:
            entry.expiry.cancel()
            entry.expiry = None
        previous_owner = run.on_taken
        if previous_owner is not None:
            previous_owner(run)
        run.process, run.on_ended, run.on_taken = process, forget, forget
        if entry.ended:
            del self._entries[run_id]
        else:
            entry.phase = "queued" if run.queued else "running"
        previous = await run.relay.attach(target, process)
        if previous is not None and previous is not target:
            previous.put(ErrorEvent("this program was attached from another connection"))
        log.info("a run was attached")
        return run

    async def _expire(self, entry: BookEntry, seconds: float) -> None:
        await asyncio.sleep(seconds)
        entry.expiry = None
        self._entries.pop(entry.run.run_id, None)
        if not entry.ended:
            log.info("a detached run ended: nobody attached within %.0f s", seconds)
            await entry.run.close()

    async def close(self) -> None:
        """Server shutdown: end every detached run."""
        entries = [e for e in self._entries.values() if e.detached]
        for entry in entries:
            self._entries.pop(entry.run.run_id, None)
            assert entry.expiry is not None
            entry.expiry.cancel()
            await asyncio.gather(entry.expiry, return_exceptions=True)
        await asyncio.gather(*(entry.run.close() for entry in entries if not entry.ended))

    # ------------------------------------------------------------ views

    def queue(self) -> list[str]:
        """Exclusive mode: run ids waiting to start, next first."""
        turn = self._turns.snapshot().get(DEVICE_TURN) or {}
        waiting = turn.get("waiting", [])
        return [str(run_id) for run_id in waiting] if isinstance(waiting, list) else []

    def describe(self) -> dict[str, Any]:
        """``GET /runs``: every run, the exclusive queue (next first), and the claims."""
        return {
            "runs": [entry.describe(self.claims) for entry in self._entries.values()],
            "queue": self.queue(),
            "claims": self.claims.snapshot(),
            "exclusive": self.exclusive,
        }
