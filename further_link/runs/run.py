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

from further_link.errors import StartError
from further_link.protocol.events import Novnc, Output, Started, Stopped, Video
from further_link.runs.containment import RunGroup
from further_link.runs.gui import DisplayRequest, VirtualDisplay, env_on_display, open_display
from further_link.runs.process import Program, ProgramSpec
from further_link.runs.pty import PtyLauncher
from further_link.runs.rundirs import RunPlace
from further_link.runs.services import SHORTAGES, Services, contain_run, remove_group
from further_link.runs.side_events import frame_event, send_frame_event
from further_link.runs.sink import EventSink, SinkClosed
from further_link.runs.streams import SideChannel

log = logging.getLogger(__name__)


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


Planner = Callable[[Path], RunPlan]  # the run dir -> the plan; raises StartError


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
    ) -> None:
        self.sink = sink
        self.process = process
        self.state = RunState.STARTING
        self._services = services
        self._on_ended = on_ended
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
        try:
            if self._services.admission is not None:
                await self._services.admission(self)
            await self._launch(planner)
        except BaseException:
            self.state = RunState.STOPPED
            raise
        self.state = RunState.RUNNING
        self._announce_display()
        self.sink.put(Started(process=self.process))
        self._task = asyncio.ensure_future(self._supervise())

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
            plan = planner(place.directory)
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

    # ------------------------------------------------------------ input

    def write_stdin(self, text: str) -> None:
        """Queue input for the program; raises ``StdinError`` (see ``Program.write_stdin``)."""
        self.program.write_stdin(text)

    def close_stdin(self) -> None:
        self.program.close_stdin()

    def push_key(self, key: str, event: str) -> None:
        """A browser key event for the program's ``KeyboardButton`` listeners."""
        assert self._channel is not None, "run not started"
        self._channel.push_key(key, event)

    def use_control(self, control_id: str, value: float | None) -> None:
        """The learner used one of the program's buttons or sliders; raises ``ControlError``."""
        assert self._channel is not None, "run not started"
        self._channel.use_control(control_id, value)

    # ------------------------------------------------------------ end

    def stop(self) -> None:
        """Begin ending the program (INT, TERM, then KILL); ``Stopped`` follows. Idempotent."""
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
        await remove_group(self._group)
        self.state = RunState.STOPPED
        if self._on_ended is not None:
            self._on_ended(self)
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
        if self._program is None or self.state is RunState.STOPPED:
            return
        self.state = RunState.STOPPED
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
        await remove_group(self._group)
        if self._stopping is not None:
            self._stopping.cancel()
            await asyncio.gather(self._stopping, return_exceptions=True)


def _release_plan(plan: RunPlan) -> None:
    for release in plan.release:
        release()
    if plan.terminal is not None:
        plan.terminal.close()
