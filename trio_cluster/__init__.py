"""trio_cluster: distributed, persistent actors (entities) for Trio.

Write entity classes with ``@rpc`` and ``@stream`` handlers, open a runner,
and call entities by id from anywhere in the cluster::

    async with trio_cluster.open_runner(entities=[Account]) as runner:
        await runner.client(Account)("alice").deposit(Deposit("t1", 10))
"""

from __future__ import annotations

from ._broadcast import Broadcast as Broadcast
from ._call_metadata import (
    current_metadata as current_metadata,
    with_metadata as with_metadata,
)
from ._client import EntityClient as EntityClient
from ._clock import Clock as Clock, TrioWallClock as TrioWallClock
from ._cluster_state import (
    ClusterState as ClusterState,
    current_cluster_state as current_cluster_state,
)
from ._context import (
    current_entity_address as current_entity_address,
    current_transaction as current_transaction,
    outside_transaction as outside_transaction,
)
from ._core._addresses import (
    EntityAddress as EntityAddress,
    EntityId as EntityId,
    RunnerAddress as RunnerAddress,
    ShardId as ShardId,
)
from ._core._config import ShardingConfig as ShardingConfig
from ._core._retry import Backoff as Backoff, RetryPolicy as RetryPolicy
from ._core._snowflake import Snowflake as Snowflake
from ._cron import Cron as Cron
from ._durable import (
    Durable as Durable,
    checkpoint_state as checkpoint_state,
    durable as durable,
)
from ._entity import Entity as Entity
from ._errors import (
    AlreadyProcessingError as AlreadyProcessingError,
    CallInTransactionError as CallInTransactionError,
    ClusterError as ClusterError,
    ClusterInternalError as ClusterInternalError,
    ConfigError as ConfigError,
    DeadLetteredError as DeadLetteredError,
    DurableStateError as DurableStateError,
    EntityDefinitionError as EntityDefinitionError,
    EntityNotAssignedError as EntityNotAssignedError,
    EventsUnsupportedError as EventsUnsupportedError,
    InvalidIdError as InvalidIdError,
    InvalidMetadataError as InvalidMetadataError,
    InvalidTransitionError as InvalidTransitionError,
    MailboxFullError as MailboxFullError,
    MalformedMessageError as MalformedMessageError,
    MessageTooLargeError as MessageTooLargeError,
    NoCurrentRunnerError as NoCurrentRunnerError,
    NotInTransactionError as NotInTransactionError,
    PersistenceError as PersistenceError,
    RemoteError as RemoteError,
    RequestInterruptedError as RequestInterruptedError,
    RunnerUnavailableError as RunnerUnavailableError,
    StaleEpochError as StaleEpochError,
    StorageRefusedError as StorageRefusedError,
    UnknownEntityTypeError as UnknownEntityTypeError,
)
from ._errors._closed import RunnerClosedError as RunnerClosedError
from ._fsm import (
    GetState as GetState,
    StateMachine as StateMachine,
    StateTimedOut as StateTimedOut,
    StateTimeout as StateTimeout,
    WatchState as WatchState,
    transition as transition,
)
from ._handlers import (
    BoundRpc as BoundRpc,
    BoundStream as BoundStream,
    rpc as rpc,
    stream as stream,
)
from ._metadata import fixup_module_metadata
from ._operations._check_messages import (
    MessageCheck as MessageCheck,
    MessageExample as MessageExample,
    MessageProblem as MessageProblem,
    ProblemKind as ProblemKind,
    check_messages as check_messages,
)
from ._operations._dead_letters import DeadLetterQueue as DeadLetterQueue
from ._operations._metrics import serve_metrics as serve_metrics
from ._operations._statistics import (
    LatencySnapshot as LatencySnapshot,
    RunnerStatistics as RunnerStatistics,
)
from ._runner import (
    Runner as Runner,
    current_runner as current_runner,
    open_runner as open_runner,
    serve_runner as serve_runner,
)
from ._singletons import Singleton as Singleton
from ._storage_retries import DeadLetter as DeadLetter
from ._version import __version__ as __version__

__all__ = [
    "AlreadyProcessingError",
    "Backoff",
    "BoundRpc",
    "BoundStream",
    "Broadcast",
    "CallInTransactionError",
    "Clock",
    "ClusterError",
    "ClusterInternalError",
    "ClusterState",
    "ConfigError",
    "Cron",
    "DeadLetter",
    "DeadLetterQueue",
    "DeadLetteredError",
    "Durable",
    "DurableStateError",
    "Entity",
    "EntityAddress",
    "EntityClient",
    "EntityDefinitionError",
    "EntityId",
    "EntityNotAssignedError",
    "EventsUnsupportedError",
    "GetState",
    "InvalidIdError",
    "InvalidMetadataError",
    "InvalidTransitionError",
    "LatencySnapshot",
    "MailboxFullError",
    "MalformedMessageError",
    "MessageCheck",
    "MessageExample",
    "MessageProblem",
    "MessageTooLargeError",
    "NoCurrentRunnerError",
    "NotInTransactionError",
    "PersistenceError",
    "ProblemKind",
    "RemoteError",
    "RequestInterruptedError",
    "RetryPolicy",
    "Runner",
    "RunnerAddress",
    "RunnerClosedError",
    "RunnerStatistics",
    "RunnerUnavailableError",
    "ShardId",
    "ShardingConfig",
    "Singleton",
    "Snowflake",
    "StaleEpochError",
    "StateMachine",
    "StateTimedOut",
    "StateTimeout",
    "StorageRefusedError",
    "TrioWallClock",
    "UnknownEntityTypeError",
    "WatchState",
    "check_messages",
    "checkpoint_state",
    "current_cluster_state",
    "current_entity_address",
    "current_metadata",
    "current_runner",
    "current_transaction",
    "durable",
    "open_runner",
    "outside_transaction",
    "rpc",
    "serve_metrics",
    "serve_runner",
    "stream",
    "transition",
    "with_metadata",
]

fixup_module_metadata(__name__, globals())
del fixup_module_metadata
