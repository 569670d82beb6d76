"""Running programs end to end: a real server, a real websocket, real Python."""

from __future__ import annotations

import asyncio
import os
import textwrap
from collections.abc import Awaitable
from pathlib import Path
from typing import Callable

from conftest import Client, RunningServer, alive, give_to_program_user, sleeper_script

ClientFactory = Callable[..., Awaitable[Client]]


async def test_seed_readme_example(client: Client) -> None:
    """The 2020 README's example session, literally (output may come in pieces)."""
    await client.ws.send_str('{ "type": "start", "data": { "sourceScript": "print(\'hi\')" } }')
    started = await client.receive()
    # The seed's `{}`, plus the run's id (issue 13): clients ignore fields they do not know.
    assert started == {"type": "started", "data": {"runId": started["data"]["runId"]}}
    await client.read_output("hi\n")
    assert await client.receive() == {"type": "stopped", "data": {"exitCode": 0}}


async def test_stdout_stderr_and_exit_code(client: Client) -> None:
    script = "import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)"
    result = await client.run({"sourceScript": script})
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"
    assert result.exit_code == 3


async def test_traceback_goes_to_stderr_with_exit_code_1(client: Client) -> None:
    result = await client.run({"sourceScript": "x = 1\nraise ValueError('nope')\n"})
    assert "ValueError: nope" in result.stderr
    assert "line 2" in result.stderr
    assert result.exit_code == 1


async def test_output_appears_while_the_program_runs(client: Client) -> None:
    await client.send("start", {"sourceScript": "print('first')\ninput()\nprint('second')"})
    assert (await client.receive())["type"] == "started"
    await client.read_output("first\n")
    await client.send("stdin", {"input": "go\n"})
    result = await client.collect()
    assert result.stdout == "second\n"
    assert result.exit_code == 0


async def test_stdin_line_split_across_messages(client: Client) -> None:
    script = "a = input()\nb = input()\nprint(repr(a), repr(b))"
    result = await client.run({"sourceScript": script}, stdin=("hel", "lo wo", "rld\nsecond", "\n"))
    assert result.stdout == "'hello world' 'second'\n"


async def test_stdin_unicode_round_trip(client: Client) -> None:
    result = await client.run({"sourceScript": "print(input()[::-1])"}, stdin=("é€😀\n",))
    assert result.stdout == "😀€é\n"


async def test_stop_reports_minus_15(client: Client) -> None:
    await client.send("start", {"sourceScript": "import time\nprint('up')\ntime.sleep(60)"})
    await client.receive_type("started")
    await client.read_output("up\n")
    await client.send("stop")
    result = await client.collect()
    # Stop is a terminal's Ctrl-C: Python reports KeyboardInterrupt, then
    # ends by SIGINT (2); clients still read -15, "stopped by user".
    assert result.stderr.endswith("KeyboardInterrupt\n")
    assert result.messages[-1] == {"type": "stopped", "data": {"exitCode": -15, "signal": 2}}


async def test_stop_ends_children_and_grandchildren(client: Client, shared: Path) -> None:
    pids = shared / "pids"
    script = textwrap.dedent(
        f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
            "import subprocess, sys, time;"
            "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            "open({str(pids)!r}, 'a').write(str(g.pid) + chr(10));"
            "time.sleep(60)"])
        open({str(pids)!r}, "a").write(str(child.pid) + "\\n")
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    await client.send("start", {"sourceScript": script})
    await client.receive_type("started")
    await client.receive_type("stdout")
    for _ in range(200):
        if pids.exists() and len(pids.read_text().split()) == 2:
            break
        await asyncio.sleep(0.05)
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 2 and all(alive(pid) for pid in started)
    await client.send("stop")
    stopped = await client.receive_type("stopped")
    assert stopped["data"]["exitCode"] == -15
    assert not any(alive(pid) for pid in started)


async def test_second_start_is_refused_and_first_keeps_running(client: Client) -> None:
    await client.send("start", {"sourceScript": "print(input())"})
    await client.receive_type("started")
    await client.send("start", {"sourceScript": "print('intruder')"})
    error = await client.receive()
    assert error == {
        "type": "error",
        "data": {"message": "a program is already running; send stop first"},
    }
    await client.send("stdin", {"input": "still here\n"})
    result = await client.collect()
    assert result.stdout == "still here\n"
    assert result.exit_code == 0


async def test_connection_is_reusable_for_many_runs(client: Client) -> None:
    for n in range(5):
        result = await client.run({"sourceScript": f"print({n} * 2)"})
        assert result.stdout == f"{n * 2}\n"


async def test_errors_keep_the_connection_usable(client: Client) -> None:
    await client.ws.send_str("not json")
    assert "not valid JSON" in (await client.receive())["data"]["message"]
    await client.send("frobnicate")
    assert (await client.receive())["data"]["message"].startswith(
        "unknown message type 'frobnicate'"
    )
    await client.send("start", {})
    assert (await client.receive())["data"] == {
        "message": "start needs data.sourceScript or data.sourcePath"
    }
    await client.send("stdin", {"input": "x\n"})
    assert "no program is running" in (await client.receive())["data"]["message"]
    await client.send("stop")
    assert (await client.receive())["data"] == {"message": "no program is running"}
    await client.ws.send_bytes(b"\x00\x01")
    assert "binary messages" in (await client.receive())["data"]["message"]
    result = await client.run({"sourceScript": "print('fine')"})
    assert result.stdout == "fine\n"


async def test_ping_gets_pong(client: Client) -> None:
    await client.send("ping")
    assert await client.receive() == {"type": "pong", "data": {}}


async def test_source_path_relative_to_work_dir(client: Client, server: RunningServer) -> None:
    project = server.config.work_dir / "myproject"
    project.mkdir(parents=True)
    (project / "helper.py").write_text("NAME = 'helper'\n")
    (project / "run.py").write_text(
        "import os, sys, helper\nprint(helper.NAME, os.getcwd(), sys.argv[0])\n"
    )
    result = await client.run({"sourcePath": "myproject/run.py"})
    assert result.stdout == f"helper {project} {project / 'run.py'}\n"
    assert result.exit_code == 0


async def test_source_path_absolute(client: Client, shared: Path) -> None:
    script = shared / "elsewhere.py"
    script.write_text("print(__file__)\n")
    result = await client.run({"sourcePath": str(script)})
    assert result.stdout == f"{script}\n"


async def test_missing_source_path_is_an_error(client: Client, server: RunningServer) -> None:
    await client.send("start", {"sourcePath": "nope/missing.py"})
    message = await client.receive()
    looked = server.config.work_dir / "nope" / "missing.py"
    assert message == {
        "type": "error",
        "data": {
            "message": f"sourcePath 'nope/missing.py' does not exist "
            f"(looked for {str(looked)!r} in the work dir)"
        },
    }


async def test_start_while_stopping_says_to_wait(client: Client, shared: Path) -> None:
    script = (
        "import signal, time\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('up')\n"
        "time.sleep(60)"
    )
    await client.send("start", {"sourceScript": script})
    await client.receive_type("started")
    await client.read_output("up\n")
    await client.send("stop")
    await client.send("start", {"sourceScript": "print(1)"})
    error = await client.receive_type("error")
    assert error["data"]["message"] == "the program is still stopping; start again after 'stopped'"
    assert (await client.receive_type("stopped"))["data"] == {"exitCode": -15, "signal": 9}


async def test_script_runs_in_tmp_without_directory(client: Client) -> None:
    result = await client.run({"sourceScript": "import os\nprint(os.getcwd())"})
    assert result.stdout == "/tmp\n"


async def test_script_in_directory_name_can_import_its_files(
    client: Client, server: RunningServer
) -> None:
    project = server.config.work_dir / "proj"
    project.mkdir(parents=True)
    (project / "some_lib.py").write_text("def call():\n    return 'lib called'\n")
    give_to_program_user(project)
    script = "import os, some_lib\nprint(some_lib.call(), os.getcwd())"
    result = await client.run({"sourceScript": script, "directoryName": "proj"})
    assert result.stdout == f"lib called {project}\n"


async def test_parallel_clients_are_independent(connect: ClientFactory) -> None:
    clients = [await connect() for _ in range(6)]
    script = "import sys\nname = input()\nprint('I am', name)\nsys.exit(len(name))"
    results = await asyncio.gather(
        *(
            c.run({"sourceScript": script}, stdin=(f"client{'x' * i}\n",))
            for i, c in enumerate(clients)
        )
    )
    for i, result in enumerate(results):
        assert result.stdout == f"I am client{'x' * i}\n"
        assert result.exit_code == len(f"client{'x' * i}")


async def test_utf8_character_split_across_reads_arrives_whole(client: Client) -> None:
    script = textwrap.dedent(
        """
        import os, time
        euro = "€".encode()
        os.write(1, euro[:2])
        time.sleep(0.3)
        os.write(1, euro[2:] + b"\\n")
        """
    )
    result = await client.run({"sourceScript": script})
    assert result.stdout == "€\n"
    outputs = [m["data"]["output"] for m in result.messages if m["type"] == "stdout"]
    assert all("\ufffd" not in text for text in outputs)


async def test_invalid_utf8_is_replaced_not_dropped(client: Client) -> None:
    script = "import os\nos.write(1, b'a\\xff\\xfeb\\n')\nos.write(2, b'\\xc3')"
    result = await client.run({"sourceScript": script})
    assert result.stdout == "a\ufffd\ufffdb\n"
    assert result.stderr == "\ufffd"
    assert result.exit_code == 0


async def test_large_output_arrives_complete_and_in_order(client: Client) -> None:
    script = "for i in range(20000):\n    print(f'line {i:06d}')"
    result = await client.run({"sourceScript": script})
    assert result.stdout == "".join(f"line {i:06d}\n" for i in range(20000))


async def test_three_megabyte_script_runs(client: Client) -> None:
    padding = "# " + "x" * 98 + "\n"
    script = padding * 30000 + "print('big script ran')\n"
    assert len(script) > 3_000_000
    result = await client.run({"sourceScript": script})
    assert result.stdout == "big script ran\n"


async def test_program_sees_unbuffered_utf8_environment(client: Client) -> None:
    script = "import os, sys\nprint(sys.stdout.encoding, os.environ.get('PYTHONUNBUFFERED'))"
    result = await client.run({"sourceScript": script})
    assert result.stdout == "utf-8 1\n"


async def test_closing_the_socket_ends_the_program(connect: ClientFactory, shared: Path) -> None:
    marker = shared / "pid"
    client = await connect()
    await client.send("start", {"sourceScript": sleeper_script(marker)})
    await client.receive_type("stdout")
    pid = int(marker.read_text())
    assert alive(pid)
    await client.ws.close()
    for _ in range(200):
        if not alive(pid):
            break
        await asyncio.sleep(0.05)
    assert not alive(pid)


async def test_works_over_tls(
    start_server: Callable[..., Awaitable[RunningServer]], connect: ClientFactory
) -> None:
    secure = await start_server(no_ssl=False)
    assert secure.base_url.startswith("https://")
    client = await connect(secure)
    result = await client.run({"sourceScript": "print('secret hi')"})
    assert result.stdout == "secret hi\n"
    key = secure.config.config_dir / "key.pem"
    assert os.stat(key).st_mode & 0o777 == 0o600


async def test_stdin_eof_ends_the_programs_input(client: Client) -> None:
    script = "import sys\ndata = sys.stdin.read()\nprint(repr(data))\nprint(repr(sys.stdin.read()))"
    await client.send("start", {"sourceScript": script})
    await client.receive_type("started")
    await client.send("stdin", {"input": "first\nsecond"})
    await client.send("stdin", {"input": " line", "eof": True})
    await client.send("stdin", {"input": "too late\n"})
    result = await client.collect()
    assert result.stdout == "'first\\nsecond line'\n''\n"
    assert result.errors == ["the program's input was already ended (eof)"]
    assert result.exit_code == 0


async def test_ending_input_is_never_an_error(client: Client) -> None:
    await client.send("stdin", {"eof": True})  # nothing runs: nothing to end
    result = await client.run({"sourceScript": "import sys\nsys.stdin.close()\nprint('done')"})
    assert result.stdout == "done\n"
    await client.send("stdin", {"eof": True})
    await client.send("ping")
    assert await client.receive() == {"type": "pong", "data": {}}


async def test_keyboard_button_is_announced_as_keylisten_not_as_a_frame(client: Client) -> None:
    """`KeyboardButton(key)` says which key it wants, in words, as on /run; no bogus image."""
    script = "from further_link import KeyboardButton\nKeyboardButton('ArrowUp')\nprint('ready')"
    result = await client.run({"sourceScript": script})
    assert result.exit_code == 0, result
    assert result.stdout == "ready\n"
    assert result.frames == []
    listens = [message for message in result.messages if message["type"] == "keylisten"]
    assert listens == [{"type": "keylisten", "data": {"output": "ArrowUp"}}]
