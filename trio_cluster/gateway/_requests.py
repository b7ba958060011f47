"""A request's admission, its stream credit, and the error frame of a
failure (Trio driver helpers of a gateway socket).

`admit` decides whether a ``call`` or ``stream`` frame may run, and decodes
its message; `failure_frame` turns what a handler raised into the error
frame the client gets: its declared errors typed (tag and fields), the
cluster errors a retry may cure as ``unavailable``, anything else as
``internal`` with nothing of it sent (it is logged, bounded).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

import trio

from .._core._addresses import EntityId
from .._errors import (
    AlreadyProcessingError,
    EntityNotAssignedError,
    MailboxFullError,
    MalformedMessageError,
    PersistenceError,
    RequestInterruptedError,
    RunnerUnavailableError,
)
from .._errors._closed import RunnerClosedError
from ._protocol import Call, ErrorCode, FrameError, OpenStream, error_frame

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .._log_limit import LogLimiter
    from ._definition import Route

__all__ = ["UNAVAILABLE", "StreamCredit", "admit", "failure_frame"]


UNAVAILABLE: Final = (
    RunnerUnavailableError,
    EntityNotAssignedError,
    MailboxFullError,
    RunnerClosedError,
    PersistenceError,
    RequestInterruptedError,
    AlreadyProcessingError,
)
"""Cluster errors a client may retry: answered ``unavailable``."""


def admit(
    frame: Call | OpenStream,
    routes: Mapping[str, Route],
    in_flight: Mapping[int, object],
    max_concurrent: int,
) -> tuple[Route, Any]:
    """The route and decoded message of a request.

    Raises:
        FrameError: it is refused (see `ErrorCode`).
    """
    request_id = frame.id
    if request_id in in_flight:
        raise FrameError(request_id, ErrorCode.DUPLICATE_ID, "request id in use")
    if len(in_flight) >= max_concurrent:
        raise FrameError(
            request_id,
            ErrorCode.TOO_MANY_REQUESTS,
            f"at most {max_concurrent} requests at once",
        )
    kind = "call" if isinstance(frame, Call) else "stream"
    route = routes.get(frame.op)
    if route is None or route.kind != kind:
        raise FrameError(
            request_id,
            ErrorCode.NOT_FOUND,
            f"no {kind} operation {frame.op!r:.100}",
        )
    if route.keyed:
        key = frame.key
        if key is None:
            raise FrameError(
                request_id,
                ErrorCode.BAD_REQUEST,
                '"key" (the entity id) is required',
            )
        if key not in route.known_keys:
            try:
                EntityId(key)
            except ValueError as exc:
                raise FrameError(request_id, ErrorCode.BAD_REQUEST, str(exc)) from None
    elif frame.key is not None:
        raise FrameError(request_id, ErrorCode.BAD_REQUEST, f"{frame.op} takes no key")
    try:
        message = route.message.structure(frame.msg)
    except MalformedMessageError as exc:
        raise FrameError(request_id, ErrorCode.BAD_REQUEST, str(exc)) from None
    return route, message


class StreamCredit:
    """A stream's items the client still accepts."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._granted = trio.Event()

    def grant(self, n: int) -> None:
        self.n += n
        self._granted.set()

    async def take(self) -> None:
        while self.n <= 0:
            self._granted = trio.Event()
            await self._granted.wait()
        self.n -= 1


def failure_frame(
    request_id: int, route: Route | None, exc: Exception, warnings: LogLimiter
) -> dict[str, Any]:
    """The error frame for a request that raised ``exc`` (see the module
    docstring)."""
    declared = None if route is None else route.declared(exc)
    if declared is not None:
        tag, codec = declared
        try:
            data = codec.unstructure(exc)
        except MalformedMessageError:
            data = None
        return error_frame(
            request_id, ErrorCode.DECLARED, str(exc), type_name=tag, data=data
        )
    if isinstance(exc, UNAVAILABLE):
        return error_frame(
            request_id,
            ErrorCode.UNAVAILABLE,
            "the cluster cannot serve this request now; retry later",
            type_name=type(exc).__name__,
        )
    warnings.log(
        logging.ERROR,
        "topics" if route is None else route.name,
        "failed requests",
        "gateway request %s failed: %r",
        "subscribe" if route is None else route.name,
        exc,
    )
    return error_frame(request_id, ErrorCode.INTERNAL, "internal error")
