"""The ``@rpc`` and ``@stream`` decorators and their descriptors (definition layer).

A decorated method becomes a descriptor that remembers its options in a
`HandlerSpec`. Accessed on an entity instance, it gives a bound handler you can
call directly (inside the entity, that is a plain method call). Accessed
through a client (``runner.client(Account)("alice").deposit``), the client
builds a bound handler of the same shape that sends a message instead: both
satisfy `BoundRpc` / `BoundStream`, which is what makes client calls typed.

No I/O happens here; message and reply types are read from the annotations
when the entity type is registered with a runner.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar, overload

import attrs

from ._context import runner_context
from ._core._retry import RetryPolicy
from ._errors import EntityDefinitionError
from .serialization._replies import check_declared_error

if TYPE_CHECKING:
    from ._core._addresses import Addressed

__all__ = ["BoundRpc", "BoundStream", "HandlerSpec", "Rpc", "Stream", "rpc", "stream"]

E = TypeVar("E", bound="Addressed")
M = TypeVar("M")
M_contra = TypeVar("M_contra", contravariant=True)
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

_WIRE_NAME_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-/"
)


@attrs.frozen
class HandlerSpec:
    """What a handler is and how its messages travel."""

    name: str
    """Wire name (defaults to the method name)."""
    attribute: str
    """The method's attribute name on the class."""
    fn: Callable[..., Any]
    kind: Literal["rpc", "stream"]
    persisted: bool = False
    primary_key: Callable[[Any], str] | None = None
    deliver_at: Callable[[Any], datetime | float | None] | None = None
    errors: tuple[type[Exception], ...] = ()
    transactional: bool = False
    """Persisted only: the handler runs in a storage transaction (see
    `trio_cluster.current_transaction`) that also records its reply."""
    retry: RetryPolicy | None = None
    """Persisted only: its attempts and their backoff (None: the entity
    type's ``defect_retry``, else the default `RetryPolicy`)."""


class BoundRpc(Protocol[M_contra, R_co]):
    """An RPC handler bound to one entity (local instance or client proxy)."""

    def __call__(self, message: M_contra, /) -> Awaitable[R_co]:
        """Send ``message`` and wait for the reply.

        Cancelling the call interrupts the handler (Trio cancellation inside
        the handler). For a persisted handler the interruption is recorded as
        the request's reply; the message stays stored either way.
        """
        ...

    async def discard(self, message: M_contra, /) -> None:
        """Send ``message`` without waiting for the handler (fire and forget).

        Returns once the message is stored (persisted handlers) or handed to
        the entity's mailbox (volatile handlers).
        """


class BoundStream(Protocol[M_contra, T_co]):
    """A stream handler bound to one entity (local instance or client proxy)."""

    def __call__(
        self, message: M_contra, /
    ) -> AbstractAsyncContextManager[AsyncIterator[T_co]]:
        """Open the stream: ``async with ref.watch(msg) as items: async for x in items``.

        Leaving the ``async with`` block early interrupts the handler.
        """
        ...


def _check_wire_name(name: str, where: str) -> str:
    if not name or not set(name) <= _WIRE_NAME_CHARS or len(name) > 100:
        raise EntityDefinitionError(
            f"{where}: wire name {name!r} must be 1-100 characters of letters,"
            " digits, '_', '.', '-' or '/'"
        )
    return name


class _HandlerDescriptor:
    __slots__ = ("_name", "spec")

    def __init__(
        self, fn: Callable[..., Any], kind: Literal["rpc", "stream"], **options: Any
    ) -> None:
        if not callable(fn):
            raise EntityDefinitionError(f"@{kind} must decorate a method, got {fn!r}")
        name = options.pop("name", None)
        if name is not None:
            _check_wire_name(name, f"@{kind} on {fn.__qualname__}")
        self._name: str | None = name
        self.spec = HandlerSpec(
            name=name or fn.__name__, attribute=fn.__name__, fn=fn, kind=kind, **options
        )

    def __set_name__(self, owner: type, attribute: str) -> None:
        # Attribute names are identifiers, hence always valid wire names.
        self.spec = attrs.evolve(
            self.spec, name=self._name or attribute, attribute=attribute
        )


class _LocalRpc:
    __slots__ = ("_fn", "_instance", "_spec")

    def __init__(self, instance: Addressed, spec: HandlerSpec) -> None:
        self._instance = instance
        self._spec = spec
        self._fn = spec.fn

    def __call__(self, message: Any, /) -> Awaitable[Any]:
        return self._fn(self._instance, message)  # type: ignore[no-any-return]

    async def discard(self, message: Any, /) -> None:
        # Inside an entity, discard means: send to myself through the mailbox,
        # as any client of this entity would.
        instance = self._instance
        handle = runner_context().client(type(instance))(
            instance.address.entity_id.value
        )
        await getattr(handle, self._spec.attribute).discard(message)


class Rpc(_HandlerDescriptor, Generic[E, M, R]):
    """Descriptor made by `rpc`. Read ``Account.deposit.spec`` for its options."""

    @overload
    def __get__(self, instance: None, owner: type[Any]) -> Rpc[E, M, R]: ...
    @overload
    def __get__(self, instance: E, owner: type[Any]) -> BoundRpc[M, R]: ...
    def __get__(
        self, instance: E | None, owner: type[Any]
    ) -> Rpc[E, M, R] | BoundRpc[M, R]:
        if instance is None:
            return self
        return _LocalRpc(instance, self.spec)


class Stream(_HandlerDescriptor, Generic[E, M, T]):
    """Descriptor made by `stream`."""

    @overload
    def __get__(self, instance: None, owner: type[Any]) -> Stream[E, M, T]: ...
    @overload
    def __get__(self, instance: E, owner: type[Any]) -> BoundStream[M, T]: ...
    def __get__(
        self, instance: E | None, owner: type[Any]
    ) -> Stream[E, M, T] | BoundStream[M, T]:
        if instance is None:
            return self
        fn = self.spec.fn

        @asynccontextmanager
        async def local(message: Any) -> AsyncIterator[AsyncIterator[Any]]:
            generator = fn(instance, message)
            try:
                yield generator
            finally:
                await generator.aclose()

        return local


def _validate_options(
    kind: str,
    persisted: bool,
    primary_key: object,
    deliver_at: object,
    errors: Sequence[type[Exception]],
    transactional: bool = False,
    retry: object = None,
) -> tuple[type[Exception], ...]:
    where = f"@{kind}"
    if retry is not None:
        if not isinstance(retry, RetryPolicy):
            raise EntityDefinitionError(
                f"{where}: retry must be a RetryPolicy, got {retry!r}"
            )
        if not persisted:
            raise EntityDefinitionError(
                f"{where}: retry needs persisted=True (a volatile message is"
                " attempted once: its caller decides)"
            )
    if not isinstance(persisted, bool):
        raise EntityDefinitionError(
            f"{where}: persisted must be a bool, got {persisted!r}"
        )
    if primary_key is not None and not callable(primary_key):
        raise EntityDefinitionError(
            f"{where}: primary_key must be a function of the message"
        )
    if deliver_at is not None and not callable(deliver_at):
        raise EntityDefinitionError(
            f"{where}: deliver_at must be a function of the message"
        )
    if (primary_key is not None or deliver_at is not None) and not persisted:
        raise EntityDefinitionError(
            f"{where}: primary_key and deliver_at need persisted=True"
            " (deduplication and delayed delivery are storage features)"
        )
    if not isinstance(transactional, bool):
        raise EntityDefinitionError(f"{where}: transactional must be a bool")
    if transactional and not persisted:
        raise EntityDefinitionError(
            f"{where}: transactional=True needs persisted=True (the reply is"
            " recorded in the handler's storage transaction)"
        )
    listed: Sequence[object] = (errors,) if isinstance(errors, type) else errors
    return tuple(check_declared_error(cls, where) for cls in listed)


@overload
def rpc(fn: Callable[[E, M], Awaitable[R]], /) -> Rpc[E, M, R]: ...
@overload
def rpc(
    *,
    persisted: bool = False,
    primary_key: Callable[[Any], str] | None = None,
    deliver_at: Callable[[Any], datetime | float | None] | None = None,
    errors: Sequence[type[Exception]] = (),
    name: str | None = None,
    transactional: bool = False,
    retry: RetryPolicy | None = None,
) -> Callable[[Callable[[E, M], Awaitable[R]]], Rpc[E, M, R]]: ...
def rpc(
    fn: Callable[[E, M], Awaitable[R]] | None = None,
    /,
    *,
    persisted: bool = False,
    primary_key: Callable[[Any], str] | None = None,
    deliver_at: Callable[[Any], datetime | float | None] | None = None,
    errors: Sequence[type[Exception]] = (),
    name: str | None = None,
    transactional: bool = False,
    retry: RetryPolicy | None = None,
) -> Rpc[E, M, R] | Callable[[Callable[[E, M], Awaitable[R]]], Rpc[E, M, R]]:
    """Declare an RPC handler: ``async def method(self, message: M) -> R``.

    Use bare (``@rpc``) for a volatile handler, or with options.

    Args:
        persisted: store each request before delivery; it is redelivered after
            a crash until exactly one reply is recorded (at least once to the
            handler). Volatile handlers (the default) run at most once.
        primary_key: persisted only: a function of the message giving its
            dedup key. A second request with the same key (to the same entity
            and handler) is not run again: its caller gets the stored reply,
            or waits for the original if it is still running.
        deliver_at: persisted only: a function of the message giving the
            earliest delivery time, as an aware ``datetime`` or Unix seconds
            (or None for now).
        errors: exception classes (attrs-defined) the handler may raise on
            purpose; they cross the wire and are re-raised as themselves at
            the caller. Any other exception reaches the caller as
            `RemoteError`, and the entity is restarted.
        name: wire name, if it must differ from the method name (keep it
            stable once persisted messages exist).
        transactional: persisted only: run the handler inside a storage
            transaction, reachable with `trio_cluster.current_transaction()`,
            in which its reply is recorded too. Its own SQL writes commit
            atomically with the reply when it returns a value or raises a
            declared error; they roll back if it crashes, is interrupted, or
            its shard moved on (the request then runs again).
        retry: persisted only: how often a request is attempted when the
            handler raises an exception it did not declare (or its runner
            stops while it runs), with what backoff, before it is
            dead-lettered (`DeadLetteredError`). Default: the entity type's
            ``defect_retry``, else ``RetryPolicy()`` (3 attempts).

    Raises:
        EntityDefinitionError: inconsistent options.
    """
    declared = _validate_options(
        "rpc", persisted, primary_key, deliver_at, errors, transactional, retry
    )

    def decorate(function: Callable[[E, M], Awaitable[R]]) -> Rpc[E, M, R]:
        return Rpc(
            function,
            "rpc",
            persisted=persisted,
            primary_key=primary_key,
            deliver_at=deliver_at,
            errors=declared,
            name=name,
            transactional=transactional,
            retry=retry,
        )

    if fn is not None:
        return decorate(fn)
    return decorate


@overload
def stream(fn: Callable[[E, M], AsyncIterator[T]], /) -> Stream[E, M, T]: ...
@overload
def stream(
    *, errors: Sequence[type[Exception]] = (), name: str | None = None
) -> Callable[[Callable[[E, M], AsyncIterator[T]]], Stream[E, M, T]]: ...
def stream(
    fn: Callable[[E, M], AsyncIterator[T]] | None = None,
    /,
    *,
    errors: Sequence[type[Exception]] = (),
    name: str | None = None,
) -> Stream[E, M, T] | Callable[[Callable[[E, M], AsyncIterator[T]]], Stream[E, M, T]]:
    """Declare a stream handler: an async generator method
    ``async def method(self, message: M) -> AsyncIterator[T]``.

    A stream starts in mailbox order, then runs alongside the entity's other
    handlers (it does not hold the entity's concurrency slot), so an entity
    can keep answering while it streams. Streams are volatile.

    Args:
        errors: declared error classes, as for `rpc`.
        name: wire name, if it must differ from the method name.
    """
    declared = _validate_options("stream", False, None, None, errors)

    def decorate(function: Callable[[E, M], AsyncIterator[T]]) -> Stream[E, M, T]:
        return Stream(function, "stream", errors=declared, name=name)

    if fn is not None:
        return decorate(fn)
    return decorate
