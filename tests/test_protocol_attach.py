"""Issue 13's messages on both wire formats, tested like a parser: plain function calls."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from further_link.errors import ProcessMessageError, ProtocolError
from further_link.protocol.run import RunAttach, RunStart, encode_run_event, parse_run_command
from further_link.protocol.runpy import (
    AttachCommand,
    KeyListen,
    Novnc,
    Queued,
    StartCommand,
    Started,
    encode_event,
    parse_command,
)


def test_keep_alive_and_attach_parse_on_run_py() -> None:
    start = {"type": "start", "data": {"sourceScript": "x", "keepAlive": 30}}
    assert parse_command(json.dumps(start)) == StartCommand(source_script="x", keep_alive=30.0)
    attach = {"type": "attach", "data": {"runId": "ab" * 16}}
    assert parse_command(json.dumps(attach)) == AttachCommand("ab" * 16)


def test_keep_alive_and_attach_parse_on_run() -> None:
    start = {"type": "start", "process": "1", "data": {"runner": "exec", "keepAlive": 2.5}}
    assert parse_run_command(json.dumps(start)) == RunStart("1", "exec", keep_alive=2.5)
    attach = {"type": "attach", "process": "p", "data": {"runId": "cd" * 16}}
    assert parse_run_command(json.dumps(attach)) == RunAttach("p", "cd" * 16)


@pytest.mark.parametrize("value", [-1, "10", True, [], {"s": 1}])
def test_bad_keep_alive_is_refused_with_its_name(value: Any) -> None:
    with pytest.raises(ProtocolError, match=r"data\.keepAlive must be a number of seconds"):
        parse_command(
            json.dumps({"type": "start", "data": {"sourceScript": "", "keepAlive": value}})
        )
    message = {"type": "start", "process": "9", "data": {"runner": "exec", "keepAlive": value}}
    with pytest.raises(ProcessMessageError, match="keepAlive") as caught:
        parse_run_command(json.dumps(message))
    assert caught.value.process == "9"


@pytest.mark.parametrize("data", [{}, {"runId": ""}, {"runId": 7}, {"runId": "x" * 65}])
def test_attach_needs_a_run_id(data: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError, match="runId"):
        parse_command(json.dumps({"type": "attach", "data": data}))


def test_started_and_queued_encode_as_agreed() -> None:
    assert json.loads(encode_event(Started(run_id="f" * 32))) == {
        "type": "started",
        "data": {"runId": "f" * 32},
    }
    assert json.loads(encode_event(Queued(1, "motors", "a" * 32))) == {
        "type": "queued",
        "data": {"position": 1, "resource": "motors", "heldBy": "a" * 32},
    }
    assert json.loads(encode_event(Queued(3))) == {"type": "queued", "data": {"position": 3}}
    assert json.loads(encode_run_event(Queued(2, process="7"), "c")) == {
        "type": "queued",
        "data": {"position": 2},
        "client": "c",
        "process": "7",
    }


def test_side_events_carry_the_same_data_on_both_apis() -> None:
    expected = [
        (KeyListen("ArrowUp"), "keylisten", {"output": "ArrowUp"}),
        (Novnc(8028, "/novnc/k3y"), "novnc", {"port": 8028, "path": "/novnc/k3y"}),
        (
            Queued(2, "camera", "b" * 32),
            "queued",
            {"position": 2, "resource": "camera", "heldBy": "b" * 32},
        ),
    ]
    for event, kind, data in expected:
        assert json.loads(encode_event(event)) == {"type": kind, "data": data}
        on_run = json.loads(encode_run_event(dataclasses.replace(event, process="p"), "c"))
        assert on_run == {"type": kind, "data": data, "client": "c", "process": "p"}
