"""One v5 ``/run`` connection: any number of processes, each under a client-chosen id.

Each process is a ``Run`` (run.py, the core /run-py shares), from a successful
``start`` until its ``stopped`` is queued; then its id is free again. Per process::

    (absent) --start--> RUNNING --stop--> STOPPING
        ^                  |                  |
        +------ program ended: `stopped` -----+

A failed ``start`` leaves nothing behind and answers an ``error`` carrying the
process id. Every ``FurtherLinkError`` while handling a message becomes one
``error`` event (with the process id when it concerns one), and the
connection stays usable. Closing the connection ends every process.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from further_link.errors import FurtherLinkError, ProcessMessageError, SessionStateError, StartError
from further_link.protocol.events import ErrorEvent, Ping, Pong, Stdin, Stop, UseControl
from further_link.protocol.run import (
    RunAttach,
    RunCommand,
    RunKeyEvent,
    RunOptions,
    RunResize,
    RunStart,
)
from further_link.runs.gui import DisplayRequest
from further_link.runs.pty import PtyLauncher
from further_link.runs.run import Run, RunPlan, error_event
from further_link.runs.runners import plan_run
from further_link.runs.services import Services
from further_link.runs.session import keep_alive_for
from further_link.runs.sink import EventSink

log = logging.getLogger(__name__)

# Further runs one or two programs at a time; this only bounds a runaway client.
MAX_PROCESSES = 64


class RunSession:
    """What one v5 /run connection may do: its processes, by id."""

    def __init__(
        self,
        services: Services,
        sink: EventSink,
        options: RunOptions,
        gui_port: int | None = None,
    ) -> None:
        """``gui_port``: the server port this connection came in on, named in ``novnc``."""
        self._services = services
        self._gui_port = gui_port
        self._config = services.config
        self.sink = sink
        self.options = options
        self._processes: dict[str, Run] = {}
        self._closed = False
        # Only a connection that presented the device token may take over a run.
        self.may_attach = False

    @property
    def process_ids(self) -> list[str]:
        return list(self._processes)

    # ------------------------------------------------------------ inbound

    async def handle(self, command: RunCommand) -> None:
        """Carry out one command; a refusal becomes an ``error`` event with its process id."""
        process = getattr(command, "process", None)
        try:
            log.debug("command %s", type(command).__name__)
            await self._dispatch(command)
        except ProcessMessageError as exc:
            log.info("refused: %s", exc.message)
            self.sink.put(ErrorEvent(exc.message, process=exc.process))
        except FurtherLinkError as exc:
            log.info("refused: %s", exc.message)
            self.sink.put(error_event(exc, process))
        except OSError as exc:
            # The device is short of something (descriptors, memory, disk), as on /run-py.
            log.warning("could not carry out a command: %s", exc)
            self.sink.put(error_event(exc, process))

    async def _dispatch(self, command: RunCommand) -> None:
        if isinstance(command, Ping):
            self.sink.put(Pong())
        elif isinstance(command, RunStart):
            await self._start(command)
        elif isinstance(command, Stdin):
            assert command.process is not None  # parse_run_command requires one
            self._running(command.process, "stdin").write_stdin(command.input)
        elif isinstance(command, RunResize):
            self._resize(command)
        elif isinstance(command, Stop):
            assert command.process is not None
            self._running(command.process, "stop").stop()
        elif isinstance(command, RunAttach):
            await self._attach(command)
        elif isinstance(command, RunKeyEvent):
            self._running(command.process, "keyevent").push_key(command.key, command.event)
        elif isinstance(command, UseControl):
            assert command.process is not None
            self._running(command.process, "control").use_control(command.control_id, command.value)
        else:  # pragma: no cover - parse_run_command returns only the above
            raise ProcessMessageError(f"unsupported command {command!r}")

    def _running(self, process_id: str, what: str) -> Run:
        run = self._processes.get(process_id)
        if run is None:
            raise SessionStateError(
                f"{what}: no process {process_id!r} is running on this connection"
            )
        return run

    # ------------------------------------------------------------ start

    async def _start(self, command: RunStart) -> None:
        process_id = command.process
        if self._closed:
            raise SessionStateError("the connection is closing; no process can start")
        self._check_room(process_id, "use a new id or wait for its 'stopped'")
        self._check_user()
        run = Run(
            self._services,
            self.sink,
            process_id,
            on_ended=self._ended,
            keep_alive=keep_alive_for(command.keep_alive, self._config),
        )
        run.on_taken = self._ended
        await run.start(lambda place: self._plan(command, place.directory))
        self._processes[process_id] = run

    async def _attach(self, command: RunAttach) -> None:
        process_id = command.process
        if self._closed:
            raise SessionStateError("the connection is closing; nothing can be attached")
        self._check_room(process_id, "attach under a new id")
        run = await self._services.runs.attach(
            command.run_id, self.sink, process_id, self._ended, self.may_attach
        )
        self._processes[process_id] = run

    def _check_room(self, process_id: str, hint: str) -> None:
        if process_id in self._processes:
            raise SessionStateError(f"process {process_id!r} is still running; {hint}")
        if len(self._processes) >= MAX_PROCESSES:
            raise SessionStateError(
                f"{MAX_PROCESSES} processes are already running on this connection; stop one first"
            )

    def _plan(self, command: RunStart, run_dir: Path) -> RunPlan:
        planned = plan_run(command, self._config, self._services.library_dir, run_dir)
        script = planned.script
        novnc = command.novnc
        display = None
        if novnc is not None and novnc.enabled:
            port = self._gui_port if self._gui_port is not None else self._config.port
            display = DisplayRequest(novnc.width, novnc.height, port)
        return RunPlan(
            planned.spec,
            release=(script.remove,) if script is not None else (),
            terminal=PtyLauncher() if self.options.pty else None,
            display=display,
        )

    def _ended(self, run: Run) -> None:
        if run.process is not None and self._processes.get(run.process) is run:
            del self._processes[run.process]

    def _check_user(self) -> None:
        requested = self.options.user
        run_as = self._config.run_as
        if requested is None or run_as is None or requested == run_as.name:
            return
        raise StartError(
            f"cannot run programs as user {requested!r}: this device runs them as "
            f"{run_as.name!r} only; connect without ?user= or with ?user={run_as.name}"
        )

    # ------------------------------------------------------------ resize

    def _resize(self, command: RunResize) -> None:
        run = self._running(command.process, "resize")
        if run.terminal is None:
            raise ProcessMessageError(
                "resize works only for a terminal: connect with /run?pty=true", command.process
            )
        run.terminal.resize(command.rows, command.cols)

    # ------------------------------------------------------------- close

    async def close(self) -> None:
        """The connection is gone: end every process tree and every task."""
        self._closed = True
        runs = list(self._processes.values())
        self._processes.clear()
        book = self._services.runs
        await asyncio.gather(*(run.close() for run in runs if not book.detach(run)))

    async def __aenter__(self) -> RunSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
