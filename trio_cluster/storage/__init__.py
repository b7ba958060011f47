"""Storage backends for trio_cluster (public namespace).

`MemoryStorage` keeps everything in process memory: for tests, the simulator,
the demo, and several runners in one process. The contract every backend
implements is `trio_cluster.abc.Storage`.
"""

from __future__ import annotations

from ._memory import MemoryStorage as MemoryStorage

__all__ = ["MemoryStorage"]
