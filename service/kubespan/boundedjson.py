"""JSON from untrusted sources, with its size, nesting and numbers bounded.

The standard library parses whatever it is given: 100,000 nested `[` end in a RecursionError,
a 5,000-digit integer costs quadratic time to convert, and the answer can be any size. Every
byte that reaches kubespan from the network (the discovery service's answers, requests to the
service) and every state file goes through `loads` instead, which refuses all of that with a
ValueError naming the limit.
"""

from __future__ import annotations

import json
import re
from typing import Any

DEFAULT_MAX_DEPTH = 32
MAX_INTEGER_DIGITS = 20
# Brackets and braces outside strings; strings are matched whole so their content is skipped.
_STRUCTURE = re.compile(rb'"(?:[^"\\]+|\\.)*"|[\[\]{}]')


def nesting_depth(raw: bytes, limit: int) -> int:
    """The deepest nesting of arrays and objects in `raw`, counting up to `limit` + 1 at most
    (the scan stops as soon as the limit is passed)."""
    depth = deepest = 0
    for match in _STRUCTURE.finditer(raw):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif token in (b"]", b"}"):
            depth -= 1
    return deepest


def _bounded_int(text: str) -> int:
    digits = text.lstrip("-")
    if len(digits) > MAX_INTEGER_DIGITS:
        raise ValueError(f"an integer has more than {MAX_INTEGER_DIGITS} digits")
    return int(text)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(raw: bytes, max_bytes: int, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Parse `raw` as UTF-8 JSON; ValueError when it is too large, too deep, not UTF-8, not
    JSON, or holds an integer of more than 20 digits or NaN/Infinity."""
    if len(raw) > max_bytes:
        raise ValueError(f"is larger than {max_bytes} bytes")
    if (b"[" in raw or b"{" in raw) and nesting_depth(raw, max_depth) > max_depth:
        raise ValueError(f"is nested deeper than {max_depth} levels")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8") from None
    try:
        return json.loads(text, parse_int=_bounded_int, parse_constant=_no_constant)
    except json.JSONDecodeError as error:
        raise ValueError(f"is not JSON ({error.msg} at offset {error.pos})") from None
    except RecursionError:  # defence in depth: the scan above should have refused it
        raise ValueError(f"is nested deeper than {max_depth} levels") from None
