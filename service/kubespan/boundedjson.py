"""JSON from untrusted sources, with its size, nesting and numbers bounded.

The standard library parses whatever it is given: 100,000 nested `[` end in a RecursionError,
a 5,000-digit integer costs quadratic time to convert, and the answer can be any size. Every
byte that reaches kubespan from the network (the discovery service's answers, requests to the
service) and every state file goes through `loads` instead, which refuses all of that with a
ValueError naming the limit.
"""

from __future__ import annotations

import json
from typing import Any

DEFAULT_MAX_DEPTH = 32
MAX_INTEGER_DIGITS = 20


def nesting_depth(document: Any, limit: int) -> int:
    """The deepest nesting of arrays and objects in a parsed document, counting up to
    `limit` + 1 at most. Iterative: no input can make it recurse, and it is linear."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in children)
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
    JSON, or holds an integer of more than 20 digits or NaN/Infinity.

    The standard parser is linear in its input and stops a runaway nesting with a
    RecursionError (caught here) after about a thousand levels; the depth is then measured
    on the result, without recursion. (A pre-scan with a regular expression was tried first:
    an unterminated string made it backtrack exponentially.)"""
    if len(raw) > max_bytes:
        raise ValueError(f"is larger than {max_bytes} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8") from None
    try:
        document = json.loads(text, parse_int=_bounded_int, parse_constant=_no_constant)
    except json.JSONDecodeError as error:
        raise ValueError(f"is not JSON ({error.msg} at offset {error.pos})") from None
    except RecursionError:
        raise ValueError(f"is nested deeper than {max_depth} levels") from None
    if nesting_depth(document, max_depth) > max_depth:
        raise ValueError(f"is nested deeper than {max_depth} levels")
    return document
