"""The v5 /run wire format, tested like a parser: plain function calls."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from further_link.errors import ProcessMessageError
from further_link.protocol.run import (
    NovncOptions,
    RunKeyEvent,
    RunOptions,
    RunPing,
    RunResize,
    RunStart,
    RunStdin,
    RunStop,
    encode_run_event,
    parse_options,
    parse_run_command,
)
from further_link.protocol.runpy import ErrorEvent, KeyListen, Output, Pong, Started, Stopped, Video


def parse(message: Any) -> Any:
    return parse_run_command(json.dumps(message))


def refusal(message: Any) -> ProcessMessageError:
    with pytest.raises(ProcessMessageError) as caught:
        parse(message)
    return caught.value


def test_every_client_message_of_the_spec_parses() -> None:
    assert parse({"type": "ping"}) == RunPing()
    assert parse(
        {"type": "start", "process": "1", "data": {"runner": "python3", "code": "print(1)"}}
    ) == RunStart("1", "python3", code="print(1)")
    assert parse(
        {"type": "start", "process": "p", "data": {"runner": "python3", "path": "proj1/a.py"}}
    ) == RunStart("p", "python3", path="proj1/a.py")
    assert parse({"type": "start", "process": "sh", "data": {"runner": "shell"}}) == RunStart(
        "sh", "shell"
    )
    assert parse({"type": "stdin", "process": "a", "data": {"input": "typed\r"}}) == RunStdin(
        "a", "typed\r"
    )
    assert parse(
        {"type": "resize", "process": "a", "data": {"rows": 30, "cols": 100}}
    ) == RunResize("a", 30, 100)
    assert parse({"type": "stop", "process": "sh"}) == RunStop("sh")
    assert parse(
        {"type": "keyevent", "process": "k", "data": {"key": " ", "event": "keydown"}}
    ) == RunKeyEvent("k", " ", "keydown")


def test_novnc_options_are_read_only_when_enabled_is_a_boolean() -> None:
    base = {"type": "start", "process": "n", "data": {"runner": "python3", "code": ""}}
    base["data"]["novncOptions"] = {"enabled": True, "width": 640, "height": 480}
    assert parse(base).novnc == NovncOptions(True, 640, 480)
    base["data"]["novncOptions"] = {"enabled": "yes"}
    assert parse(base).novnc is None


def test_data_that_is_not_an_object_counts_as_empty() -> None:
    assert parse({"type": "stop", "process": "1", "data": [1, 2]}) == RunStop("1")


def test_unknown_fields_and_v2020_fields_are_ignored() -> None:
    command = parse(
        {
            "type": "start",
            "process": "1",
            "client": "x",
            "data": {"runner": "python3", "code": "", "directoryName": "d", "extra": 1},
        }
    )
    assert command == RunStart("1", "python3", code="")


@pytest.mark.parametrize(
    ("message", "process", "words"),
    [
        ({"type": "stop"}, None, "'process'"),
        ({"type": "stop", "process": 1}, None, "non-empty string"),
        ({"type": "stop", "process": ""}, None, "empty string"),
        ({"type": "start", "process": "1", "data": {"runner": "ruby"}}, "1", "'ruby'"),
        ({"type": "start", "process": "1", "data": {}}, "1", "data.runner"),
        ({"type": "start", "process": "1", "data": {"runner": "exec", "path": ""}}, "1", "empty"),
        ({"type": "launch", "process": "1"}, "1", "unknown message type 'launch'"),
        ({"type": "stdin", "process": "a", "data": {"input": 5}}, "a", "data.input"),
        ({"type": "stdin", "process": "a"}, "a", "data.input"),
        ({"type": "resize", "process": "a", "data": {"rows": 0, "cols": 9}}, "a", "data.rows"),
        ({"type": "resize", "process": "a", "data": {"rows": 9, "cols": True}}, "a", "data.cols"),
        ({"type": "keyevent", "process": "k", "data": {"key": "a"}}, "k", "data.event"),
        ({"process": "1"}, None, "'type'"),
        ([1], None, "JSON object"),
    ],
)
def test_refusals_name_the_field_and_carry_the_process(
    message: Any, process: str | None, words: str
) -> None:
    error = refusal(message)
    assert error.process == process
    assert words in error.message


def test_invalid_json_is_refused_clearly() -> None:
    with pytest.raises(ProcessMessageError, match="not valid JSON"):
        parse_run_command("{nope")


def test_query_options() -> None:
    assert parse_options({}) == RunOptions(pty=False, user=None, client="")
    assert parse_options({"pty": "TRUE", "client": "abc", "user": "pi"}) == RunOptions(
        True, "pi", "abc"
    )
    assert parse_options({"pty": "1"}).pty
    assert not parse_options({"pty": "yes"}).pty


def test_server_frames_have_four_keys_in_upstream_order_and_format() -> None:
    assert encode_run_event(Pong(), "") == (
        '{"type": "pong", "data": null, "client": "", "process": null}'
    )
    assert encode_run_event(Started(process="1"), "abc") == (
        '{"type": "started", "data": null, "client": "abc", "process": "1"}'
    )
    assert encode_run_event(Stopped(-15, process="sh"), "") == (
        '{"type": "stopped", "data": {"exitCode": -15}, "client": "", "process": "sh"}'
    )
    assert encode_run_event(Output("stdout", "hi\n", process="1"), "abc") == json.dumps(
        {"type": "stdout", "data": {"output": "hi\n"}, "client": "abc", "process": "1"}
    )
    assert encode_run_event(KeyListen("ArrowUp", process="k"), "") == json.dumps(
        {"type": "keylisten", "data": {"output": "ArrowUp"}, "client": "", "process": "k"}
    )
    assert encode_run_event(Video("/9j/", process="v"), "") == json.dumps(
        {"type": "video", "data": {"output": "/9j/"}, "client": "", "process": "v"}
    )
    assert encode_run_event(ErrorEvent("no", process="2"), "c") == json.dumps(
        {"type": "error", "data": {"message": "no"}, "client": "c", "process": "2"}
    )


@given(st.text(), st.text(), st.sampled_from(["stdout", "stderr"]))
def test_output_frames_equal_json_dumps(text: str, client: str, stream: str) -> None:
    encoded = encode_run_event(Output(stream, text, process="p"), client)
    assert json.loads(encoded) == {
        "type": stream,
        "data": {"output": text},
        "client": client,
        "process": "p",
    }


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
        max_leaves=10,
    )
)
def test_any_json_gives_a_command_or_a_clear_refusal(value: Any) -> None:
    try:
        parse(value)
    except ProcessMessageError as exc:
        assert exc.message
