"""Encoding of replies: values, declared errors, cluster errors (edge adapter).

A final reply ("exit") is one msgpack array whose first item says what it is::

    [0, value]                     the handler returned a value
    [1, tag, fields]               the handler raised one of its declared errors
    [2, tag, fields]               a trio_cluster error (MailboxFull, Remote, ...)
    [3]                            the request was interrupted by its sender

Stream chunks are the encoded element value alone. Tags are stable names, never
derived from module paths: a declared error's tag is its ``type_name`` class
attribute if it has one, else its class name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, cast

import attrs
import msgpack

from .. import _errors as errors
from .._errors import EntityDefinitionError, MalformedMessageError
from ._converter import Codec, describe_decode_error, packb

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    import cattrs

__all__ = [
    "Exit",
    "ReplyCodec",
    "check_declared_error",
    "cluster_error_codecs",
    "error_tag",
    "value_exit",
]

_VALUE: Final = 0
_DECLARED: Final = 1
_CLUSTER: Final = 2
_INTERRUPTED: Final = 3

# Stable wire tags of the errors trio_cluster itself may send back.
_CLUSTER_ERRORS: Final[dict[str, type[errors.ClusterError]]] = {
    "MailboxFull": errors.MailboxFullError,
    "EntityNotAssigned": errors.EntityNotAssignedError,
    "RunnerUnavailable": errors.RunnerUnavailableError,
    "AlreadyProcessing": errors.AlreadyProcessingError,
    "RequestInterrupted": errors.RequestInterruptedError,
    "MalformedMessage": errors.MalformedMessageError,
    "MessageTooLarge": errors.MessageTooLargeError,
    "UnknownEntityType": errors.UnknownEntityTypeError,
    "Remote": errors.RemoteError,
    "DeadLettered": errors.DeadLetteredError,
    "StaleEpoch": errors.StaleEpochError,
}
_CLUSTER_TAGS: Final[dict[type[BaseException], str]] = {
    cls: tag for tag, cls in _CLUSTER_ERRORS.items()
}
# Plain (not attrs) trio_cluster errors that travel as their message alone;
# a subclass travels as its base (a backend's `PersistenceError`).
_MESSAGE_ERRORS: Final[dict[str, type[errors.ClusterError]]] = {
    "Persistence": errors.PersistenceError,
    "InvalidId": errors.InvalidIdError,
}


@attrs.frozen(slots=True)
class Exit:
    """How a request ended: a value, or an error to raise at the caller."""

    value: object = None
    error: BaseException | None = None
    failure: Exception | None = None
    """For a handler that raised an exception it did not declare: that
    exception (``error`` is then the `RemoteError` naming it). Never encoded:
    it stays on the runner, which decides from it whether a persisted request
    is attempted again."""

    def unwrap(self) -> Any:
        """Return the value, or raise the error."""
        if self.error is not None:
            raise self.error
        return self.value


_new_object = object.__new__
_set_value = Exit.__dict__["value"].__set__
_set_error = Exit.__dict__["error"].__set__
_set_failure = Exit.__dict__["failure"].__set__


def value_exit(value: object) -> Exit:
    """``Exit(value=value)``, the outcome of every call that returns, made at
    half the cost: attrs' ``__init__`` of a frozen class sets each field
    through a bound ``object.__setattr__``, this through its slot directly.
    The object is the same (frozen, equal to ``Exit(value=value)``)."""
    exit_ = _new_object(Exit)
    _set_value(exit_, value)
    _set_error(exit_, None)
    _set_failure(exit_, None)
    return exit_


def error_tag(cls: type[BaseException]) -> str:
    """The wire tag of a declared error class."""
    tag = getattr(cls, "type_name", None)
    return tag if isinstance(tag, str) else cls.__name__


def check_declared_error(cls: object, where: str) -> type[Exception]:
    """Validate a class listed in a handler's ``errors=``.

    Raises:
        EntityDefinitionError: it is not an attrs-defined Exception subclass.
    """
    if not isinstance(cls, type) or not issubclass(cls, Exception):
        raise EntityDefinitionError(
            f"{where}: errors must be Exception classes, got {cls!r}"
        )
    if not attrs.has(cls):
        raise EntityDefinitionError(
            f"{where}: declared error {cls.__name__} must be an attrs class, e.g."
            " @attrs.define(eq=False, kw_only=True) class MyError(Exception): ..."
        )
    return cast("type[Exception]", cls)


STREAM_END: Final = msgpack.packb([_VALUE, None])
"""The clean end of a stream on the wire: the reply "returned None" (the
bytes a None-able item codec makes too, so peers agree whatever the type)."""


class ReplyCodec:
    """Encodes and decodes the replies of one handler.

    Args:
        converter: the runner's converter.
        value_type: the handler's return type (stream element type for streams).
        declared: the handler's declared error classes.
        what: names the handler in error messages.
        cluster_codecs: from `cluster_error_codecs` for the same converter
            (shared by all handlers of a runner); built if not given.
    """

    __slots__ = ("_cluster_codecs", "_declared", "_declared_tags", "value")

    def __init__(
        self,
        converter: cattrs.Converter,
        value_type: Any,
        declared: Sequence[type[Exception]],
        what: str,
        cluster_codecs: Mapping[str, Codec[Any]] | None = None,
    ) -> None:
        self.value: Codec[Any] = Codec(converter, value_type, f"{what} reply")
        self._declared: dict[str, Codec[Any]] = {}
        self._declared_tags: dict[type[BaseException], str] = {}
        for cls in declared:
            tag = error_tag(cls)
            if tag in self._declared:
                raise EntityDefinitionError(
                    f"{what}: two declared errors use tag {tag!r}"
                )
            self._declared[tag] = Codec(converter, cls, f"{what} error {tag}")
            self._declared_tags[cls] = tag
        self._cluster_codecs = (
            cluster_error_codecs(converter)
            if cluster_codecs is None
            else cluster_codecs
        )

    def is_declared(self, exc: BaseException) -> bool:
        """Whether ``exc`` is an instance of a declared error class."""
        return type(exc) in self._declared_tags

    def encode_value(self, value: object) -> bytes:
        """Encode a returned value as a final reply."""
        return _pack([_VALUE, self.value.unstructure(value)], self.value.what)

    def encode_error(self, exc: BaseException) -> bytes:
        """Encode a declared error or a `ClusterError` as a final reply.

        Raises:
            TypeError: ``exc`` is neither (convert it to `RemoteError` first).
        """
        tag = self._declared_tags.get(type(exc))
        if tag is not None:
            fields = self._declared[tag].unstructure(exc)
            return _pack([_DECLARED, tag, fields], self.value.what)
        if not attrs.has(type(exc)):
            for tag, cls in _MESSAGE_ERRORS.items():
                if isinstance(exc, cls):
                    return _pack([_CLUSTER, tag, {"message": str(exc)}], "reply")
        tag = _CLUSTER_TAGS.get(type(exc))
        if tag is None:
            raise TypeError(f"cannot encode {type(exc).__name__} as a reply")
        fields = self._cluster_codecs[tag].unstructure(exc)
        return _pack([_CLUSTER, tag, fields], "reply")

    def encode_stream_end(self, exit_: Exit) -> bytes:
        """Encode how a stream ended: an error, or `STREAM_END` for the end
        of the generator (it carries no item, so the item codec, which may
        not encode None, is not used)."""
        return STREAM_END if exit_.error is None else self.encode_error(exit_.error)

    def decode_stream_end(self, data: bytes, *, request_id: int = 0) -> Exit:
        """Decode what `encode_stream_end` made.

        Raises:
            MalformedMessageError: not a valid end of this handler's stream.
        """
        if data == STREAM_END:
            return Exit()
        return self.decode_exit(data, request_id=request_id)

    def encode_interrupted(self) -> bytes:
        """Encode "interrupted by its sender" as a final reply."""
        return _pack([_INTERRUPTED], "reply")

    def encode_exit(self, exit_: Exit) -> bytes:
        """Encode an `Exit`."""
        if exit_.error is None:
            return self.encode_value(exit_.value)
        return self.encode_error(exit_.error)

    def decode_exit(self, data: bytes, *, request_id: int = 0) -> Exit:
        """Decode a final reply.

        Raises:
            MalformedMessageError: not a valid reply for this handler.
        """
        try:
            item = msgpack.unpackb(data)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise MalformedMessageError(
                what=self.value.what, problems=describe_decode_error(exc)
            ) from None
        if not isinstance(item, list) or not item or type(item[0]) is not int:
            raise MalformedMessageError(what=self.value.what, problems=["not a reply"])
        kind = item[0]
        if kind == _VALUE and len(item) == 2:
            return value_exit(self.value.structure(item[1]))
        if kind == _INTERRUPTED:
            return Exit(error=errors.RequestInterruptedError(request_id=request_id))
        if (
            kind in (_DECLARED, _CLUSTER)
            and len(item) == 3
            and isinstance(item[1], str)
        ):
            return Exit(error=self._decode_error(kind, item[1], item[2]))
        raise MalformedMessageError(
            what=self.value.what, problems=[f"unknown reply kind {kind!r}"]
        )

    def _decode_error(self, kind: int, tag: str, fields: object) -> BaseException:
        if kind == _DECLARED:
            codec = self._declared.get(tag)
        elif tag in _MESSAGE_ERRORS and isinstance(fields, dict):
            return _MESSAGE_ERRORS[tag](str(fields.get("message", "")))
        else:
            codec = self._cluster_codecs.get(tag)
        if codec is None:
            raise MalformedMessageError(
                what=self.value.what, problems=[f"unknown error tag {tag!r}"]
            )
        return codec.structure(fields)  # type: ignore[no-any-return]


def _pack(item: object, what: str) -> bytes:
    try:
        return packb(item)
    except (TypeError, ValueError, OverflowError) as exc:
        raise MalformedMessageError(
            what=what, problems=[f"cannot encode: {exc}"]
        ) from None


def cluster_error_codecs(converter: cattrs.Converter) -> Mapping[str, Codec[Any]]:
    """Codecs for the trio_cluster errors that can travel as replies."""
    return {
        tag: Codec(converter, cls, f"{tag} error")
        for tag, cls in _CLUSTER_ERRORS.items()
    }
