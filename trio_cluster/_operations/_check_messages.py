"""`check_messages`: would the current code deliver every stored message? (operations)

What ``trio-cluster check-messages`` runs before a deploy. It pages through
the unprocessed persisted requests of a storage backend
(`MessageStorage.scan_unprocessed`: read-only, one page in memory at a
time, nothing claimed) and checks each one as the claim loop
(`trio_cluster._engine._claims`) would when it delivers it with the given
entity classes: the stored address must be one the API accepts, in the
entity's own shard; the entity type must be hosted and the handler must
exist, be an ``@rpc`` handler and be persisted; and the payload must decode
with the handler's message codec (the converter given, as at delivery).
A request its sender asked to interrupt is answered without decoding, so
only its type and handler are checked.

Every problem is counted by kind, with a few examples (request id, address,
handler, the error, cut short), so the report stays small however many
requests fail. Requests with a future ``deliver_at`` are checked too: they
will be delivered by the new code.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Final

import attrs

from .._core._addresses import EntityAddress, EntityId
from .._core._checks import count, positive_count
from .._core._config import ShardingConfig
from .._core._hashing import misplaced
from .._cron import cron_entity
from .._errors import ClusterError, MalformedMessageError, UnknownEntityTypeError
from .._registry import Registry
from ..serialization._converter import make_converter

if TYPE_CHECKING:
    from collections.abc import Sequence

    import cattrs

    from .._cron import Cron
    from .._entity import Entity
    from .._registry import EntityType
    from .._storage_abc import Storage, StoredRequest

__all__ = [
    "MessageCheck",
    "MessageExample",
    "MessageProblem",
    "ProblemKind",
    "check_messages",
]

_ERROR_TEXT: Final = 200
"""Longest error text kept in an example (characters)."""


class ProblemKind(enum.Enum):
    """Why a stored request would not be delivered by the checked code."""

    UNKNOWN_ENTITY_TYPE = "unknown_entity_type"
    """No hosted entity class has its type name (renamed or removed)."""
    UNKNOWN_HANDLER = "unknown_handler"
    """Its entity class has no handler of that wire name (renamed or removed)."""
    NOT_PERSISTED = "not_persisted"
    """The handler exists but never runs from storage: it is volatile, or a
    ``@stream`` handler, or the request was stored as a stream."""
    UNDECODABLE_PAYLOAD = "undecodable_payload"
    """The payload does not decode as the handler's message type."""
    INVALID_ADDRESS = "invalid_address"
    """The stored entity id is not one the API accepts, or names a shard the
    entity does not belong to (a row written by hand or another program)."""

    @property
    def label(self) -> str:
        return self.value.replace("_", " ")


@attrs.frozen
class MessageExample:
    """One request of a `MessageProblem`."""

    request_id: int
    address: str
    """``type/id@group:number`` as stored."""
    tag: str
    """The handler's wire name as stored."""
    error: str
    """What is wrong, cut to 200 characters."""


@attrs.frozen
class MessageProblem:
    """All the stored requests that fail one way."""

    kind: ProblemKind
    count: int
    """How many requests fail this way."""
    examples: tuple[MessageExample, ...]
    """The first few of them, by request id."""


@attrs.frozen
class MessageCheck:
    """The result of `check_messages`."""

    checked: int
    """Unprocessed requests read."""
    problems: tuple[MessageProblem, ...]
    """One entry per kind of problem found, in `ProblemKind` order."""

    @property
    def ok(self) -> bool:
        """Whether every request would be delivered."""
        return not self.problems

    @property
    def failing(self) -> int:
        """Requests with a problem."""
        return sum(problem.count for problem in self.problems)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (what ``check-messages --json`` prints)."""
        return {
            "checked": self.checked,
            "failing": self.failing,
            "problems": [
                {
                    "kind": problem.kind.value,
                    "count": problem.count,
                    "examples": [attrs.asdict(e) for e in problem.examples],
                }
                for problem in self.problems
            ],
        }

    def render(self) -> str:
        """A short human-readable report."""
        if self.ok:
            return f"{self.checked} unprocessed messages checked: all decode"
        lines = [
            f"{self.checked} unprocessed messages checked:"
            f" {self.failing} would fail with the current code"
        ]
        for problem in self.problems:
            lines.append(f"  {problem.kind.label}: {problem.count}")
            lines.extend(
                f"    request {e.request_id} {e.address} {e.tag!r}: {e.error}"
                for e in problem.examples
            )
        return "\n".join(lines)


@attrs.define
class _Tally:
    examples: int
    counts: dict[ProblemKind, int] = attrs.field(factory=dict)
    found: dict[ProblemKind, list[MessageExample]] = attrs.field(factory=dict)

    def add(self, kind: ProblemKind, request: StoredRequest, error: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        found = self.found.setdefault(kind, [])
        if len(found) < self.examples:
            if len(error) > _ERROR_TEXT:
                error = error[: _ERROR_TEXT - 3] + "..."
            address = f"{request.entity_type}/{request.entity_id}@{request.shard}"
            found.append(
                MessageExample(request.request_id, address, request.tag, error)
            )

    def result(self, checked: int) -> MessageCheck:
        problems = tuple(
            MessageProblem(kind, self.counts[kind], tuple(self.found[kind]))
            for kind in ProblemKind
            if kind in self.counts
        )
        return MessageCheck(checked=checked, problems=problems)


async def check_messages(
    storage: Storage,
    *,
    entities: Sequence[type[Entity]],
    crons: Sequence[Cron] = (),
    converter: cattrs.Converter | None = None,
    config: ShardingConfig | None = None,
    batch_size: int = 500,
    examples: int = 3,
) -> MessageCheck:
    """Check that the given code would deliver every unprocessed persisted
    request stored in ``storage`` (see the module docstring).

    Opens a storage session of its own and only reads: nothing is claimed,
    answered or changed, and at most ``batch_size`` requests are in memory
    at a time. For PostgreSQL pass ``PostgresStorage(dsn,
    auto_migrate=False)``, so that an outdated schema is reported rather than
    migrated.

    Args:
        storage: the cluster's storage backend.
        entities: the entity classes the new code hosts (as given to
            `open_runner`).
        crons: its crons (their entity type is hosted too).
        converter: its converter, if it has its own hooks.
        config: its config (``shards_per_group`` and the entity defaults);
            `ShardingConfig()` by default.
        batch_size: requests read per page.
        examples: examples kept per kind of problem.

    Returns:
        The counts and examples of each kind of problem found.

    Raises:
        EntityDefinitionError: an entity class is invalid.
        ConfigError: ``batch_size`` or ``examples`` is not a positive int
            (``examples`` may be 0).
        PersistenceError: storage failed (or, on PostgreSQL, its schema is
            missing or not the current one).

    On cancellation the session is closed and nothing is returned.
    """
    config = config if config is not None else ShardingConfig()
    batch_size = positive_count("batch_size", batch_size)
    examples = count("examples", examples)
    classes = [*entities, *([cron_entity(crons)] if crons else [])]
    registry = Registry(classes, config=config, converter=converter or make_converter())
    tally = _Tally(examples)
    checked = 0
    async with storage.open_session(
        name="check-messages", lease_duration=config.lease_duration
    ) as session:
        after: int | None = None
        while True:
            page = await session.messages.scan_unprocessed(
                after_id=after, limit=batch_size
            )
            for request in page:
                checked += 1
                found = _problem(request, registry, config.shards_per_group)
                if found is not None:
                    tally.add(*found)
            if len(page) < batch_size:
                break
            after = page[-1].request_id
    return tally.result(checked)


def _problem(
    request: StoredRequest, registry: Registry, shards_per_group: int
) -> tuple[ProblemKind, StoredRequest, str] | None:
    """What would stop the claim loop from delivering ``request``, if anything."""
    entity_type = registry.get(request.entity_type)
    if entity_type is None:
        error = UnknownEntityTypeError(entity_type=request.entity_type)
        return ProblemKind.UNKNOWN_ENTITY_TYPE, request, str(error)
    handler = entity_type.handlers.get(request.tag)
    if handler is None:
        error = UnknownEntityTypeError(
            entity_type=request.entity_type, handler=request.tag
        )
        return ProblemKind.UNKNOWN_HANDLER, request, str(error)
    if request.stream:
        why = "it was stored as a stream request, which never runs from storage"
    elif handler.spec.kind == "stream":
        why = f"{handler.what} is a @stream handler: it never runs from storage"
    elif not handler.spec.persisted:
        why = f"{handler.what} is volatile: it never runs from storage"
    else:
        why = None
    if why is not None:
        return ProblemKind.NOT_PERSISTED, request, why
    address_problem = _address_problem(request, entity_type, shards_per_group)
    if address_problem is not None:
        return ProblemKind.INVALID_ADDRESS, request, address_problem
    if request.interrupted:
        return None  # answered as interrupted, never decoded
    try:
        handler.message.decode(request.payload)
    except MalformedMessageError as exc:
        return ProblemKind.UNDECODABLE_PAYLOAD, request, str(exc)
    return None


def _address_problem(
    request: StoredRequest, entity_type: EntityType, shards_per_group: int
) -> str | None:
    try:
        address = EntityAddress(
            request.entity_type, EntityId(request.entity_id), request.shard
        )
    except (ClusterError, TypeError, ValueError) as exc:  # InvalidIdError included
        return str(exc)
    return misplaced(address, entity_type.shard_group, shards_per_group)
