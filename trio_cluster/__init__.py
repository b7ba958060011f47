"""trio_cluster: distributed, persistent actors (entities) for Trio."""

from __future__ import annotations

from ._core._addresses import (
    EntityAddress as EntityAddress,
    EntityId as EntityId,
    RunnerAddress as RunnerAddress,
    ShardId as ShardId,
)
from ._core._config import ShardingConfig as ShardingConfig
from ._errors import (
    AlreadyProcessingError as AlreadyProcessingError,
    ClusterError as ClusterError,
    ClusterInternalError as ClusterInternalError,
    ConfigError as ConfigError,
    EntityDefinitionError as EntityDefinitionError,
    EntityNotAssignedError as EntityNotAssignedError,
    MailboxFullError as MailboxFullError,
    MalformedMessageError as MalformedMessageError,
    MessageTooLargeError as MessageTooLargeError,
    PersistenceError as PersistenceError,
    RemoteError as RemoteError,
    RequestInterruptedError as RequestInterruptedError,
    RunnerUnavailableError as RunnerUnavailableError,
    StaleEpochError as StaleEpochError,
    UnknownEntityTypeError as UnknownEntityTypeError,
)
from ._version import __version__ as __version__

__all__ = [
    "AlreadyProcessingError",
    "ClusterError",
    "ClusterInternalError",
    "ConfigError",
    "EntityAddress",
    "EntityDefinitionError",
    "EntityId",
    "EntityNotAssignedError",
    "MailboxFullError",
    "MalformedMessageError",
    "MessageTooLargeError",
    "PersistenceError",
    "RemoteError",
    "RequestInterruptedError",
    "RunnerAddress",
    "RunnerUnavailableError",
    "ShardId",
    "ShardingConfig",
    "StaleEpochError",
    "UnknownEntityTypeError",
]
