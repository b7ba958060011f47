"""Deterministic weighted assignment of shards to runners (sans-IO).

Theory of operation: every runner computes the whole assignment from the set
of live runners alone, so they all agree without talking to each other. Each
shard group is assigned on its own, among the members that host it, by
weighted rendezvous (highest random weight) hashing with bounded loads:

1. *Costs.* Member ``m`` draws for shard ``n`` of group ``g`` the 64-bit
   word ``(n - 1) % 8`` of ``stable_hash_block(f"{m.address}/{g}#{(n - 1) // 8}")``
   (eight shards per hash call; see `_hashing`). With ``h`` that word and
   ``u = ((h >> 12) + 0.5) / 2**52`` (uniform in (0, 1), never 0 or 1), the
   *cost* of the pair is ``-ln(u) / m.weight``: exponentially distributed with
   rate ``weight``, so the member with the lowest cost for a shard is member
   ``i`` with probability ``w_i / W``. When all members of the group have
   the same weight, the cost is ``-(h >> 12)`` instead: the same order, in
   integers only.
2. *Caps.* Member ``i`` may hold at most
   ``cap_i = ceil(n_shards * w_i * (1 + SLACK) / W) + 1`` shards of the group,
   ``W`` being the exact (``math.fsum``) total weight of the group's members.
   The caps add up to more than ``n_shards``.
3. *Greedy matching.* All (shard, member) pairs are taken in increasing cost
   (ties broken by member address, then shard number); a pair is used when
   its shard has no owner yet and its member is below its cap. This is the
   unique stable matching of shards and capacity-bounded members under the
   common cost order: no shard has a lower cost for another member that has
   room or holds a shard at a higher cost.

Properties (each checked by Hypothesis in ``tests/core/test_ring.py``):

* Every shard of every hosted group has exactly one owner, which hosts the
  group. The input order of members does not matter.
* Balance: a member holds at most ``ceil(fair * (1 + SLACK)) + 1`` shards of
  a group, ``fair = n_shards * w / W`` being its fair share. ``SLACK = 0.05``.
  There is no lower bound: with few shards per member, a member may get
  noticeably less than its share (3 members, 12 shards: 6, 5 and 1).
* Movement: when a member joins (or leaves) a group, the shards of that group
  that change owner number on average ``1.11 * fair`` (its fair share in the
  larger membership); plain rendezvous hashing would move exactly the
  member's own shards, about ``fair``. The rest are cascades: the caps of the
  other members shrink together when the total weight grows, and a member
  at its cap passes shards on. Measured (not proven) bound: over 20,000
  random joins (1-13 members, weights 0.25-4, 1-400 shards) the worst was
  ``2 * fair + 5.1``, and an adversarial Hypothesis search (``target()``,
  12,000 examples) found ``2 * fair + 6.4`` (11 members, 64 shards, 9 moves
  for a fair share of 1.3). The tests assert
  ``MOVE_FACTOR * fair + MOVE_CONSTANT`` = ``2 * fair + 8``. (Caps of
  ``ceil(fair * 1.1)``, without the ``+ 1``, balance small shares more
  tightly but cascade more: with equal weights the same search reached
  ``2 * fair + 7.6`` with them, against ``2 * fair + 3.6`` with these.)
* Cost: ``members * ceil(n_shards / 8)`` hash calls per group, one
  logarithm per pair (unequal weights only), and a heap of one entry per
  shard instead of a sort of all pairs: 300 shards over 50 members take
  about 5 ms (8 ms with unequal weights).

Determinism across machines: with equal weights the order is computed from
integers only. With unequal weights it also depends on ``math.log``, which C
libraries compute to within one ulp but do not all round the same way; two
runners on different platforms could then disagree only about a pair whose
costs tie to within an ulp (probability about ``2**-50`` per comparison).
Such a disagreement leaves a shard unowned (never owned twice: ownership is
a lock) until the membership changes.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
from typing import TYPE_CHECKING

import attrs

from ._addresses import RunnerAddress, ShardId
from ._hashing import stable_hash_block

if TYPE_CHECKING:
    from collections.abc import Collection, Mapping

__all__ = [
    "MOVE_CONSTANT",
    "MOVE_FACTOR",
    "SLACK",
    "Member",
    "assign_shards",
    "diff",
    "shards_of",
]

SLACK = 0.05
"""A member holds at most ``ceil(fair * (1 + SLACK)) + 1`` shards of a group."""

MOVE_FACTOR = 2.0
"""See `MOVE_CONSTANT`."""

MOVE_CONSTANT = 8
"""A join or leave moves at most ``MOVE_FACTOR * fair + MOVE_CONSTANT`` shards
of a group (measured, see the module docstring)."""

_UNIT = 2.0**-52


def _check_weight(_: object, __: object, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"member weight must be a number, got {value!r}")
    if not 0 < value < math.inf:
        raise ValueError(f"member weight must be positive and finite, got {value!r}")


def _check_groups(_: object, __: object, value: object) -> None:
    if not isinstance(value, tuple) or not all(isinstance(g, str) for g in value):
        raise TypeError(f"member groups must be a tuple of str, got {value!r}")


@attrs.frozen
class Member:
    """A live runner as the assignment sees it."""

    address: RunnerAddress
    """Where the runner is reachable; unique among members."""

    groups: tuple[str, ...] = attrs.field(validator=_check_groups)
    """Shard groups the runner hosts."""

    weight: float = attrs.field(default=1.0, validator=_check_weight)
    """Relative share of each hosted group's shards (positive, finite)."""


def assign_shards(
    members: Collection[Member], *, shards_per_group: int
) -> dict[ShardId, RunnerAddress]:
    """Assign every shard of every hosted group to one member hosting it.

    Args:
        members: the live runners, in any order.
        shards_per_group: number of shards in each group (the same on every
            runner of the cluster).

    Returns:
        A mapping with one entry per shard of each group that at least one
        member hosts: shards ``1..shards_per_group`` of each such group.

    Raises:
        ValueError: two members share an address, or ``shards_per_group`` is
            less than 1.
    """
    if shards_per_group < 1:
        raise ValueError(f"shards_per_group must be >= 1, got {shards_per_group!r}")
    ordered = sorted(members, key=lambda member: member.address)
    for before, after in itertools.pairwise(ordered):
        if before.address == after.address:
            raise ValueError(f"two members have the address {after.address}")
    return dict(_assignment(tuple(ordered), shards_per_group))


@functools.lru_cache(maxsize=64)
def _assignment(
    ordered: tuple[Member, ...], shards_per_group: int
) -> dict[ShardId, RunnerAddress]:
    """`assign_shards` of members sorted by address, remembered: every runner
    of a process (the simulator, tests, the demo) computes the same mapping
    for the same membership, and at 300 shards it costs milliseconds. Callers
    get a copy."""
    hosts: dict[str, list[Member]] = {}
    for member in ordered:
        for group in dict.fromkeys(member.groups):
            hosts.setdefault(group, []).append(member)
    assignment: dict[ShardId, RunnerAddress] = {}
    for group in sorted(hosts):
        owners = _assign_group(hosts[group], group, shards_per_group)
        for number, owner in enumerate(owners, start=1):
            assignment[ShardId(group, number)] = owner.address
    return assignment


def _assign_group(members: list[Member], group: str, n_shards: int) -> list[Member]:
    """Owners of shards 1..n_shards of ``group``; ``members`` sorted by address."""
    total = math.fsum(member.weight for member in members)
    room = [
        math.ceil(n_shards * member.weight * (1 + SLACK) / total) + 1
        for member in members
    ]
    exact = all(member.weight == members[0].weight for member in members)
    costs = [_costs(member, group, n_shards, exact=exact) for member in members]
    # columns[shard][index]: the cost of member ``index`` for ``shard``.
    columns = list(zip(*costs, strict=True))
    # The greedy matching of the module docstring, without sorting every
    # pair: the heap holds, for each shard without an owner, its cheapest
    # pair not tried yet, as (cost, member index, shard). The member index
    # breaks ties by address, independently of the input order.
    heap: list[tuple[float, int, int]] = []
    for shard, column in enumerate(columns):
        cost = min(column)
        heap.append((cost, column.index(cost), shard))
    heapq.heapify(heap)
    owners: dict[int, Member] = {}
    ranked: dict[int, list[tuple[float, int]]] = {}
    while heap:
        cost, index, shard = heapq.heappop(heap)
        if room[index]:
            owners[shard] = members[index]
            room[index] -= 1
            continue
        # The member is full for good: move on to the shard's next pair.
        # (The caps add up to more than n_shards, so some member with room
        # is always further down the list.)
        remaining = ranked.get(shard)
        if remaining is None:
            # Most expensive first, so that pop() takes the next cheapest;
            # the last one is the pair just tried.
            pairs = zip(columns[shard], range(len(members)), strict=True)
            remaining = sorted(pairs, reverse=True)
            remaining.pop()
            ranked[shard] = remaining
        cost, index = remaining.pop()
        heapq.heappush(heap, (cost, index, shard))
    return [owners[shard] for shard in range(n_shards)]


def _costs(member: Member, group: str, n_shards: int, *, exact: bool) -> list[float]:
    """The member's cost for each shard of ``group``, in shard order."""
    prefix = f"{member.address}/{group}#"
    words: list[int] = []
    for block in range((n_shards + 7) // 8):
        words.extend(stable_hash_block(f"{prefix}{block}"))
    del words[n_shards:]
    if exact:
        # Equal weights: the cost order is the order of the hashes, so use
        # the integers themselves and leave no room for floating point.
        return [-(word >> 12) for word in words]
    log = math.log
    rate = member.weight
    return [-log(((word >> 12) + 0.5) * _UNIT) / rate for word in words]


def shards_of(
    assignment: Mapping[ShardId, RunnerAddress], address: RunnerAddress
) -> frozenset[ShardId]:
    """The shards ``assignment`` gives to the runner at ``address``."""
    return frozenset(shard for shard, owner in assignment.items() if owner == address)


def diff(
    old_owned: frozenset[ShardId], new_owned: frozenset[ShardId]
) -> tuple[frozenset[ShardId], frozenset[ShardId]]:
    """What a runner must do to go from owning ``old_owned`` to ``new_owned``.

    Returns:
        ``(to_acquire, to_release)``.
    """
    return new_owned - old_owned, old_owned - new_owned
