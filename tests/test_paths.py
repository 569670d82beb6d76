"""confine_path: a client's name either stays inside its directory or is refused."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from further_link.errors import UnsafePathError
from further_link.files.paths import confine_path, describe_kind


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A directory with a real sub-directory and two links: one inside, one leading out."""
    root = tmp_path / "base"
    (root / "real").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "inner-link").symlink_to(root / "real")
    (root / "outer-link").symlink_to(tmp_path / "outside")
    (root / "relative-out").symlink_to("../outside")
    (root / "self-link").symlink_to(".")
    (root / "loop").symlink_to("loop")
    return root


def is_inside(base: Path, path: Path) -> bool:
    base_real = os.path.realpath(base)
    path_real = os.path.realpath(path)
    return path_real != base_real and os.path.commonpath([base_real, path_real]) == base_real


# Names built from the parts that cause trouble, as well as arbitrary text.
TRICKY_PARTS = st.sampled_from(
    ["..", ".", "", "real", "inner-link", "outer-link", "relative-out", "self-link", "loop",
     "new", "é", "\0", "/", "a\\b", "\ud800", "\udc80", " ", "x" * 256]
)  # fmt: skip
NAMES = st.one_of(
    st.text(max_size=40),
    st.lists(TRICKY_PARTS, min_size=1, max_size=5).map("/".join),
    st.lists(st.one_of(TRICKY_PARTS, st.text(max_size=8)), min_size=1, max_size=4).map("".join),
)


@settings(
    deadline=None, max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=NAMES, nested=st.booleans())
def test_any_name_is_refused_or_stays_inside(base: Path, name: str, nested: bool) -> None:
    try:
        result = confine_path(base, name, "file name", nested=nested)
    except UnsafePathError as exc:
        assert exc.message.startswith("file name")
        return
    assert is_inside(base, result), (name, result)
    assert str(result) == os.path.realpath(result)
    if not nested:
        assert result.parent == Path(os.path.realpath(base))


@pytest.mark.parametrize(
    ("name", "relative"),
    [
        ("real", "real"),
        ("real/new.py", "real/new.py"),
        ("new/deeper/file.txt", "new/deeper/file.txt"),
        ("inner-link/file.py", "real/file.py"),
        ("é ü.txt", "é ü.txt"),
        ("..hidden", "..hidden"),
    ],
)
def test_plain_names_resolve_inside(base: Path, name: str, relative: str) -> None:
    assert confine_path(base, name, "file name") == base / relative


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "file name is empty"),
        ("a\0b", "file name 'a\\x00b' contains a NUL character"),
        ("/etc/passwd", "file name '/etc/passwd' is an absolute path; give a relative name"),
        ("..", "file name '..' contains '..', which leaves its directory"),
        ("a/../../b", "file name 'a/../../b' contains '..', which leaves its directory"),
        (".", "file name '.' contains '.'; use a plain relative path"),
        ("a//b", "file name 'a//b' has an empty part ('//' or a trailing '/')"),
        ("a/", "file name 'a/' has an empty part ('//' or a trailing '/')"),
        ("\ud800", "file name '\\ud800' is not valid text (it contains a lone surrogate)"),
        ("x" * 256, "file name has a part longer than 255 bytes, which no file system accepts"),
        ("outer-link", "file name 'outer-link' leads outside {base}: 'outer-link' is a symbolic"),
        ("outer-link/x", "file name 'outer-link/x' leads outside {base}: 'outer-link' is a sym"),
        ("relative-out", "file name 'relative-out' leads outside {base}: 'relative-out' is a s"),
        ("self-link", "file name 'self-link' leads back to {base} itself: 'self-link' is a sy"),
        ("loop/x", "file name 'loop/x' goes through 'loop', a symbolic link loop"),
    ],
)
def test_unsafe_names_are_refused_saying_why(base: Path, name: str, message: str) -> None:
    with pytest.raises(UnsafePathError) as refused:
        confine_path(base, name, "file name")
    assert refused.value.message.startswith(message.format(base=base))


def test_a_single_component_is_required_when_not_nested(base: Path) -> None:
    with pytest.raises(UnsafePathError, match="bucketName 'a/b' must not contain '/'"):
        confine_path(base, "a/b", "bucketName", nested=False)
    assert confine_path(base, "b", "bucketName", nested=False) == base / "b"


def test_base_that_is_itself_a_link_is_resolved(base: Path, tmp_path: Path) -> None:
    link = tmp_path / "linked-base"
    link.symlink_to(base)
    assert confine_path(link, "real/x", "file name") == base / "real" / "x"
    with pytest.raises(UnsafePathError, match="leads outside"):
        confine_path(link, "outer-link", "file name")


def test_kinds_of_file_are_named(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert describe_kind(os.stat(fifo).st_mode) == "a FIFO (named pipe)"
    assert describe_kind(os.stat("/dev/null").st_mode) == "a character device"
    assert describe_kind(os.stat(tmp_path).st_mode) == "a directory"
    assert describe_kind(stat.S_IFREG) == "a regular file"
    assert describe_kind(stat.S_IFSOCK) == "a socket"
    assert describe_kind(stat.S_IFBLK) == "a block device"


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can make a link owned by another user")
def test_base_reached_through_another_users_link_is_refused(base: Path, tmp_path: Path) -> None:
    """A program's account may own the work dir: its links must not steer the server."""
    nobody = pwd.getpwnam("nobody")
    taken_over = tmp_path / "taken-over"
    taken_over.symlink_to(tmp_path / "outside")
    os.lchown(taken_over, nobody.pw_uid, nobody.pw_gid)
    admin_link = tmp_path / "admin-link"
    admin_link.symlink_to("taken-over")
    for path in (taken_over, admin_link, taken_over / "deeper"):
        with pytest.raises(UnsafePathError) as refused:
            confine_path(path, "x", "file name")
        assert refused.value.message == (
            f"file name 'x' cannot be used: {taken_over} is a symbolic link owned by uid "
            f"{nobody.pw_uid}, which a program could have made; further-link does not follow it"
        )
    assert os.listdir(tmp_path / "outside") == []


def test_links_made_by_root_or_the_server_are_followed_to_the_base(
    base: Path, tmp_path: Path
) -> None:
    hop = tmp_path / "hop"
    hop.symlink_to("base/../base/inner-link")
    chained = tmp_path / "chained"
    chained.symlink_to(hop)
    assert confine_path(chained, "x", "file name") == base / "real" / "x"
    looping = tmp_path / "looping"
    looping.symlink_to("looping")
    with pytest.raises(UnsafePathError, match="goes through a symbolic link loop"):
        confine_path(looping / "below", "x", "file name")
