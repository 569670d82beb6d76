"""The v5 /run websocket (today's Further IDE), replaying the spec's recorded exchanges."""

from __future__ import annotations

import json

from conftest import RunningServer
from v5client import V5Client, V5Connect, connect_run

__all__ = ["connect_run"]


def frame(kind: str, data: object, client: str, process: str | None) -> str:
    """A server frame exactly as upstream formats it."""
    return json.dumps({"type": kind, "data": data, "client": client, "process": process})


async def test_python_run_with_pipes(connect_run: V5Connect) -> None:
    client = await connect_run("client=abc")
    await client.ws.send_str(
        '{"type": "start", "process": "1", "data": {"runner": "python3", "code": '
        '"import sys\\nprint(\'hi\')\\nprint(\'err\', file=sys.stderr)\\nimport os\\n'
        'print(os.getcwd())\\nsys.exit(3)"}}'
    )
    result = await client.collect("1")
    assert client.raw[0] == '{"type": "started", "data": null, "client": "abc", "process": "1"}'
    assert result.stdout == "hi\n/tmp\n"
    assert result.stderr == "err\n"
    assert client.raw[-1] == frame("stopped", {"exitCode": 3}, "abc", "1")
