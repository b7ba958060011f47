"""`StepTypes`: a step's return type is resolved once per function, and
nothing is kept for a function that is gone."""

from __future__ import annotations

import gc
import typing

import attrs
import pytest

from trio_cluster.workflows._context import StepTypes


@attrs.frozen
class Receipt:
    total: int


async def charge(amount: int) -> Receipt:
    return Receipt(amount)  # pragma: no cover - never run here


class Till:
    async def refund(self, amount: int) -> Receipt:
        return Receipt(-amount)  # pragma: no cover - never run here


def test_a_return_type_is_resolved_once_per_function(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[object] = []
    resolve = typing.get_type_hints

    def counted(fn: object) -> dict[str, object]:
        calls.append(fn)
        return resolve(fn)

    monkeypatch.setattr(typing, "get_type_hints", counted)
    types = StepTypes()
    assert types.return_type(charge) is Receipt
    assert types.return_type(charge) is Receipt
    assert calls == [charge]
    # A method: keyed by its function (a new bound method each access).
    assert types.return_type(Till().refund) is Receipt
    assert types.return_type(Till().refund) is Receipt
    assert len(calls) == 2


def test_unannotated_and_unresolvable_steps_are_any_and_nothing_is_kept() -> None:
    types = StepTypes()

    async def bare(x):
        return x  # pragma: no cover - never run here

    async def broken(x: int) -> NoSuchType:  # type: ignore[name-defined]  # noqa: F821
        return x  # pragma: no cover - never run here

    assert types.return_type(bare) is typing.Any
    assert types.return_type(broken) is typing.Any
    assert len(types._known) == 2
    del bare, broken
    gc.collect()
    assert len(types._known) == 0
