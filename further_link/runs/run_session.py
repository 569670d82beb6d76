"""One v5 ``/run`` connection: any number of processes, each under a client-chosen id.

Each process is a ``Process`` entry, from a successful ``start`` until its
``stopped`` is queued; then its id is free again. Per process::

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
import base64
import contextlib
import dataclasses
import enum
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from further_link.errors import FurtherLinkError, ProcessMessageError, SessionStateError, StartError
from further_link.protocol.run import (
    RunCommand,
    RunKeyEvent,
    RunOptions,
    RunPing,
    RunResize,
    RunStart,
    RunStdin,
    RunStop,
    parse_run_command,
)
from further_link.protocol.runpy import (
    ErrorEvent,
    KeyListen,
    Output,
    Pong,
    Queued,
    Started,
    Stopped,
    Video,
)
from further_link.runs.claims import RunClaims, new_run_id
from further_link.runs.containment import RunGroup
from further_link.runs.process import Program
from further_link.runs.pty import PtyLauncher
from further_link.runs.runners import ScriptFile, plan_run
from further_link.runs.session import Services, contain_run, remove_group
from further_link.runs.streams import KIND_KEYLISTEN, SideChannel
from further_link.server.outbox import Outbox, OutboxClosed

log = logging.getLogger(__name__)

# Further runs one or two programs at a time; this only bounds a runaway client.
MAX_PROCESSES = 64


class ProcessState(enum.Enum):
    RUNNING = "running"
    STOPPING = "stopping"


@dataclass
class Process:
    """One started process of the connection and everything it owns."""

    process_id: str
    program: Program
    channel: SideChannel
    run_dir: Path
    script: ScriptFile | None
    terminal: PtyLauncher | None
    group: RunGroup | None = None  # the process's cgroups (containment), when there are any
    state: ProcessState = ProcessState.RUNNING
    task: asyncio.Task[None] | None = None
    claims: RunClaims | None = None

    def release(self) -> None:
        """Remove the temporary script, the pty and the run dir (idempotent)."""
        if self.claims is not None:
            self.claims.release_all()
        if self.script is not None:
            self.script.remove()
        if self.terminal is not None:
            self.terminal.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)


class RunSession:
    def __init__(self, services: Services, outbox: Outbox, options: RunOptions) -> None:
        self._services = services
        self._config = services.config
        self.outbox = outbox
        self.options = options
        self._processes: dict[str, Process] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    @property
    def process_ids(self) -> list[str]:
        return list(self._processes)

    # ------------------------------------------------------------ inbound

    async def receive(self, text: str) -> None:
        """Handle one text frame; a refusal becomes an ``error`` event."""
        process: str | None = None
        try:
            command = parse_run_command(text)
            process = getattr(command, "process", None)
            log.debug("command %s", type(command).__name__)
            await self._dispatch(command)
        except ProcessMessageError as exc:
            log.info("refused: %s", exc.message)
            self.outbox.put(ErrorEvent(exc.message, process=exc.process))
        except FurtherLinkError as exc:
            log.info("refused: %s", exc.message)
            self.outbox.put(ErrorEvent(exc.message, process=process))

    def receive_binary(self) -> None:
        self.outbox.put(
            ErrorEvent("binary messages are not understood; send JSON as a text message")
        )

    async def _dispatch(self, command: RunCommand) -> None:
        if isinstance(command, RunPing):
            self.outbox.put(Pong())
        elif isinstance(command, RunStart):
            await self._start(command)
        elif isinstance(command, RunStdin):
            self._running(command.process, "stdin").program.write_stdin(command.input)
        elif isinstance(command, RunResize):
            self._resize(command)
        elif isinstance(command, RunStop):
            self._stop(command.process)
        elif isinstance(command, RunKeyEvent):
            self._running(command.process, "keyevent").channel.push_key(command.key, command.event)
        else:  # pragma: no cover - parse_run_command returns only the above
            raise ProcessMessageError(f"unsupported command {command!r}")

    def _running(self, process_id: str, what: str) -> Process:
        process = self._processes.get(process_id)
        if process is None:
            raise SessionStateError(
                f"{what}: no process {process_id!r} is running on this connection"
            )
        return process

    # ------------------------------------------------------------ start

    async def _start(self, command: RunStart) -> None:
        process_id = command.process
        if self._closed:
            raise SessionStateError("the connection is closing; no process can start")
        if process_id in self._processes:
            raise SessionStateError(
                f"process {process_id!r} is still running; use a new id or wait for its 'stopped'"
            )
        if len(self._processes) >= MAX_PROCESSES:
            raise SessionStateError(
                f"{MAX_PROCESSES} processes are already running on this connection; stop one first"
            )
        self._check_user()
        try:
            place = self._services.take_run_place()
        except OSError as exc:
            raise StartError(f"could not create a directory for the run: {exc.strerror}") from None
        script: ScriptFile | None = None
        group: RunGroup | None = None
        terminal = PtyLauncher() if self.options.pty else None
        run_id = new_run_id()
        claims = RunClaims(
            self._services.claims,
            run_id,
            lambda resource, position, held_by: self.outbox.put(
                Queued(position, resource, held_by, process=process_id)
            ),
        )
        try:
            planned = plan_run(command, self._config, self._services.library_dir, place.directory)
            script = planned.script
            group, rlimits = contain_run(self._services)
            program = Program(
                dataclasses.replace(planned.spec, group=group, rlimits=rlimits),
                lambda stream, text: self._deliver_output(process_id, stream, text),
                self._config.kill_grace,
                terminal or self._services.launcher,
            )
            channel = SideChannel(
                place.socket_path,
                lambda kind, payload: self._deliver_frame(process_id, program, kind, payload),
                self._config.max_message_bytes,
                listener=place.listener,
                peer_group=group,
                claims=claims,
            )
            await channel.start()
            try:
                await program.start()
            except BaseException:
                await channel.close()
                raise
        except BaseException as exc:
            place.discard()
            if group is not None:
                group.kill()
                group.remove()
            if script is not None:
                script.remove()
            if terminal is not None:
                terminal.close()
            if isinstance(exc, OSError):
                where = f" ({exc.filename})" if exc.filename else ""
                raise StartError(f"could not prepare the run: {exc.strerror}{where}") from None
            raise
        process = Process(
            process_id,
            program,
            channel,
            place.directory,
            script,
            terminal,
            group=group,
            claims=claims,
        )
        self._processes[process_id] = process
        self.outbox.put(Started(process=process_id, run_id=run_id))
        process.task = asyncio.ensure_future(self._supervise(process))

    def _check_user(self) -> None:
        requested = self.options.user
        run_as = self._config.run_as
        if requested is None or run_as is None or requested == run_as.name:
            return
        raise StartError(
            f"cannot run programs as user {requested!r}: this device runs them as "
            f"{run_as.name!r} only; connect without ?user= or with ?user={run_as.name}"
        )

    async def _supervise(self, process: Process) -> None:
        """Wait for the program to end, release what it owns, free its id, say ``stopped``."""
        try:
            code = await process.program.wait()
            await process.channel.close()
        finally:
            process.release()
        # Not in ``finally``: when cancelled, ``close`` removes it after ending the run.
        await remove_group(process.group)
        self._processes.pop(process.process_id, None)
        self.outbox.put(Stopped(code, process.program.ending_signal, process=process.process_id))

    async def _deliver_output(self, process_id: str, stream: str, text: str) -> None:
        with contextlib.suppress(OutboxClosed):
            await self.outbox.put_output(Output(stream, text, process=process_id))

    async def _deliver_frame(
        self, process_id: str, program: Program, kind: bytes, payload: bytes
    ) -> None:
        await program.sync_output()
        if kind == KIND_KEYLISTEN:
            self.outbox.put(KeyListen(payload.decode("utf-8", "replace"), process=process_id))
            return
        with contextlib.suppress(OutboxClosed):
            await self.outbox.put_output(
                Video(base64.b64encode(payload).decode("ascii"), process=process_id)
            )

    # ------------------------------------------------------ stop / resize

    def _stop(self, process_id: str) -> None:
        process = self._running(process_id, "stop")
        if process.state is ProcessState.STOPPING:
            return
        process.state = ProcessState.STOPPING
        task = asyncio.ensure_future(process.program.stop())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _resize(self, command: RunResize) -> None:
        process = self._running(command.process, "resize")
        if process.terminal is None:
            raise ProcessMessageError(
                "resize works only for a terminal: connect with /run?pty=true", command.process
            )
        process.terminal.resize(command.rows, command.cols)

    # ------------------------------------------------------------- close

    async def close(self) -> None:
        """The connection is gone: end every process tree and every task."""
        self._closed = True
        processes = list(self._processes.values())
        self._processes.clear()
        await asyncio.gather(*(self._end(process) for process in processes))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _end(self, process: Process) -> None:
        if process.task is not None:
            process.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await process.task
        try:
            await process.program.abort()
            await process.channel.close()
        finally:
            process.release()
        await remove_group(process.group)

    async def __aenter__(self) -> RunSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
