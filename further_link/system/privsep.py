"""Started as root, the server does what needs root, then becomes the program user for good.

The root phase is short and does no file work where a program can reach:
the caller reads the device token and the TLS key (from the root-only config
dir), binds its sockets, then calls ``drop_privileges``, which imports every
module the server may ever need, runs the root set-up steps (e.g. handing a
cgroup subtree to the program user), switches to the program user's uid, gid
and groups with no way back, and marks the process no-new-privileges and
not dumpable. Everything after that — the work dir, uploads, run dirs,
``sourcePath`` checks, interpreter probes, the warm pool — happens with the
program user's rights, so nothing a program does to a path can make the
server do more than the program itself could.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import logging
import os
from typing import Callable

from further_link.config import RunAs
from further_link.errors import PrivilegeError
from further_link.runs.containment import prepare_delegation

log = logging.getLogger(__name__)

# Steps that need root and must run just before the drop, each given the
# program user's (uid, gid). Containment (issue 8 part A) appends
# ``containment.prepare_delegation`` here: it creates the server's cgroup
# subtree and hands it to the program user.
RootStep = Callable[[int, int], None]


def _delegate_cgroups(uid: int, gid: int) -> None:
    """Hand the server a cgroup subtree the program user can manage (containment.py)."""
    try:
        prepare_delegation(uid, gid)
    except OSError as exc:
        log.warning("cannot hand a cgroup subtree to the program user (%s)", exc)


ROOT_SETUP_STEPS: list[RootStep] = [_delegate_cgroups]

# Modules the server imports lazily (at a request, an upload, a probe). After
# the drop the server's own installation may be unreadable (e.g. under
# /root), so each is imported while still root. tests/ run the server exactly
# so: a module missing here fails an end-to-end test.
LATE_MODULES = (
    "encodings.idna",
    "encodings.ascii",
    "encodings.latin_1",
    "encodings.utf_8",
    "encodings.utf_8_sig",
    "encodings.utf_16",
    "encodings.utf_32",
    "encodings.cp437",
    "encodings.punycode",
    "encodings.raw_unicode_escape",
    "encodings.unicode_escape",
    "stringprep",
    "unicodedata",
    "json",
    "ssl",
    "mimetypes",
    "email.utils",
    "email.parser",
    "email.message",
    "http.cookies",
    "concurrent.futures.thread",
    "asyncio.unix_events",
    "asyncio.sslproto",
    "zlib",
    "gzip",
    "hashlib",
    "hmac",
    "secrets",
    "base64",
    "binascii",
    "shutil",
    "tempfile",
    "platform",
    "subprocess",
    "uuid",
    "psutil",
    "aiohttp",
    "aiohttp.web",
    "aiohttp.client",
    "aiohttp.connector",
    "aiohttp.resolver",
    "aiohttp.web_fileresponse",
    "aiohttp.web_ws",
    "aiohttp.client_ws",
    "aiohttp.http_websocket",
    "yarl",
    "multidict",
    "idna",
    "further_link.server.app",
    "further_link.server.device",
    "further_link.server.webpage",
    "further_link.files.upload",
    "further_link.runs.session",
    "further_link.runs.pool",
    "further_link.runs.process",
    "further_link.runs.proctree",
    "further_link.runs.launch",
    "further_link.runs.streams",
    "further_link.trust.control",
    # GUI runs (runs/gui.py): reading the screen and saving it as JPEG (Pillow's
    # save imports these five plugins at its first call).
    "PIL.Image",
    "PIL.BmpImagePlugin",
    "PIL.GifImagePlugin",
    "PIL.JpegImagePlugin",
    "PIL.PpmImagePlugin",
    "PIL.PngImagePlugin",
)
# Imported when present: the server runs without them.
OPTIONAL_MODULES = ("aiodns", "brotli", "brotlicffi", "charset_normalizer", "certifi")

PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39


def preload_modules() -> None:
    """Import, while the installation is still readable, what the server imports later."""
    for name in LATE_MODULES:
        importlib.import_module(name)
    for name in OPTIONAL_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            log.debug("optional module %s is not installed", name)
    # Codecs are looked up by name at first use; warm the cache for the usual ones.
    for codec in ("idna", "ascii", "latin-1", "utf-8", "utf-16", "utf-32", "cp437"):
        "".encode(codec)


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise PrivilegeError(f"prctl({option}) failed: {os.strerror(errno)}")


def harden_self() -> None:
    """No-new-privileges (inherited by programs) and not dumpable (no ptrace, no /proc/PID/mem).

    Raises PrivilegeError when the kernel refuses.
    """
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _prctl(PR_SET_DUMPABLE, 0)


def drop_privileges(run_as: RunAs, steps: list[RootStep] | None = None) -> None:
    """Become ``run_as`` for good: imports, root steps, groups, gid, uid, then checks.

    Raises PrivilegeError if any part fails or root could be regained; the
    server must then not serve.
    """
    if os.geteuid() != 0:
        raise PrivilegeError("only a server started as root can drop to the program user")
    if run_as.uid == 0:
        raise PrivilegeError("programs never run as root, and the program user is root")
    preload_modules()
    for step in ROOT_SETUP_STEPS if steps is None else steps:
        step(run_as.uid, run_as.gid)
    try:
        # The account's own groups (gpio, i2c, video, ...) so hardware keeps working.
        os.setgroups(os.getgrouplist(run_as.name, run_as.gid))
        os.setresgid(run_as.gid, run_as.gid, run_as.gid)
        os.setresuid(run_as.uid, run_as.uid, run_as.uid)
    except OSError as exc:
        raise PrivilegeError(f"cannot become user {run_as.name!r}: {exc.strerror}") from None
    _check_dropped(run_as)
    harden_self()
    log.info(
        "dropped root: serving as %s (uid %d, gid %d, groups %s)",
        run_as.name,
        run_as.uid,
        run_as.gid,
        ",".join(str(g) for g in os.getgroups()),
    )


def _check_dropped(run_as: RunAs) -> None:
    if set(os.getresuid()) != {run_as.uid} or set(os.getresgid()) != {run_as.gid}:
        raise PrivilegeError("the server still holds another user or group id after the drop")
    regains: tuple[Callable[[int], None], ...] = (os.setuid, os.setgid, os.seteuid)
    for regain in regains:
        try:
            regain(0)
        except PermissionError:
            continue
        raise PrivilegeError("the server could regain root after dropping it; refusing to serve")
