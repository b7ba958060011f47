"""The `Entity` base class users subclass (definition layer).

An entity class declares its stable ``type_name``, its policies (idle time,
mailbox capacity, concurrency, shard group) and its handlers (``@rpc`` and
``@stream`` methods). Instances are created by the runner, one per entity id,
when the first message arrives; state lives in ordinary attributes.

Entities do not own a task while idle: an idle entity is a small object, which
is what lets a runner hold hundreds of thousands of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from ._durable import Durable
from ._errors import EntityDefinitionError
from ._handlers import HandlerSpec, _HandlerDescriptor

if TYPE_CHECKING:
    from ._core._addresses import EntityAddress
    from ._core._retry import RetryPolicy

__all__ = ["Entity"]


class Entity:
    """Base class of entity (actor) classes.

    Example::

        class Account(Entity):
            type_name = "Account"

            async def on_start(self) -> None:
                self.balance = 0

            @rpc(persisted=True, primary_key=lambda m: m.tx_id)
            async def deposit(self, msg: Deposit) -> int:
                self.balance += msg.amount
                return self.balance

    Class attributes (policies):
        type_name: stable wire name of the type; required, never derived from
            the class name (renaming the class must not orphan stored messages).
        max_idle: seconds without messages before the entity is passivated
            (``on_stop``, then dropped from memory); None: the runner's
            ``entity_max_idle``. `keep_alive` overrides it.
        mailbox_capacity: most messages queued or running at once; beyond it
            volatile callers get `MailboxFullError`. None: the runner's default.
        concurrency: handlers running at once (1: one at a time, in order).
        shard_group: the shard group the entities of this type live in.
        defect_retry: a `RetryPolicy` for the type's defects (exceptions its
            handlers did not declare): its backoff spaces the restarts of a
            crashed entity (default: the runner's ``entity_restart_backoff``),
            and it is the retry policy of the type's persisted handlers that
            set none (default: ``RetryPolicy()``, 3 attempts).

    The constructor takes no arguments; initialise state in ``__init__`` or
    in `on_start`, where ``self.id`` and ``self.address`` are available.
    State that must survive passivation and crashes is declared with
    `trio_cluster.durable` and changed by transactional handlers.
    """

    type_name: ClassVar[str]
    max_idle: ClassVar[float | None] = None
    mailbox_capacity: ClassVar[int | None] = None
    concurrency: ClassVar[int] = 1
    shard_group: ClassVar[str] = "default"
    defect_retry: ClassVar[RetryPolicy | None] = None

    __tc_handlers__: ClassVar[dict[str, HandlerSpec]] = {}
    """Handlers by wire name, collected from the class and its bases."""
    __tc_durable__: ClassVar[Durable[Any] | None] = None
    """The durable state declaration (`trio_cluster.durable`), if any."""

    __slots__ = ("_tc_address", "_tc_slot", "_tc_state")

    _tc_address: EntityAddress
    _tc_slot: Any
    _tc_state: Any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        handlers: dict[str, HandlerSpec] = {}
        attributes: dict[str, str] = {}
        states: dict[str, Durable[Any]] = {}
        for klass in reversed(cls.__mro__):
            for attribute, value in vars(klass).items():
                if attribute in attributes:
                    # Overridden in a subclass (by a handler or anything else).
                    del handlers[attributes.pop(attribute)]
                states.pop(attribute, None)
                if isinstance(value, _HandlerDescriptor):
                    handlers[value.spec.name] = value.spec
                    attributes[attribute] = value.spec.name
                elif isinstance(value, Durable) and attribute != "__tc_durable__":
                    states[attribute] = value
        cls.__tc_handlers__ = handlers
        if len(states) > 1:
            raise EntityDefinitionError(
                f"{cls.__qualname__} declares durable state more than once"
                f" ({', '.join(sorted(states))}); keep it in one attrs class"
            )
        cls.__tc_durable__ = next(iter(states.values()), None)

    @property
    def id(self) -> str:
        """This entity's id (the string the caller addressed it by)."""
        return self._tc_address.entity_id.value

    @property
    def address(self) -> EntityAddress:
        """This entity's full address: type, id and shard."""
        return self._tc_address

    @property
    def fencing_epoch(self) -> int:
        """The fencing epoch of the shard this incarnation runs under: it
        grows each time the shard changes owner, so a write to an outside
        system can carry it as a fencing token (refuse a write with an
        epoch lower than the last one seen). 0 for an instance made outside
        a runner."""
        slot = getattr(self, "_tc_slot", None)
        return 0 if slot is None else int(slot.shard.epoch)

    async def on_start(self) -> None:
        """Called once per incarnation, before the first handler runs.

        If it raises, the entity is restarted with backoff; the message that
        activated it is failed with `RemoteError` if it is volatile, and kept
        for the next attempt if it is persisted.
        """

    async def on_stop(self) -> None:
        """Called when the incarnation ends gracefully: passivation, shard
        release, runner shutdown, or restart after a crash. Bounded by the
        runner's ``entity_termination_timeout``, then cancelled. Not called
        when the shard's lease was lost (the entity may already run elsewhere).
        """

    def keep_alive(self, enabled: bool = True) -> None:
        """Keep this entity in memory (no idle passivation) until called with
        ``False``. Applies to the current incarnation on this runner."""
        self._tc_slot.keep_alive = enabled
