"""`RunnerClosedError`: the one error that is also a Trio resource error.

It subclasses `trio.ClosedResourceError` ("you closed it", as trio means it),
so it cannot live in the I/O-free ``trio_cluster._errors`` that the sans-IO
core imports.
"""

from __future__ import annotations

import trio

from . import ClusterError

__all__ = ["RunnerClosedError"]


class RunnerClosedError(ClusterError, trio.ClosedResourceError):
    """The runner is shut down (or shutting down): it takes no more calls."""


RunnerClosedError.__module__ = "trio_cluster"
