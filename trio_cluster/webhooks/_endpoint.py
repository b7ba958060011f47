"""`WebhookEndpoint`: where deliveries go, and how (delivery part)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import attrs
import httpx

from trio_cluster import ConfigError

from .._core._ratelimit import RateLimit
from ._signing import new_secret, secret_key

if TYPE_CHECKING:
    from trio_cluster.abc import EndpointRecord

__all__ = ["WebhookEndpoint"]

_ID_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-"
)


def _check_id(_: object, attribute: attrs.Attribute[str], value: object) -> None:
    if (
        not isinstance(value, str)
        or not value
        or len(value) > 200
        or not set(value) <= _ID_CHARS
    ):
        raise ConfigError(
            "an endpoint id must be 1-200 letters, digits, '_', '.', ':' or '-',"
            f" got {value!r}"
        )


def _check_url(_: object, attribute: attrs.Attribute[str], value: object) -> None:
    if not isinstance(value, str) or len(value) > 2000:
        raise ConfigError(
            f"url must be a str of at most 2000 characters, got {value!r}"
        )
    try:
        url = httpx.URL(value)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise ConfigError(f"url {value!r} is not a valid URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"url must be an http:// or https:// URL, got {value!r}")


def _check_secret(_: object, attribute: attrs.Attribute[str], value: object) -> None:
    if not isinstance(value, str) or not value.startswith("whsec_"):
        raise ConfigError("secret must be a str whsec_<base64> (see new_secret)")
    try:
        key = secret_key(value)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not 24 <= len(key) <= 64:
        raise ConfigError(f"a secret must hold 24 to 64 bytes, got {len(key)}")


def _event_types(value: object) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, tuple | list | set | frozenset):
        raise ConfigError(f"event_types must be a set of str or None, got {value!r}")
    for item in value:
        if not isinstance(item, str) or not item or len(item) > 200:
            raise ConfigError(
                f"an event type must be a str of 1-200 characters, got {item!r}"
            )
    return frozenset(value)


def _check_timeout(_: object, attribute: attrs.Attribute[float], value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 < value <= 300
    ):
        raise ConfigError(f"timeout must be seconds in (0, 300], got {value!r}")


def _check_bool(_: object, attribute: attrs.Attribute[bool], value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{attribute.name} must be a bool, got {value!r}")


@attrs.frozen
class WebhookEndpoint:
    """A receiver of webhooks, registered at runtime (``WebhookClient.register``).

    Args:
        id: its stable id (also the id of the entity that delivers to it).
        url: where deliveries are POSTed (``http://`` or ``https://``).
        secret: the signing secret, ``whsec_<base64>`` (a fresh random one by
            default: read it back to give it to the receiver).
        event_types: the event types it receives (None: every one).
        enabled: False: sends skip it and queued deliveries to it fail.
        ordered: its deliveries form a FIFO: attempted one at a time, in
            the order they were sent, and a delivery waiting for a retry
            holds back the next ones until it succeeds or goes to the dead
            letters; otherwise up to the part's ``concurrency`` at once,
            retries passed by later deliveries.
        rate: at most this many attempts per second (None: no limit).
        timeout: seconds an attempt may take to get its answer; slower is a
            failed attempt (``timeout``).

    Raises:
        ConfigError: on construction, for any invalid value.
    """

    id: str = attrs.field(validator=_check_id)
    url: str = attrs.field(validator=_check_url)
    secret: str = attrs.field(factory=new_secret, validator=_check_secret)
    event_types: frozenset[str] | None = attrs.field(
        default=None, converter=_event_types
    )
    enabled: bool = attrs.field(default=True, validator=_check_bool)
    ordered: bool = attrs.field(default=False, validator=_check_bool)
    rate: RateLimit | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(attrs.validators.instance_of(RateLimit)),
    )
    timeout: float = attrs.field(default=15.0, validator=_check_timeout)

    def accepts(self, event_type: str) -> bool:
        """Whether it receives events of ``event_type``."""
        return self.event_types is None or event_type in self.event_types

    def to_record(self, now: float, reason: str | None = None) -> EndpointRecord:
        """Its storage record, changed at wall time ``now``."""
        from trio_cluster.abc import EndpointRecord

        return EndpointRecord(
            endpoint_id=self.id,
            url=self.url,
            secret=self.secret,
            event_types=None
            if self.event_types is None
            else tuple(sorted(self.event_types)),
            enabled=self.enabled,
            ordered=self.ordered,
            rate_per_second=None if self.rate is None else self.rate.per_second,
            rate_burst=1.0 if self.rate is None else self.rate.burst,
            timeout=self.timeout,
            disabled_reason=None if self.enabled else reason,
            updated_at=now,
        )

    @classmethod
    def from_record(cls, record: EndpointRecord) -> WebhookEndpoint:
        """The endpoint of a storage record."""
        return cls(
            id=record.endpoint_id,
            url=record.url,
            secret=record.secret,
            event_types=None
            if record.event_types is None
            else frozenset(record.event_types),
            enabled=record.enabled,
            ordered=record.ordered,
            rate=None
            if record.rate_per_second is None
            else RateLimit(record.rate_per_second, record.rate_burst),
            timeout=record.timeout,
        )
