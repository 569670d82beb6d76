"""The bounded output a detachable run keeps: plain function tests, as for a parser."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from further_link.runs.kept import KeptOutput, dropped_notice

chunks = st.lists(
    st.tuples(st.sampled_from(["stdout", "stderr"]), st.text(max_size=40)), max_size=60
)


@given(chunks, st.integers(min_value=1, max_value=200))
def test_kept_output_is_the_newest_tail_and_counts_the_rest(
    written: list[tuple[str, str]], limit: int
) -> None:
    kept = KeptOutput(limit)
    for stream, text in written:
        kept.add(stream, text)
    replay = kept.replay()
    total = "".join(text for _, text in written).encode("utf-8", "surrogatepass")
    if kept.dropped_bytes:
        assert replay[0] == ("stdout", dropped_notice(kept.dropped_bytes))
        replay = replay[1:]
    tail = "".join(text for _, text in replay).encode("utf-8", "surrogatepass")
    assert len(tail) <= limit
    assert kept.kept_bytes == len(tail)
    assert kept.dropped_bytes + len(tail) == len(total)
    assert total.endswith(tail)
    # A dropped span is only ever the oldest output: at most 3 bytes of one character
    # beyond what the limit forced.
    if kept.dropped_bytes:
        assert len(tail) > limit - 4


def test_notice_reads_as_the_issue_asks() -> None:
    kept = KeptOutput(10)
    kept.add("stdout", "0123456789")
    kept.add("stderr", "abc")
    assert kept.replay() == [
        ("stdout", "\u2026 3 bytes not kept \u2026\n"),
        ("stdout", "3456789"),
        ("stderr", "abc"),
    ]
    big = KeptOutput(4)
    big.add("stdout", "h\u00e9llo")  # é is 2 bytes: the tail keeps whole characters
    assert big.replay() == [("stdout", "\u2026 3 bytes not kept \u2026\n"), ("stdout", "llo")]
