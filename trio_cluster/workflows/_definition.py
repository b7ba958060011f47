"""`Workflow`: a workflow function and its options; the `workflow` decorator (delivery part).

A workflow is a plain ``async def wf(ctx: WorkflowContext, arg: A) -> R``.
Its definition makes the entity type that runs its executions
(``trio_cluster.workflow.<name>``): host it on the runners that should run
them (``open_runner(entities=[..., wf.entity])``), and start executions
through any runner (``wf.client(runner)``).
"""

from __future__ import annotations

import typing
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import attrs

from trio_cluster import ConfigError, Entity, RetryPolicy, durable

from .._core._checks import non_negative_seconds, part_name
from ._context import StepTypes, WorkflowContext
from ._entity import WorkflowEntity
from ._peers import entity_type_name, remember
from ._records import Journal

if TYPE_CHECKING:
    from trio_cluster import Runner

    from ._handle import Workflows

__all__ = ["Workflow", "workflow"]

A = TypeVar("A")
R = TypeVar("R")


def _check_name(_: object, attribute: attrs.Attribute[str], value: object) -> None:
    part_name("workflow", value)


def _check_fn(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not callable(value):
        raise ConfigError(
            f"a workflow must be an async function (ctx, arg), got {value!r}"
        )


def _check_group(_: object, attribute: attrs.Attribute[str], value: object) -> None:
    if not isinstance(value, str) or not value or value.strip() != value:
        raise ConfigError(f"a shard group must be a non-empty str, got {value!r}")


def _check_sleep(_: object, attribute: attrs.Attribute[float], value: object) -> None:
    non_negative_seconds(attribute.name, value)


def _check_steps(_: object, attribute: attrs.Attribute[int], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{attribute.name} must be an int >= 1, got {value!r}")


@attrs.frozen(eq=False)
class Workflow(Generic[A, R]):
    """A workflow definition (see `workflow`).

    Raises:
        ConfigError: on construction, for an invalid name, function, retry
            policy, ``in_memory_sleep``, ``steps_per_checkpoint`` or
            ``advance_seconds``.
    """

    name: str = attrs.field(validator=_check_name)
    fn: Callable[[WorkflowContext, A], Awaitable[R]] = attrs.field(validator=_check_fn)
    idempotency_key: Callable[[A], str] | None = None
    """Derives an execution id from the argument (None: a digest of the
    encoded argument)."""
    retry: RetryPolicy = attrs.field(
        factory=RetryPolicy, validator=attrs.validators.instance_of(RetryPolicy)
    )
    """The default retry policy of its steps."""
    in_memory_sleep: float = attrs.field(default=1.0, validator=_check_sleep)
    """Sleeps up to this long stay in memory (in the running handler);
    longer ones suspend the execution on a durable timer."""
    shard_group: str = attrs.field(default="default", validator=_check_group)
    """The shard group of its executions' entities: the runners that host
    that group (and the workflow's entity) run them."""
    steps_per_checkpoint: int = attrs.field(default=1, validator=_check_steps)
    """New steps a task runs between two commits of the journal (1: each
    step's result commits before the task's next step starts)."""
    advance_seconds: float = attrs.field(default=1.0, validator=_check_sleep)
    """An advance that has run this long ends at its next new step (it
    commits, and a wake message goes on), so that messages queued for the
    execution (signals, interrupt) get their turn."""
    arg_type: Any = attrs.field(init=False)
    result_type: Any = attrs.field(init=False)
    entity: type[Entity] = attrs.field(init=False)
    """The entity type of its executions (host it on runners)."""
    step_types: StepTypes = attrs.field(init=False, factory=StepTypes)
    """Its steps' return types, resolved once for all its runs."""

    def __attrs_post_init__(self) -> None:
        hints = _hints(self.fn)
        params = [k for k in hints if k != "return"]
        object.__setattr__(
            self, "arg_type", hints[params[1]] if len(params) > 1 else Any
        )
        object.__setattr__(self, "result_type", hints.get("return", Any))
        object.__setattr__(self, "entity", _entity_class(self))

    def client(self, runner: Runner) -> Workflows[A, R]:
        """Start and follow executions through ``runner`` (any runner of the
        cluster; it need not host the executions).

        Raises:
            TypeError: ``runner`` is not a `trio_cluster.Runner`.
        """
        from ._handle import Workflows

        return Workflows(self, runner)


class WorkflowDecorator(Protocol):
    """What `workflow` returns: makes a `Workflow` of a function."""

    def __call__(
        self, fn: Callable[[WorkflowContext, A], Awaitable[R]], /
    ) -> Workflow[A, R]: ...


def workflow(
    *,
    name: str,
    idempotency_key: Callable[[Any], str] | None = None,
    retry: RetryPolicy | None = None,
    in_memory_sleep: float = 1.0,
    shard_group: str = "default",
    steps_per_checkpoint: int = 1,
    advance_seconds: float = 1.0,
) -> WorkflowDecorator:
    """Define a workflow: ``@workflow(name="order") async def order(ctx, arg)``.

    Args:
        name: stable name (its entity type is ``trio_cluster.workflow.<name>``).
        idempotency_key: derives the execution id from the argument.
        retry: the default retry policy of its steps.
        in_memory_sleep: the longest sleep kept in memory (seconds).
        shard_group: the shard group of its executions (run by the runners
            hosting that group and its entity).
        steps_per_checkpoint: new steps a task runs between two commits of
            the journal (1: each step's result commits before its next step
            starts; more: fewer writes, but a crash runs again the steps not
            committed yet).
        advance_seconds: an advance that has run this long ends at its next
            new step (signals and interrupts queued meanwhile get their turn).

    Raises:
        ConfigError: an invalid option (when decorating).
    """

    def decorate(fn: Callable[[WorkflowContext, A], Awaitable[R]], /) -> Workflow[A, R]:
        return Workflow(
            name,
            fn,
            idempotency_key,
            retry if retry is not None else RetryPolicy(),
            in_memory_sleep,
            shard_group,
            steps_per_checkpoint,
            advance_seconds,
        )

    return decorate


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:
        return {}


def _entity_class(definition: Workflow[Any, Any]) -> type[Entity]:
    namespace = {
        "type_name": entity_type_name(definition.name),
        "definition": definition,
        # Labelled with its status: listed and counted by it (`._admin`).
        "state": durable(Journal, label=lambda journal: journal.status.value),
        "shard_group": definition.shard_group,
        "__module__": __name__,
    }
    cls = type(
        f"Workflow_{definition.name.replace('.', '_').replace('-', '_')}",
        (WorkflowEntity,),
        namespace,
    )
    remember(definition.name, cls)
    return cls
