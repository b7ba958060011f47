"""The layers of `trio_cluster`, read from its import graph.

Every ``import`` of every module is read with `ast` (nothing is imported):
module-level imports, lazy ones (inside a function) and ``TYPE_CHECKING``
ones alike, relative imports resolved. The rules:

* `trio_cluster._core` is sans-IO: it imports no I/O library, no clock, no
  randomness, and nothing of the package but `trio_cluster._errors`;
* the edges (`trio_cluster.storage`, `trio_cluster.transport`) never import
  the engine, the runner or the declarative API;
* the engine, the runner and the declarative API never import
  `trio_cluster.testing`;
* the libpq driver imports nothing of the cluster but `_errors` and `_core`;
* the PostgreSQL backend never imports the memory backend;
* no import circle spans more than one module of the runtime.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

PACKAGE = Path(__file__).parent.parent / "trio_cluster"
CORE = PACKAGE / "_core"
FORBIDDEN = {
    "trio",
    "psycopg",
    "trio_websocket",
    "msgpack",
    "time",
    "random",
    "asyncio",
    "socket",
    "os",
}
# Modules outside _core that _core may import (they import no I/O either).
ALLOWED_PARENT_MODULES = {"_errors"}

API = tuple(
    f"trio_cluster.{name}"
    for name in (
        "_entity",
        "_handlers",
        "_durable",
        "_fsm",
        "_fsm_checks",
        "_fsm_records",
        "_client",
        "_registry",
        "_singletons",
        "_cron",
        "_broadcast",
    )
)
"""The declarative API: what users write entities against."""
ENGINE = ("trio_cluster._engine", "trio_cluster._runner", *API)
"""The engine, its façade and the declarative API."""
RUNTIME = (*ENGINE, "trio_cluster._context", "trio_cluster._operations")
"""No import circle may span two of these (type-only imports counted)."""


class Import(NamedTuple):
    importer: str
    imported: str
    kind: str
    """``runtime`` (module level), ``lazy`` (in a function) or ``type``
    (under ``if TYPE_CHECKING:``)."""
    line: int

    def __str__(self) -> str:
        return (
            f"{self.importer} imports {self.imported} ({self.kind}, line {self.line})"
        )


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts).removesuffix(".__init__")


def package_modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def imports_in(
    path: Path, module: str, known: Callable[[str], bool] = lambda _: False
) -> Iterator[Import]:
    """Every import in the file at ``path`` (module ``module``), resolved to
    absolute module names; ``from package import module`` names the module
    when ``known(name)`` says it is one."""
    tree = ast.parse(path.read_text(), filename=str(path))
    type_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for statement in node.body
        for inner in ast.walk(statement)
    }
    lazy = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for inner in ast.walk(node)
        if inner is not node
    }
    package = (
        module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    )
    for node in ast.walk(tree):
        kind = (
            "type"
            if id(node) in type_only
            else "lazy"
            if id(node) in lazy
            else "runtime"
        )
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, kind, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                yield Import(
                    module, submodule if known(submodule) else target, kind, node.lineno
                )


def package_imports() -> list[Import]:
    """Every import of trio_cluster by trio_cluster, once per line and target."""
    modules = package_modules()
    found = [
        found
        for module, path in modules.items()
        for found in imports_in(path, module, modules.__contains__)
        if found.imported.split(".")[0] == "trio_cluster"
    ]
    return list(dict.fromkeys(found))


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(
        module == prefix or module.startswith(prefix + ".") for prefix in prefixes
    )


# ----------------------------------------------------------------------
# _core is sans-IO


def core_modules() -> list[Path]:
    return sorted(CORE.glob("*.py"))


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(module, relative level) for every import statement in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level))
    return found


def test_there_are_core_modules():
    assert len(core_modules()) >= 8


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: p.name)
def test_core_module_imports_no_io(path: Path) -> None:
    for module, level in imports_of(path):
        top = module.split(".")[0]
        if level == 0:
            assert top not in FORBIDDEN, f"{path.name} imports {module}"
            assert top != "trio_cluster", (
                f"{path.name} must use relative imports within _core"
            )
        elif level == 2:
            assert top in ALLOWED_PARENT_MODULES, (
                f"{path.name} imports ..{module} (outside _core)"
            )
        else:
            assert level == 1, f"{path.name}: unexpected relative import level {level}"


CLOCK_CALLS = ("datetime.now", ".now", "utcnow", "time.time", "monotonic")


def clock_reads(path: Path) -> list[str]:
    """Calls in the file that read the clock (a call, not a mention in a string)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        f"{ast.unparse(node.func)}(...) on line {node.lineno}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and any(
            f".{ast.unparse(node.func)}".endswith(call if "." in call else f".{call}")
            for call in CLOCK_CALLS
        )
    ]


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: p.name)
def test_core_module_reads_no_clock(path: Path) -> None:
    reads = clock_reads(path)
    assert not reads, f"{path.name} reads the clock with {reads}"


def parent_module_files(name: str) -> list[Path]:
    """The files of a module outside _core: ``name.py``, or its package's
    ``__init__.py``."""
    path = CORE.parent / f"{name}.py"
    return [path if path.exists() else CORE.parent / name / "__init__.py"]


def test_allowed_parent_modules_are_io_free_too():
    for name in ALLOWED_PARENT_MODULES:
        for path in parent_module_files(name):
            for module, level in imports_of(path):
                assert level != 0 or module.split(".")[0] not in FORBIDDEN, (
                    f"{name} imports {module}"
                )


def test_the_check_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "_bad.py"
    bad.write_text(
        "from __future__ import annotations\nimport trio\nfrom time import monotonic\n"
    )
    offending = [
        m for m, level in imports_of(bad) if level == 0 and m.split(".")[0] in FORBIDDEN
    ]
    assert offending == ["trio", "time"]
    bad.write_text(
        "import datetime\nMESSAGE = 'use datetime.now(UTC)'\nNOW = datetime.datetime.now()\n"
    )
    assert clock_reads(bad) == ["datetime.datetime.now(...) on line 3"]


# ----------------------------------------------------------------------
# Layer rules over the whole package


class Rule(NamedTuple):
    importers: tuple[str, ...]
    """The rule applies to imports made by these modules (and their submodules)."""
    allowed: Callable[[str], bool]
    """Whether an importer may import this module of trio_cluster."""
    why: str


RULES = {
    "core-imports-only-errors": Rule(
        ("trio_cluster._core",),
        lambda imported: within(
            imported, ("trio_cluster._core", "trio_cluster._errors")
        ),
        "_core is sans-IO and imports nothing of trio_cluster but _errors",
    ),
    "edges-never-import-the-engine": Rule(
        ("trio_cluster.storage", "trio_cluster.transport"),
        lambda imported: not within(imported, ENGINE),
        "storage and transport are edges below the engine and the declarative API",
    ),
    "transport-never-imports-storage": Rule(
        ("trio_cluster.transport",),
        lambda imported: not within(imported, ("trio_cluster.storage",)),
        "the two edges are independent",
    ),
    "engine-never-imports-testing": Rule(
        ENGINE,
        lambda imported: not within(imported, ("trio_cluster.testing",)),
        "the runtime must not depend on the test support built on it",
    ),
    "driver-imports-only-errors-and-core": Rule(
        ("trio_cluster.storage._postgres._driver",),
        lambda imported: within(
            imported,
            (
                "trio_cluster._errors",
                "trio_cluster._core",
                "trio_cluster.storage._postgres._driver",
            ),
        ),
        "the libpq driver knows nothing of the cluster",
    ),
    "simulator-uses-only-public-seams": Rule(
        ("trio_cluster.testing._simulation",),
        lambda imported: (
            imported
            in (
                "trio_cluster",
                "trio_cluster.abc",
                "trio_cluster.storage",
                "trio_cluster.transport",
                "trio_cluster.testing",
                # Pure helpers with no state of a runner: the core's backoff,
                # the exception-group helper, and the envelope kinds the trace
                # names frames by.
                "trio_cluster._groups",
                "trio_cluster._engine._wire",
            )
            or within(
                imported, ("trio_cluster._core", "trio_cluster.testing._simulation")
            )
        ),
        "the simulator observes runners through the public seam only"
        " (RunnerListener, the Runner's views), so an engine refactoring cannot"
        " blind its invariants",
    ),
    "delivery-parts-use-only-public-seams": Rule(
        (
            "trio_cluster.queues",
            "trio_cluster.events",
            "trio_cluster.webhooks",
            "trio_cluster.workflows",
        ),
        lambda imported: (
            imported
            in ("trio_cluster", "trio_cluster.abc", "trio_cluster.serialization")
            or within(
                imported,
                (
                    "trio_cluster._core",
                    "trio_cluster.queues",
                    "trio_cluster.events",
                    "trio_cluster.webhooks",
                    "trio_cluster.workflows",
                ),
            )
        ),
        "the delivery parts (queues, events, webhooks, workflows) stand on the runtime's"
        " public API, so the engine can change under them",
    ),
    "gateway-uses-only-public-seams": Rule(
        ("trio_cluster.gateway",),
        lambda imported: (
            imported in ("trio_cluster", "trio_cluster.abc")
            or within(
                imported,
                (
                    "trio_cluster._core",
                    "trio_cluster.gateway",
                    # The bridge from the event bus (a delivery part on the
                    # public API itself).
                    "trio_cluster.events",
                    # The declarative API (entity classes, handler specs and
                    # their codecs), errors, log limits and serialization:
                    # contracts, never the engine.
                    "trio_cluster._entity",
                    "trio_cluster._handlers",
                    "trio_cluster._registry",
                    "trio_cluster._errors",
                    "trio_cluster._log_limit",
                    "trio_cluster._metadata",
                    "trio_cluster.serialization",
                    # Code of the WebSocket edge it reuses (admission, close
                    # helpers), never its wire.
                    "trio_cluster.transport._ws_admission",
                    "trio_cluster.transport._ws_connection",
                    "trio_cluster.transport._ws_handshake",
                    "trio_cluster.transport._ws_outbox",
                    "trio_cluster.transport._ws_tap",
                    # Type-only: what `runner.client` returns, the façade.
                    "trio_cluster._client",
                    "trio_cluster._runner",
                ),
            )
        ),
        "the realtime gateway stands on the runtime's public API and its"
        " contracts, so the engine can change under it",
    ),
    "postgres-never-imports-memory": Rule(
        ("trio_cluster.storage._postgres",),
        lambda imported: not within(imported, ("trio_cluster.storage._memory",)),
        "the PostgreSQL backend does not depend on the memory backend",
    ),
}


def violations(rule: Rule, imports: list[Import]) -> list[str]:
    return [
        f"{found}: {rule.why}"
        for found in imports
        if within(found.importer, rule.importers) and not rule.allowed(found.imported)
    ]


@pytest.mark.parametrize("name", RULES)
def test_layer_rule(name: str) -> None:
    rule = RULES[name]
    imports = package_imports()
    assert any(within(found.importer, rule.importers) for found in imports), (
        f"no module matches {rule.importers}: the rule checks nothing"
    )
    problems = violations(rule, imports)
    assert not problems, "\n".join(problems)


def test_imports_are_resolved_and_classified(tmp_path: Path) -> None:
    package = tmp_path / "trio_cluster"
    (package / "_engine").mkdir(parents=True)
    (package / "_engine" / "_x.py").write_text(
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "from .. import _errors\n"
        "from .._core._ring import Ring\n"
        "if TYPE_CHECKING:\n"
        "    from .._runner import Runner\n"
        "def f():\n"
        "    from ..testing import run_scenario\n"
    )
    path = package / "_engine" / "_x.py"
    found = [
        (i.imported, i.kind)
        for i in imports_in(
            path, module_name(path, package), "trio_cluster._errors".__eq__
        )
        if i.imported.startswith("trio_cluster")
    ]
    assert found == [
        ("trio_cluster._errors", "runtime"),
        ("trio_cluster._core._ring", "runtime"),
        ("trio_cluster._runner", "type"),
        ("trio_cluster.testing", "lazy"),
    ]
    [problem] = violations(
        RULES["engine-never-imports-testing"],
        [
            Import(module_name(path, package), imported, kind, 0)
            for imported, kind in found
        ],
    )
    assert problem.startswith(
        "trio_cluster._engine._x imports trio_cluster.testing (lazy, line 0)"
    )


# ----------------------------------------------------------------------
# Import circles


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one member."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_strongly_connected_components():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]


def test_no_import_circle_spans_two_runtime_modules():
    imports = [found for found in package_imports() if found.importer != found.imported]
    graph: dict[str, set[str]] = {}
    for found in imports:
        graph.setdefault(found.importer, set()).add(found.imported)
    report = []
    for component in strongly_connected(graph):
        if sum(within(member, RUNTIME) for member in component) > 1:
            members = set(component)
            report.append(f"{len(component)} modules: {' '.join(component)}")
            report.extend(
                f"    {found}"
                for found in imports
                if found.importer in members and found.imported in members
            )
    assert not report, "import circles (type-only imports counted):\n" + "\n".join(
        report
    )
