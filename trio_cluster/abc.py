"""Abstract base classes for trio_cluster's pluggable edges.

Implement `Storage` (with its `MessageStorage` and `RunnerStorage` services) to
add a storage backend, and run `trio_cluster.testing.StorageConformance`
against it. Implement `Transport` (with its `Endpoint`) to add a way for
runners to reach each other. Implement `Tracer` to make spans of calls.
"""

from __future__ import annotations

from ._listener import RunnerListener as RunnerListener
from ._metadata import fixup_module_metadata
from ._storage_abc import (
    ClaimBatch as ClaimBatch,
    ClaimedRequest as ClaimedRequest,
    MessagesAvailable as MessagesAvailable,
    MessageStorage as MessageStorage,
    Notification as Notification,
    NotificationsMissed as NotificationsMissed,
    PersistedRequest as PersistedRequest,
    RepliesAvailable as RepliesAvailable,
    ReplyOutcome as ReplyOutcome,
    ReplyQuery as ReplyQuery,
    ReplyRecord as ReplyRecord,
    RequestsInterrupted as RequestsInterrupted,
    RunnerInfo as RunnerInfo,
    RunnersChanged as RunnersChanged,
    RunnerStorage as RunnerStorage,
    SaveResult as SaveResult,
    ShardOwner as ShardOwner,
    Storage as Storage,
    StorageSession as StorageSession,
    StorageTransaction as StorageTransaction,
    StoredChunk as StoredChunk,
    StoredReplies as StoredReplies,
    StoredRequest as StoredRequest,
    UnreadableRequest as UnreadableRequest,
)
from ._storage_events import (
    CursorAdvance as CursorAdvance,
    CursorOutcome as CursorOutcome,
    EventRecord as EventRecord,
    EventStorage as EventStorage,
    PartitionPosition as PartitionPosition,
    StoredEvent as StoredEvent,
)
from ._storage_retries import (
    DeadLetterStorage as DeadLetterStorage,
    RetryRecord as RetryRecord,
)
from ._storage_state import (
    ListedState as ListedState,
    StateCount as StateCount,
    StateOutcome as StateOutcome,
    StateQuery as StateQuery,
    StateStorage as StateStorage,
    StateWrite as StateWrite,
    StoredState as StoredState,
)
from ._storage_webhooks import (
    AttemptRecord as AttemptRecord,
    EndpointRecord as EndpointRecord,
    WebhookStorage as WebhookStorage,
    WebhookStorageProvider as WebhookStorageProvider,
)
from ._tracing import (
    TracedCall as TracedCall,
    Tracer as Tracer,
    TraceSpan as TraceSpan,
)
from ._transport_abc import (
    Endpoint as Endpoint,
    EndpointHandler as EndpointHandler,
    Envelope as Envelope,
    Transport as Transport,
)

__all__ = [
    "AttemptRecord",
    "ClaimBatch",
    "ClaimedRequest",
    "CursorAdvance",
    "CursorOutcome",
    "DeadLetterStorage",
    "Endpoint",
    "EndpointHandler",
    "EndpointRecord",
    "Envelope",
    "EventRecord",
    "EventStorage",
    "ListedState",
    "MessageStorage",
    "MessagesAvailable",
    "Notification",
    "NotificationsMissed",
    "PartitionPosition",
    "PersistedRequest",
    "RepliesAvailable",
    "ReplyOutcome",
    "ReplyQuery",
    "ReplyRecord",
    "RequestsInterrupted",
    "RetryRecord",
    "RunnerInfo",
    "RunnerListener",
    "RunnerStorage",
    "RunnersChanged",
    "SaveResult",
    "ShardOwner",
    "StateCount",
    "StateOutcome",
    "StateQuery",
    "StateStorage",
    "StateWrite",
    "Storage",
    "StorageSession",
    "StorageTransaction",
    "StoredChunk",
    "StoredEvent",
    "StoredReplies",
    "StoredRequest",
    "StoredState",
    "TraceSpan",
    "TracedCall",
    "Tracer",
    "Transport",
    "UnreadableRequest",
    "WebhookStorage",
    "WebhookStorageProvider",
]

fixup_module_metadata(__name__, globals())
del fixup_module_metadata
