"""Domain identifiers: entity ids, shards, entity and runner addresses (sans-IO).

Theory of operation: identifiers are frozen attrs classes so they hash, compare
and encode the same everywhere; each has a ``str()`` form used in logs, error
messages and storage keys, and a ``parse`` classmethod that inverts it.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

import attrs

from .._errors import InvalidIdError

T = TypeVar("T")

__all__ = [
    "MAX_ENTITY_ID_LENGTH",
    "Addressed",
    "EntityAddress",
    "EntityId",
    "RunnerAddress",
    "ShardId",
    "check_entity_id",
    "check_storable",
]

MAX_ENTITY_ID_LENGTH = 255
"""Longest entity id accepted, in characters (it is part of storage keys)."""


def check_storable(what: str, value: str) -> None:
    """Refuse text that storage cannot hold, with `InvalidIdError`: a NUL
    character (PostgreSQL text refuses it) or a lone surrogate (not encodable
    as UTF-8). Checked before a request is sent, so one bad id or key never
    fails a batch of other requests."""
    if "\x00" in value:
        raise InvalidIdError(f"{what} must not contain a NUL character: {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidIdError(
            f"{what} must be valid Unicode text (it has a lone surrogate): {value!r}"
        ) from None


def check_entity_id(value: object) -> None:
    """Refuse what is not a valid entity id: a non-empty str without
    surrounding whitespace, of at most `MAX_ENTITY_ID_LENGTH` characters,
    that storage can hold (`check_storable`). The rules of `EntityId`, also
    applied to ids read back from storage.

    Raises:
        TypeError: ``value`` is not a str.
        InvalidIdError: it is not a valid id.
    """
    if not isinstance(value, str):
        raise TypeError(f"entity id must be a str, got {type(value).__name__}")
    if not value or value.strip() != value:
        raise InvalidIdError(
            f"entity id must be non-empty without surrounding whitespace: {value!r}"
        )
    if len(value) > MAX_ENTITY_ID_LENGTH:
        raise InvalidIdError(
            f"entity id is {len(value)} characters, over {MAX_ENTITY_ID_LENGTH}"
        )
    check_storable("entity id", value)


def _check_entity_id(_: object, __: object, value: str) -> None:
    check_entity_id(value)


@attrs.frozen(order=True)
class EntityId:
    """The id of one entity within its type: a non-empty, trimmed string of at
    most 255 characters."""

    value: str = attrs.field(validator=_check_entity_id)

    def __str__(self) -> str:
        return self.value


@attrs.frozen(order=True, cache_hash=True)
class ShardId:
    """A shard: its shard group and its 1-based number within the group."""

    group: str
    number: int

    def __str__(self) -> str:
        return f"{self.group}:{self.number}"

    @classmethod
    def parse(cls, text: str) -> ShardId:
        """Invert ``str()``: ``"default:17"`` -> ``ShardId("default", 17)``.

        Raises:
            ValueError: ``text`` is not of the form ``group:number`` (ASCII digits).
        """
        group, sep, number = text.rpartition(":")
        if not sep or not group or not (number.isascii() and number.isdigit()):
            raise ValueError(f"not a shard id: {text!r} (expected 'group:number')")
        return cls(group, int(number))


@attrs.frozen(order=True, cache_hash=True)
class EntityAddress:
    """Where an entity lives: its type name, its id and its shard.

    Its hash is computed once: every call looks its entity up by address.
    """

    entity_type: str
    entity_id: EntityId
    shard: ShardId

    def __str__(self) -> str:
        return f"{self.entity_type}/{self.entity_id}@{self.shard}"


def _check_port(_: object, __: object, value: T) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"port must be an integer in 0..65535, got {value!r}")


@attrs.frozen(order=True, cache_hash=True)
class RunnerAddress:
    """The address a runner is reachable at by other runners."""

    host: str
    port: int = attrs.field(validator=_check_port)

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> RunnerAddress:
        """Invert ``str()``: ``"10.0.0.5:34431"`` or ``"[::1]:34431"``.

        Raises:
            ValueError: ``text`` is not ``host:port`` with a port in 0..65535.
        """
        host, sep, port = text.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if (
            not sep
            or not host
            or "[" in host
            or "]" in host
            or not (port.isascii() and port.isdigit())
            or int(port) > 65535
        ):
            raise ValueError(f"not a runner address: {text!r} (expected 'host:port')")
        return cls(host, int(port))


class Addressed(Protocol):
    """Anything with an entity address: an entity instance, seen by modules
    that must not import the entity class (it imports them)."""

    @property
    def address(self) -> EntityAddress: ...
