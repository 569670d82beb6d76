"""Every way further-link can refuse or fail, as one tree.

    FurtherLinkError            base: message is meant for the person at the browser
     +-- ProtocolError          the client's message is malformed or not allowed
     |    +-- ProcessMessageError  ... on /run, naming the process it concerns
     +-- SessionStateError      the command does not fit now ("no program is running")
     |    +-- ClassLockedError  the teacher locked the device; the message is the teacher's
     +-- StartError             a program could not be started (missing file, bad dir)
     +-- StdinError             input could not be handed to the program
 +-- ControlError           a ``control`` message names no control of the run, or a
 |                          value that control cannot take
     +-- UploadError            an upload was refused; the previous directory is kept
     |    +-- UnsafePathError   a client-supplied name would leave its directory
     |    +-- LimitExceededError a configured cap (files, bytes) was exceeded
     |    +-- DownloadError     a url file could not be fetched completely
     |    |    +-- UnreachableError  ... because its host refused or could not be reached
     |    +-- VersionConflictError  the project changed on the device since it was opened
     |    +-- ProjectNotFoundError  GET /projects/{name} names no project
     +-- ConfigError            the server's own configuration is unusable
     +-- ClientError            `further-link run` / `pair` cannot go on (not paired,
     |    |                     refused, certificate changed, files it cannot send)
     |    +-- ConnectionLost    ... the connection broke while the program ran
     +-- ServiceError           `further-link install-service` cannot (un)install the unit
     +-- PrivilegeError         a server started as root cannot drop to the program user
     +-- TeacherError           a teacher's command was refused (unknown key, bad signature)
     +-- BodyError              a small JSON request body is too big, late or not an object

Each message names what was wrong so that a learner or teacher can act on it.
The web layer turns any of them into one ``error`` event; nothing else is
caught broadly.
"""

from __future__ import annotations

# Client data quoted in an answer or a log line is cut to this many characters,
# so a 4 MiB value cannot grow every message (and the log) by 4 MiB.
QUOTE_CHARS = 80


def shorten(text: str) -> str:
    """``text`` itself, or its first ``QUOTE_CHARS`` characters and ``...``."""
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "..."


def excerpt(value: object) -> str:
    """``repr`` of a client's value, cut to ``QUOTE_CHARS`` characters: ``'abc...'``."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= QUOTE_CHARS:
        return repr(text) if isinstance(value, str) else text
    return repr(text[:QUOTE_CHARS]) + f"... ({len(text)} characters)"


class FurtherLinkError(Exception):
    """Base of all errors whose text may be shown to the client."""

    @property
    def message(self) -> str:
        return str(self)


class ProtocolError(FurtherLinkError):
    """The client sent something that is not a valid command."""


class ProcessMessageError(ProtocolError):
    """A /run message was refused; ``process`` is its process id when it had a usable one."""

    def __init__(self, message: str, process: str | None = None) -> None:
        super().__init__(message)
        self.process = process


class SessionStateError(FurtherLinkError):
    """The command is valid but does not fit the session's current state."""


class StartError(FurtherLinkError):
    """The program could not be started."""


class StdinError(FurtherLinkError):
    """Input could not be delivered to the program."""


class ControlError(FurtherLinkError):
    """A learner's use of a program's button or slider cannot reach the program."""


class UploadError(FurtherLinkError):
    """An upload was refused or failed; the work dir is left as it was."""


class UnsafePathError(UploadError):
    """A name from the client would escape the directory it belongs in."""


class LimitExceededError(UploadError):
    """A configured cap was exceeded."""


class DownloadError(UploadError):
    """A url file could not be downloaded completely."""


class UnreachableError(DownloadError):
    """A url file's host refused the connection or could not be reached (offline)."""

    def __init__(self, url: str, message: str) -> None:
        super().__init__(message)
        self.url = url


class VersionConflictError(UploadError):
    """An upload's ``version`` is not the project's current one; nothing was written."""


class ProjectNotFoundError(UploadError):
    """No project directory of that name is in the work dir."""


class ConfigError(FurtherLinkError):
    """The server's configuration cannot be used."""


class ClientError(FurtherLinkError):
    """The command-line client cannot connect, pair or run; the message says what to do."""


class ConnectionLost(ClientError):
    """The websocket broke (not closed by the device on purpose) while a program ran."""


class ServiceError(FurtherLinkError):
    """The systemd unit cannot be installed or removed."""


class PrivilegeError(FurtherLinkError):
    """A server started as root could not become the program user for good; it must not serve."""


class ClassLockedError(SessionStateError):
    """The teacher locked this device: no program starts until the teacher unlocks it.

    The message is the teacher's own ("Eyes on the board"), shown to learners as is.
    """


class TeacherError(FurtherLinkError):
    """A teacher's command was refused: unknown key, stale challenge or bad signature."""


class BodyError(FurtherLinkError):
    """A small JSON request body (``/pair``, ``/teacher``) was refused; ``status`` is the HTTP
    status to answer (400 malformed, 408 too slow, 413 too big)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
