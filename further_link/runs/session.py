"""One websocket connection's state: at most one program, and what it may do.

States (the only legal ones)::

    IDLE --start--> RUNNING --stop--> STOPPING
      ^                |                  |
      +----- program ended: `stopped` ----+

``upload`` and ``ping`` are allowed in every state. Every ``FurtherLinkError``
raised while handling a message becomes one ``error`` event here, and the
session stays usable.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import enum
import errno
import logging
import shutil
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from further_link.config import Config
from further_link.errors import (
    FurtherLinkError,
    ProtocolError,
    SessionStateError,
    StartError,
    UploadError,
)
from further_link.files.project import ProjectScript
from further_link.files.upload import UploadLimits, UrlCache, materialise_upload
from further_link.protocol.runpy import (
    Command,
    ErrorEvent,
    Output,
    PingCommand,
    Pong,
    Queued,
    StartCommand,
    Started,
    StdinCommand,
    StopCommand,
    Stopped,
    UploadCommand,
    Uploaded,
    Video,
    parse_command,
)
from further_link.runs.claims import ClaimRegistry, RunClaims, new_run_id
from further_link.runs.containment import BEST_EFFORT, Containment, Limits, RunGroup
from further_link.runs.launch import Plan, plan_program
from further_link.runs.pool import WarmPool
from further_link.runs.process import Launcher, Program, cold_launch
from further_link.runs.rundirs import RunPlace, RunPlaces, make_run_place
from further_link.runs.streams import SideChannel
from further_link.server.outbox import Outbox, OutboxClosed

log = logging.getLogger(__name__)

# The device itself is short of something: receive() says so, not "could not prepare the run".
SHORTAGES = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSPC, errno.EDQUOT, errno.ENOBUFS}
)


class State(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    STOPPING = "stopping"


@dataclass(frozen=True)
class Services:
    """What all sessions of one server share."""

    config: Config
    cache: UrlCache
    library_dir: Path  # holds the `further_link` client package; on every program's import path
    pool: WarmPool | None = None  # pre-started interpreters, when the pool is on
    run_places: RunPlaces | None = None  # run directories made ahead
    containment: Containment | None = None  # per-run cgroups; None: best-effort tracking
    claims: ClaimRegistry = field(default_factory=ClaimRegistry)  # hardware claims, device-wide

    @property
    def launcher(self) -> Launcher:
        return self.pool.launch if self.pool is not None else cold_launch

    def take_run_place(self) -> RunPlace:
        """A directory (and side-channel socket) for a new run; raises ``OSError``."""
        if self.run_places is not None:
            return self.run_places.take()
        return make_run_place()


@dataclass
class Run:
    """One program execution and everything it owns."""

    program: Program
    channel: SideChannel
    run_dir: Path
    project_script: ProjectScript | None = None
    group: RunGroup | None = None
    task: asyncio.Task[None] | None = None
    claims: RunClaims | None = None

    def remove_files(self) -> None:
        """Remove what the run wrote: its private dir and its script in the project."""
        if self.claims is not None:
            self.claims.release_all()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.project_script is not None:
            self.project_script.remove()


class Session:
    def __init__(self, services: Services, outbox: Outbox) -> None:
        self._services = services
        self._config = services.config
        self.outbox = outbox
        self.state = State.IDLE
        self._run: Run | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._ran = False  # a program has run on this connection (late input is dropped)

    # ------------------------------------------------------------ inbound

    async def receive(self, text: str) -> None:
        """Handle one text frame; errors become an ``error`` event."""
        try:
            command = parse_command(text)
            log.debug("command %s", type(command).__name__)
            await self._dispatch(command)
        except FurtherLinkError as exc:
            log.info("refused: %s", exc.message)
            self.outbox.put(ErrorEvent(exc.message))
        except OSError as exc:
            # The device itself is short of something (descriptors, memory, disk):
            # the client hears why and the connection stays usable.
            log.warning("could not carry out a command: %s", exc)
            self.outbox.put(ErrorEvent(f"the device could not do this now: {exc.strerror or exc}"))

    def receive_binary(self) -> None:
        self.outbox.put(
            ErrorEvent("binary messages are not understood; send JSON as a text message")
        )

    async def _dispatch(self, command: Command) -> None:
        if isinstance(command, StartCommand):
            await self._start(command)
        elif isinstance(command, StopCommand):
            self._stop()
        elif isinstance(command, StdinCommand):
            self._stdin(command)
        elif isinstance(command, UploadCommand):
            await self._upload(command)
        elif isinstance(command, PingCommand):
            self.outbox.put(Pong())
        else:  # pragma: no cover - parse_command returns only the above
            raise ProtocolError(f"unsupported command {command!r}")

    # ------------------------------------------------------------ start

    async def _start(self, command: StartCommand) -> None:
        if self._closed:
            raise SessionStateError("the connection is closing; no program can start")
        if self.state is State.STOPPING:
            raise SessionStateError("the program is still stopping; start again after 'stopped'")
        if self.state is not State.IDLE:
            raise SessionStateError("a program is already running; send stop first")
        try:
            place = self._services.take_run_place()
        except OSError as exc:
            if exc.errno in SHORTAGES:
                raise
            raise StartError(f"could not create a directory for the run: {exc.strerror}") from None
        run_dir = place.directory
        run_id = new_run_id()
        claims = RunClaims(
            self._services.claims,
            run_id,
            lambda resource, position, held_by: self.outbox.put(
                Queued(position, resource, held_by)
            ),
        )
        plan: Plan | None = None
        group: RunGroup | None = None
        try:
            plan = plan_program(command, self._config, self._services.library_dir, run_dir)
            group, rlimits = contain_run(self._services)
            spec = dataclasses.replace(plan.spec, group=group, rlimits=rlimits)
            program = Program(
                spec, self._deliver_output, self._config.kill_grace, self._services.launcher
            )
            run = Run(
                program,
                SideChannel(
                    place.socket_path,
                    lambda kind, payload: self._deliver_frame(program, payload),
                    self._config.max_message_bytes,
                    listener=place.listener,
                    peer_group=group,
                    claims=claims,
                ),
                run_dir,
                plan.project_script,
                group,
                claims=claims,
            )
            await run.channel.start()
            try:
                await program.start()
            except BaseException:
                await run.channel.close()
                raise
        except BaseException as exc:
            place.discard()
            if group is not None:
                group.kill()
                group.remove()
            if plan is not None and plan.project_script is not None:
                plan.project_script.remove()
            if isinstance(exc, OSError) and exc.errno not in SHORTAGES:
                # E.g. another program (same account) changed the run dir under us.
                where = f" ({exc.filename})" if exc.filename else ""
                raise StartError(f"could not prepare the run: {exc.strerror}{where}") from None
            raise
        self._run = run
        self._ran = True
        self.state = State.RUNNING
        self.outbox.put(Started(run_id=run_id))
        run.task = asyncio.ensure_future(self._supervise(run))

    async def _supervise(self, run: Run) -> None:
        """Wait for the program to end, then release what the run owns."""
        try:
            code = await run.program.wait()
            await run.channel.close()
        finally:
            run.remove_files()
        # Not in ``finally``: when cancelled, ``close`` removes it after ending the run.
        await remove_group(run.group)
        self._run = None
        self.state = State.IDLE
        self.outbox.put(Stopped(code, run.program.ending_signal))

    async def _deliver_output(self, stream: str, text: str) -> None:
        with contextlib.suppress(OutboxClosed):
            await self.outbox.put_output(Output(stream, text))

    async def _deliver_frame(self, program: Program, jpeg: bytes) -> None:
        await program.sync_output()
        with contextlib.suppress(OutboxClosed):
            await self.outbox.put_output(Video(base64.b64encode(jpeg).decode("ascii")))

    # ------------------------------------------------------ stop / stdin

    def _stop(self) -> None:
        if self.state is State.IDLE or self._run is None:
            raise SessionStateError("no program is running")
        if self.state is State.STOPPING:
            return
        self.state = State.STOPPING
        self._spawn(self._run.program.stop())

    def _stdin(self, command: StdinCommand) -> None:
        if command.eof and not command.input:
            # Ending input is idempotent: a client's end of input may cross the
            # program's own exit, and that is no error.
            if self._run is not None:
                self._run.program.close_stdin()
            return
        if self._run is None:
            if self._ran:
                # Sent before the client saw `stopped`, as a learner typing while
                # the program ends does; the 2020 server dropped it silently too.
                log.debug("dropped input that arrived after the program ended")
                return
            raise SessionStateError("no program is running to read this input")
        self._run.program.write_stdin(command.input)
        if command.eof:
            self._run.program.close_stdin()

    # ------------------------------------------------------------ upload

    async def _upload(self, command: UploadCommand) -> None:
        config = self._config
        limits = UploadLimits.from_config(config)
        try:
            await materialise_upload(command, config.work_dir, self._services.cache, limits)
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            raise UploadError(f"upload failed: {exc.strerror}{where}") from None
        self.outbox.put(Uploaded())

    # ------------------------------------------------------------- close

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """The connection is gone: end the program tree and every task.

        Server shutdown and the connection handler both call this; each call
        ends what exists by then, such as a run whose start was under way.
        """
        self._closed = True
        run, self._run = self._run, None
        if run is not None:
            if run.task is not None:
                run.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await run.task
            await run.program.abort()
            await run.channel.close()
            run.remove_files()
            await remove_group(run.group)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.state = State.IDLE

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def contain_run(services: Services) -> tuple[RunGroup | None, Limits | None]:
    """A new run's own cgroup, or the limits to set as rlimits (best-effort).

    Raises ``StartError`` when the cgroup cannot be made. Shared by /run-py and /run.
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


async def remove_group(group: RunGroup | None) -> None:
    if group is not None:
        # Waits (briefly) for the kernel to finish tearing the processes down.
        await asyncio.get_running_loop().run_in_executor(None, group.remove)
