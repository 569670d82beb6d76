"""The teacher's small parsers and the device's challenge book, as plain function calls."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from further_link.errors import ClientError, ConfigError, TeacherError
from further_link.fleet.discovery import FoundDevice, parse_device_line
from further_link.trust.teachers import ChallengeBook, parse_public_key, signed_message


def test_device_list_lines() -> None:
    assert parse_device_line("pi-07.local") == FoundDevice(
        "pi-07.local", "pi-07.local", 8028, True, source="list"
    )
    assert parse_device_line("10.0.0.7:9000 Ada's robot  # by the window") == FoundDevice(
        "Ada's robot", "10.0.0.7", 9000, True, source="list"
    )
    assert parse_device_line("http://127.0.0.1:8080 p1") == FoundDevice(
        "p1", "127.0.0.1", 8080, False, source="list"
    )
    assert parse_device_line("   # only a comment") is None
    for bad in ("ftp://x", "host:notaport", "http://:80"):
        with pytest.raises(ClientError):
            parse_device_line(bad)


@given(st.text(max_size=80))
def test_any_device_list_line_is_a_device_nothing_or_a_clear_refusal(line: str) -> None:
    try:
        found = parse_device_line(line)
    except ClientError as exc:
        assert "is not HOST" in exc.message
    else:
        assert found is None or (found.host and 0 < found.port < 65536)


def test_challenges_expire_and_are_spent_once() -> None:
    book = ChallengeBook(lifetime=30)
    challenge = book.issue(now=1000.0)
    book.check(challenge, now=1029.0)
    with pytest.raises(TeacherError, match="older than"):
        book.check(challenge, now=1031.0)
    book.spend(challenge, now=1010.0)
    with pytest.raises(TeacherError, match="already used"):
        book.check(challenge, now=1011.0)
    with pytest.raises(TeacherError, match="not issued"):
        ChallengeBook().check(challenge, now=1011.0)
    forged = challenge.rsplit(".", 1)[0] + "." + "0" * 64
    with pytest.raises(TeacherError, match="not issued"):
        book.check(forged, now=1011.0)


def test_what_is_signed_names_device_action_and_parameters() -> None:
    one = signed_message("c", None, "lock", {"message": "hi"})
    assert one == b'further-link teacher v1\nc\nnone\nlock\n{"message":"hi"}'
    assert signed_message("c", "AB:CD", "lock", {"message": "hi"}) != one
    assert signed_message("c", None, "unlock", {"message": "hi"}) != one


def test_a_teacher_key_is_44_characters_of_base64() -> None:
    assert len(parse_public_key("A" * 43 + "=")) == 32
    for bad in ("", "A" * 44, "not base64!", "A" * 42 + "=="):
        with pytest.raises(ConfigError):
            parse_public_key(bad)
