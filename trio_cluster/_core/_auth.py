"""Proving a shared secret by challenge-response (sans-IO).

Theory of operation. Every member of a cluster holds the same secret (or,
while it is being rotated, the old and the new one). When two parties
connect, each sends a fresh random *nonce*; each then proves it holds a
secret by sending ``HMAC-SHA256(secret, message)``, where the message binds:

* a *label* naming the protocol and the role of the prover (``"runner
  server"``, ``"runner client"``): a proof made in one role is worthless in
  the other, so a proof one party sends can never be reflected back to it;
* both nonces: a proof is good for one connection only (no replay);
* whatever else the two parties must agree on (here, the addresses both
  announce): a proof made for one pair of addresses does not vouch for
  another.

The parts are length-prefixed before hashing, so two different lists of parts
never give the same message. A party proves with *every* secret it holds and
accepts a proof made with *any* of its secrets: a rotation is two rolling
restarts (add the new secret beside the old one everywhere, then remove the
old one), and members with either set keep talking.

Nothing here reads a clock or a random source: the caller draws the nonces
(`NONCE_SIZE` bytes from the operating system's generator). Comparisons are
constant-time (`hmac.compare_digest`).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING, Final, TypeGuard

import attrs

from .._errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

__all__ = [
    "MAX_SECRETS",
    "MIN_SECRET_SIZE",
    "NONCE_SIZE",
    "PROOF_SIZE",
    "ClusterSecrets",
    "are_proofs",
    "proof_message",
]

NONCE_SIZE: Final = 32
"""Bytes of a challenge nonce."""

PROOF_SIZE: Final = hashlib.sha256().digest_size
"""Bytes of one proof (an HMAC-SHA256)."""

MIN_SECRET_SIZE: Final = 16
"""Fewest bytes a secret may have (128 bits, if it is random)."""

MAX_SECRETS: Final = 8
"""Most secrets held at once (and proofs accepted in one message)."""


def proof_message(label: str, parts: Iterable[bytes]) -> bytes:
    """The bytes a proof authenticates: ``label`` and ``parts``, each prefixed
    with its length (4 bytes, big-endian)."""
    chunks = [label.encode()]
    chunks.extend(parts)
    return b"".join(len(chunk).to_bytes(4, "big") + chunk for chunk in chunks)


def are_proofs(value: object) -> TypeGuard[Sequence[bytes]]:
    """Whether ``value`` (as received: anything) has the shape of proofs: a
    list (or tuple) of 1 to `MAX_SECRETS` byte strings of `PROOF_SIZE`
    bytes."""
    return (
        isinstance(value, list | tuple)
        and 0 < len(value) <= MAX_SECRETS
        and all(isinstance(item, bytes) and len(item) == PROOF_SIZE for item in value)
    )


def _as_secret(value: object, index: int) -> bytes:
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, bytes):
        raise ConfigError(
            f"cluster secret {index} must be bytes or str, got {type(value).__name__}"
        )
    if len(value) < MIN_SECRET_SIZE:
        raise ConfigError(
            f"cluster secret {index} is {len(value)} bytes; a secret needs at"
            f" least {MIN_SECRET_SIZE} (make one with `openssl rand -hex 32`)"
        )
    return value


@attrs.frozen(repr=False)
class ClusterSecrets:
    """The secrets a member holds: it proves with all of them and accepts a
    proof made with any of them (see the module docstring).

    Build it with `ClusterSecrets.of`. Its ``repr`` shows how many secrets it
    holds, never their bytes.
    """

    keys: tuple[bytes, ...]

    @classmethod
    def of(cls, values: Sequence[bytes | str]) -> ClusterSecrets:
        """Secrets from ``values`` (``str`` ones are encoded as UTF-8).

        Raises:
            ConfigError: ``values`` is empty, holds more than `MAX_SECRETS`,
                a value that is neither ``bytes`` nor ``str``, or one shorter
                than `MIN_SECRET_SIZE` bytes. The message never shows a
                secret.
        """
        if isinstance(values, bytes | str):
            raise ConfigError(
                "cluster_secrets must be a sequence of secrets, not one secret:"
                " wrap it in a list"
            )
        keys = tuple(_as_secret(value, index) for index, value in enumerate(values))
        if not keys:
            raise ConfigError("cluster_secrets is empty")
        if len(keys) > MAX_SECRETS:
            raise ConfigError(
                f"{len(keys)} cluster secrets; at most {MAX_SECRETS} are held at once"
            )
        return cls(keys=tuple(dict.fromkeys(keys)))

    def __repr__(self) -> str:
        return f"ClusterSecrets(<{len(self.keys)} secret(s)>)"

    def prove(self, label: str, parts: Iterable[bytes]) -> list[bytes]:
        """One proof per secret held, of ``label`` and ``parts``."""
        message = proof_message(label, parts)
        return [hmac.digest(key, message, "sha256") for key in self.keys]

    def verify(self, label: str, parts: Iterable[bytes], proofs: object) -> bool:
        """Whether ``proofs`` (as received: anything) holds a proof of
        ``label`` and ``parts`` made with one of these secrets.

        False for anything that is not a list of at most `MAX_SECRETS`
        byte strings of `PROOF_SIZE` bytes. Every pair is compared, in
        constant time each, whatever matches.
        """
        if not are_proofs(proofs):
            return False
        expected = self.prove(label, parts)
        found = False
        for proof in proofs:
            for mine in expected:
                found |= hmac.compare_digest(proof, mine)
        return found
