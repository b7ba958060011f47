"""`WorkflowHistory`: an execution's journal, exported (delivery part).

`WorkflowHandle.history` fetches an execution's committed journal; keep it
(``to_bytes``) as a test fixture and replay it against today's code with
`trio_cluster.testing.replay_workflow`, before deploying a change, to see
whether running executions would still replay.
"""

from __future__ import annotations

from typing import Any

import attrs
import msgpack

from trio_cluster import MalformedMessageError
from trio_cluster.serialization import make_converter

from ._records import Journal

__all__ = ["WorkflowHistory"]

_FORMAT = 1
"""The version of the ``to_bytes`` format."""


@attrs.frozen
class WorkflowHistory:
    """One execution's journal, as committed when it was fetched."""

    workflow: str
    """The workflow's name."""
    execution_id: str
    journal: Journal
    """Its journal: the recorded operations (`Journal.entries`, each an
    `Entry` at its position) and its status."""

    def to_bytes(self) -> bytes:
        """The history as bytes (msgpack), for `from_bytes`."""
        converter = make_converter()
        body = {
            "format": _FORMAT,
            "workflow": self.workflow,
            "execution_id": self.execution_id,
            "journal": converter.unstructure(self.journal, Journal),
        }
        return msgpack.packb(body)  # type: ignore[no-any-return]

    @classmethod
    def from_bytes(cls, data: bytes) -> WorkflowHistory:
        """The history ``to_bytes`` made.

        Raises:
            MalformedMessageError: ``data`` is not one (or of a newer format).
        """
        try:
            body: Any = msgpack.unpackb(data)
            if not isinstance(body, dict) or body.get("format") != _FORMAT:
                raise ValueError(f"not a workflow history of format {_FORMAT}")
            journal = make_converter().structure(body["journal"], Journal)
            return cls(str(body["workflow"]), str(body["execution_id"]), journal)
        except Exception as exc:
            raise MalformedMessageError(
                what="workflow history", problems=[f"{type(exc).__name__}: {exc}"]
            ) from exc
