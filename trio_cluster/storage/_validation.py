"""Argument checks of the storage contract, one per operation (edge adapter helpers).

The storage records are plain attrs classes without validators, so a backend
checks what it is given before touching its tables. Each method of the
storage ABCs (`trio_cluster.abc`) that takes arguments has one
``check_<operation>`` here, which every backend calls first: they raise the
same `TypeError` / `ValueError` messages whatever the backend, and return the
arguments normalised (sequences as lists, times as floats), so a new backend
copies none of this. The number checks come from `trio_cluster._core._checks`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from functools import partial
from operator import attrgetter
from types import UnionType
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

import attrs

from .. import _storage_abc, _storage_retries
from .._call_metadata import metadata_problem
from .._core._addresses import EntityAddress, ShardId
from .._core._checks import ARGUMENT, count, integer, positive_seconds, timestamp
from .._storage_abc import (
    PersistedRequest,
    ReplyQuery,
    ReplyRecord,
    RunnerInfo,
    StorageTransaction,
)
from .._storage_retries import MAX_ERROR_TEXT, RetryRecord
from .._storage_state import MAX_LABEL, StateQuery, StateWrite

__all__ = [
    "MACHINE_IDS",
    "QUERY_FIELDS",
    "REPLY_FIELDS",
    "REQUEST_FIELDS",
    "RUNNER_FIELDS",
    "check_ack_chunks",
    "check_acquire",
    "check_claim",
    "check_clear_address",
    "check_delete_processed",
    "check_fields",
    "check_int",
    "check_interrupt",
    "check_items",
    "check_limit",
    "check_list_states",
    "check_mapping",
    "check_now",
    "check_open_session",
    "check_pairs",
    "check_refresh",
    "check_register",
    "check_release",
    "check_replies_for",
    "check_save_replies",
    "check_save_requests",
    "check_scan_unprocessed",
    "check_state_query",
    "check_state_write",
    "check_state_writes",
    "check_transaction",
]

T = TypeVar("T")

Types = type | tuple[type, ...]

MACHINE_IDS = 1024
"""Snowflake machine ids are 0..1023."""


def _record_fields(
    cls: type, *, skip: Collection[str] = (), module: object = _storage_abc
) -> dict[str, Types]:
    """The field types of a storage record (of `trio_cluster.abc`), read
    from its annotations.

    ``float`` admits an int too, and ``X | None`` admits None; a generic
    (``tuple[str, ...]``) is checked by its class only.
    """
    # NOTE: resolved in the module that defines the records: their public
    # ``__module__`` (`trio_cluster`) may still be importing.
    hints = get_type_hints(cls, vars(module))
    fields: dict[str, Types] = {}
    for field in attrs.fields(cls):
        if field.name in skip:
            continue
        hint = hints[field.name]
        options = get_args(hint) if isinstance(hint, UnionType) else (hint,)
        runtime: list[type] = []
        for option in options:
            origin = get_origin(option) or option
            runtime += [int, float] if origin is float else [origin]
        fields[field.name] = runtime[0] if len(runtime) == 1 else tuple(runtime)
    return fields


# The field types of the storage records, checked by every backend.
RUNNER_FIELDS = _record_fields(RunnerInfo, skip={"machine_id"})
"""`RunnerInfo`'s, but its ``machine_id``: storage assigns that one."""
REQUEST_FIELDS = _record_fields(PersistedRequest)
REPLY_FIELDS = _record_fields(ReplyRecord)
QUERY_FIELDS = _record_fields(ReplyQuery)
RETRY_FIELDS = _record_fields(RetryRecord, module=_storage_retries)


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
    return integer(what, value, errors=ARGUMENT)


def check_now(value: object, what: str = "now") -> float:
    """Check a time in seconds: a finite int or float."""
    return timestamp(what, value, errors=ARGUMENT)


def check_limit(value: object) -> int:
    """Check a batch limit: an int >= 0."""
    return count("limit", value, errors=ARGUMENT)


def check_items(items: object, cls: type[T], what: str) -> list[T]:
    """Check a sequence or collection argument whose items are all ``cls``."""
    if type(items) is not list and (  # a list is what callers pass
        isinstance(items, str | bytes | Mapping) or not isinstance(items, Iterable)
    ):
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


def _admitted(
    fields: Mapping[str, Types],
) -> tuple[Callable[[object], tuple[Any, ...]], list[set[type]]]:
    """What `check_fields` reads of ``fields``: a getter of their values (a
    tuple) and, per field, the classes found to pass its full check so far
    (whether a value passes depends on its class alone)."""
    cached = _ADMITTED.get(id(fields))
    if cached is not None and cached[0] is fields:
        return cached[1], cached[2]
    names = list(fields)
    # (`attrgetter` of one name returns the value, not a tuple)
    getter: Callable[[object], tuple[Any, ...]] = (
        attrgetter(*names) if len(names) > 1 else partial(_values, names)
    )
    admitted: list[set[type]] = [set() for _ in names]
    if len(_ADMITTED) >= _MAX_ADMITTED:  # mappings made per call: keep few
        _ADMITTED.clear()
    _ADMITTED[id(fields)] = (fields, getter, admitted)
    return getter, admitted


def _values(names: list[str], record: object) -> tuple[Any, ...]:
    return tuple(getattr(record, name) for name in names)


_ADMITTED: dict[
    int,
    tuple[
        Mapping[str, Types],
        Callable[[object], tuple[Any, ...]],
        list[set[type]],
    ],
] = {}
"""`_admitted` of the field mappings checked so far (a few constants, kept
with their mapping: an id is only theirs while they live)."""
_MAX_ADMITTED = 64


def check_fields(record: object, fields: Mapping[str, Types]) -> None:
    """Check the field types of an attrs record, e.g. a `PersistedRequest`.

    The classes of its values are looked up among those that passed before
    (one pass over the values); a class not seen yet takes the full check.
    """
    getter, admitted = _admitted(fields)
    values = getter(record)
    if all(map(set.__contains__, admitted, map(type, values))):
        return
    for (name, types), value, classes in zip(
        fields.items(), values, admitted, strict=True
    ):
        if type(value) in classes:
            continue
        if not _is_instance(value, types):
            raise TypeError(
                f"{type(record).__name__}.{name} must be {_names(types)}, got {value!r}"
            )
        classes.add(type(value))


def check_pairs(items: object, what: str) -> list[tuple[int, int]]:
    """Check a sequence of ``(int, int)`` pairs, e.g. chunk acknowledgements."""
    checked = check_items(items, tuple, what)
    for pair in checked:
        if len(pair) != 2:
            raise TypeError(f"{what} must contain (int, int) pairs, got {pair!r}")
        check_int(pair[0], f"{what} request id")
        check_int(pair[1], f"{what} sequence")
    return checked


# --------------------------------------------------------------------------
# One check per storage operation


def check_open_session(name: object, lease_duration: object) -> float:
    """`Storage.open_session`: returns the lease duration as a float."""
    if not isinstance(name, str):
        raise TypeError(f"session name must be a str, got {name!r}")
    return positive_seconds("lease_duration", lease_duration, errors=ARGUMENT)


def check_save_requests(
    requests: object, now: object
) -> tuple[list[PersistedRequest], float]:
    """`MessageStorage.save_requests`: returns ``(requests, now)``."""
    checked = check_items(requests, PersistedRequest, "requests")
    for request in checked:
        check_fields(request, REQUEST_FIELDS)
        if request.deliver_at is not None:
            check_now(request.deliver_at, "PersistedRequest.deliver_at")
        if request.metadata:
            problem = metadata_problem(request.metadata)
            if problem is not None:
                raise ValueError(f"PersistedRequest.metadata: {problem}")
    return checked, check_now(now)


def check_transactional_saves(requests: Sequence[PersistedRequest]) -> None:
    """`MessageStorage.save_requests` in a transaction: none saved claimed."""
    for request in requests:
        if request.claim_epoch is not None:
            raise ValueError(
                "a request saved in a transaction cannot be saved claimed"
                f" (request {request.request_id} has claim_epoch"
                f" {request.claim_epoch}): it is claimed once committed"
            )


def check_claim(
    shards: object, now: object, limit: object
) -> tuple[dict[ShardId, int], float, int]:
    """`MessageStorage.claim`: returns ``(shards, now, limit)``."""
    return check_mapping(shards, ShardId, "shards"), check_now(now), check_limit(limit)


def check_save_replies(replies: object, now: object) -> tuple[list[ReplyRecord], float]:
    """`MessageStorage.save_replies` (but its ``transaction``, see
    `check_transaction`): returns ``(replies, now)``."""
    checked = check_items(replies, ReplyRecord, "replies")
    for reply in checked:
        check_fields(reply, REPLY_FIELDS)
        if reply.sequence is not None and reply.sequence < 0:
            raise ValueError(f"ReplyRecord.sequence must be >= 0, got {reply.sequence}")
        if reply.dead_letter is not None:
            if reply.sequence is not None:
                raise ValueError(
                    "ReplyRecord.dead_letter is for a final reply (sequence None)"
                )
            _check_error_text(reply.dead_letter, "ReplyRecord.dead_letter")
    return checked, check_now(now)


def _check_error_text(text: str, what: str) -> None:
    if len(text) > MAX_ERROR_TEXT:
        raise ValueError(
            f"{what} must be at most {MAX_ERROR_TEXT} characters, got {len(text)}"
        )


def check_retry_later(retries: object, now: object) -> tuple[list[RetryRecord], float]:
    """`MessageStorage.retry_later`: returns ``(retries, now)``."""
    checked = check_items(retries, RetryRecord, "retries")
    for retry in checked:
        check_fields(retry, RETRY_FIELDS)
        if retry.deliver_at is not None:
            check_now(retry.deliver_at, "RetryRecord.deliver_at")
        if retry.error is not None:
            _check_error_text(retry.error, "RetryRecord.error")
    return checked, check_now(now)


def check_dead_letters(after_id: object, limit: object) -> tuple[int | None, int]:
    """`MessageStorage.dead_letters`: returns ``(after_id, limit)``."""
    return check_scan_unprocessed(after_id, limit)


def check_replay_dead_letter(
    request_id: object, new_request_id: object, now: object
) -> tuple[int, int, float]:
    """`MessageStorage.replay_dead_letter`: returns the three, checked."""
    return (
        check_int(request_id, "request_id"),
        check_int(new_request_id, "new_request_id"),
        check_now(now),
    )


def check_purge_dead_letters(request_ids: object) -> list[int]:
    """`MessageStorage.purge_dead_letters`."""
    return check_interrupt(request_ids)


def check_transaction(
    transaction: StorageTransaction, kind: type[T], owner: object
) -> T:
    """The ``transaction`` of `MessageStorage.save_replies`: a ``kind``
    (the backend's transaction class) whose ``owner`` attribute is ``owner``
    (the storage that opened it)."""
    if (
        not isinstance(transaction, kind)
        or getattr(transaction, "owner", None) is not owner
    ):
        raise ValueError(
            "transaction must come from open_transaction() of this storage"
        )
    return transaction


def check_replies_for(queries: object) -> list[ReplyQuery]:
    """`MessageStorage.replies_for`."""
    checked = check_items(queries, ReplyQuery, "queries")
    for query in checked:
        check_fields(query, QUERY_FIELDS)
    return checked


def check_ack_chunks(acks: object) -> list[tuple[int, int]]:
    """`MessageStorage.ack_chunks`."""
    return check_pairs(acks, "acks")


def check_interrupt(request_ids: object) -> list[int]:
    """`MessageStorage.interrupt`."""
    return [
        check_int(i, "request id") for i in check_items(request_ids, int, "request_ids")
    ]


def check_clear_address(address: object) -> EntityAddress:
    """`MessageStorage.clear_address`."""
    if not isinstance(address, EntityAddress):
        raise TypeError(f"address must be an EntityAddress, got {address!r}")
    return address


def check_state_write(write: object, now: object) -> tuple[StateWrite, float]:
    """`StateStorage.save_state`: returns ``(write, now)``."""
    if not isinstance(write, StateWrite):
        raise TypeError(f"write must be a StateWrite, got {write!r}")
    check_clear_address(write.address)
    check_int(write.epoch, "StateWrite.epoch")
    if count("StateWrite.expected_version", write.expected_version, errors=ARGUMENT) > (
        _MAX_VERSION
    ):
        raise ValueError(f"StateWrite.expected_version is too large: {write!r}")
    if not isinstance(write.payload, bytes):
        raise TypeError(f"StateWrite.payload must be bytes, got {write.payload!r}")
    _check_label(write.label, "StateWrite.label")
    return write, check_now(now)


def check_state_writes(writes: object, now: object) -> tuple[list[StateWrite], float]:
    """`StateStorage.save_states`: returns ``(writes, now)``."""
    if isinstance(writes, (str, bytes)) or not hasattr(writes, "__iter__"):
        raise TypeError(f"writes must be a sequence of StateWrite, got {writes!r}")
    checked = [check_state_write(write, now)[0] for write in writes]
    keys = {(w.address.entity_type, w.address.entity_id.value) for w in checked}
    if len(keys) != len(checked):
        raise ValueError("save_states takes at most one write per entity")
    return checked, check_now(now)


def _check_label(label: object, what: str) -> None:
    if label is None:
        return
    if not isinstance(label, str):
        raise TypeError(f"{what} must be a str or None, got {label!r}")
    if len(label) > MAX_LABEL:
        raise ValueError(
            f"{what} must be at most {MAX_LABEL} characters, got {len(label)}"
        )


def check_state_query(query: object) -> StateQuery:
    """`StateStorage.count_states` (and the query of ``list_states``)."""
    if not isinstance(query, StateQuery):
        raise TypeError(f"query must be a StateQuery, got {query!r}")
    if not isinstance(query.entity_type, str):
        raise TypeError(
            f"StateQuery.entity_type must be a str, got {query.entity_type!r}"
        )
    if not isinstance(query.prefix, bool):
        raise TypeError(f"StateQuery.prefix must be a bool, got {query.prefix!r}")
    _check_label(query.label, "StateQuery.label")
    if query.entity_id is not None and not isinstance(query.entity_id, str):
        raise TypeError(
            f"StateQuery.entity_id must be a str or None, got {query.entity_id!r}"
        )
    return query


def check_list_states(
    query: object, after: object, limit: object
) -> tuple[StateQuery, tuple[str, str] | None, int]:
    """`StateStorage.list_states`: returns ``(query, after, limit)``."""
    checked = check_state_query(query)
    if after is not None and not (
        isinstance(after, tuple)
        and len(after) == 2
        and all(isinstance(part, str) for part in after)
    ):
        raise TypeError(
            f"after must be an (entity_type, entity_id) pair of str, got {after!r}"
        )
    return checked, after, check_limit(limit)


_MAX_VERSION = 2**63 - 2
"""The largest version a save may replace (the next one fits an int8)."""


def check_delete_processed(older_than: object, limit: object) -> tuple[float, int]:
    """`MessageStorage.delete_processed`: returns ``(older_than, limit)``."""
    return check_now(older_than, "older_than"), check_limit(limit)


def check_scan_unprocessed(after_id: object, limit: object) -> tuple[int | None, int]:
    """`MessageStorage.scan_unprocessed`: returns ``(after_id, limit)``."""
    after = None if after_id is None else check_int(after_id, "after_id")
    return after, check_limit(limit)


def check_register(runner: object) -> RunnerInfo:
    """`RunnerStorage.register`."""
    if not isinstance(runner, RunnerInfo):
        raise TypeError(f"runner must be a RunnerInfo, got {runner!r}")
    check_fields(runner, RUNNER_FIELDS)
    check_items(runner.groups, str, "RunnerInfo.groups")
    return runner


def check_acquire(shards: object) -> list[ShardId]:
    """`RunnerStorage.acquire`, `refresh` and `release`."""
    return check_items(shards, ShardId, "shards")


check_refresh = check_acquire
check_release = check_acquire
