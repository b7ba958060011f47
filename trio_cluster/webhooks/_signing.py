"""Standard Webhooks signatures: sign on the sending side, verify on the
receiving side (delivery part).

The scheme (https://www.standardwebhooks.com, "Signature scheme"): a
delivery carries three headers,

* ``webhook-id``: the message's id, the same on every retry (receivers
  deduplicate on it);
* ``webhook-timestamp``: Unix seconds of this attempt;
* ``webhook-signature``: ``v1,<base64 HMAC-SHA256>`` of
  ``"{id}.{timestamp}.{body}"`` under the endpoint's secret, possibly several
  space-separated (while a secret is rotated).

Secrets are written ``whsec_<base64 of 24 to 64 random bytes>``; the
``whsec_`` prefix is optional when reading one. Pure functions: no I/O; the
time of a verification is an argument (``now``, default the wall clock).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "WebhookSignatureError",
    "new_secret",
    "secret_key",
    "sign_webhook",
    "verify_webhook",
    "webhook_headers",
]

SECRET_PREFIX = "whsec_"


class WebhookSignatureError(ValueError):
    """A webhook failed verification: a header is missing or malformed, its
    timestamp is outside the tolerance, or no signature matches."""


def new_secret(size: int = 32) -> str:
    """A fresh random secret, ``whsec_<base64>`` of ``size`` bytes.

    Raises:
        ValueError: ``size`` is not between 24 and 64.
    """
    if not 24 <= size <= 64:
        raise ValueError(f"a secret has 24 to 64 bytes, got {size}")
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(size)).decode()


def secret_key(secret: str | bytes) -> bytes:
    """The HMAC key of ``secret``: its raw bytes, or a ``whsec_`` string
    (prefix optional) decoded from base64 (padding optional).

    Raises:
        ValueError: an empty secret, or a string that is not base64.
        TypeError: neither str nor bytes.
    """
    if isinstance(secret, bytes):
        key = secret
    elif isinstance(secret, str):
        text = secret.removeprefix(SECRET_PREFIX)
        try:
            key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except binascii.Error:
            raise ValueError("a webhook secret must be whsec_<base64>") from None
    else:
        raise TypeError(f"a webhook secret is a str or bytes, got {secret!r}")
    if not key:
        raise ValueError("a webhook secret may not be empty")
    return key


def _body(body: bytes | str) -> bytes:
    return body.encode() if isinstance(body, str) else bytes(body)


def sign_webhook(
    secret: str | bytes, message_id: str, timestamp: int, body: bytes | str
) -> str:
    """The ``webhook-signature`` value ``v1,<base64>`` of one delivery.

    Raises:
        ValueError, TypeError: a malformed secret (see `secret_key`).
    """
    signed = f"{message_id}.{int(timestamp)}.".encode() + _body(body)
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def webhook_headers(
    secret: str | bytes, message_id: str, timestamp: int, body: bytes | str
) -> dict[str, str]:
    """The three Standard Webhooks headers of one delivery."""
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(timestamp)),
        "webhook-signature": sign_webhook(secret, message_id, timestamp, body),
    }


def verify_webhook(
    headers: Mapping[str, str],
    body: bytes | str,
    secret: str | bytes,
    *,
    tolerance: float = 300.0,
    now: float | None = None,
) -> str:
    """Check that a received webhook was signed with ``secret``; return its
    ``webhook-id`` (deduplicate on it: a delivery may arrive more than once).

    Args:
        headers: the request's headers (any case: ``httpx.Headers``,
            a ``dict``...).
        body: the raw request body, exactly as received.
        secret: the endpoint's secret (``whsec_...`` or raw bytes).
        tolerance: the most seconds ``webhook-timestamp`` may differ from
            ``now`` (replay protection).
        now: Unix seconds; default the wall clock.

    Raises:
        WebhookSignatureError: a header is missing or malformed, the
            timestamp is out of tolerance, or no ``v1`` signature matches
            (compared in constant time; any of several space-separated
            signatures may match).
        ValueError, TypeError: a malformed ``secret``.
    """
    key = secret_key(secret)
    found = {name.lower(): value for name, value in headers.items()}
    message_id = found.get("webhook-id")
    stamp = found.get("webhook-timestamp")
    signatures = found.get("webhook-signature")
    if not (message_id and stamp and signatures):
        raise WebhookSignatureError(
            "missing header: webhook-id, webhook-timestamp and webhook-signature"
            " are required"
        )
    try:
        timestamp = int(stamp)
    except ValueError:
        raise WebhookSignatureError(
            f"malformed webhook-timestamp {stamp[:40]!r}"
        ) from None
    current = datetime.now(UTC).timestamp() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise WebhookSignatureError(
            f"webhook-timestamp {timestamp} is more than {tolerance:g} s from now"
        )
    expected = sign_webhook(key, message_id, timestamp, body).encode()
    for candidate in signatures.split(" "):
        if candidate.startswith("v1,") and hmac.compare_digest(
            candidate.encode(), expected
        ):
            return message_id
    raise WebhookSignatureError("no matching signature")
