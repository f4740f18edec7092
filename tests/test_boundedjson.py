"""Bounded JSON: what the standard parser would choke on is refused with a ValueError."""

from __future__ import annotations

import pytest

from kubespan.boundedjson import loads, nesting_depth


def test_parses_ordinary_json() -> None:
    assert loads(b'{"a": [1, -2, {"b": "[[{\\"["}], "c": 1.5}', 1000) == {
        "a": [1, -2, {"b": '[[{"['}],
        "c": 1.5,
    }


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"[" * 100_000, "nested deeper than 32"),
        (b"[" * 33 + b"]" * 33, "nested deeper than 32"),
        (b'{"ttl": ' + b"9" * 5000 + b"}", "more than 20 digits"),
        (b"[NaN]", "NaN is not JSON"),
        (b"Infinity", "Infinity is not JSON"),
        (b'"\xff"', "not UTF-8"),
        (b"[1, 2", "not JSON"),
        (b"x" * 2000, "larger than 1000 bytes"),
    ],
)
def test_refuses_hostile_input(raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        loads(raw, 1000 if raw.startswith(b"x") else 1_000_000)


def test_brackets_inside_strings_do_not_count() -> None:
    raw = b'["' + b"[" * 1000 + b'\\"' + b'"]'
    assert nesting_depth(loads(raw, 10_000), 32) == 1
    assert loads(raw, 10_000) == ["[" * 1000 + '"']


def test_unterminated_strings_are_refused() -> None:
    """A regular-expression pre-scan backtracked exponentially on these (26 bytes took
    seconds, a megabyte would never end); the parser refuses them in linear time."""
    for size in (24, 1 << 20):
        with pytest.raises(ValueError, match="not JSON"):
            loads(b'["' + b"a" * size, 2 << 20)


def test_depth_at_the_limit_is_accepted() -> None:
    assert loads(b"[" * 32 + b"]" * 32, 1000) is not None
