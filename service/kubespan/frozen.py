"""A copy of a frozen record with some fields changed, without dataclasses.replace's
per-call introspection: the planner changes a peer's tracking several times per peer and
pass, and replace() alone was a fifth of an idle pass with a hundred peers that answer.

Only for plain frozen dataclasses: every field set by __init__, no __post_init__ (nothing
would check the copy), no __slots__ and no cached_property (a cached value would be copied
with the fields it was computed from). A class that is not so is refused, and so is a name
that is not one of its fields.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, TypeVar

Record = TypeVar("Record")


def evolve(record: Record, **changes: Any) -> Record:
    """`record` with `changes`, as dataclasses.replace would make it."""
    cls: type = type(record)
    names = _field_names(cls)
    if not changes.keys() <= names:
        unknown = ", ".join(sorted(changes.keys() - names))
        raise TypeError(f"{cls.__name__} has no field {unknown}")
    copy: Record = object.__new__(cls)
    state = copy.__dict__
    state.update(record.__dict__)
    state.update(changes)
    return copy


def require_plain(cls: type) -> None:
    """Refuse (TypeError) a class that is not a plain frozen dataclass: for the few places
    that copy a record's __dict__ themselves, as evolve does, on a path too hot for its
    checks at every call; called once, where they are defined."""
    _field_names(cls)


@functools.cache
def _field_names(cls: type) -> frozenset[str]:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a dataclass")
    plain = (
        cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
        and not hasattr(cls, "__post_init__")
        and "__slots__" not in vars(cls)
        and all(f.init for f in dataclasses.fields(cls))
        and not any(
            isinstance(value, functools.cached_property)
            for klass in cls.__mro__
            for value in vars(klass).values()
        )
    )
    if not plain:
        raise TypeError(f"{cls.__name__} is not a plain frozen dataclass: use replace()")
    return frozenset(f.name for f in dataclasses.fields(cls))
