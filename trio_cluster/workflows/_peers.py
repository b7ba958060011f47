"""Reaching other workflows' executions by workflow name (delivery part).

A child tells its parent when it ends, and a compensating parent interrupts
its running children: each knows the other's workflow only by name (it is
what the journal records). A runner addresses an entity through a class
with its ``type_name``; a runner refuses two classes of one type name, so
the class must be the one the runner already knows, if any. `remember`
keeps the entity classes of the workflows defined in this process, by name;
`execution_of` tries them, newest first, then a send-only stand-in (the
handlers of every workflow's entity are the same).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from trio_cluster import EntityDefinitionError

if TYPE_CHECKING:
    from trio_cluster import Entity, Runner

__all__ = ["TYPE_PREFIX", "entity_type_name", "execution_of", "remember"]

_CLASSES: dict[str, list[weakref.ref[type[Entity]]]] = {}
_STAND_INS: dict[tuple[str, str], type[Entity]] = {}


TYPE_PREFIX = "trio_cluster.workflow."
"""The entity types of executions: this, then the workflow's name."""


def entity_type_name(workflow: str) -> str:
    """The type name of a workflow's entity."""
    return TYPE_PREFIX + workflow


def remember(workflow: str, cls: type[Entity]) -> None:
    """Keep ``cls`` as an entity class of the workflow ``workflow``."""
    refs = [ref for ref in _CLASSES.get(workflow, ()) if ref() is not None]
    refs.append(weakref.ref(cls))
    _CLASSES[workflow] = refs


def execution_of(
    runner: Runner,
    workflow: str,
    execution_id: str,
    *,
    base: type[Entity],
    shard_group: str | None = None,
) -> Any:
    """A handle on the execution ``execution_id`` of the workflow
    ``workflow`` (``base``: the entity base class, and ``shard_group`` the
    workflow's, for a stand-in; None: take it from a known class)."""
    candidates = [cls for ref in reversed(_CLASSES.get(workflow, ())) if (cls := ref())]
    for cls in candidates:
        try:
            return runner.client(cls)(execution_id)
        except EntityDefinitionError:
            continue  # the runner knows another class of that name
    group = shard_group or "default"
    stand_in = _STAND_INS.get((workflow, group))
    if stand_in is None:
        name = f"Workflow_{workflow.replace('.', '_').replace('-', '_')}_ref"
        stand_in = type(
            name,
            (base,),
            {
                "type_name": entity_type_name(workflow),
                "shard_group": group,
                "__module__": __name__,
            },
        )
        _STAND_INS[workflow, group] = stand_in
    return runner.client(stand_in)(execution_id)
