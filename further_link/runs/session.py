"""One websocket connection's state: at most one program, and what it may do.

States (the only legal ones)::

    IDLE --start/attach--> RUNNING --stop--> STOPPING
      ^                       |                  |
      +-------- program ended: `stopped` --------+

``attach`` adopts a run started with ``keepAlive`` (on any connection);
closing the connection detaches such a run instead of ending it (detach.py).

``upload`` and ``ping`` are allowed in every state. Every ``FurtherLinkError``
raised while handling a command becomes one ``error`` event here, and the
session stays usable. The program itself is a ``Run`` (run.py), the core the
v5 ``RunSession`` shares; events go to the sink, which the server encodes.
"""

from __future__ import annotations

import enum
import logging

from further_link.config import Config
from further_link.errors import (
    FurtherLinkError,
    ProtocolError,
    SessionStateError,
    UploadError,
)
from further_link.files.upload import UploadLimits, materialise_upload
from further_link.protocol.events import Ping, Pong, Stdin, Stop, Uploaded, UseControl
from further_link.protocol.runpy import AttachCommand, Command, StartCommand, UploadCommand
from further_link.runs.launch import plan_program
from further_link.runs.run import Run, RunPlan, RunState, error_event
from further_link.runs.rundirs import RunPlace
from further_link.runs.services import Services
from further_link.runs.sink import EventSink

log = logging.getLogger(__name__)


class State(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    STOPPING = "stopping"


class Session:
    """What one /run-py connection may do: one program at a time, uploads, pings."""

    def __init__(self, services: Services, sink: EventSink) -> None:
        self._services = services
        self._config: Config = services.config
        self.sink = sink
        self._run: Run | None = None
        self._closed = False
        # Only a connection that presented the device token may take over a run.
        self.may_attach = False
        self._ran = False  # a program has run on this connection (late input is dropped)

    @property
    def state(self) -> State:
        if self._run is None:
            return State.IDLE
        return State.STOPPING if self._run.state is RunState.STOPPING else State.RUNNING

    # ------------------------------------------------------------ inbound

    async def handle(self, command: Command) -> None:
        """Carry out one command; a refusal becomes an ``error`` event."""
        try:
            log.debug("command %s", type(command).__name__)
            await self._dispatch(command)
        except FurtherLinkError as exc:
            log.info("refused: %s", exc.message)
            self.sink.put(error_event(exc))
        except OSError as exc:
            # The device itself is short of something (descriptors, memory, disk):
            # the client hears why and the connection stays usable.
            log.warning("could not carry out a command: %s", exc)
            self.sink.put(error_event(exc))

    async def _dispatch(self, command: Command) -> None:
        if isinstance(command, StartCommand):
            await self._start(command)
        elif isinstance(command, Stop):
            self._stop()
        elif isinstance(command, Stdin):
            self._stdin(command)
        elif isinstance(command, UploadCommand):
            await self._upload(command)
        elif isinstance(command, Ping):
            self.sink.put(Pong())
        elif isinstance(command, UseControl):
            if self._run is None:
                raise SessionStateError("control: no program is running")
            self._run.use_control(command.control_id, command.value)
        elif isinstance(command, AttachCommand):
            await self._attach(command)
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
        run = Run(
            self._services,
            self.sink,
            on_ended=self._ended,
            keep_alive=keep_alive_for(command.keep_alive, self._config),
        )
        run.on_taken = self._ended
        await run.start(lambda place: self._plan(command, place))
        self._run = run
        self._ran = True

    async def _attach(self, command: AttachCommand) -> None:
        if self._closed:
            raise SessionStateError("the connection is closing; nothing can be attached")
        if self._run is not None and self._run.run_id != command.run_id:
            raise SessionStateError(
                "a program is already running on this connection; attach on another one"
            )
        self._run = await self._services.runs.attach(
            command.run_id, self.sink, None, self._ended, self.may_attach
        )
        self._ran = True

    def _plan(self, command: StartCommand, place: RunPlace) -> RunPlan:
        plan = plan_program(command, self._config, self._services.library_dir, place)
        script = plan.project_script
        return RunPlan(plan.spec, release=(script.remove,) if script is not None else ())

    def _ended(self, run: Run) -> None:
        if self._run is run:
            self._run = None

    # ------------------------------------------------------ stop / stdin

    def _stop(self) -> None:
        if self._run is None:
            raise SessionStateError("no program is running")
        self._run.stop()

    def _stdin(self, command: Stdin) -> None:
        if command.eof and not command.input:
            # Ending input is idempotent: a client's end of input may cross the
            # program's own exit, and that is no error.
            if self._run is not None:
                self._run.close_stdin()
            return
        if self._run is None:
            if self._ran:
                # Sent before the client saw `stopped`, as a learner typing while
                # the program ends does; the 2020 server dropped it silently too.
                log.debug("dropped input that arrived after the program ended")
                return
            raise SessionStateError("no program is running to read this input")
        self._run.write_stdin(command.input)
        if command.eof:
            self._run.close_stdin()

    # ------------------------------------------------------------ upload

    async def _upload(self, command: UploadCommand) -> None:
        config = self._config
        limits = UploadLimits.from_config(config)
        try:
            result = await materialise_upload(
                command, config.work_dir, self._services.cache, limits
            )
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            raise UploadError(f"upload failed: {exc.strerror}{where}") from None
        self.sink.put(Uploaded(version=result.version))

    # ------------------------------------------------------------- close

    async def close(self) -> None:
        """The connection is gone: end the program tree and every task.

        Server shutdown and the connection handler both call this; each call
        ends what exists by then, such as a run whose start was under way.
        """
        self._closed = True
        run, self._run = self._run, None
        if run is not None and not self._services.runs.detach(run):
            await run.close()

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def keep_alive_for(requested: float | None, config: Config) -> float:
    """Seconds a run outlives its connection: the client's ask (or the server's default),
    at most ``FURTHER_LINK_MAX_KEEP_ALIVE``. Shared by /run-py and /run."""
    seconds = config.keep_alive if requested is None else requested
    return min(seconds, config.max_keep_alive)
