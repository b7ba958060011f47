"""The one cattrs converter, and codecs built on it (edge adapter: msgpack/cattrs).

Messages are plain ``attrs.frozen`` classes with no serialization code;
`make_converter` returns the configured msgpack converter that turns them into
bytes and back. It is strict: values of the wrong type are refused instead of
coerced (cattrs' default hooks would turn ``"17"`` into ``17`` and ``None``
into ``"None"``), and unknown keys are refused.

`Codec` wraps one type: it looks the hooks up once, so encoding and decoding
on the hot path is a dictionary-free function call plus msgpack. Every decoding
failure, whatever its source (bad bytes, missing field, wrong type, unknown
union tag), becomes `MalformedMessageError` listing each problem with the path
of the field at fault.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Generic, Protocol, TypeVar

import cattrs
import msgpack
from cattrs.fns import identity
from cattrs.preconf.msgpack import MsgpackConverter, make_converter as _make_msgpack
from cattrs.strategies import configure_tagged_union

from .._errors import EntityDefinitionError, MalformedMessageError
from ._unchanged import mark_exact, unchanged_check, unchanged_structure

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = ["Codec", "make_converter", "packb", "register_tagged_union"]

T = TypeVar("T")


class _Packer(Protocol):
    """What `packb` needs of a msgpack packer."""

    def pack(self, obj: Any, /) -> bytes: ...


_PACKERS: list[_Packer] = []
"""Packers free for `packb` to use (one per nesting level or thread that
packed at once, in practice one)."""
_KEEP_PACKER_BELOW: Final = 1 << 20
"""A packer whose last output was larger is not kept: its buffer has grown
to that size."""


def packb(value: object) -> bytes:
    """``msgpack.packb(value)`` with a packer taken from a pool, not made for
    this value (``msgpack.packb`` makes one, and its buffer, per call: about
    twice the time of packing a message). A packer packs one value at a
    time: a value whose packing runs Python code that packs too (a ``dict``
    subclass), or another thread packing, takes another packer from the pool
    or a new one; ``list.pop`` and ``list.append`` are atomic.

    Raises:
        TypeError, ValueError, OverflowError: as ``msgpack.packb`` (that
            packer is dropped).
    """
    try:
        packer = _PACKERS.pop()
    except IndexError:
        packer = msgpack.Packer()
    data = packer.pack(value)  # resets the packer if it raises
    if len(data) < _KEEP_PACKER_BELOW:
        _PACKERS.append(packer)
    return data


def _strict(tp: type[Any]) -> Callable[[object, object], object]:
    name = tp.__name__

    def hook(value: object, _: object) -> object:
        if type(value) is not tp:
            raise TypeError(f"expected {name}, got {type(value).__name__}")
        return value

    return mark_exact(hook)


@mark_exact
def _strict_float(value: object, _: object) -> float:
    # msgpack keeps the distinction between 1 and 1.0; accept an int where a
    # float is expected (widening is lossless for sane values), never a bool.
    if type(value) is float:
        return value
    if type(value) is int:
        return float(value)
    raise TypeError(f"expected float, got {type(value).__name__}")


@mark_exact
def _strict_none(value: object, _: object) -> None:
    if value is not None:
        raise TypeError(f"expected None, got {type(value).__name__}")


@mark_exact
def _identity(value: object) -> object:
    return value


def make_converter(*, forbid_extra_keys: bool = True) -> MsgpackConverter:
    """Return a new strict msgpack converter for messages and replies.

    Register hooks for your own non-attrs types on the returned converter and
    pass it to `open_runner`; never use cattrs' global converter.

    Args:
        forbid_extra_keys: refuse encoded messages with fields the class does
            not have. Turn off to let older runners accept messages from newer
            ones that added optional fields.
    """
    converter = _make_msgpack(forbid_extra_keys=forbid_extra_keys)
    for tp in (str, int, bytes, bool):
        converter.register_structure_hook(tp, _strict(tp))
    converter.register_structure_hook(float, _strict_float)
    converter.register_structure_hook(type(None), _strict_none)
    converter.register_unstructure_hook(type(None), _identity)
    return converter


def register_tagged_union(
    converter: cattrs.Converter,
    union: Any,
    tags: Mapping[type[Any], str],
    *,
    tag_name: str = "_type",
) -> None:
    """Make ``union`` (e.g. ``Deposit | Withdraw``) encodable with explicit,
    stable tags, so that renaming a class does not change the wire format.

    Args:
        converter: from `make_converter`.
        union: the union type used in message annotations.
        tags: one tag per member class of the union.
        tag_name: the key that carries the tag in the encoded map.

    Raises:
        EntityDefinitionError: a member of the union has no tag, or two
            members share one.
    """
    members = getattr(union, "__args__", ())
    missing = [member for member in members if member not in tags]
    if missing:
        names = ", ".join(member.__name__ for member in missing)
        raise EntityDefinitionError(f"no tag given for union member(s): {names}")
    if len(set(tags.values())) != len(tags):
        raise EntityDefinitionError(f"tags must be unique: {dict(tags)!r}")
    configure_tagged_union(
        union, converter, tag_generator=tags.__getitem__, tag_name=tag_name
    )


_DECODE_ERRORS = (
    ValueError,  # msgpack ExtraData/FormatError, UnicodeDecodeError, cattrs coercions
    TypeError,
    KeyError,  # unknown union tag
    IndexError,
    AttributeError,
    msgpack.UnpackException,
    RecursionError,
)


def describe_decode_error(exc: BaseException) -> list[str]:
    """Turn a cattrs/msgpack failure into human-readable problems with paths."""
    if isinstance(exc, cattrs.BaseValidationError):
        return cattrs.transform_error(exc)
    if isinstance(exc, KeyError):
        return [f"unknown tag or missing key {exc}"]
    text = str(exc) or type(exc).__name__
    return [f"{type(exc).__name__}: {text}"]


class Codec(Generic[T]):
    """Encodes and decodes values of one type with a given converter.

    Args:
        converter: usually the runner's converter.
        tp: the type (a class, ``None`` for no value, or a generic alias).
        what: names the value in error messages, e.g. ``"Account.deposit message"``.

    Raises:
        EntityDefinitionError: the converter cannot handle ``tp``.
    """

    __slots__ = (
        "_structure",
        "_tp",
        "_unstructure",
        "size_if_unchanged",
        "unstructures_to_itself",
        "what",
    )

    def __init__(self, converter: cattrs.Converter, tp: Any, what: str) -> None:
        self._tp = tp
        self.what = what
        try:
            self._unstructure = converter.get_unstructure_hook(tp)
            self._structure = converter.get_structure_hook(tp)
        except cattrs.StructureHandlerNotFoundError as exc:
            raise EntityDefinitionError(
                f"{what}: cannot encode type {tp!r}; use attrs classes, builtins,"
                " or register hooks on the converter"
            ) from exc
        self.size_if_unchanged = unchanged_check(converter, tp)
        """For a value that decoding its encoding gives back unchanged (and
        that is immutable): an upper bound on its encoded size; else None
        (see `_unchanged`)."""
        self._structure = unchanged_structure(
            tp, self.size_if_unchanged, self._structure
        )
        self.unstructures_to_itself = self._unstructure is identity
        """Whether `unstructure` returns every value as it is (a scalar type's
        hook): a caller may skip it."""

    def unstructure(self, value: T) -> object:
        """Turn a value into msgpack-ready primitives.

        Raises:
            MalformedMessageError: the value does not fit the type.
        """
        try:
            return self._unstructure(value)
        except Exception as exc:
            raise MalformedMessageError(
                what=self.what,
                problems=[f"cannot encode {type(value).__name__}: {exc}"],
            ) from None

    def structure(self, primitive: object) -> T:
        """Inverse of `unstructure`.

        Raises:
            MalformedMessageError: with one entry per problem and its path.
        """
        try:
            value: T = self._structure(primitive, self._tp)  # no `cast` call
        except (*_DECODE_ERRORS, cattrs.BaseValidationError) as exc:
            raise MalformedMessageError(
                what=self.what, problems=describe_decode_error(exc)
            ) from None
        return value

    def encode(self, value: T) -> bytes:
        """Encode a value to msgpack bytes.

        Raises:
            MalformedMessageError: the value cannot be encoded.
        """
        # `unstructure`, inlined: a call less per message.
        try:
            primitive = self._unstructure(value)
        except Exception as exc:
            raise MalformedMessageError(
                what=self.what,
                problems=[f"cannot encode {type(value).__name__}: {exc}"],
            ) from None
        try:
            return packb(primitive)
        except (TypeError, ValueError, OverflowError) as exc:
            raise MalformedMessageError(
                what=self.what, problems=[f"cannot encode: {exc}"]
            ) from None

    def decode(self, data: bytes) -> T:
        """Decode msgpack bytes.

        Raises:
            MalformedMessageError: the bytes are not valid msgpack or do not
                structure into the type.
        """
        try:
            primitive = msgpack.unpackb(data)
        except _DECODE_ERRORS as exc:
            raise MalformedMessageError(
                what=self.what, problems=describe_decode_error(exc)
            ) from None
        # `structure`, inlined: a call less per message.
        try:
            value: T = self._structure(primitive, self._tp)  # no `cast` call
        except (*_DECODE_ERRORS, cattrs.BaseValidationError) as exc:
            raise MalformedMessageError(
                what=self.what, problems=describe_decode_error(exc)
            ) from None
        return value
