"""`fixup_module_metadata`: public names report their public module (API helper).

Implementation modules are private (``trio_cluster._runner``), but users should
see the public path in tracebacks, reprs, docs and IDEs
(``trio_cluster.Runner``). Each public namespace calls this on its exports, as
trio does in ``trio/__init__.py``. Only names defined inside trio_cluster are
touched; the qualified names of methods and nested classes follow.
"""

from __future__ import annotations

from typing import Any

__all__ = ["fixup_module_metadata", "fixup_name"]


def fixup_module_metadata(module_name: str, namespace: dict[str, Any]) -> None:
    """Set ``__module__`` of every name in ``namespace["__all__"]`` that was
    defined in a private trio_cluster module to ``module_name``."""
    for name in namespace["__all__"]:
        fixup_name(module_name, name, namespace[name])


def fixup_name(module_name: str, name: str, obj: Any) -> None:
    """`fixup_module_metadata` for one public name (lazy namespaces)."""
    seen: set[int] = set()

    def fix(qualname: str, obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        module = getattr(obj, "__module__", None)
        if not isinstance(module, str) or not module.startswith("trio_cluster."):
            return
        if "._" not in f".{module.removeprefix('trio_cluster.')}":
            return  # already public
        obj.__module__ = module_name
        if isinstance(obj, type):
            obj.__qualname__ = qualname
            for attribute, value in vars(obj).items():
                if isinstance(value, type) or callable(value):
                    fix(f"{qualname}.{attribute}", value)

    if isinstance(obj, type) or callable(obj):
        fix(name, obj)
