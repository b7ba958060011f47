"""`ShardingConfig`: every policy knob of a runner, validated eagerly (sans-IO).

Theory of operation: the config is a frozen attrs class. Each field carries its
own validator, which raises `ConfigError` with a message that says what to do;
cross-field rules run in ``__attrs_post_init__``. `ShardingConfig.from_env`
reads ``TRIO_CLUSTER_<FIELD>`` variables from a mapping the caller passes in
(normally ``os.environ``), so this module never touches the process itself.

Durations are float seconds, like everywhere in Trio. Async APIs take no
timeout arguments: durations that are policy live here.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, TypeVar

import attrs

from .._errors import ConfigError
from ._addresses import RunnerAddress
from ._checks import (
    non_negative_seconds,
    positive_count,
    positive_number,
    positive_seconds,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = ["ENV_PREFIX", "ShardingConfig"]

T = TypeVar("T")

ENV_PREFIX = "TRIO_CLUSTER_"
_GROUP_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_MAX_SHARDS_PER_GROUP = 65_536


def _positive(_: object, attribute: attrs.Attribute[T], value: T) -> None:
    positive_seconds(attribute.name, value)


def _non_negative(_: object, attribute: attrs.Attribute[T], value: T) -> None:
    non_negative_seconds(attribute.name, value)


def _positive_int(_: object, attribute: attrs.Attribute[T], value: T) -> None:
    positive_count(attribute.name, value)


def _check_bool(_: object, attribute: attrs.Attribute[T], value: T) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{attribute.name} must be True or False, got {value!r}")


def _optional_positive_int(
    instance: object, attribute: attrs.Attribute[T], value: T
) -> None:
    if value is not None:
        _positive_int(instance, attribute, value)


def _check_groups(_: object, attribute: attrs.Attribute[T], value: T) -> None:
    if not isinstance(value, tuple):
        raise ConfigError(f"{attribute.name} must be a tuple of group names")
    for group in value:
        if not isinstance(group, str) or not _GROUP_NAME.match(group):
            raise ConfigError(
                f"{attribute.name}: shard group names are 1-64 characters of"
                f" letters, digits, '_', '.' or '-'; got {group!r}"
            )
    if len(set(value)) != len(value):
        raise ConfigError(f"{attribute.name} lists a group twice: {value!r}")


def _check_shards(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    _positive_int(_, attribute, value)
    if value > _MAX_SHARDS_PER_GROUP:
        raise ConfigError(
            f"shards_per_group is {value}; use at most {_MAX_SHARDS_PER_GROUP}"
            " (a few hundred is plenty: shards are units of movement, not of load)"
        )


def _check_address(_: object, attribute: attrs.Attribute[T], value: T) -> None:
    if not isinstance(value, RunnerAddress):
        raise ConfigError(
            f"{attribute.name} must be a RunnerAddress, e.g."
            f" RunnerAddress.parse('10.0.0.5:34431'); got {value!r}"
        )
    if value.host.strip("[]") in _UNSPECIFIED:
        raise ConfigError(
            f"{attribute.name} {value} is not an address other runners can"
            " dial: give this runner's own address (to listen on every"
            " interface, pass that to the transport, e.g. `trio-cluster run"
            " --listen 0.0.0.0:PORT --advertise HOST`)"
        )


_UNSPECIFIED = frozenset({"", "0.0.0.0", "::", "0:0:0:0:0:0:0:0"})
"""Hosts that name no machine in particular (listen-anywhere addresses)."""


def _check_weight(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    positive_number(attribute.name, value)
    if value > 1000:
        raise ConfigError(f"runner_weight is {value}; use a weight in (0, 1000]")


def _as_groups(value: object) -> object:
    if isinstance(value, list):
        return tuple(value)
    return value


@attrs.frozen(kw_only=True)
class ShardingConfig:
    """Configuration of one runner. Every runner of a cluster must agree on
    ``shards_per_group`` and on the set of shard groups that exist.

    Raises:
        ConfigError: eagerly, on construction, naming the field and the fix.
    """

    shards_per_group: int = attrs.field(default=300, validator=_check_shards)
    """Number of shards in each shard group. Changing it moves every entity:
    it must be the same on every runner of a cluster, for the cluster's life."""

    shard_groups: tuple[str, ...] = attrs.field(
        default=("default",), converter=_as_groups, validator=_check_groups
    )
    """Shard groups this runner hosts. Entities of a group only run on runners
    that list it. An empty tuple makes a client-only runner: it hosts no
    entities and sends every call to the runners that do."""

    runner_address: RunnerAddress = attrs.field(
        default=RunnerAddress("127.0.0.1", 34431), validator=_check_address
    )
    """Address at which other runners reach this one."""

    runner_weight: float = attrs.field(default=1.0, validator=_check_weight)
    """Relative share of shards this runner takes (weighted assignment)."""

    lease_duration: float = attrs.field(default=5.0, validator=_positive)
    """How long a shard lease stays valid after a successful refresh. A runner
    that cannot refresh (frozen, partitioned, lost database) stops serving its
    shards when the lease lapses; the database ends its lock session after the
    same time, so a successor can take over."""

    lease_refresh_interval: float = attrs.field(default=1.0, validator=_positive)
    """How often leases are refreshed (heartbeat); each refresh also lists the
    live runners, so a runner that joined, left or died is noticed within this
    interval (sooner by the peers whose connections to it dropped). Must be at
    most a third of ``lease_duration``, so that two refreshes may fail before
    the lease lapses."""

    membership_poll_interval: float = attrs.field(default=0.25, validator=_positive)
    """How often the live runners are read again, and shards still held by
    another runner retried, while this runner wants such shards. Otherwise
    nothing is polled: each lease refresh lists the live runners (see
    ``lease_refresh_interval``), and a change is read at once. A dropped
    connection to a peer triggers a read at once, then more after 10, 20,
    40... ms (up to this interval) while the peer is still live in storage or
    wanted shards are still locked, then reads at this interval while that
    peer is still live, until its lease would have ended (frozen or cut off:
    its shards are taken as soon as its session ends)."""

    entity_max_idle: float = attrs.field(default=60.0, validator=_positive)
    """Default ``max_idle`` for entity classes that do not set their own."""

    entity_mailbox_capacity: int = attrs.field(default=4096, validator=_positive_int)
    """Default ``mailbox_capacity`` for entity classes that do not set their own."""

    entity_termination_timeout: float = attrs.field(default=15.0, validator=_positive)
    """How long a graceful stop (shard release, runner shutdown, passivation)
    waits for running handlers and ``on_stop`` hooks before cancelling them."""

    entity_restart_backoff: float = attrs.field(default=0.1, validator=_positive)
    """First delay before an entity that crashed is started again; it doubles
    on each consecutive crash."""

    entity_restart_backoff_max: float = attrs.field(default=10.0, validator=_positive)
    """Longest delay between restarts of an entity that keeps crashing."""

    max_resident_entities: int | None = attrs.field(
        default=500_000, validator=_optional_positive_int
    )
    """Cap on entities in memory on this runner. Beyond it the least recently
    used idle entities are passivated; if none is idle, new volatile messages
    get `MailboxFullError` and persisted ones wait in storage. ``None``: no cap."""

    persisted_batch_size: int = attrs.field(default=1024, validator=_positive_int)
    """Most persisted messages claimed from storage in one batch."""

    max_persisted_in_flight: int = attrs.field(default=10_000, validator=_positive_int)
    """Most claimed persisted messages held in memory at once (backpressure
    for the storage read loop)."""

    storage_poll_interval: float = attrs.field(default=5.0, validator=_positive)
    """Safety-net poll of storage for persisted messages, for backends that
    cannot promise to announce every lost notification (both built-in
    backends do, `MessageStorage.notifications_lossless`: they are not
    polled). Delivery is pushed (direct notice, LISTEN/NOTIFY, ``deliver_at``
    timers). Also how often replies awaited from another runner are fetched,
    while there are any."""

    unknown_type_grace: float = attrs.field(default=300.0, validator=_non_negative)
    """Rolling deploys: how long a persisted request for an entity type this
    runner does not host is kept, unanswered, instead of being answered with
    `UnknownEntityTypeError` at once, counted from when it was sent (or from
    its ``deliver_at``, if later). It stays stored and claimed here, so the
    shard's next owner (a runner of the new version) delivers it; other
    requests of the shard are not held up. ``0`` answers at once."""

    send_retry_interval: float = attrs.field(default=0.05, validator=_positive)
    """Delay between attempts to route a message while its shard moves."""

    send_retry_timeout: float = attrs.field(default=30.0, validator=_positive)
    """Longest a call waits for its shard to get an owner before raising
    `EntityNotAssignedError`, even when the caller set no deadline."""

    serialize_local_calls: bool = attrs.field(default=True, validator=_check_bool)
    """Encode and decode messages and replies even when caller and entity share
    a runner, so a message that could not cross the wire fails in tests too.
    Turn off for speed once your messages are known to encode."""

    freeze_gc_at_start: bool = attrs.field(default=False, validator=_check_bool)
    """Whether the first runner of a process to start collects garbage and
    freezes the objects that exist then (``gc.freeze``: the modules, classes
    and functions made at import), so that full garbage collections, which
    stop the event loop, no longer scan them: their pauses, which make timers
    fire late, shrink in proportion. An object alive then, dropped later in a
    reference cycle, is never freed. Off by default, as it changes the whole
    process's collector; ``trio-cluster run`` (a process that is only a
    runner) turns it on unless ``TRIO_CLUSTER_FREEZE_GC_AT_START`` says."""

    retention_age: float = attrs.field(default=7 * 86_400.0, validator=_positive)
    """Finished persisted requests (and their replies) are deleted this many
    seconds after their final reply. Until then a duplicate (same primary
    key) gets the recorded reply; after, it runs again."""

    retention_interval: float = attrs.field(default=60.0, validator=_positive)
    """How often the janitor (a singleton) deletes expired requests."""

    retention_batch_size: int = attrs.field(default=1000, validator=_positive_int)
    """Most requests the janitor deletes per statement (it repeats while a
    batch comes back full)."""

    max_message_size: int = attrs.field(
        default=4 * 1024 * 1024, validator=_positive_int
    )
    """Largest encoded message or reply, in bytes; bigger ones are refused with
    `MessageTooLargeError` before they are stored or sent."""

    def __attrs_post_init__(self) -> None:
        # Tolerate float rounding: 0.1 * 3 > 0.3 in binary floating point.
        if self.lease_refresh_interval * 3 > self.lease_duration * (1 + 1e-9):
            raise ConfigError(
                f"lease_refresh_interval ({self.lease_refresh_interval} s) must be at"
                f" most a third of lease_duration ({self.lease_duration} s), so a"
                " lease survives two failed refreshes; lower the interval or"
                " lengthen the lease"
            )
        if self.entity_restart_backoff > self.entity_restart_backoff_max:
            raise ConfigError(
                "entity_restart_backoff must not exceed entity_restart_backoff_max"
            )

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str],
        *,
        ignore: frozenset[str] = frozenset(),
        **overrides: object,
    ) -> ShardingConfig:
        """Build a config from ``TRIO_CLUSTER_<FIELD>`` variables.

        ``TRIO_CLUSTER_SHARDS_PER_GROUP=600`` sets ``shards_per_group``;
        ``TRIO_CLUSTER_SHARD_GROUPS=default,batch`` sets a tuple;
        ``TRIO_CLUSTER_RUNNER_ADDRESS=10.0.0.5:34431`` an address;
        ``TRIO_CLUSTER_MAX_RESIDENT_ENTITIES=none`` clears an optional field.
        Keyword ``overrides`` win over the environment.

        Args:
            environ: usually ``os.environ``.
            ignore: other ``TRIO_CLUSTER_*`` names in use by the application,
                which are not config fields, with or without the prefix
                (``TRIO_CLUSTER_DSN``, ``TRIO_CLUSTER_TEST_DSN`` and
                ``TRIO_CLUSTER_LOG_LEVEL`` are always ignored).
            overrides: field values that take precedence.

        Raises:
            ConfigError: an unknown ``TRIO_CLUSTER_*`` variable (a typo), or a
                value that does not parse or validate.
        """
        fields = {field.name: field for field in attrs.fields(cls)}
        ignored = {name.removeprefix(ENV_PREFIX) for name in ignore}
        ignored |= {"DSN", "TEST_DSN", "LOG_LEVEL"}
        values: dict[str, object] = {}
        for key, raw in environ.items():
            if not key.startswith(ENV_PREFIX):
                continue
            name = key[len(ENV_PREFIX) :]
            if name in ignored:
                continue
            field_name = name.lower()
            if field_name not in fields:
                known = ", ".join(ENV_PREFIX + f.upper() for f in sorted(fields))
                raise ConfigError(f"unknown variable {key}; known ones are {known}")
            values[field_name] = _parse_env(key, fields[field_name], raw)
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


def _parse_groups(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


_PARSERS: dict[str, Callable[[str], object]] = {
    "int": int,
    "float": float,
    "bool": _parse_bool,
    "tuple[str, ...]": _parse_groups,
    "RunnerAddress": RunnerAddress.parse,
}


def _parse_env(key: str, field: attrs.Attribute[object], raw: str) -> object:
    type_text = str(field.type)
    optional = type_text.endswith(" | None")
    if optional:
        type_text = type_text.removesuffix(" | None")
        if raw.strip().lower() in {"", "none"}:
            return None
    parser = _PARSERS[type_text]
    try:
        return parser(raw.strip())
    except ValueError as exc:
        raise ConfigError(
            f"{key}={raw!r} does not parse as {type_text}: {exc}"
        ) from None
