"""Call metadata: string key/values that travel with calls (API).

A caller sets metadata for a block of code with `with_metadata`; every call
made inside the block carries it, to a local entity, to another runner (in
the ``REQUEST`` envelope) or through storage (a persisted request stores it
and gets it back when it is claimed, after a failover too). The handler reads
what its caller sent with `current_metadata`, and the calls it makes carry it
onward: the handler runs with it set, as if inside its caller's block.

The value lives in one `contextvars.ContextVar` holding an immutable mapping
(None when nothing is set, so a call without metadata costs one lookup and
no allocation). Entity code runs in a fresh copy of the runner's base context
(`trio_cluster._engine._isolation`), where it is reset, then set to the
job's metadata when there is some.

Limits keep an envelope and a stored row small whatever the caller does: at
most `MAX_METADATA_ENTRIES` entries of keys up to `MAX_METADATA_KEY_LENGTH`
and values up to `MAX_METADATA_VALUE_LENGTH` characters, `MAX_METADATA_SIZE`
characters in all. The keys of `RESERVED_METADATA_KEYS` (W3C trace context)
belong to the tracer: `with_metadata` refuses them; a carried map may hold
them beyond those limits (within `MAX_CARRIED_ENTRIES` and
`MAX_CARRIED_SIZE`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Final

from ._core._addresses import check_storable
from ._errors import InvalidIdError, InvalidMetadataError

__all__ = [
    "EMPTY_METADATA",
    "MAX_CARRIED_ENTRIES",
    "MAX_CARRIED_SIZE",
    "MAX_METADATA_ENTRIES",
    "MAX_METADATA_KEY_LENGTH",
    "MAX_METADATA_SIZE",
    "MAX_METADATA_VALUE_LENGTH",
    "RESERVED_METADATA_KEYS",
    "current_metadata",
    "current_metadata_var",
    "metadata_problem",
    "with_metadata",
]

MAX_METADATA_ENTRIES: Final = 32
"""Most entries a caller may set (reserved keys not counted)."""
MAX_METADATA_KEY_LENGTH: Final = 64
"""Longest key, in characters."""
MAX_METADATA_VALUE_LENGTH: Final = 1024
"""Longest value, in characters."""
MAX_METADATA_SIZE: Final = 4096
"""Most characters of keys and values together a caller may set (reserved
keys not counted)."""
RESERVED_METADATA_KEYS: Final = frozenset({"traceparent", "tracestate"})
"""Keys a tracer writes (W3C trace context); `with_metadata` refuses them."""
MAX_CARRIED_ENTRIES: Final = MAX_METADATA_ENTRIES + len(RESERVED_METADATA_KEYS)
"""Most entries a call carries (on the wire, in storage)."""
MAX_CARRIED_SIZE: Final = MAX_METADATA_SIZE + 1024
"""Most characters a call carries: the caller's, and room for the trace
context (a ``tracestate`` is at most 512 characters)."""

EMPTY_METADATA: Final[Mapping[str, str]] = MappingProxyType({})
"""The empty metadata (shared: it is immutable)."""

current_metadata_var: ContextVar[Mapping[str, str] | None] = ContextVar(
    "trio_cluster.metadata", default=None
)
"""The metadata calls made here carry (None: none). Always an immutable
mapping."""


def current_metadata() -> Mapping[str, str]:
    """The call metadata in effect here.

    Inside a handler (and the code it calls), the metadata its caller sent,
    with what enclosing `with_metadata` blocks in the handler added; an empty
    mapping when the caller sent none. Elsewhere, what the enclosing
    `with_metadata` blocks set.

    The mapping is read-only. Inside handlers it may hold the tracer's keys
    (`RESERVED_METADATA_KEYS`).
    """
    metadata = current_metadata_var.get()
    return EMPTY_METADATA if metadata is None else metadata


@contextmanager
def with_metadata(**values: str) -> Iterator[None]:
    """Set call metadata for the calls made inside the block::

        with trio_cluster.with_metadata(tenant="acme", request_id="r-17"):
            await accounts("alice").deposit(Deposit(10))

    Blocks nest: an inner block's values are merged over the outer's (the
    inner wins). Inside a handler, the block starts from the metadata the
    handler received. Every call made in the block carries the metadata,
    local, remote or persisted, and the handler it reaches sees it with
    `current_metadata` and carries it onward in its own calls.

    Tasks started inside the block inherit it (they copy the context);
    handlers never see their caller's context otherwise.

    Raises:
        InvalidMetadataError: a value is not a str; a key is empty, too long
            or reserved (``traceparent``, ``tracestate``); a value is too
            long; a key or value holds a NUL character or a lone surrogate;
            or the merged metadata has too many entries or characters (see
            the module's limits). Raised when the block is entered, before
            anything is sent.
    """
    for key, value in values.items():
        _check_entry(key, value)
    outer = current_metadata_var.get()
    merged = dict(values) if outer is None else {**outer, **values}
    _check_totals(merged)
    token = current_metadata_var.set(MappingProxyType(merged))
    try:
        yield
    finally:
        current_metadata_var.reset(token)


def _check_entry(key: str, value: object) -> None:
    if key in RESERVED_METADATA_KEYS:
        raise InvalidMetadataError(
            f"call metadata key {key!r} is reserved for the tracer (W3C trace"
            " context): pick another name"
        )
    problem = _entry_problem(key, value)
    if problem is not None:
        raise InvalidMetadataError(f"call metadata: {problem}")


def _entry_problem(key: object, value: object) -> str | None:
    if not isinstance(key, str):
        return f"keys must be str, got {type(key).__name__}"
    if not isinstance(value, str):
        return f"the value of {key!r} must be a str, got {type(value).__name__}"
    if not key:
        return "keys must not be empty"
    if len(key) > MAX_METADATA_KEY_LENGTH:
        return (
            f"key {key[:20]!r}... is {len(key)} characters,"
            f" over {MAX_METADATA_KEY_LENGTH}"
        )
    if len(value) > MAX_METADATA_VALUE_LENGTH:
        return (
            f"the value of {key!r} is {len(value)} characters,"
            f" over {MAX_METADATA_VALUE_LENGTH}"
        )
    try:
        # What PostgreSQL text and UTF-8 cannot hold.
        check_storable(f"the key {key!r}", key)
        check_storable(f"the value of {key!r}", value)
    except InvalidIdError as exc:
        return str(exc)
    return None


def _check_totals(metadata: Mapping[str, str]) -> None:
    entries = size = 0
    for key, value in metadata.items():
        if key not in RESERVED_METADATA_KEYS:
            entries += 1
            size += len(key) + len(value)
    if entries > MAX_METADATA_ENTRIES:
        raise InvalidMetadataError(
            f"call metadata has {entries} entries, over {MAX_METADATA_ENTRIES}"
        )
    if size > MAX_METADATA_SIZE:
        raise InvalidMetadataError(
            f"call metadata has {size} characters of keys and values,"
            f" over {MAX_METADATA_SIZE}"
        )


def metadata_problem(value: object) -> str | None:
    """What is wrong with ``value`` as carried metadata (from a peer, or
    stored), or None: it must be a dict (or mapping) of str to str within the
    carried limits. Reserved keys are allowed."""
    if not isinstance(value, Mapping):
        return f"expected a map, got {type(value).__name__}"
    if len(value) > MAX_CARRIED_ENTRIES:
        return f"{len(value)} entries, over {MAX_CARRIED_ENTRIES}"
    size = 0
    for key, text in value.items():
        problem = _entry_problem(key, text)
        if problem is not None:
            return problem
        size += len(key) + len(text)
    if size > MAX_CARRIED_SIZE:
        return f"{size} characters of keys and values, over {MAX_CARRIED_SIZE}"
    return None
