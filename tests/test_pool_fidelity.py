"""A warm interpreter runs every source exactly as a fresh `python3 -u SCRIPT` does.

Sources are written as raw bytes into the shared work dir and started by
``sourcePath``, once on a server with a warm pool and once on a server
without, so paths in messages are the same and only the start differs.
"""

from __future__ import annotations

import asyncio
import codecs
import io
import os
import re
import subprocess
import time
import zipfile
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from further_link.runs.pool import REFILL_AFTER, WarmPool
from further_link.runs.process import ProgramSpec, cold_launch
from further_link.server.app import SERVICES

from conftest import TIMEOUT, Client, RunningServer, alive, make_config

StartServer = Callable[..., Awaitable[RunningServer]]
ClientFactory = Callable[..., Awaitable[Client]]


def zip_application(main: str) -> bytes:
    """A zip file holding __main__.py: `python3 FILE` runs it as a package."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("__main__.py", main)
    return buffer.getvalue()


# Cases that once differed between the pool and a fresh interpreter (issue 10).
CORPUS: dict[str, bytes] = {
    "NUL byte after a statement": b"print('hi')\0",
    "NUL byte mid-file": b"print('a')\n\0print('b')\n",
    "UTF-16 file": "print('hi')\n".encode("utf-16"),
    "UTF-8 BOM": codecs.BOM_UTF8 + b"print('bom')\n",
    "BOM with a latin-1 cookie": codecs.BOM_UTF8 + b"# coding: latin-1\nprint(1)\n",
    "latin-1 cookie": b"# -*- coding: latin-1 -*-\nprint('\xe9')\n",
    "unknown cookie": b"# coding: klingon\nprint(1)\n",
    "utf-16 cookie": b"# coding: utf-16\nprint(1)\n",
    "invalid UTF-8": b"print('\xff')\n",
    "invalid UTF-8 in a comment": b"# \xe9\nprint(1)\n",
    "CRLF": b"x = 1\r\nprint(x)\r\n",
    "lone CR": b"x = 1\rprint(x)\r",
    "form feed": b"\x0cprint(1)\n",
    "deep parentheses": b"print(" + b"(" * 300 + b"1" + b")" * 300 + b")\n",
    "deeper parentheses": b"x = " + b"(" * 5000 + b")" * 5000 + b"\n",
    "deep brackets with values": b"x = " + b"[" * 100 + b"]" * 100 + b"\n",
    "deep nested expression": b"x = " + b"-" * 100000 + b"1\n",
    "deep nested calls": b"x = " + b"f(" * 2000 + b")" * 2000 + b"\n",
    "very long line": b"x = " + b"1 + " * 100000 + b"1\nprint(x)\n",
    "huge source": b"x = 1\n" * 300000 + b"print('end')\n",
    "unterminated string": b"print('abc\n",
    "unterminated triple quote": b'"""abc\n',
    "bad indentation": b"if True:\nprint(1)\n",
    "tabs and spaces": b"if True:\n        x = 1\n\ty = 2\n",
    "continuation at end": b"x = 1 + \\",
    "empty": b"",
    "only a BOM": codecs.BOM_UTF8,
    "runtime error": b"def f():\n    return 1 / 0\nf()\n",
    "keyboard interrupt": b"raise KeyboardInterrupt\n",
    "stack of the module": b"import sys\nprint(sys._getframe().f_code.co_name)\n",
    "pyc magic": b"\xa7\r\r\n" + b"\0" * 12 + b"junk",
    "recursion": b"def f(): return f()\nf()\n",
    "zip application": zip_application(
        "import sys\nprint('zipped', sys.path[0] == sys.argv[0], __name__)\n"
    ),
    "zip application that fails": zip_application("print('a')\n1 / 0\n"),
    "zip application interrupted": zip_application("raise KeyboardInterrupt\n"),
    "zip application exits": zip_application("raise SystemExit('bye')\n"),
    "zip without a main": zip_application("print('never')\n").replace(b"__main__", b"__other__"),
}


def same_lib(text: str) -> str:
    """Each server has its own copy of the client library; its name is not the program's."""
    return re.sub(r"further-link-lib-[a-z0-9_]+", "further-link-lib-X", text)


WAITS = re.compile(r"an interpreter waits \(pid (\d+), preloading (\S+)\)")
WARM_START = re.compile(r"started a program warm \(pid (\d+)\)")


@dataclass
class PoolInLog:
    """The warm pool of a server process (as root), as its log (at DEBUG) shows it."""

    server: RunningServer

    def waiting_pids(self) -> list[int]:
        log = self.server.log()
        taken = {int(pid) for pid in WARM_START.findall(log)}
        return [int(pid) for pid, _ in WAITS.findall(log) if int(pid) not in taken]

    @property
    def warm_starts(self) -> int:
        return len(WARM_START.findall(self.server.log()))

    @property
    def preload(self) -> list[str]:
        waits = WAITS.findall(self.server.log())
        assert waits, "no interpreter waited yet"
        names = waits[-1][1]
        return [] if names == "nothing" else names.split(",")

    async def ready(self) -> None:
        """Wait until an interpreter waits (the caller bounds the time)."""
        while not [pid for pid in self.waiting_pids() if alive(pid)]:
            await asyncio.sleep(0.05)


def pool_of(server: RunningServer) -> WarmPool | PoolInLog:
    if server.runner is None:
        return PoolInLog(server)
    pool = server.runner.app[SERVICES].pool
    assert pool is not None
    return pool


@dataclass
class Pair:
    """A warm-pool server and a pool-less server sharing one work dir."""

    warm: RunningServer
    cold: RunningServer
    warm_client: Client
    cold_client: Client

    @property
    def pool(self) -> WarmPool | PoolInLog:
        return pool_of(self.warm)

    def write(self, name: str, source: bytes) -> str:
        directory = self.warm.config.work_dir / "odd"
        directory.mkdir(exist_ok=True)
        directory.chmod(0o755)
        path = directory / name
        path.write_bytes(source)
        path.chmod(0o644)
        return str(path)

    async def compare(self, source: bytes, name: str = "main.py") -> dict[str, Any]:
        """Run ``source`` both ways; assert the same outcome and that the warm run was warm."""
        path = self.write(name, source)
        await asyncio.wait_for(self.pool.ready(), 60)
        before = self.pool.warm_starts
        warm = await self.warm_client.run({"sourcePath": path})
        assert self.pool.warm_starts == before + 1, "the pool had no interpreter waiting"
        cold = await self.cold_client.run({"sourcePath": path})
        seen = {"stdout": same_lib(warm.stdout), "stderr": warm.stderr, "code": warm.exit_code}
        expected = {"stdout": same_lib(cold.stdout), "stderr": cold.stderr, "code": cold.exit_code}
        assert seen == expected, source[:200]
        return seen


async def make_pair(
    start_server: StartServer, connect: ClientFactory, preload: str = "none"
) -> Pair:
    # Each client sits idle while the other server runs (seconds on a loaded
    # machine, longer than the 5 s heartbeat it answers only when reading).
    patient = {"FURTHER_LINK_HEARTBEAT": "120"}
    warm = await start_server(
        environ={"FURTHER_LINK_POOL_SIZE": "2", "FURTHER_LINK_POOL_PRELOAD": preload, **patient}
    )
    cold = await start_server(environ={"FURTHER_LINK_POOL_SIZE": "0", **patient})
    return Pair(warm, cold, await connect(warm), await connect(cold))


@pytest.mark.parametrize("case", sorted(CORPUS))
async def test_odd_sources_run_as_a_fresh_interpreter_runs_them(
    case: str, start_server: StartServer, connect: ClientFactory
) -> None:
    pair = await make_pair(start_server, connect)
    await pair.compare(CORPUS[case])


async def test_what_a_fresh_interpreter_prints_for_the_issue_cases(
    start_server: StartServer, connect: ClientFactory
) -> None:
    pair = await make_pair(start_server, connect)
    nul = await pair.compare(CORPUS["NUL byte after a statement"])
    utf16 = await pair.compare(CORPUS["UTF-16 file"])
    deep = await pair.compare(CORPUS["deeper parentheses"])
    for outcome in (nul, utf16, deep):  # nothing of the pool's own code shows
        assert "warm" not in outcome["stderr"] and "<string>" not in outcome["stderr"]
    assert "SyntaxError" in utf16["stderr"] and "main.py" in utf16["stderr"]
    assert utf16["code"] == 1 and deep["code"] == 1
    version = subprocess.run(
        [pair.warm.config.python, "-c", "import sys; print(sys.version_info[:2] == (3, 11))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if version == "True\n":  # 3.11 stops reading at the NUL; 3.12 on refuse NUL bytes
        assert (nul["stdout"], nul["code"]) == ("hi\n", 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a script the program user cannot read")
async def test_an_unreadable_script_fails_as_a_fresh_interpreter_does(
    start_server: StartServer, connect: ClientFactory
) -> None:
    pair = await make_pair(start_server, connect)
    secret = pair.warm.config.work_dir / "secret"
    secret.mkdir(mode=0o700)
    (secret / "main.py").write_text("print(1)\n")
    data = {"sourcePath": str(secret / "main.py"), "directoryName": "odd"}
    pair.write("placeholder.py", b"")
    await asyncio.wait_for(pair.pool.ready(), 60)

    async def outcome(client: Client) -> tuple[Any, ...]:
        # A server that runs as the program user (one that dropped root) finds the
        # script unreadable itself and refuses the start; either way, both alike.
        await client.send("start", data)
        first = await client.receive()
        if first["type"] == "error":
            return ("refused", first["data"]["message"])
        assert first["type"] == "started", first
        result = await client.collect()
        return (result.stdout, result.stderr, result.exit_code)

    warm = await outcome(pair.warm_client)
    cold = await outcome(pair.cold_client)
    assert warm == cold
    if cold[0] == "refused":
        assert cold[1].endswith("cannot be read: Permission denied"), cold
    else:
        assert cold[2] == 2 and "Permission denied" in cold[1]


# Pieces odd sources are made of: encodings, separators, deep and long things.
FRAGMENTS = [
    b"print('hi')",
    b"print('\xc3\xa9')",
    b"print('\xe9')",
    b"\xff\xfe",
    b"x = 1",
    b"\0",
    b"\t",
    b"\x0c",
    b"if x:",
    b"    pass",
    b"def f(:",
    b"'''",
    b"\\",
    b"import sys; sys.exit(3)",
    b"raise ValueError('boom')",
    b"print(" + b"(" * 250 + b")" * 250 + b")",
    b"(" * 201,
    b"[" * 99 + b"]" * 99,
    b"x = " + b"+" * 3000 + b"1",
    b"y = " + b"1+" * 20000 + b"1",
    b"# coding: latin-1",
    b"# -*- coding: utf-8 -*-",
    b"# coding: nonsense",
    b"#!/usr/bin/env python3",
    b"f'{1:{2}}'",
    b"print(f'{\"x\"!r:>{4}}')",
    b"\xef\xbb\xbf",
    b"\xe2\x80\xa8",
    b"\x1a",
]
SEPARATORS = [b"\n", b"\r\n", b"\r", b"\0", b"", b" "]


@st.composite
def odd_sources(draw: st.DrawFn) -> bytes:
    parts = draw(
        st.lists(
            st.tuples(st.sampled_from(FRAGMENTS), st.sampled_from(SEPARATORS)),
            max_size=6,
        )
    )
    source = b"".join(fragment + separator for fragment, separator in parts)
    prefix = draw(st.sampled_from([b"", codecs.BOM_UTF8, b"# coding: utf-8\n"]))
    source = prefix + source
    if draw(st.booleans()) and draw(st.booleans()):  # a quarter: another file encoding
        text = source.decode("utf-8", "replace")
        source = text.encode(
            draw(st.sampled_from(["utf-16", "utf-16-le", "latin-1", "utf-32"])), "replace"
        )
    return source


async def test_generated_odd_sources_run_as_a_fresh_interpreter_runs_them(
    start_server: StartServer, connect: ClientFactory
) -> None:
    pair = await make_pair(start_server, connect)
    loop = asyncio.get_running_loop()

    @settings(
        max_examples=100,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(odd_sources())
    def check(source: bytes) -> None:
        asyncio.run_coroutine_threadsafe(pair.compare(source), loop).result(timeout=120)

    await asyncio.to_thread(check)


INTROSPECT_START = b"""\
import os, sys
print(open('/proc/self/cmdline', 'rb').read())
environ = open('/proc/self/environ', 'rb').read().split(b'\\0')
print(sorted(e if not e.startswith(b'FURTHER_LINK_') else e.partition(b'=')[0] for e in environ))
print(getattr(sys, 'orig_argv', None))
print(os.popen('ps -o args= -p %d' % os.getpid()).read())
print(sorted(m for m in sys.modules if not m.startswith(('numpy', 'PIL'))))
print(sorted(sys.path_importer_cache)[:3])
"""


async def test_a_pool_started_program_looks_like_a_fresh_start_in_ps_and_proc(
    start_server: StartServer, connect: ClientFactory
) -> None:
    pair = await make_pair(start_server, connect)
    seen = await pair.compare(INTROSPECT_START + b"import time\n", name="title.py")
    script = str(pair.warm.config.work_dir / "odd" / "title.py")
    assert f"-u {script}\n" in seen["stdout"], seen["stdout"]
    assert f"\\x00-u\\x00{script}\\x00'\n" in seen["stdout"], seen["stdout"]


async def test_a_running_pool_program_shows_its_script_to_a_teachers_ps(
    start_server: StartServer, connect: ClientFactory
) -> None:
    pair = await make_pair(start_server, connect)
    path = pair.write("runaway.py", b"import os, time\nprint(os.getpid())\ntime.sleep(60)\n")
    await asyncio.wait_for(pair.pool.ready(), 60)
    await pair.warm_client.send("start", {"sourcePath": path})
    await pair.warm_client.receive_type("started")
    pid = int((await pair.warm_client.receive_type("stdout"))["data"]["output"])
    shown = subprocess.run(
        ["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True, check=True
    ).stdout.strip()
    python = pair.warm.config.python
    assert shown == f"{python} -u {path}"
    assert Path(f"/proc/{pid}/cmdline").read_bytes() == os.fsencode(f"{python}\0-u\0{path}\0")
    await pair.warm_client.send("stop")
    await pair.warm_client.receive_type("stopped")


PRELOADED_PROGRAMS = {
    "numpy": b"import numpy, sys\nprint(numpy.arange(3).sum(), sys.argv, sys.path[0])\n",
    "pillow": b"from PIL import Image\nprint(Image.new('RGB', (3, 2)).size, __name__)\n",
    "both, then an error": b"import numpy\nfrom PIL import Image\nnumpy.zeros(-1)\n",
    "environment": b"import os, sys\nprint(os.getcwd(), sorted(os.environ), sys.argv)\n",
    # A preloaded interpreter ends without tearing the libraries down: what a
    # program sees of the interpreter's shutdown must still happen, in order.
    "shutdown order": (
        b"import atexit, numpy\n"
        b"class Noisy:\n"
        b"    def __init__(self, name):\n"
        b"        self.name = name\n"
        b"    def __del__(self):\n"
        b"        print('del', self.name)\n"
        b"_private = Noisy('private')\n"
        b"public = Noisy('public')\n"
        b"atexit.register(print, 'at exit 1')\n"
        b"atexit.register(print, 'at exit 2')\n"
        b"try:\n"
        b"    print('body', end='')\n"
        b"finally:\n"
        b"    print(' finally')\n"
    ),
    "a thread outlives the main code": (
        b"import threading, time\n"
        b"def work():\n"
        b"    time.sleep(0.3)\n"
        b"    print('thread done')\n"
        b"threading.Thread(target=work).start()\n"
        b"print('main done')\n"
    ),
    "a failing exit hook after an error": (
        b"import atexit, sys\n"
        b"class Boom:\n"
        b"    def __call__(self):\n"
        b"        1 / 0\n"
        b"    def __repr__(self):\n"
        b"        return 'boom'\n"  # the report names it: no address, which differs per run
        b"atexit.register(Boom())\n"
        b"atexit.register(print, 'at exit', file=sys.stderr)\n"
        b"raise ValueError('boom')\n"
    ),
    "an exit hook that exits": b"import atexit, sys\natexit.register(sys.exit, 3)\nprint('x')\n",
    "objects ended at exit, no exit hooks": (
        b"import numpy, sys\n"
        b"class Noisy:\n"
        b"    def __repr__(self):\n"
        b"        return 'noisy'\n"
        b"    def __del__(self):\n"
        b"        print('del', self)\n"
        b"        sys.stdout.write('unflushed')\n"
        b"keep = Noisy()\n"
        b"print(numpy.arange(3).sum())\n"
        b"try:\n"
        b"    raise SystemError('boom')\n"
        b"finally:\n"
        b"    print('finally')\n"
    ),
}


@pytest.mark.parametrize("program", sorted(PRELOADED_PROGRAMS))
async def test_a_preloaded_pool_runs_programs_as_a_fresh_interpreter(
    program: str, start_server: StartServer, connect: ClientFactory
) -> None:
    pair = await make_pair(start_server, connect, preload="numpy,PIL.Image")
    await asyncio.wait_for(pair.pool.ready(), 60)
    assert pair.pool.preload == ["numpy", "PIL.Image"]
    await pair.compare(PRELOADED_PROGRAMS[program])
    for case in ("UTF-16 file", "recursion", "keyboard interrupt", "NUL byte mid-file"):
        await pair.compare(CORPUS[case])


async def test_a_preloaded_program_s_unclosed_file_keeps_what_it_wrote(
    start_server: StartServer, connect: ClientFactory, shared: Path
) -> None:
    pair = await make_pair(start_server, connect, preload="numpy,PIL.Image")
    await asyncio.wait_for(pair.pool.ready(), 60)
    out = shared / "unclosed.txt"
    # Never closed: the interpreter's shutdown flushes it as the file object goes.
    writer = f"import numpy\nfile = open({str(out)!r}, 'w')\nfile.write('kept' * 1000)\n"
    before = pair.pool.warm_starts
    result = await pair.warm_client.run({"sourceScript": writer})
    assert pair.pool.warm_starts == before + 1
    assert result.exit_code == 0
    assert out.read_text() == "kept" * 1000


async def test_a_programs_own_module_shadows_a_preloaded_one(
    start_server: StartServer, connect: ClientFactory
) -> None:
    pair = await make_pair(start_server, connect, preload="numpy")
    Path(pair.write("numpy.py", b"print('my own numpy')\n"))
    seen = await pair.compare(b"import numpy\nprint(numpy.__file__)\n", name="uses_own.py")
    assert seen["stdout"].startswith("my own numpy\n")


async def preloading_server(
    start_server: StartServer, preload: str, **environ: str
) -> tuple[RunningServer, WarmPool | PoolInLog]:
    """A server with a pool of 2 preloading ``preload``, once an interpreter waits."""
    server = await start_server(
        environ={"FURTHER_LINK_POOL_SIZE": "2", "FURTHER_LINK_POOL_PRELOAD": preload, **environ}
    )
    pool = pool_of(server)
    await asyncio.wait_for(pool.ready(), 60)
    return server, pool


def write_module(directory: Path, name: str, source: str) -> None:
    directory.mkdir(exist_ok=True)
    directory.chmod(0o755)
    (directory / f"{name}.py").write_text(source)
    (directory / f"{name}.py").chmod(0o644)


@pytest.mark.parametrize(
    ("module", "source", "why"),
    [
        ("explodes", "raise RuntimeError('not on this device')\n", "not on this device"),
        ("chatty", "print('hello from chatty')\n", "writes output"),
        ("quits", "import os\nos._exit(3)\n", "ended while importing"),
    ],
)
async def test_a_module_that_misbehaves_when_preloaded_is_dropped_and_runs_go_on(
    module: str,
    source: str,
    why: str,
    sandbox: Path,
    start_server: StartServer,
    connect: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    libraries = sandbox / "shared" / "libs"
    write_module(libraries, module, source)
    server, pool = await preloading_server(
        start_server, f"{module},numpy", PYTHONPATH=str(libraries)
    )
    assert pool.preload == ["numpy"]
    said = server.log().splitlines() if server.process else [r.getMessage() for r in caplog.records]
    dropped = [line for line in said if module in line and "not preloading" in line]
    assert len(dropped) == 1 and why in dropped[0], dropped
    client = await connect(server)
    result = await client.run({"sourceScript": "import numpy\nprint(numpy.ones(2).sum())"})
    assert (result.stdout, result.exit_code) == ("2.0\n", 0)
    assert pool.warm_starts == 1


# What README promises for a waiting interpreter with numpy and Pillow imported.
PRELOADED_RSS_LIMIT = 80 * 1024 * 1024


async def test_a_preloaded_interpreter_costs_the_memory_readme_states(
    start_server: StartServer,
) -> None:
    import psutil

    _, pool = await preloading_server(start_server, "numpy,PIL.Image")
    assert pool.preload == ["numpy", "PIL.Image"]
    for pid in pool.waiting_pids():
        rss = psutil.Process(pid).memory_info().rss
        assert 10 * 1024 * 1024 < rss < PRELOADED_RSS_LIMIT, rss


async def test_runs_faster_than_preloading_get_plain_interpreters_then_preloaded_ones_again(
    start_server: StartServer, connect: ClientFactory
) -> None:
    server, pool = await preloading_server(start_server, "numpy")
    client = await connect(server)
    probe = "import sys\nprint('numpy' in sys.modules)"
    burst = [await client.run({"sourceScript": probe}) for _ in range(6)]
    assert all((r.stdout, r.exit_code) in (("True\n", 0), ("False\n", 0)) for r in burst)
    preloaded_again = False
    for _ in range(8):  # bounded: two plain interpreters are used up, then preloaded ones come
        await asyncio.wait_for(pool.ready(), 60)
        await asyncio.sleep(0.5)
        result = await client.run({"sourceScript": probe})
        if result.stdout == "True\n":
            preloaded_again = True
            break
    assert preloaded_again
    assert pool.preload == ["numpy"]


async def read_to_end(fd: int) -> bytes:
    """Everything a launched program writes to ``fd`` until it closes it (bounded in time)."""
    loop = asyncio.get_running_loop()
    data = b""
    deadline = loop.time() + 60
    os.set_blocking(fd, False)
    try:
        while loop.time() < deadline:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                await asyncio.sleep(0.01)
                continue
            if not chunk:
                return data
            data += chunk
    finally:
        os.close(fd)
    raise AssertionError("the program did not close its output within 60 s")


async def launch_and_collect(launch: Any, spec: ProgramSpec) -> tuple[bytes, bytes, int]:
    launched = await launch(spec)
    out, err = await asyncio.gather(
        read_to_end(launched.stdout_fd), read_to_end(launched.stderr_fd)
    )
    if launched.process.stdin is not None:
        launched.process.stdin.close()
    return out, err, await asyncio.wait_for(launched.process.wait(), 60)


async def test_a_missing_script_or_a_directory_fails_as_a_fresh_interpreter_does(
    sandbox: Path,
) -> None:
    # The server checks sourcePath before starting, so these are launched directly:
    # a script can still vanish, or become a directory, between that check and the start.
    config = make_config(sandbox, environ={"FURTHER_LINK_POOL_PRELOAD": "none"})
    base_env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    # Here in the test process (root in CI): it only ever starts a script that is not there.
    pool = WarmPool(2, config.python, base_env)
    pool.start()
    place = sandbox / "shared"
    (place / "adir").mkdir()
    (place / "adir").chmod(0o755)
    try:
        for script in (place / "missing.py", place / "adir"):
            spec = ProgramSpec([config.python, "-u", str(script)], place, base_env)
            await asyncio.wait_for(pool.ready(), 60)
            before = pool.warm_starts
            warm = await launch_and_collect(pool.launch, spec)
            assert pool.warm_starts == before + 1
            cold = await launch_and_collect(cold_launch, spec)
            assert warm == cold
            assert cold[2] in (1, 2) and str(script).encode() in cold[1]
    finally:
        await pool.close()


async def test_the_pool_refills_after_the_program_that_took_an_interpreter(
    start_server: StartServer, connect: ClientFactory
) -> None:
    """Refilling (a Python start-up, preload imports) never shares the cores with a
    program's first moments: it waits for the program to end, or to have run a while."""
    server = await start_server(environ={"FURTHER_LINK_POOL_SIZE": "1"})
    pool = pool_of(server)
    await asyncio.wait_for(pool.ready(), TIMEOUT)
    client = await connect(server)

    # A short program: the pool stays empty while it runs, then refills.
    await client.send("start", {"sourceScript": "import time\nprint('up')\ntime.sleep(0.5)\n"})
    await client.receive_type("started")
    await client.read_output("up\n")
    assert pool.warm_starts == 1
    await asyncio.sleep(0.3)  # a refill 30 ms after the start would be waiting by now
    assert pool.waiting_pids() == [], "the pool refilled while the program was starting"
    await client.receive_type("stopped")
    await asyncio.wait_for(pool.ready(), TIMEOUT)

    # A long program: the pool refills after REFILL_AFTER, while it still runs.
    await client.send("start", {"sourceScript": "import time\nprint('up')\ntime.sleep(60)\n"})
    await client.receive_type("started")
    await client.read_output("up\n")
    began = time.monotonic()
    assert pool.warm_starts == 2
    await asyncio.wait_for(pool.ready(), TIMEOUT)
    assert time.monotonic() - began >= REFILL_AFTER - 0.2
    await client.send("stop")
    await client.receive_type("stopped")
