"""Storage backends for trio_cluster (public namespace).

`MemoryStorage` keeps everything in process memory: for tests, the simulator,
the demo, and several runners in one process. `PostgresStorage` keeps them
in a PostgreSQL database (``PostgresStorage(dsn)``), `migrate` creates or upgrades
its tables (what ``trio-cluster migrate`` runs), and `cluster_status` reads a
cluster's runners, shard map and backlog from it (``trio-cluster status``).
The contract every backend implements is `trio_cluster.abc.Storage`.
"""

from __future__ import annotations

from .._metadata import fixup_module_metadata
from ._memory._storage import MemoryStorage as MemoryStorage
from ._postgres._schema import migrate as migrate
from ._postgres._status import ClusterStatus as ClusterStatus
from ._postgres._storage import (
    PostgresStorage as PostgresStorage,
    cluster_status as cluster_status,
)

__all__ = [
    "ClusterStatus",
    "MemoryStorage",
    "PostgresStorage",
    "cluster_status",
    "migrate",
]

fixup_module_metadata(__name__, globals())
del fixup_module_metadata
