"""Presence: which sockets are in a topic, with join/leave diffs (I/O-free
tables, used by the `Topic` entity and each gateway's hub).

Theory of operation.

* **The owner.** A topic's `Topic` entity keeps its presence in a
  `PresenceTable`: one entry per socket (its connection id), with the
  runner that holds the socket and the entry's data (what
  ``Gateway.presence`` made of the client). A socket is *tracked* when it
  subscribes to a topic the gateway gives presence, and *untracked* when it
  unsubscribes or closes.
* **Runners own their entries.** A gateway follows each topic it has
  subscribers for with one entity stream (`Topic.follow`); the stream
  carries the runner's address and its full set of present sockets, which
  replaces that runner's entries. When the runner's last stream ends (it
  unsubscribed everything, its connection was lost, it died: the caller's
  streams of a lost peer are cancelled), the runner's entries go, and
  the others get the leave diff. A runner that only lost its connection
  follows again with its set, and its entries come back. So the entries of
  a runner that dies disappear within the failover time, and a topic
  entity that starts again (a new epoch) is filled again by the runners'
  streams.
* **Diffs.** Every change is a `PresenceDiff` (joins and leaves, by
  connection id) sent on the followers' streams, in order; a follower first
  gets the full table (``snapshot``). Each gateway keeps a
  `PresenceMirror` of the table: the ``presence`` list a socket asks for,
  and the ``presence`` part of its subscribe answer, come from the mirror,
  and the diffs after it go to the socket: a client that applies the
  list, then each diff (set the joins, delete the leaves), has the table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from ._protocol import encode_frame

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "ListPresence",
    "PresenceDiff",
    "PresenceMirror",
    "PresenceTable",
    "Track",
    "Untrack",
    "presence_frame",
]


@attrs.frozen
class PresenceDiff:
    """Changes of a topic's presence: entries that joined (or changed), by
    connection id, and those that left."""

    joins: dict[str, Any] = attrs.field(factory=dict)
    leaves: dict[str, Any] = attrs.field(factory=dict)

    def __bool__(self) -> bool:
        return bool(self.joins or self.leaves)


@attrs.frozen
class Track:
    """A socket of ``runner`` joins the topic's presence with ``data``."""

    runner: str
    connection: str
    data: Any


@attrs.frozen
class Untrack:
    """A socket leaves the topic's presence."""

    connection: str


@attrs.frozen
class ListPresence:
    """Ask for a topic's presence (``{connection id: data}``)."""


@attrs.define
class _Entry:
    runner: str
    data: Any


class PresenceTable:
    """A topic's presence, kept by its entity (see the module docstring)."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._streams: dict[str, int] = {}
        """Follow streams open per runner."""

    def snapshot(self) -> dict[str, Any]:
        """``{connection id: data}`` of every entry."""
        return {key: entry.data for key, entry in self._entries.items()}

    def track(self, runner: str, connection: str, data: Any) -> PresenceDiff:
        entry = self._entries.get(connection)
        if entry is not None and entry.runner == runner and entry.data == data:
            return PresenceDiff()
        self._entries[connection] = _Entry(runner, data)
        return PresenceDiff(joins={connection: data})

    def untrack(self, connection: str) -> PresenceDiff:
        entry = self._entries.pop(connection, None)
        if entry is None:
            return PresenceDiff()
        return PresenceDiff(leaves={connection: entry.data})

    def stream_opened(self, runner: str, present: Mapping[str, Any]) -> PresenceDiff:
        """A follow stream of ``runner`` opened with its present sockets:
        they replace the runner's entries."""
        self._streams[runner] = self._streams.get(runner, 0) + 1
        leaves = {
            key: entry.data
            for key, entry in self._entries.items()
            if entry.runner == runner and key not in present
        }
        for key in leaves:
            del self._entries[key]
        joins: dict[str, Any] = {}
        for key, data in present.items():
            joins.update(self.track(runner, key, data).joins)
        return PresenceDiff(joins=joins, leaves=leaves)

    def stream_closed(self, runner: str) -> PresenceDiff:
        """A follow stream of ``runner`` ended; with its last one, the
        runner's entries go."""
        left = self._streams.get(runner, 0) - 1
        if left > 0:
            self._streams[runner] = left
            return PresenceDiff()
        self._streams.pop(runner, None)
        leaves = {
            key: entry.data
            for key, entry in self._entries.items()
            if entry.runner == runner
        }
        for key in leaves:
            del self._entries[key]
        return PresenceDiff(leaves=leaves)


class PresenceMirror:
    """A gateway's copy of a topic's presence (see the module docstring)."""

    def __init__(self) -> None:
        self.entries: dict[str, Any] = {}
        self.synced = False
        """Whether a snapshot arrived (the mirror is the table then)."""

    def apply(self, diff: PresenceDiff) -> None:
        for key in diff.leaves:
            self.entries.pop(key, None)
        self.entries.update(diff.joins)

    def reset(self, snapshot: Mapping[str, Any]) -> PresenceDiff:
        """Replace the mirror by a snapshot (a new stream); the diff from
        what it was."""
        old = self.entries
        leaves = {key: data for key, data in old.items() if key not in snapshot}
        joins = {
            key: data
            for key, data in snapshot.items()
            if key not in old or old[key] != data
        }
        self.entries = dict(snapshot)
        self.synced = True
        return PresenceDiff(joins=joins, leaves=leaves)


def presence_frame(topic: str, diff: PresenceDiff, subprotocol: str) -> bytes | str:
    """The ``presence`` frame of a diff, encoded.

    Raises:
        ValueError: data the subprotocol cannot carry.
    """
    return encode_frame(
        {"t": "presence", "topic": topic, "joins": diff.joins, "leaves": diff.leaves},
        subprotocol,
    )
