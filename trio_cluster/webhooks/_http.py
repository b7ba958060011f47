"""One HTTP attempt of a webhook delivery, with httpx (delivery part).

`post_attempt` POSTs a signed delivery and classifies what came back; it
never raises for what the receiver or the network does (that is the
attempt's outcome), only `trio.Cancelled` when its caller is cancelled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import httpx
import trio

from .._core._schedule import parse_retry_after
from ._signing import webhook_headers

if TYPE_CHECKING:
    from trio_cluster.abc import EndpointRecord

__all__ = ["AttemptResult", "post_attempt"]

USER_AGENT = "trio-cluster-webhooks"
MAX_ERROR = 500


@attrs.frozen
class AttemptResult:
    """What one attempt came to (see `trio_cluster.abc.AttemptRecord`)."""

    outcome: str
    status: int | None
    latency: float
    error: str | None
    retry_after: float | None = None
    """Seconds the receiver asked to wait (``Retry-After``), if any."""


async def post_attempt(
    http: httpx.AsyncClient,
    endpoint: EndpointRecord,
    message_id: str,
    body: bytes,
    wall_now: float,
) -> AttemptResult:
    """POST ``body`` to ``endpoint`` signed for ``message_id`` at
    ``wall_now``; a 2xx answer within the endpoint's timeout is a success,
    410 is ``gone``, any other answer a ``failure`` (with its
    ``Retry-After``), no answer in time a ``timeout``, a transport error an
    ``error``. Cancellation propagates (the attempt's outcome is unknown)."""
    headers = webhook_headers(endpoint.secret, message_id, int(wall_now), body)
    headers["content-type"] = "application/json"
    headers["user-agent"] = USER_AGENT
    start = trio.current_time()
    response: httpx.Response | None = None
    error: str | None = None
    with trio.move_on_after(endpoint.timeout):
        try:
            response = await http.post(endpoint.url, content=body, headers=headers)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR]
    latency = trio.current_time() - start
    if error is not None:
        return AttemptResult("error", None, latency, error)
    if response is None:
        return AttemptResult(
            "timeout", None, latency, f"no answer within {endpoint.timeout:g} s"
        )
    status = response.status_code
    if 200 <= status < 300:
        return AttemptResult("success", status, latency, None)
    if status == 410:
        return AttemptResult("gone", status, latency, "HTTP 410 Gone")
    return AttemptResult(
        "failure",
        status,
        latency,
        f"HTTP {status}",
        parse_retry_after(response.headers.get("retry-after"), wall_now),
    )
