"""The warm interpreter pool: a program must not be able to tell it was pre-started."""

from __future__ import annotations

import re
from collections.abc import Awaitable
from typing import Any, Callable

from further_link.server.app import SERVICES

from conftest import Client, RunningServer, RunResult

StartServer = Callable[..., Awaitable[RunningServer]]
ClientFactory = Callable[..., Awaitable[Client]]

INTROSPECT = '''"""doc of the script"""
import os, sys, signal, threading
import further_link
print("argv", sys.argv)
print("path", sys.path)
print("file", __file__, __name__, __doc__, __spec__, __package__, __cached__)
print("main globals", sorted(globals()))
print("loader", type(__loader__).__name__, __loader__.name, __loader__.path)
print("cwd", os.getcwd())
print("env", sorted((k, v) for k, v in os.environ.items() if k != "FURTHER_LINK_RUN_ID"))
print("ids", os.getuid(), os.getgid(), os.getgroups())
print("session", os.getsid(0) == os.getpid(), os.getpgid(0) == os.getpid())
print("flags", sys.flags)
print("stdio", sys.stdout.encoding, sys.stdout.line_buffering, sys.stdout.write_through)
print("stdin", sys.stdin.encoding, sys.stdin.isatty())
print("threads", threading.active_count())
print("signals", signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGPIPE))
print("modules", "further_link" in sys.modules, further_link.__version__)
print("umask", os.umask(0o22))
print("input", input())
print("to stderr", file=sys.stderr)
'''

ENDINGS = {
    "exit 7": "import sys\nsys.exit(7)",
    "exit message": "import sys\nsys.exit('bye')",
    "traceback": "def f():\n    raise ValueError('boom')\nf()",
    "syntax error": "x = (\n",
    "keyboard interrupt": "raise KeyboardInterrupt",
    "killed by signal": "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)",
    "atexit": "import atexit\natexit.register(lambda: print('at exit'))\nprint('main')",
}


def normalise(result: RunResult) -> dict[str, Any]:
    """Remove what differs between any two runs (the run's temporary directory)."""

    def clean(text: str) -> str:
        text = re.sub(r"further-link-run-[^/'\"\s]+", "further-link-run-X", text)
        return re.sub(r"further-link-lib-[^/'\"\s]+", "further-link-lib-X", text)

    return {
        "stdout": clean(result.stdout),
        "stderr": clean(result.stderr),
        "code": result.exit_code,
    }


async def run_both_ways(
    start_server: StartServer,
    connect: ClientFactory,
    data: dict[str, Any],
    stdin: tuple[str, ...] = (),
) -> tuple[dict[str, Any], dict[str, Any], RunningServer]:
    warm_server = await start_server(environ={"FURTHER_LINK_POOL_SIZE": "2"})
    cold_server = await start_server(environ={"FURTHER_LINK_POOL_SIZE": "0"})
    warm = await (await connect(warm_server)).run(data, stdin)
    cold = await (await connect(cold_server)).run(data, stdin)
    return normalise(warm), normalise(cold), warm_server


def warm_starts(server: RunningServer) -> int:
    """How many programs the server started in a waiting interpreter."""
    if server.runner is None:  # a server process: it logs each (at DEBUG, as tests run it)
        return server.log().count("started a program warm")
    pool = server.runner.app[SERVICES].pool
    assert pool is not None
    return pool.warm_starts


async def test_script_sees_the_same_world_warm_or_cold(
    start_server: StartServer, connect: ClientFactory
) -> None:
    warm, cold, warm_server = await run_both_ways(
        start_server, connect, {"sourceScript": INTROSPECT}, ("typed\n",)
    )
    assert warm == cold
    assert "input typed" in warm["stdout"] and warm["code"] == 0, warm["stderr"]
    assert warm_starts(warm_server) == 1


async def test_uploaded_project_sees_the_same_world_warm_or_cold(
    start_server: StartServer, connect: ClientFactory
) -> None:
    for server_env in ({"FURTHER_LINK_POOL_SIZE": "2"}, {"FURTHER_LINK_POOL_SIZE": "0"}):
        server = await start_server(environ=server_env)
        client = await connect(server)
        files = {
            "main.py": {"type": "text", "content": {"text": INTROSPECT}},
            "helper.py": {"type": "text", "content": {"text": "X = 1\n"}},
        }
        await client.send("upload", {"directory": {"name": "proj", "files": files}})
        assert (await client.receive())["type"] == "uploaded"
    warm_server, cold_server = await start_server(environ={"FURTHER_LINK_POOL_SIZE": "2"}), None
    del warm_server, cold_server  # the two servers above share one work dir
    for data in (
        {"sourcePath": "proj/main.py"},
        {"sourceScript": INTROSPECT + "import helper\n", "directoryName": "proj"},
    ):
        warm, cold, server = await run_both_ways(start_server, connect, data, ("typed\n",))
        assert warm == cold, data
        assert warm_starts(server) == 1


async def test_endings_are_the_same_warm_or_cold(
    start_server: StartServer, connect: ClientFactory
) -> None:
    for name, script in ENDINGS.items():
        warm, cold, _ = await run_both_ways(start_server, connect, {"sourceScript": script})
        assert warm == cold, name
    expected_codes = {
        "exit 7": 7,
        "keyboard interrupt": -2,
        "killed by signal": -15,
        "traceback": 1,
    }
    for name, code in expected_codes.items():
        warm, _, _ = await run_both_ways(start_server, connect, {"sourceScript": ENDINGS[name]})
        assert warm["code"] == code, name
