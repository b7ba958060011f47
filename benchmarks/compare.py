"""``python -m benchmarks compare REV``: one workload, two versions of the
library, in the same run.

Absolute figures move by a factor of three between runs of these shared
machines, so a claim about speed is a ratio measured in one run. This runs
the workload alternately against the library at ``REV`` (the base) and at
``--new`` (default: the working tree), ``--runs`` times each, with the same
benchmark scripts (the working tree's ``benchmarks/``), and prints one JSON
line per figure: both medians, the ratio new/base and every value. A summary
table goes to stderr.

Each side is a copy of its ``trio_cluster`` package (``git archive``, or the
working tree's files) in a temporary directory put first on ``PYTHONPATH``,
so an installed or editable ``trio_cluster`` is not what runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORKTREE = "WORKTREE"
"""``--new`` value for the files as they are now (committed or not)."""

Key = tuple[tuple[str, Any], ...]
"""A figure's identity: its JSON fields but those a run measures."""


MEASURED = frozenset({"value", "local_fraction"})
"""Fields a run measures, which differ between runs of one figure (W2's
mixed figures say which fraction of the ids was local in that run)."""


def figure_key(line: Mapping[str, Any]) -> Key:
    """What identifies a figure across runs: every field but those of
    `MEASURED`."""
    return tuple(sorted((k, v) for k, v in line.items() if k not in MEASURED))


def figures(output: str) -> list[dict[str, Any]]:
    """The JSON figures a benchmark printed (lines that are JSON objects
    with a ``value``); other lines are ignored."""
    found = []
    for line in output.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and isinstance(value.get("value"), int | float):
            found.append(value)
    return found


def summarize(
    runs: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]],
) -> list[dict[str, Any]]:
    """Per figure, the median of each side and the ratio new/base.

    Args:
        runs: ``{"base": [figures of run 1, ...], "new": [...]}``.

    Returns:
        One record per figure both sides reported, in the order the base
        reported them: the figure's fields, ``base`` and ``new`` (medians),
        ``ratio`` (new / base; None if the base median is 0) and
        ``base_values``/``new_values``.
    """
    values: dict[str, dict[Key, list[float]]] = {
        side: defaultdict(list) for side in ("base", "new")
    }
    order: dict[Key, Mapping[str, Any]] = {}
    for side in ("base", "new"):
        for run in runs.get(side, ()):
            for line in run:
                key = figure_key(line)
                values[side][key].append(float(line["value"]))
                if side == "base":
                    order.setdefault(key, line)
    records = []
    for key, line in order.items():
        new = values["new"].get(key)
        if not new:
            continue
        base_median = statistics.median(values["base"][key])
        new_median = statistics.median(new)
        record = {k: v for k, v in line.items() if k not in MEASURED}
        record.update(
            base=base_median,
            new=new_median,
            ratio=None if base_median == 0 else new_median / base_median,
            base_values=values["base"][key],
            new_values=new,
        )
        records.append(record)
    return records


def extract(revision: str, into: Path, repo: Path = REPO) -> str:
    """Put ``trio_cluster`` as it is at ``revision`` (or the working tree's,
    for `WORKTREE`) in ``into``; return a label for it (the short commit).

    Raises:
        SystemExit: ``revision`` is no commit of ``repo``.
    """
    into.mkdir(parents=True)
    if revision == WORKTREE:
        shutil.copytree(
            repo / "trio_cluster",
            into / "trio_cluster",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        return WORKTREE.lower()
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", f"{revision}^{{commit}}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except subprocess.CalledProcessError as exc:
        message = f"compare: {revision!r} is not a commit: {exc.stderr.strip()}"
        raise SystemExit(message) from None
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", commit, "trio_cluster"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return commit


def run_once(
    workdir: Path,
    side: Path,
    workload: str,
    quick: bool,
    timeout: float,
    options: Sequence[str] = (),
    log: Path | None = None,
) -> list[dict[str, Any]]:
    """Run ``python -m benchmarks WORKLOAD [OPTIONS]`` once with ``side``
    first on the path; return its figures. Its stderr (progress lines) is
    written to ``log``, if given.

    Raises:
        SystemExit: the benchmark failed (its stderr is shown).
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(side), str(workdir)]))
    command = [sys.executable, "-m", "benchmarks", workload]
    if quick:
        command.append("--quick")
    command += options
    done = subprocess.run(
        command,
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if log is not None:
        log.write_text(done.stderr)
    if done.returncode != 0:
        raise SystemExit(
            f"compare: {' '.join(command[2:])} failed with {side.name}:\n{done.stderr}"
        )
    return figures(done.stdout)


def compare(
    base: str,
    new: str,
    workload: str,
    *,
    runs: int,
    quick: bool = False,
    timeout: float = 1800.0,
    repo: Path = REPO,
    options: Sequence[str] = (),
    logs: Path | None = None,
) -> tuple[str, str, list[dict[str, Any]]]:
    """Run ``workload`` ``runs`` times against each side, alternating;
    return the labels of both sides and `summarize`'s records. ``options``
    go to every run's command line (e.g. ``--under-load``); with ``logs``
    (a directory), each run's stderr is kept there as ``base-1.log``,
    ``new-1.log``..."""
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as temp:
        workdir = Path(temp)
        shutil.copytree(
            repo / "benchmarks",
            workdir / "benchmarks",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        sides = {"base": workdir / "base", "new": workdir / "new"}
        labels = {
            "base": extract(base, sides["base"], repo),
            "new": extract(new, sides["new"], repo),
        }
        results: dict[str, list[list[dict[str, Any]]]] = {"base": [], "new": []}
        if logs is not None:
            logs.mkdir(parents=True, exist_ok=True)
        for number in range(1, runs + 1):
            for side in ("base", "new"):
                log = None if logs is None else logs / f"{side}-{number}.log"
                results[side].append(
                    run_once(
                        workdir, sides[side], workload, quick, timeout, options, log
                    )
                )
    return labels["base"], labels["new"], summarize(results)


def _table(records: Iterable[Mapping[str, Any]]) -> str:
    lines = [f"{'figure':44} {'base':>12} {'new':>12} {'ratio':>7}"]
    for record in records:
        name = " ".join(
            str(record[k]) for k in ("workload", "figure", "mode") if k in record
        )
        ratio = "-" if record["ratio"] is None else f"{record['ratio']:.3f}"
        lines.append(
            f"{name[:44]:44} {record['base']:12.2f} {record['new']:12.2f} {ratio:>7}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks compare",
        description="Run a workload against two versions of the library, in turn.",
    )
    parser.add_argument("base", help="the base revision (a commit, tag or branch)")
    parser.add_argument(
        "--new",
        default=WORKTREE,
        help=f"the other side: a revision, or {WORKTREE} (default: the files as"
        " they are now)",
    )
    parser.add_argument("--workload", default="w1", help="w1..w5 (default w1)")
    parser.add_argument("--runs", type=int, default=3, help="runs per side (3)")
    parser.add_argument("--quick", action="store_true", help="smaller runs")
    parser.add_argument(
        "--under-load",
        action="store_true",
        help="w4: one core kept busy by an unrelated process during each run",
    )
    parser.add_argument(
        "--logs",
        type=Path,
        help="keep each run's progress lines (stderr) in this directory",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    base, new, records = compare(
        args.base,
        args.new,
        args.workload,
        runs=args.runs,
        quick=args.quick,
        options=["--under-load"] if args.under_load else [],
        logs=args.logs,
    )
    for record in records:
        print(
            json.dumps({"base_rev": base, "new_rev": new, "runs": args.runs, **record})
        )
    print(
        f"{args.workload}: {new} against {base}, {args.runs} run(s) each, medians",
        file=sys.stderr,
    )
    print(_table(records), file=sys.stderr)
