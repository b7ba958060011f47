"""``python -m benchmarks compare``: same-run comparisons of two versions of
the library (`benchmarks.compare`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import trio_cluster
from benchmarks._common import child_env
from benchmarks.compare import REPO, WORKTREE, compare, figures, summarize


def line(figure: str, value: float, mode: str = "direct") -> dict[str, object]:
    return {"workload": "W1", "figure": figure, "value": value, "mode": mode}


def test_figures_are_the_json_lines_with_a_value():
    output = "\n".join(
        [
            "W1 sequential: 1000 calls",
            '{"workload": "W1", "figure": "p50", "value": 12.5}',
            '{"not": "a figure"}',
            "{broken json",
            '  {"workload": "W1", "figure": "n", "value": 3}  ',
        ]
    )
    assert figures(output) == [
        {"workload": "W1", "figure": "p50", "value": 12.5},
        {"workload": "W1", "figure": "n", "value": 3},
    ]


def test_summarize_takes_medians_per_figure_and_side():
    runs = {
        "base": [
            [line("p50", 10), line("p50", 100, mode="serialized"), line("gone", 1)],
            [line("p50", 12), line("p50", 110, mode="serialized"), line("gone", 1)],
            [line("p50", 11), line("p50", 90, mode="serialized"), line("gone", 1)],
        ],
        "new": [
            [line("p50", 22), line("p50", 100, mode="serialized")],
            [line("p50", 20), line("p50", 100, mode="serialized")],
            [line("p50", 21), line("p50", 100, mode="serialized"), line("extra", 5)],
        ],
    }
    direct, serialized = summarize(runs)  # "gone" and "extra": one side only
    assert direct["mode"] == "direct"
    assert (direct["base"], direct["new"], direct["ratio"]) == (11, 21, 21 / 11)
    assert direct["base_values"] == [10, 12, 11]
    assert (serialized["base"], serialized["new"]) == (100, 100)
    assert serialized["ratio"] == 1.0
    assert "value" not in direct


def test_what_a_run_measures_does_not_split_a_figure():
    # W2's mixed figures say which fraction of the ids was local: it varies
    # from run to run, and the figure is still the same one.
    def mixed(value: float, local: float) -> dict[str, object]:
        return {**line("mixed_p50", value), "local_fraction": local}

    runs = {
        "base": [[mixed(10, 0.49)], [mixed(12, 0.51)]],
        "new": [[mixed(5, 0.5)], [mixed(7, 0.52)]],
    }
    [record] = summarize(runs)
    assert (record["base"], record["new"]) == (11, 6)
    assert "local_fraction" not in record


def test_a_zero_base_has_no_ratio():
    [record] = summarize({"base": [[line("errors", 0)]], "new": [[line("errors", 2)]]})
    assert record["ratio"] is None


@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")
def test_compare_runs_both_sides_in_turn(tmp_path: Path) -> None:
    # A repository of its own: one commit of the library and the scripts.
    repo = tmp_path / "repo"
    for part in ("trio_cluster", "benchmarks"):
        shutil.copytree(
            REPO / part, repo / part, ignore=shutil.ignore_patterns("__pycache__")
        )
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git[:3], "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "base"], check=True)
    base, new, records = compare(
        "HEAD", WORKTREE, "w1", runs=1, quick=True, timeout=300, repo=repo
    )
    assert len(base) >= 7
    assert new == "worktree"
    names = {(r["figure"], r["mode"]) for r in records}
    assert ("sequential_p50", "direct") in names
    for record in records:
        assert record["ratio"] is None or record["ratio"] > 0
        assert len(record["base_values"]) == len(record["new_values"]) == 1
    with pytest.raises(SystemExit, match="is not a commit"):
        compare("no-such-revision", WORKTREE, "w1", runs=1, quick=True, repo=repo)


def test_a_benchmark_child_imports_the_parents_library_not_its_directorys(
    tmp_path: Path,
) -> None:
    """A child started where another ``trio_cluster`` lies (a checkout)
    imports the one its parent imported (`child_env`)."""
    decoy = tmp_path / "trio_cluster"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise ImportError('the decoy')\n")
    command = [sys.executable, "-m", "trio_cluster", "--help"]
    done = subprocess.run(command, cwd=tmp_path, env=child_env(), capture_output=True)
    assert done.returncode == 0, done.stderr
    assert b"the decoy" not in done.stderr
    plain = subprocess.run(command, cwd=tmp_path, capture_output=True)
    assert b"the decoy" in plain.stderr  # what it guards against
    assert child_env()["PYTHONPATH"].startswith(
        str(Path(trio_cluster.__file__).parent.parent)
    )
