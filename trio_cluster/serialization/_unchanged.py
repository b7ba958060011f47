"""Values that come back from encoding unchanged (pure).

With ``serialize_local_calls`` (the default) a local call hands its handler
the message as the receiver would decode it, and its caller the reply as
decoded, so that local and remote calls behave alike: nothing unencodable
gets through, and neither side shares a mutable object with the other. For
an immutable value whose round trip is the identity, such as an
``attrs.frozen`` message of ints and strings or a plain ``int`` reply, the
copy is the value itself; passing it on saves four codec steps per call
(Orleans passes immutable arguments of local calls the same way).

`unchanged_check` builds, once per type, a function that tells whether a
value is such a value and, if so, bounds its encoded size (local calls still
refuse messages over ``max_message_size``). `unchanged_structure` uses the
same check the other way, when decoding: a map whose fields make such a
value becomes the object directly, without the generated hook's work (its
error lists and key sets), which decides everything else. It only answers for types whose
hooks on the converter are the strict defaults of `make_converter` and
cattrs' generated ones for attrs classes; a type with a hook of its own, a
field hook override, a field ``converter``, a mutable class or anything else
is always copied.
"""

from __future__ import annotations

import linecache
import types
import typing
from typing import TYPE_CHECKING, Any, TypeVar, Union

import attrs
from cattrs.fns import identity

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import cattrs

__all__ = ["mark_exact", "unchanged_check", "unchanged_structure"]

_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1
"""msgpack's integer range: anything outside cannot be encoded."""

_EXACT_HOOK = "_trio_cluster_exact"
"""Set on the converter's hooks that return a value of their exact type
unchanged (see `mark_exact`)."""

F = TypeVar("F", bound="Callable[..., Any]")


def mark_exact(hook: F) -> F:
    """Declare that a (structure or unstructure) hook returns a value of its
    exact type unchanged."""
    setattr(hook, _EXACT_HOOK, True)
    return hook


def _int(value: object) -> int | None:
    if type(value) is int and _INT_MIN <= value <= _INT_MAX:
        return 9
    return None


def _float(value: object) -> int | None:
    return 9 if type(value) is float else None


def _bool(value: object) -> int | None:
    return 1 if type(value) is bool else None


def _none(value: object) -> int | None:
    return 1 if value is None else None


def _str(value: object) -> int | None:
    # Only ASCII: any other string may hold a lone surrogate, which msgpack
    # refuses; those take the codec's path, which says so.
    if type(value) is str and value.isascii():
        return 5 + len(value)
    return None


def _bytes(value: object) -> int | None:
    return 5 + len(value) if type(value) is bytes else None


_SCALARS: dict[Any, Callable[[object], int | None]] = {
    int: _int,
    float: _float,
    bool: _bool,
    type(None): _none,
    None: _none,
    str: _str,
    bytes: _bytes,
}


def unchanged_check(
    converter: cattrs.Converter, tp: Any
) -> Callable[[object], int | None]:
    """The check for values of ``tp`` (see the module docstring): an upper
    bound on the encoded size of a value that decodes to itself and is
    immutable, None for any other value."""
    try:
        check = _check(converter, tp, depth=0)
    except Exception:  # an unusual type: copy its values
        check = None
    return _never if check is None else check


def _never(value: object) -> None:
    return None


def _scalar_hooks_are_defaults(converter: cattrs.Converter, tp: Any) -> bool:
    key = type(None) if tp is None else tp
    structure = converter.get_structure_hook(key)
    unstructure = converter.get_unstructure_hook(key)
    return getattr(structure, _EXACT_HOOK, False) is True and (
        unstructure is identity or getattr(unstructure, _EXACT_HOOK, False) is True
    )


def _check(
    converter: cattrs.Converter, tp: Any, *, depth: int
) -> Callable[[object], int | None] | None:
    if depth > 8:
        return None
    scalar = _SCALARS.get(tp) if isinstance(tp, typing.Hashable) else None
    if scalar is not None:
        return scalar if _scalar_hooks_are_defaults(converter, tp) else None
    optional = _optional_member(tp)
    if optional is not None:
        member = _SCALARS.get(optional)
        if member is None or not _scalar_hooks_are_defaults(converter, optional):
            return None
        if not _scalar_hooks_are_defaults(converter, type(None)):
            return None
        return _either_none(member)
    if isinstance(tp, type) and attrs.has(tp):
        return _frozen_class(converter, tp, depth=depth)
    return None


def _optional_member(tp: Any) -> Any:
    """``X`` for ``X | None`` (or ``Optional[X]``), else None."""
    if typing.get_origin(tp) not in (Union, types.UnionType):
        return None
    members = [arg for arg in typing.get_args(tp) if arg is not type(None)]
    if len(members) != 1 or len(typing.get_args(tp)) != 2:
        return None
    return members[0]


def _either_none(
    member: Callable[[object], int | None],
) -> Callable[[object], int | None]:
    def check(value: object) -> int | None:
        return 1 if value is None else member(value)

    return check


def _frozen_class(
    converter: cattrs.Converter, cls: type[Any], *, depth: int
) -> Callable[[object], int | None] | None:
    if getattr(cls.__setattr__, "__name__", "") != "_frozen_setattrs":
        return None  # mutable: the handler could change the caller's object
    structure = converter.get_structure_hook(cls)
    unstructure = converter.get_unstructure_hook(cls)
    if not (_generated(structure) and _generated(unstructure)):
        return None
    hints = typing.get_type_hints(cls)
    fields = attrs.fields(cls)
    checks: list[tuple[str, Callable[[object], int | None]]] = []
    size = 5
    for field in fields:
        if not field.init:
            return None  # decoding would not restore it
        if field.converter is not None:
            return None  # decoding runs it again: not the identity unless idempotent
        tp = hints.get(field.name, field.type)
        check = _check(converter, tp, depth=depth + 1)
        if check is None or not _field_hooks_are_the_types(
            converter, structure, unstructure, field.name, tp
        ):
            return None
        checks.append((field.name, check))
        size += 5 + len(field.name.encode())
    return _class_check(cls, tuple(checks), size)


def _generated(hook: Callable[..., Any]) -> bool:
    code = getattr(hook, "__code__", None)
    return code is not None and code.co_filename.startswith("<cattrs generated")


def _field_hooks_are_the_types(
    converter: cattrs.Converter,
    structure: Callable[..., Any],
    unstructure: Callable[..., Any],
    name: str,
    tp: Any,
) -> bool:
    """Whether the class's generated hooks use the converter's hooks for the
    field's type (no per-field override)."""
    field_structure = structure.__globals__.get(f"__c_structure_{name}")
    field_unstructure = unstructure.__globals__.get(f"__c_unstr_{name}")
    if isinstance(tp, type) and attrs.has(tp):
        # cattrs generates the hooks of a nested class again for each class
        # that holds it: they are the converter's if they are generated ones
        # (an override would be a function of the application's).
        return (
            field_structure is not None
            and _generated(field_structure)
            and (field_unstructure is None or _generated(field_unstructure))
        )
    if field_structure is None or not _same_hook(
        field_structure, converter.get_structure_hook(tp)
    ):
        return False
    return field_unstructure is None or _same_hook(
        field_unstructure, converter.get_unstructure_hook(tp)
    )


def _same_hook(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    """Whether two hooks are the same, or closures of the same code over the
    same values (cattrs makes a new one for ``X | None`` on every lookup)."""
    if a == b:
        return True
    code = getattr(a, "__code__", None)
    if code is None or code is not getattr(b, "__code__", None):
        return False
    cells_a = getattr(a, "__closure__", None) or ()
    cells_b = getattr(b, "__closure__", None) or ()
    return len(cells_a) == len(cells_b) and all(
        x.cell_contents is y.cell_contents
        for x, y in zip(cells_a, cells_b, strict=True)
    )


def _class_check(
    cls: type[Any],
    checks: tuple[tuple[str, Callable[[object], int | None]], ...],
    header: int,
) -> Callable[[object], int | None]:
    if len(checks) == 1:
        # A one-field message (the commonest kind) without the loop: this
        # check runs on every serialized local call, for its message.
        ((name, field_check),) = checks

        def check_one(value: object) -> int | None:
            if type(value) is not cls:
                return None  # see `check`
            field_size = field_check(getattr(value, name))
            return None if field_size is None else header + field_size

        check_one.field_checks = checks  # type: ignore[attr-defined]
        return check_one

    def check(value: object) -> int | None:
        if type(value) is not cls:
            return None  # a subclass may add state the codec drops
        size = header
        for name, field_check in checks:
            field_size = field_check(getattr(value, name))
            if field_size is None:
                return None
            size += field_size
        return size

    check.field_checks = checks  # type: ignore[attr-defined]
    return check


def unchanged_structure(
    tp: Any,
    check: Callable[[object], int | None],
    slow: Callable[[object, Any], Any],
) -> Callable[[object, Any], Any]:
    """``slow``, the structure hook of ``tp``, with a fast path for a map of
    exactly its fields whose values are unchanged values of the fields'
    types (the field checks of ``check``, from `unchanged_check`): the object
    is made from them directly. Then ``slow`` would have made an equal
    object (each field's hook is the strict one of its type, which returns
    the value as it is). Anything else (a key missing or extra, a value of
    another type, a nested object) is ``slow``'s to decide, and to refuse
    as it always did.

    ``slow`` itself is returned when the fast path cannot be shown to agree
    with it: ``check`` never accepts, a field is keyword-only, or the
    generated hook does not read each field from the key of its own name
    into the argument of the same name (a ``rename`` override, a private
    attribute). The object is made by attrs' ``__init__``, or, for a slotted
    class whose ``__init__`` is attrs' own and has no validator nor
    ``__attrs_pre_init__`` / ``__attrs_post_init__``, by setting its slots
    (what that ``__init__`` does, without ``object.__setattr__`` per field:
    see `value_exit`)."""
    field_checks: tuple[tuple[str, Callable[[object], int | None]], ...] | None = (
        getattr(check, "field_checks", None)
    )
    if field_checks is None or not (isinstance(tp, type) and attrs.has(tp)):
        return slow
    fields = attrs.fields(tp)
    code = getattr(slow, "__code__", None)
    if code is None or not code.co_filename.startswith("<cattrs generated"):
        return slow
    source = "".join(linecache.getlines(code.co_filename))
    for field in fields:
        name = field.name
        if (
            field.kw_only
            or not field.init
            or f"res['{name}'] = __c_structure_{name}(o['{name}']" not in source
        ):
            return slow
    make = _maker(tp, fields)
    if len(field_checks) == 1:
        # One field, the commonest message: no loop.
        ((only, only_check),) = field_checks

        def structure_one(primitive: object, target: Any) -> Any:
            if type(primitive) is dict and len(primitive) == 1:
                value = primitive.get(only, _MISSING)
                if only_check(value) is not None:
                    try:
                        return make(value)
                    except Exception:  # a validator: `slow` says it its way
                        pass
            return slow(primitive, target)

        return structure_one

    count = len(field_checks)

    def structure(primitive: object, target: Any) -> Any:
        if type(primitive) is dict and len(primitive) == count:
            values = []
            for name, field_check in field_checks:
                value = primitive.get(name, _MISSING)
                if field_check(value) is None:
                    return slow(primitive, target)
                values.append(value)
            try:
                return make(*values)
            except Exception:  # a validator: `slow` says it its way
                pass
        return slow(primitive, target)

    return structure


_MISSING: Any = object()
"""A key's value when it is missing (no field check accepts it)."""


def _maker(tp: type[Any], fields: Sequence[attrs.Attribute[Any]]) -> Callable[..., Any]:
    """What makes an object of ``tp`` from its fields' values, in order."""
    init = getattr(tp.__init__, "__code__", None)
    if (
        init is None
        or not init.co_filename.startswith("<attrs generated")
        or any(field.validator is not None for field in fields)
        or hasattr(tp, "__attrs_pre_init__")
        or hasattr(tp, "__attrs_post_init__")
        or any(
            type(vars(tp).get(field.name)) is not types.MemberDescriptorType
            for field in fields
        )
        or _other_slots(tp) - {field.name for field in fields}
    ):
        return tp
    new = object.__new__
    setters = tuple(vars(tp)[field.name].__set__ for field in fields)
    if len(setters) == 1:
        (set_only,) = setters

        def make_one(value: object) -> Any:
            made = new(tp)
            set_only(made, value)
            return made

        return make_one

    def make(*values: object) -> Any:
        made = new(tp)
        for setter, value in zip(setters, values, strict=True):
            setter(made, value)
        return made

    return make


def _other_slots(tp: type[Any]) -> set[str]:
    """The slots of ``tp`` and its bases but ``__weakref__`` and ``__dict__``
    (attrs' cached hash is one: its ``__init__`` sets it)."""
    slots: set[str] = set()
    for klass in tp.__mro__:
        names = vars(klass).get("__slots__", ())
        slots.update((names,) if isinstance(names, str) else names)
    return slots - {"__weakref__", "__dict__"}
