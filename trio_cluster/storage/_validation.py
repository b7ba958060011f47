"""Argument checks shared by storage backends (edge adapter helpers).

The storage records are plain attrs classes without validators, so a backend
checks what it is given before touching its tables, and every backend reports
misuse with the same `TypeError` / `ValueError` messages.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TypeVar

from .._core._addresses import EntityAddress, RunnerAddress, ShardId

__all__ = [
    "MACHINE_IDS",
    "QUERY_FIELDS",
    "REPLY_FIELDS",
    "REQUEST_FIELDS",
    "RUNNER_FIELDS",
    "check_fields",
    "check_int",
    "check_items",
    "check_limit",
    "check_mapping",
    "check_now",
    "check_pairs",
]

T = TypeVar("T")

Types = type | tuple[type, ...]

# The field types of the storage records, checked by every backend.
MACHINE_IDS = 1024
"""Snowflake machine ids are 0..1023."""

RUNNER_FIELDS: dict[str, Types] = {
    "address": RunnerAddress,
    "groups": tuple,
    "weight": (int, float),
}

REQUEST_FIELDS: dict[str, Types] = {
    "request_id": int,
    "address": EntityAddress,
    "tag": str,
    "payload": bytes,
    "primary_key": (str, type(None)),
    "deliver_at": (int, float, type(None)),
    "stream": bool,
    "claim_epoch": (int, type(None)),
}
REPLY_FIELDS: dict[str, Types] = {
    "request_id": int,
    "shard": ShardId,
    "epoch": int,
    "payload": bytes,
    "sequence": (int, type(None)),
}
QUERY_FIELDS: dict[str, Types] = {
    "request_id": int,
    "after_sequence": int,
}


def _names(types: Types) -> str:
    if isinstance(types, type):
        types = (types,)
    return " or ".join("None" if t is type(None) else t.__name__ for t in types)


def _is_instance(value: object, types: Types) -> bool:
    # bool is an int subclass, but True is never a sensible id, epoch or time.
    if isinstance(value, bool):
        return types is bool or (isinstance(types, tuple) and bool in types)
    return isinstance(value, types)


def check_int(value: object, what: str) -> int:
    """Return ``value`` if it is an int (not a bool), else raise `TypeError`."""
    if not _is_instance(value, int):
        raise TypeError(f"{what} must be an int, got {value!r}")
    assert isinstance(value, int)
    return value


def check_now(value: object, what: str = "now") -> float:
    """Check a time in seconds: a finite int or float."""
    if not _is_instance(value, (int, float)):
        raise TypeError(
            f"{what} must be a float (seconds since the epoch), got {value!r}"
        )
    assert isinstance(value, int | float)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return float(value)


def check_limit(value: object) -> int:
    """Check a batch limit: an int >= 0."""
    limit = check_int(value, "limit")
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return limit


def check_items(items: object, cls: type[T], what: str) -> list[T]:
    """Check a sequence or collection argument whose items are all ``cls``."""
    if isinstance(items, str | bytes | Mapping) or not isinstance(items, Iterable):
        raise TypeError(f"{what} must be a sequence of {cls.__name__}, got {items!r}")
    checked = list(items)
    for item in checked:
        if not isinstance(item, cls):
            raise TypeError(f"{what} must contain only {cls.__name__}, got {item!r}")
    return checked


def check_mapping(mapping: object, key_cls: type[T], what: str) -> dict[T, int]:
    """Check a mapping of ``key_cls`` to int (e.g. shards to epochs)."""
    if not isinstance(mapping, Mapping):
        raise TypeError(
            f"{what} must be a mapping of {key_cls.__name__} to int, got {mapping!r}"
        )
    checked: dict[T, int] = {}
    for key, value in mapping.items():
        if not isinstance(key, key_cls):
            raise TypeError(f"{what} keys must be {key_cls.__name__}, got {key!r}")
        checked[key] = check_int(value, f"{what}[{key}]")
    return checked


def check_fields(record: object, fields: Mapping[str, Types]) -> None:
    """Check the field types of an attrs record, e.g. a `PersistedRequest`."""
    for name, types in fields.items():
        value = getattr(record, name)
        if not _is_instance(value, types):
            raise TypeError(
                f"{type(record).__name__}.{name} must be {_names(types)}, got {value!r}"
            )


def check_pairs(items: object, what: str) -> list[tuple[int, int]]:
    """Check a sequence of ``(int, int)`` pairs, e.g. chunk acknowledgements."""
    checked = check_items(items, tuple, what)
    for pair in checked:
        if len(pair) != 2:
            raise TypeError(f"{what} must contain (int, int) pairs, got {pair!r}")
        check_int(pair[0], f"{what} request id")
        check_int(pair[1], f"{what} sequence")
    return checked
