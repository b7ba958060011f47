"""`trio_cluster._core` is sans-IO: it imports no I/O library, no clock, no randomness."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).parent.parent.parent / "trio_cluster" / "_core"
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


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: p.name)
def test_core_module_reads_no_clock(path: Path) -> None:
    source = path.read_text()
    for call in ("datetime.now(", ".now(", "utcnow(", "time.time(", "monotonic("):
        assert call not in source, f"{path.name} reads the clock with {call}"


def test_allowed_parent_modules_are_io_free_too():
    for name in ALLOWED_PARENT_MODULES:
        path = CORE.parent / f"{name}.py"
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
