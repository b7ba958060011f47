"""Stable hashing of entity ids to shards, and of names to lock keys (sans-IO).

Theory of operation: every runner, every client and every future version of
trio_cluster must map an entity id to the same shard, so the hash is fully
specified here and never uses Python's salted ``hash()``. Any language can
reproduce it from this definition:

``stable_hash64(text)``
    Encode ``text`` as UTF-8 (strict: lone surrogates are an error), compute
    BLAKE2b with an 8-byte digest (``digest_size=8``: this is a distinct
    BLAKE2b parameter, not a truncation of the 64-byte digest), no key, salt
    or personalisation, and read the 8 digest bytes as an unsigned
    little-endian integer: a value in ``[0, 2**64)``.

``stable_hash_block(text)``
    The same input with a 64-byte digest (``digest_size=64``), read as eight
    unsigned little-endian 64-bit words. The assignment ring (``_ring``)
    draws eight rendezvous scores from one call, because hashing dominates
    its cost.

``shard_number(entity_id, n)``
    ``1 + stable_hash64(entity_id) % n``: shards are 1-based, like
    @effect/cluster's (whose own hash is a 32-bit djb2 variant over UTF-16
    code units, ``reference/effect-cluster.md`` §2.2; ours is wider and
    better mixed, so shards stay uniform for any id scheme).

``advisory_namespace(prefix)``
    The low 32 bits of ``stable_hash64("trio_cluster:" + prefix)``, read as
    a two's-complement signed integer (PostgreSQL's ``int4``). It is the
    first key of the two-int advisory locks, so clusters that share a
    database under different table prefixes never take each other's locks.

``shard_number`` is on the hot path (every client handle calls it), so it
costs one BLAKE2b call and does no other validation than the modulus needs.
"""

from __future__ import annotations

import hashlib
import struct

from ._addresses import EntityAddress, ShardId

__all__ = [
    "advisory_namespace",
    "misplaced",
    "shard_for",
    "shard_number",
    "stable_hash64",
    "stable_hash_block",
]

_blake2b = hashlib.blake2b
_from_bytes = int.from_bytes
_unpack_block = struct.Struct("<8Q").unpack


def stable_hash64(text: str) -> int:
    """Hash ``text`` to an unsigned 64-bit integer, identically everywhere.

    Defined as ``int.from_bytes(blake2b(text.encode("utf-8"),
    digest_size=8).digest(), "little")``.

    Args:
        text: any string that encodes as UTF-8.

    Returns:
        An integer in ``[0, 2**64)``.

    Raises:
        TypeError: ``text`` is not a ``str``.
        UnicodeEncodeError: ``text`` contains a lone surrogate.
    """
    try:
        data = text.encode("utf-8")
    except AttributeError:
        raise TypeError(f"expected a str, got {type(text).__name__}") from None
    return _from_bytes(_blake2b(data, digest_size=8).digest(), "little")


def stable_hash_block(text: str) -> tuple[int, ...]:
    """Hash ``text`` to eight unsigned 64-bit integers, identically everywhere.

    Defined as the 64-byte ``blake2b(text.encode("utf-8"), digest_size=64)``
    digest split into eight little-endian unsigned 64-bit words, in order.

    Returns:
        A tuple of 8 integers in ``[0, 2**64)``.

    Raises:
        TypeError: ``text`` is not a ``str``.
    """
    try:
        data = text.encode("utf-8")
    except AttributeError:
        raise TypeError(f"expected a str, got {type(text).__name__}") from None
    block: tuple[int, ...] = _unpack_block(_blake2b(data, digest_size=64).digest())
    return block


def shard_number(entity_id: str, shards_per_group: int) -> int:
    """The 1-based shard number of an entity id: ``1 + stable_hash64(id) % n``.

    Args:
        entity_id: the entity id (its string form).
        shards_per_group: number of shards in the entity's group.

    Returns:
        An integer in ``[1, shards_per_group]``.

    Raises:
        ValueError: ``shards_per_group`` is less than 1.
    """
    if shards_per_group < 1:
        raise ValueError(f"shards_per_group must be >= 1, got {shards_per_group!r}")
    return 1 + stable_hash64(entity_id) % shards_per_group


def shard_for(entity_id: str, group: str, shards_per_group: int) -> ShardId:
    """The shard of an entity id within ``group``.

    Raises:
        ValueError: ``shards_per_group`` is less than 1.
    """
    return ShardId(group, shard_number(entity_id, shards_per_group))


def misplaced(address: EntityAddress, group: str, shards_per_group: int) -> str | None:
    """Why ``address`` names a shard its entity (of shard group ``group``)
    does not belong to, or None if it names the entity's own shard.

    Raises:
        ValueError: ``shards_per_group`` is less than 1.
    """
    home = shard_for(address.entity_id.value, group, shards_per_group)
    if home == address.shard:
        return None
    return (
        f"{address.entity_type} {address.entity_id.value!r} belongs to shard"
        f" {home}, not {address.shard}"
    )


def advisory_namespace(prefix: str) -> int:
    """First key of PostgreSQL two-int advisory locks for a table prefix.

    The low 32 bits of ``stable_hash64("trio_cluster:" + prefix)`` as a
    signed two's-complement ``int4``.

    Args:
        prefix: the storage table prefix (``""`` is allowed).

    Returns:
        An integer in ``[-2**31, 2**31)``.
    """
    low = stable_hash64("trio_cluster:" + prefix) & 0xFFFF_FFFF
    return low - (1 << 32) if low >= (1 << 31) else low
