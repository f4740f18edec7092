"""The client's reading of a listing answer. Nothing in it is authenticated, so every part is
bounded and checked; one malformed affiliate is skipped with a problem line and harms no
other, while a listing whose frame is malformed (no revision, no list) is refused whole."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from kubespan.discovery.protocol import Listing, WireAffiliate

# What an honest service can list for one cluster (its limits.py), and no more: a view of
# 1,024 records of 4 KiB with 64 endpoints of 128 bytes stays near 12 MiB.
MAX_LISTED_AFFILIATES = 1024
MAX_LISTED_ENDPOINTS = 64
MAX_REVISION = (1 << 63) - 1
MAX_DATA_TEXT = 5464  # base64 of the largest sealed record, 4,096 bytes
MAX_ENDPOINT_TEXT = 172  # base64 of the largest endpoint blob the service takes, 128 bytes
_ID = re.compile(r"[A-Za-z0-9_-]{1,256}")


def parse_listing_answer(body: Any) -> tuple[Listing, list[str]]:
    """The listing, and a line for each affiliate left out; ValueError for a bad frame."""
    if not isinstance(body, dict):
        raise ValueError("listing is not a JSON object")
    revision = body.get("revision")
    if isinstance(revision, bool) or not isinstance(revision, int):
        raise ValueError("listing has no integer revision")
    if not 0 <= revision <= MAX_REVISION:
        raise ValueError("listing's revision is out of range")
    reset = body.get("reset", True)
    if not isinstance(reset, bool):
        raise ValueError("listing's reset is not a boolean")
    raw_affiliates = body.get("affiliates")
    if not isinstance(raw_affiliates, list) or len(raw_affiliates) > MAX_LISTED_AFFILIATES:
        raise ValueError(f"listing's affiliates is not a list of at most {MAX_LISTED_AFFILIATES}")
    removed = body.get("removed", [])
    if (
        not isinstance(removed, list)
        or len(removed) > MAX_LISTED_AFFILIATES
        or not all(isinstance(r, str) and _ID.fullmatch(r) for r in removed)
    ):
        raise ValueError("listing's removed is not a list of affiliate ids")
    affiliates: list[WireAffiliate] = []
    problems: list[str] = []
    seen: set[str] = set()
    for index, item in enumerate(raw_affiliates):
        try:
            affiliate = _affiliate(item)
        except ValueError as error:
            problems.append(f"listed affiliate {index} ignored: {error}")
            continue
        if affiliate.id in seen:
            problems.append(f"listed affiliate {index} ignored: its id is listed twice")
            continue
        seen.add(affiliate.id)
        affiliates.append(affiliate)
    return Listing(revision, tuple(affiliates), tuple(removed), reset), problems


def _affiliate(item: Any) -> WireAffiliate:
    if not isinstance(item, dict):
        raise ValueError("not an object")
    affiliate_id = item.get("id")
    if not isinstance(affiliate_id, str) or not _ID.fullmatch(affiliate_id):
        raise ValueError("id is not 1 to 256 characters of [A-Za-z0-9_-]")
    data = _blob(item.get("data"), MAX_DATA_TEXT, "data")
    endpoints = item.get("endpoints", [])
    if not isinstance(endpoints, list) or len(endpoints) > MAX_LISTED_ENDPOINTS:
        raise ValueError(f"endpoints is not a list of at most {MAX_LISTED_ENDPOINTS}")
    blobs = tuple(_blob(e, MAX_ENDPOINT_TEXT, "endpoints") for e in endpoints)
    ttl = item.get("ttl", 0)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise ValueError("ttl is not a number")
    return WireAffiliate(affiliate_id, data, blobs, float(ttl))


def _blob(value: Any, max_text: int, name: str) -> bytes:
    if not isinstance(value, str) or not value or len(value) > max_text:
        raise ValueError(f"{name} is not a base64 string of at most {max_text} characters")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{name} is not standard base64") from None
