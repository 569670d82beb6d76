"""The sans-IO protocol module, tested like a parser: plain function calls."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from further_link.errors import ProtocolError
from further_link.protocol.runpy import (
    Base64File,
    ErrorEvent,
    Output,
    PingCommand,
    Pong,
    StartCommand,
    Started,
    StdinCommand,
    StopCommand,
    Stopped,
    TextFile,
    UploadCommand,
    Uploaded,
    UrlFile,
    Video,
    encode_event,
    parse_command,
)


def parse(message: Any) -> Any:
    return parse_command(json.dumps(message))


def test_seed_readme_start_example_parses() -> None:
    text = '{ "type": "start", "data": { "sourceScript": "print(\'hi\')" } }'
    assert parse_command(text) == StartCommand(source_script="print('hi')")


def test_start_with_path_and_directory() -> None:
    command = parse(
        {"type": "start", "data": {"sourcePath": "myproject/run.py", "directoryName": "myproject"}}
    )
    assert command == StartCommand(source_path="myproject/run.py", directory_name="myproject")


def test_commands_without_data() -> None:
    assert parse({"type": "stop"}) == StopCommand()
    assert parse({"type": "stop", "data": None}) == StopCommand()
    assert parse({"type": "ping", "data": {}}) == PingCommand()


def test_stdin_keeps_text_exactly() -> None:
    assert parse({"type": "stdin", "data": {"input": "héllo €\n"}}) == StdinCommand("héllo €\n")


def test_stdin_eof_with_or_without_input() -> None:
    assert parse({"type": "stdin", "data": {"eof": True}}) == StdinCommand("", eof=True)
    assert parse({"type": "stdin", "data": {"input": "x", "eof": True}}) == StdinCommand("x", True)
    with pytest.raises(ProtocolError, match=r"data\.eof must be true or false, not a string"):
        parse({"type": "stdin", "data": {"input": "x", "eof": "yes"}})


def test_upload_with_text_and_url_files() -> None:
    command = parse(
        {
            "type": "upload",
            "data": {
                "directory": {
                    "name": "proj",
                    "files": {
                        "lib/a.py": {"type": "text", "content": {"text": "x = 1\n"}},
                        "cat.jpg": {
                            "type": "url",
                            "content": {
                                "url": "http://h/c",
                                "bucketName": "b",
                                "fileName": "c.jpg",
                            },
                        },
                    },
                }
            },
        }
    )
    assert command == UploadCommand(
        name="proj",
        files={"lib/a.py": TextFile("x = 1\n"), "cat.jpg": UrlFile("http://h/c", "b", "c.jpg")},
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object with a 'type', not an array"),
        ('"start"', "not a string"),
        ("{}", "message has no 'type'"),
        ('{"type": 5}', "'type' must be a string, not a number"),
        (
            '{"type": "start", "data": []}',
            "'data' of a start message must be an object, not an array",
        ),
        ('{"type": "frobnicate"}', "unknown message type 'frobnicate'"),
        ('{"type": "start", "data": {}}', "start needs data.sourceScript or data.sourcePath"),
        ('{"type": "start", "data": {"sourceScript": 3}}', "data.sourceScript must be a string"),
        (
            '{"type": "start", "data": {"sourceScript": "", "sourcePath": "a.py"}}',
            "not both",
        ),
        ('{"type": "start", "data": {"sourcePath": ""}}', "sourcePath is empty"),
        (
            '{"type": "start", "data": {"sourceScript": "x", "directoryName": true}}',
            "directoryName",
        ),
        ('{"type": "stdin", "data": {}}', "stdin needs data.input"),
        (
            '{"type": "stdin", "data": {"input": ["a"]}}',
            "data.input must be a string, not an array",
        ),
        ('{"type": "stdin", "data": {"input": "\\ud800"}}', "lone surrogate"),
        ('{"type": "upload", "data": {}}', "upload needs data.directory"),
        ('{"type": "upload", "data": {"directory": {"files": {}}}}', "data.directory.name"),
        ('{"type": "upload", "data": {"directory": {"name": "x"}}}', "data.directory.files"),
        (
            '{"type": "upload", "data": {"directory": {"name": "d", "files": []}}}',
            "files must be an object",
        ),
        (
            '{"type": "upload", "data": {"directory": {"name": "d", "files": '
            '{"a": {"type": "zip", "content": {}}}}}}',
            "type must be 'text', 'base64' or 'url', not 'zip'",
        ),
        (
            '{"type": "upload", "data": {"directory": {"name": "d", "files": '
            '{"a": {"type": "url", "content": {"url": "http://x"}}}}}}',
            "bucketName",
        ),
        (
            '{"type": "upload", "data": {"directory": {"name": "d", "files": '
            '{"a": {"type": "base64", "content": {"data": "a$=="}}}}}}',
            "is not valid base64",
        ),
        (
            '{"type": "upload", "data": {"version": 3, "directory": {"name": "d", "files": {}}}}',
            "data.version must be a string",
        ),
        ("[" * 100000, "nested too deeply"),
    ],
)
def test_bad_messages_say_what_was_wrong(text: str, expected: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_command(text)
    assert expected in str(caught.value)


def test_upload_with_base64_files_and_a_version() -> None:
    command = parse(
        {
            "type": "upload",
            "data": {
                "version": "abc",
                "directory": {
                    "name": "p",
                    "files": {"logo.png": {"type": "base64", "content": {"data": "iVBORw0KGgr/"}}},
                },
            },
        }
    )
    assert command == UploadCommand(
        name="p", files={"logo.png": Base64File(b"\x89PNG\r\n\x1a\n\xff")}, version="abc"
    )


def test_events_encode_as_the_seed_describes() -> None:
    def decoded(event: Any) -> Any:
        return json.loads(encode_event(event))

    assert decoded(Output("stdout", "hi\n")) == {"type": "stdout", "data": {"output": "hi\n"}}
    assert decoded(Output("stderr", "x")) == {"type": "stderr", "data": {"output": "x"}}
    assert decoded(Stopped(0)) == {"type": "stopped", "data": {"exitCode": 0}}
    assert decoded(Started())["type"] == "started"
    assert decoded(Uploaded()) == {"type": "uploaded", "data": {}}
    assert decoded(Uploaded("v1")) == {"type": "uploaded", "data": {"version": "v1"}}
    assert decoded(Pong())["type"] == "pong"
    assert decoded(ErrorEvent("bad")) == {"type": "error", "data": {"message": "bad"}}
    assert decoded(Video("QUJD")) == {"type": "video", "data": {"output": "QUJD"}}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.text())
def test_any_text_parses_or_gives_a_protocol_error(text: str) -> None:
    try:
        parse_command(text)
    except ProtocolError as exc:
        assert str(exc)


@given(
    st.sampled_from(["start", "stop", "stdin", "upload", "ping", "other"]),
    st.dictionaries(
        st.sampled_from(["sourceScript", "sourcePath", "directoryName", "input", "directory"]),
        json_values,
    ),
)
def test_any_json_command_parses_or_gives_a_protocol_error(kind: str, data: dict[str, Any]) -> None:
    try:
        parse({"type": kind, "data": data})
    except ProtocolError as exc:
        assert str(exc)
