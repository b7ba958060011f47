"""Tests of the storage argument checks (``storage/_validation.py``), through
a `MemoryStorage` session: every backend calls the same checks."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import attrs
import pytest

from trio_cluster.abc import (
    ReplyQuery,
    ReplyRecord,
    RunnerInfo,
)
from trio_cluster.storage import _validation
from trio_cluster.storage._validation import REQUEST_FIELDS, check_fields
from trio_cluster.testing import (
    BASE_TIME,
    SHARD,
    persisted_request,
    runner_info,
)

if TYPE_CHECKING:
    pass


# ----------------------------------------------------------------------
# Argument validation


def _any(value: object) -> Any:
    """Pass a deliberately ill-typed value past mypy."""
    return value


BAD_CALLS = [
    (
        lambda s: s.messages.save_requests(_any(persisted_request(1)), now=BASE_TIME),
        TypeError,
        "requests must be a sequence of PersistedRequest",
    ),
    (
        lambda s: s.messages.save_requests(["x"], now=BASE_TIME),
        TypeError,
        "only PersistedRequest",
    ),
    (
        lambda s: s.messages.save_requests(
            [attrs.evolve(persisted_request(1), request_id=_any("1"))], now=BASE_TIME
        ),
        TypeError,
        "PersistedRequest.request_id must be int",
    ),
    (
        lambda s: s.messages.save_requests(
            [attrs.evolve(persisted_request(1), request_id=True)], now=BASE_TIME
        ),
        TypeError,
        "request_id must be int",
    ),
    (
        lambda s: s.messages.save_requests(
            [attrs.evolve(persisted_request(1), primary_key=_any(3))], now=BASE_TIME
        ),
        TypeError,
        "primary_key must be str or None",
    ),
    (
        lambda s: s.messages.save_requests(
            [attrs.evolve(persisted_request(1), stream=_any(1))], now=BASE_TIME
        ),
        TypeError,
        "stream must be bool",
    ),
    (
        lambda s: s.messages.save_requests(
            [persisted_request(1, deliver_at=math.nan)], now=BASE_TIME
        ),
        ValueError,
        "deliver_at must be finite",
    ),
    (
        lambda s: s.messages.save_requests([], now=_any("now")),
        TypeError,
        "now must be a float",
    ),
    (
        lambda s: s.messages.save_requests([], now=math.inf),
        ValueError,
        "now must be finite",
    ),
    (
        lambda s: s.messages.claim(_any([SHARD]), now=BASE_TIME, limit=1),
        TypeError,
        "mapping of ShardId",
    ),
    (
        lambda s: s.messages.claim({_any("x:1"): 1}, now=BASE_TIME, limit=1),
        TypeError,
        "keys must be ShardId",
    ),
    (
        lambda s: s.messages.claim({SHARD: _any("1")}, now=BASE_TIME, limit=1),
        TypeError,
        "must be an int",
    ),
    (
        lambda s: s.messages.claim({}, now=BASE_TIME, limit=-1),
        ValueError,
        "limit must be an integer >= 0",
    ),
    (
        lambda s: s.messages.claim({}, now=BASE_TIME, limit=_any(1.5)),
        TypeError,
        "limit must be an int",
    ),
    (
        lambda s: s.messages.save_replies([], now=_any(None)),
        TypeError,
        "now must be a float",
    ),
    (
        lambda s: s.messages.save_replies(
            [ReplyRecord(1, SHARD, 1, b"", sequence=-1)], now=BASE_TIME
        ),
        ValueError,
        "sequence must be >= 0",
    ),
    (
        lambda s: s.messages.save_replies(
            [ReplyRecord(1, SHARD, 1, _any("x"))], now=BASE_TIME
        ),
        TypeError,
        "ReplyRecord.payload must be bytes",
    ),
    (
        lambda s: s.messages.replies_for([ReplyQuery(1, _any(None))]),
        TypeError,
        "after_sequence must be int",
    ),
    (
        lambda s: s.messages.ack_chunks([_any((1, 2, 3))]),
        TypeError,
        r"\(int, int\) pairs",
    ),
    (
        lambda s: s.messages.ack_chunks([(1, _any("2"))]),
        TypeError,
        "sequence must be an int",
    ),
    (lambda s: s.messages.interrupt(_any("123")), TypeError, "sequence of int"),
    (lambda s: s.messages.interrupt([False]), TypeError, "request id must be an int"),
    (
        lambda s: s.messages.clear_address(_any("Counter/e1")),
        TypeError,
        "must be an EntityAddress",
    ),
    (
        lambda s: s.messages.delete_processed(older_than=BASE_TIME, limit=-5),
        ValueError,
        "limit must be an integer >= 0",
    ),
    (
        lambda s: s.runners.register(_any("10.0.0.1:7001")),
        TypeError,
        "must be a RunnerInfo",
    ),
    (
        lambda s: s.runners.register(RunnerInfo(runner_info(1).address, _any(["g"]))),
        TypeError,
        "RunnerInfo.groups must be tuple",
    ),
    (
        lambda s: s.runners.register(RunnerInfo(runner_info(1).address, _any((1,)))),
        TypeError,
        "RunnerInfo.groups must contain only str",
    ),
    (lambda s: s.runners.acquire([SHARD, _any("g:2")]), TypeError, "only ShardId"),
    (lambda s: s.runners.refresh(_any(SHARD)), TypeError, "sequence of ShardId"),
    (lambda s: s.runners.release(_any({SHARD: 1})), TypeError, "sequence of ShardId"),
]


@pytest.mark.parametrize(("call", "error", "message"), BAD_CALLS)
async def test_bad_arguments_are_rejected(a, call, error, message):
    with pytest.raises(error, match=message):
        await call(a)


async def test_open_session_validates_arguments(storage, a):
    with pytest.raises(TypeError, match="name must be a str"):
        storage.open_session(name=_any(b"x"), lease_duration=1.0)
    for wrong_type in (True, "1", None):
        with pytest.raises(TypeError, match="lease_duration must be a number"):
            storage.open_session(name="x", lease_duration=_any(wrong_type))
    for wrong_value in (0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="positive, finite"):
            storage.open_session(name="x", lease_duration=wrong_value)
    with pytest.raises(ValueError, match="'a' is already open"):
        storage.open_session(name="a", lease_duration=1.0)
    first = storage.open_session(name="x", lease_duration=1.0)
    second = storage.open_session(name="x", lease_duration=1.0)
    async with first:
        with pytest.raises(ValueError, match="'x' is already open"):
            async with second:
                pass  # pragma: no cover


def test_record_fields_of_a_subclass_pass_and_a_bool_for_an_int_does_not():
    # The exact classes are checked in one pass; anything else takes the
    # full check, which admits subclasses but never a bool for an int.
    class Id(int):
        pass

    request = persisted_request(1)
    check_fields(request, REQUEST_FIELDS)
    check_fields(attrs.evolve(request, request_id=Id(7)), REQUEST_FIELDS)
    check_fields(attrs.evolve(request, primary_key=None), REQUEST_FIELDS)
    with pytest.raises(TypeError, match="request_id must be int, got True"):
        check_fields(attrs.evolve(request, request_id=True), REQUEST_FIELDS)
    with pytest.raises(TypeError, match="payload must be bytes, got 'x'"):
        check_fields(attrs.evolve(request, payload=_any("x")), REQUEST_FIELDS)
    # A mapping of one field takes the same path.
    check_fields(request, {"stream": bool})
    with pytest.raises(TypeError, match="stream must be bool"):
        check_fields(attrs.evolve(request, stream=_any(1)), {"stream": bool})


def test_field_mappings_made_per_call_are_not_all_kept():
    request = persisted_request(1)
    for _ in range(200):
        check_fields(request, {"stream": bool, "request_id": int})
    assert len(_validation._ADMITTED) <= _validation._MAX_ADMITTED
    check_fields(request, REQUEST_FIELDS)  # and the constants still check
