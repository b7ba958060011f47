"""Structured logs: runner, shard and entity context on every record.

trio_cluster logs through the standard `logging` module under the
``trio_cluster`` logger. `ContextFilter` adds three attributes to each
record, read from the current Trio task's context (never from globals, so
several runners can share a process):

* ``runner``: the address of the runner whose task logged;
* ``entity``: the address of the entity whose handler was running;
* ``shard``: that entity's shard (or the shard named by the log call).

Attributes passed explicitly (``extra={"shard": ...}``) win. `JsonFormatter`
renders one JSON object per line, for log shippers::

    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter())
    logging.getLogger("trio_cluster").addHandler(handler)

``trio-cluster run --log-format json`` does exactly this.
"""

from __future__ import annotations

import json
import logging
from typing import Final

from ._context import current_entity_var, current_runner_var

__all__ = ["ContextFilter", "JsonFormatter"]

_CONTEXT: Final = ("runner", "shard", "entity")


class ContextFilter(logging.Filter):
    """Adds ``runner``, ``shard`` and ``entity`` to every record it sees
    (empty strings outside a runner or handler). It never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "runner", ""):
            runner = current_runner_var.get(None)
            record.runner = "" if runner is None else str(runner.address)
        entity = current_entity_var.get()
        if not getattr(record, "entity", ""):
            record.entity = "" if entity is None else str(entity.address)
        if not getattr(record, "shard", ""):
            record.shard = "" if entity is None else str(entity.address.shard)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the
    context attributes that are set, and the formatted exception if any."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _CONTEXT:
            value = getattr(record, name, "")
            if value:
                document[name] = str(value)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)
