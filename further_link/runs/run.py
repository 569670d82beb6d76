"""One program from ``start`` to ``Stopped``: the core both wire APIs' sessions use.

A ``Run`` owns everything its program needs and leaves behind: the run dir,
the program (pipes or a pseudo-terminal), its cgroup, its side channel, the
files its plan wrote, and the task that waits for its end. States::

    STARTING --start() ok--> RUNNING --stop()--> STOPPING
        |                       |                    |
        | start() failed        +--- program ended: release, `Stopped` ---> STOPPED
        +--> STOPPED (nothing left behind, the error raised)

``close()`` (the owner goes away) ends the program at once and releases
everything, in any state but STARTING. Events go to ``sink``, an attribute a
later owner may replace, named by ``process`` (the v5 process id, ``None`` on
/run-py). Every start of either API passes ``Services.admission`` first.

Issue 13: a run has a ``run_id`` (unguessable: ``attach`` and ``GET /runs``
name it). With ``keep_alive`` its sink is a ``RunRelay`` (detach.py) that keeps
its output, so the run can outlive its connection and be attached again. In
exclusive mode a start may wait in STARTING for its turn (``queued``) in a
task of its own, so the connection stays free to ``stop`` it; every run is
listed in ``Services.runs`` from its start to its end, and its claims
(``further_link.claim``) are made on its side channel under its run id.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import enum
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from further_link.errors import FurtherLinkError, SessionStateError, StartError
from further_link.protocol.events import (
    ErrorEvent,
    Novnc,
    Output,
    Queued,
    Started,
    Stopped,
    Video,
)
from further_link.runs.claims import RunClaims, new_run_id
from further_link.runs.containment import RunGroup
from further_link.runs.detach import RunRelay
from further_link.runs.gui import DisplayRequest, VirtualDisplay, env_on_display, open_display
from further_link.runs.process import STOPPED_EXIT_CODE, Program, ProgramSpec
from further_link.runs.pty import PtyLauncher
from further_link.runs.rundirs import RunPlace
from further_link.runs.services import SHORTAGES, Services, contain_run
from further_link.runs.side_events import frame_event, send_frame_event
from further_link.runs.sink import EventSink, SinkClosed
from further_link.runs.streams import SideChannel

log = logging.getLogger(__name__)


def error_event(exc: FurtherLinkError | OSError, process: str | None = None) -> ErrorEvent:
    """What a client hears when a command fails: the error's own message, or for an
    OSError (the device short of descriptors, memory, disk) a sentence saying so."""
    if isinstance(exc, FurtherLinkError):
        return ErrorEvent(exc.message, process=process)
    return ErrorEvent(f"the device could not do this now: {exc.strerror or exc}", process=process)


class RunState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True)
class RunPlan:
    """What to start in a run dir, and what of its making the run removes when it ends."""

    spec: ProgramSpec
    release: tuple[Callable[[], None], ...] = ()  # e.g. a temporary script's ``remove``
    terminal: PtyLauncher | None = None  # a pseudo-terminal; None: pipes
    display: DisplayRequest | None = None  # its own X display (v5 novncOptions; gui.py)


Planner = Callable[[RunPlace], RunPlan]  # the run place -> the plan; raises StartError


class Run:
    """One program of a client (see the module docstring for its states).

    ``sink`` receives its events, which carry ``process``; ``on_ended`` is
    called with the run once everything is released, just before ``Stopped``
    is queued, so that its owner frees the run's place (the v5 id) first.
    """

    def __init__(
        self,
        services: Services,
        sink: EventSink,
        process: str | None = None,
        on_ended: Callable[[Run], None] | None = None,
        keep_alive: float = 0.0,
    ) -> None:
        self.run_id = new_run_id()
        # keepAlive > 0: the run may outlive its connection; its events pass a relay
        # that keeps its output for whoever attaches (detach.py).
        self.keep_alive = keep_alive
        self.relay = (
            RunRelay(sink, process, services.config.kept_output_bytes) if keep_alive > 0 else None
        )
        self.sink: EventSink = self.relay or sink
        self.process = process
        self.state = RunState.STARTING
        self._services = services
        # The owning session's hooks; an attach from another connection replaces them.
        self.on_ended = on_ended
        self.on_taken: Callable[[Run], None] | None = None
        self._queued: asyncio.Task[None] | None = None  # exclusive mode: waiting for the turn
        self._closing = False
        self._program: Program | None = None
        self._channel: SideChannel | None = None
        self._run_dir: Path | None = None
        self._plan: RunPlan | None = None
        self._terminal: PtyLauncher | None = None
        self._group: RunGroup | None = None
        self._display: VirtualDisplay | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None

    @property
    def program(self) -> Program:
        assert self._program is not None, "run not started"
        return self._program

    @property
    def terminal(self) -> PtyLauncher | None:
        """The run's pseudo-terminal (for ``resize``); None when it has pipes."""
        return self._terminal

    # ------------------------------------------------------------ start

    async def start(self, planner: Planner) -> None:
        """Admit, plan, contain and launch the program, then say ``Started``.

        Raises ``StartError`` (or the admission's refusal) with nothing left
        behind; an ``OSError`` the device is short of (``SHORTAGES``) is raised
        as it is, for the caller to say so.
        """
        assert self.state is RunState.STARTING, "a run starts once"
        if self._services.runs.enlist(self):
            # Exclusive mode, another program runs: wait for the turn without holding
            # up the connection, whose `stop` takes this run out of the queue.
            self._queued = asyncio.ensure_future(self._start_in_turn(planner))
            return
        await self._start_now(planner)

    async def _start_now(self, planner: Planner) -> None:
        book = self._services.runs
        try:
            await book.take_turn(self)
            if self._services.admission is not None:
                await self._services.admission(self)
            await self._launch(planner)
        except BaseException:
            self.state = RunState.STOPPED
            book.forget(self)
            raise
        self.state = RunState.RUNNING
        self._announce_display()
        self.sink.put(Started(process=self.process, run_id=self.run_id))
        # On the loop's next turn, after the connection's sender has woken for
        # `started` (its wake-up was queued first): the readers' first steps,
        # the side channel's accept loop and the log line then no longer come
        # between `start` and `started`.
        asyncio.get_running_loop().call_soon(self._begin)
        self._task = asyncio.ensure_future(self._supervise())

    def _begin(self) -> None:
        assert self._channel is not None
        self._channel.begin()
        self.program.begin()

    async def _start_in_turn(self, planner: Planner) -> None:
        """A queued start: wait for the turn, then start; a refusal is said, not raised."""
        try:
            await self._start_now(planner)
        except asyncio.CancelledError:
            if self._closing:
                raise
            # `stop` on a queued run: it leaves the queue and ends as a stopped run does.
            self._ended_before_start(Stopped(STOPPED_EXIT_CODE, process=self.process))
        except (FurtherLinkError, OSError) as exc:
            self._ended_before_start(error_event(exc, self.process))
        finally:
            self._queued = None

    def _ended_before_start(self, event: Stopped | ErrorEvent) -> None:
        self.state = RunState.STOPPED
        if self.on_ended is not None:
            self.on_ended(self)
        self.sink.put(event)

    async def _launch(self, planner: Planner) -> None:
        services = self._services
        config = services.config
        try:
            place = services.take_run_place()
        except OSError as exc:
            if exc.errno in SHORTAGES:
                raise
            raise StartError(f"could not create a directory for the run: {exc.strerror}") from None
        plan: RunPlan | None = None
        group: RunGroup | None = None
        display: VirtualDisplay | None = None
        try:
            plan = planner(place)
            place.release()
            group, rlimits = contain_run(services)
            spec = dataclasses.replace(plan.spec, group=group, rlimits=rlimits)
            if plan.display is not None:
                wish = plan.display
                display = await open_display(
                    place.directory,
                    wish.width,
                    wish.height,
                    config.xvfb,
                    config.program_env,
                    group,
                    rlimits,
                )
                spec = dataclasses.replace(spec, env=env_on_display(spec.env, display), warm=False)
            program = Program(
                spec,
                self._deliver_output,
                config.kill_grace,
                plan.terminal or services.launcher,
            )
            channel = SideChannel(
                place.socket_path,
                self._deliver_frame,
                config.max_message_bytes,
                listener=place.listener,
                peer_group=group,
                claims=RunClaims(services.runs.claims, self.run_id, self._say_queued),
            )
            await channel.start()
            try:
                await program.start()
            except BaseException:
                await channel.close()
                raise
        except BaseException as exc:
            if display is not None:
                await display.close()
            self._discard(place, group, plan)
            if isinstance(exc, OSError) and exc.errno not in SHORTAGES:
                # E.g. another program (same account) changed the run dir under us.
                where = f" ({exc.filename})" if exc.filename else ""
                raise StartError(f"could not prepare the run: {exc.strerror}{where}") from None
            raise
        self._program, self._channel, self._group = program, channel, group
        self._run_dir, self._plan, self._terminal = place.directory, plan, plan.terminal
        self._display = display

    @staticmethod
    def _discard(place: RunPlace, group: RunGroup | None, plan: RunPlan | None) -> None:
        place.discard()
        if group is not None:
            group.kill()
            group.remove()
        if plan is not None:
            _release_plan(plan)

    # ------------------------------------------------------------ output

    async def _deliver_output(self, stream: str, text: str) -> None:
        with contextlib.suppress(SinkClosed):
            await self.sink.put_output(Output(stream, text, process=self.process))

    async def _deliver_frame(self, kind: bytes, payload: bytes) -> None:
        # What the program printed before sending the frame goes out first.
        await self.program.sync_output()
        assert self._channel is not None
        await send_frame_event(self.sink, frame_event(kind, payload, self._channel, self.process))

    def _say_queued(self, resource: str, position: int, held_by: str) -> None:
        self.sink.put(Queued(position, resource, held_by, process=self.process))

    # ------------------------------------------------------------ input

    @property
    def queued(self) -> bool:
        """Exclusive mode: the run waits for its turn to start."""
        return self._queued is not None

    def _started_program(self) -> Program:
        if self._program is None:
            raise SessionStateError(
                "the program has not started yet: it waits for its turn (exclusive mode)"
            )
        return self._program

    def write_stdin(self, text: str) -> None:
        """Queue input for the program; raises ``StdinError`` (see ``Program.write_stdin``),
        ``SessionStateError`` while the run is queued."""
        self._started_program().write_stdin(text)

    def close_stdin(self) -> None:
        if self._program is not None:
            self._program.close_stdin()

    def push_key(self, key: str, event: str) -> None:
        """A browser key event for the program's ``KeyboardButton`` listeners."""
        self._started_program()
        assert self._channel is not None, "run not started"
        self._channel.push_key(key, event)

    def use_control(self, control_id: str, value: float | None) -> None:
        """The learner used one of the program's buttons or sliders; raises ``ControlError``,
        or ``SessionStateError`` while the run is queued."""
        self._started_program()
        assert self._channel is not None, "run not started"
        self._channel.use_control(control_id, value)

    # ------------------------------------------------------------ end

    def stop(self) -> None:
        """Begin ending the program (INT, TERM, then KILL); ``Stopped`` follows. Idempotent."""
        if self._queued is not None:
            self._queued.cancel()  # leaves the queue; `Stopped` follows
            return
        if self.state is not RunState.RUNNING:
            return
        self.state = RunState.STOPPING
        self._stopping = asyncio.ensure_future(self._stop_program())

    async def _stop_program(self) -> None:
        if self._display is not None:
            await self._display.capture()  # its windows vanish with the program
        await self.program.stop()

    async def _supervise(self) -> None:
        """Wait for the program to end, release what the run owns, say ``Stopped``."""
        program = self.program
        try:
            code = await program.wait()
            assert self._channel is not None
            await self._channel.close()
            await self._send_last_screen()
        finally:
            await self._close_display()
            self._release()
        # Not in ``finally``: when cancelled, ``close`` removes it after ending the run.
        if self._group is not None:
            await self._group.remove_async()
        self.state = RunState.STOPPED
        self._services.runs.forget(self)
        if self.on_ended is not None:
            self.on_ended(self)
        self.sink.put(Stopped(code, program.ending_signal, process=self.process))

    # ------------------------------------------------------------ display

    def _announce_display(self) -> None:
        """``novnc`` (before ``Started``, as upstream): where the page shows the window."""
        if self._display is None:
            return
        assert self._plan is not None and self._plan.display is not None
        self._services.displays.add(self._display)
        path = f"/novnc/{self._display.key}"
        self.sink.put(Novnc(self._plan.display.port, path, process=self.process))

    async def _send_last_screen(self) -> None:
        if self._display is None:
            return
        frame = await self._display.finish()
        if frame is not None:
            with contextlib.suppress(SinkClosed):
                await self.sink.put_output(
                    Video(base64.b64encode(frame).decode("ascii"), process=self.process)
                )

    async def _close_display(self) -> None:
        display, self._display = self._display, None
        if display is not None:
            self._services.displays.discard(display)
            await display.close()

    def _release(self) -> None:
        """Remove the plan's files, the pty and the run dir (idempotent)."""
        plan, self._plan = self._plan, None
        if plan is not None:
            _release_plan(plan)
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)

    async def close(self) -> None:
        """The owner goes away: end the program tree now, without ``Stopped``."""
        self._closing = True
        if self._queued is not None:
            queued = self._queued
            queued.cancel()
            await asyncio.gather(queued, return_exceptions=True)
        if self._program is None or self.state is RunState.STOPPED:
            return
        self.state = RunState.STOPPED
        self._services.runs.forget(self)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await self._program.abort()
            assert self._channel is not None
            await self._channel.close()
        finally:
            await self._close_display()
            self._release()
        if self._group is not None:
            await self._group.remove_async()
        if self._stopping is not None:
            self._stopping.cancel()
            await asyncio.gather(self._stopping, return_exceptions=True)


def _release_plan(plan: RunPlan) -> None:
    for release in plan.release:
        release()
    if plan.terminal is not None:
        plan.terminal.close()
