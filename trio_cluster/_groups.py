"""Exception groups at the public edge (Trio driver)."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = ["unwrap_single"]


@asynccontextmanager
async def unwrap_single() -> AsyncIterator[None]:
    """Re-raise a lone exception out of (nested) exception groups as itself,
    so a block that opens a nursery raises what its body raised. Groups of
    several exceptions propagate unchanged."""
    try:
        yield
    except BaseExceptionGroup as group:
        exc: BaseException = group
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if exc is group:
            raise
        raise exc from exc.__cause__
