"""`WorkflowMetrics`: workflow metrics for ``/metrics`` (delivery part).

Two kinds, as Prometheus text (`WorkflowMetrics.render`):

* ``trio_cluster_workflows{workflow, status}``: the executions stored per
  workflow and status, read from storage at each scrape (cluster-wide:
  every runner reports the same), without decoding any journal (each is
  saved labelled with its status; see `._admin`);
* ``trio_cluster_workflow_step_seconds{workflow}``: a histogram of the
  attempts of steps run *on this runner*, and
  ``trio_cluster_workflow_step_failures_total{workflow}``, those that
  raised. An attempt is timed from its call to its return or exception
  (`run_step`); an attempt cut short by a cancellation is not counted.

One `WorkflowMetrics` per runner (`workflow_metrics`), as one event bus per
runner: steps find it through the runner they run on.
"""

from __future__ import annotations

import weakref
from collections import Counter
from typing import TYPE_CHECKING, TypeVar

import attrs
import trio

from trio_cluster import LatencySnapshot, Runner, current_entity_address, current_runner

from .._core._histogram import Histogram
from ._peers import TYPE_PREFIX

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["WorkflowMetrics", "WorkflowStatistics", "run_step", "workflow_metrics"]

A = TypeVar("A")
R = TypeVar("R")

COUNTS = "trio_cluster_workflows"
STEPS = "trio_cluster_workflow_step_seconds"
FAILURES = "trio_cluster_workflow_step_failures_total"

_metrics: weakref.WeakKeyDictionary[Runner, WorkflowMetrics] = (
    weakref.WeakKeyDictionary()
)


def workflow_metrics(runner: Runner) -> WorkflowMetrics:
    """The workflow metrics of ``runner`` (one per runner).

    Raises:
        TypeError: ``runner`` is not a `trio_cluster.Runner`.
    """
    if not isinstance(runner, Runner):
        raise TypeError(f"runner must be a trio_cluster.Runner, got {runner!r}")
    metrics = _metrics.get(runner)
    if metrics is None:
        metrics = _metrics[runner] = WorkflowMetrics(runner)
    return metrics


@attrs.frozen
class WorkflowStatistics:
    """This runner's step attempts at one instant."""

    step_latency: dict[str, LatencySnapshot]
    """Per workflow: the durations of step attempts run here (seconds)."""
    step_failures: dict[str, int]
    """Per workflow: step attempts run here that raised."""


class WorkflowMetrics:
    """One runner's workflow metrics (get it with `workflow_metrics`)."""

    def __init__(self, runner: Runner) -> None:
        self._runner = runner
        self._steps: dict[str, Histogram] = {}
        self._failures: Counter[str] = Counter()

    def observe_step(self, workflow: str, seconds: float, *, failed: bool) -> None:
        """Count one step attempt of ``workflow`` that took ``seconds``."""
        histogram = self._steps.get(workflow)
        if histogram is None:
            histogram = self._steps[workflow] = Histogram()
        histogram.observe(seconds)
        if failed:
            self._failures[workflow] += 1

    def statistics(self) -> WorkflowStatistics:
        """A snapshot of this runner's step attempts."""
        return WorkflowStatistics(
            step_latency={
                name: LatencySnapshot.of(h) for name, h in self._steps.items()
            },
            step_failures=dict(self._failures),
        )

    def steps_text(self) -> str:
        """The step metrics in the Prometheus text format."""
        stats = self.statistics()
        lines = _header(
            STEPS, "Durations of step attempts run on this runner.", "histogram"
        )
        for workflow, snapshot in sorted(stats.step_latency.items()):
            labels = {"workflow": workflow}
            for bound, count in snapshot.buckets:
                le = "+Inf" if bound == float("inf") else repr(bound)
                lines.append(_line(f"{STEPS}_bucket", count, {**labels, "le": le}))
            lines.append(_line(f"{STEPS}_sum", snapshot.total, labels))
            lines.append(_line(f"{STEPS}_count", snapshot.count, labels))
        lines += _header(
            FAILURES, "Step attempts run on this runner that raised.", "counter"
        )
        lines += [
            _line(
                FAILURES, stats.step_failures.get(workflow, 0), {"workflow": workflow}
            )
            for workflow in sorted(stats.step_latency)
        ]
        return "\n".join(lines) + "\n"

    async def counts_text(self) -> str:
        """The executions stored per workflow and status, in the Prometheus
        text format (read from storage).

        Raises:
            PersistenceError: storage failed.
            ConfigError: the runner's storage keeps no durable state.
        """
        from ._admin import WorkflowAdmin  # it imports the steps' module

        counts = await WorkflowAdmin(self._runner).counts()
        lines = _header(
            COUNTS,
            "Executions stored per workflow and status (cluster-wide: every"
            " runner reports the same).",
            "gauge",
        )
        lines += [
            _line(COUNTS, n, {"workflow": workflow, "status": status or "unknown"})
            for workflow, status, n in counts
        ]
        return "\n".join(lines) + "\n"

    async def render(self) -> str:
        """Both, for ``serve_metrics(extra_metrics=[...])``.

        Raises:
            PersistenceError: storage failed.
        """
        return await self.counts_text() + self.steps_text()


async def run_step(attempt: Callable[[], Awaitable[R]]) -> R:
    """``await attempt()``, one attempt of a step, timed into the metrics of
    the runner it runs on (for the workflow of the execution it runs in)."""
    started = trio.current_time()
    try:
        value = await attempt()
    except Exception:
        _observe(trio.current_time() - started, failed=True)
        raise
    _observe(trio.current_time() - started, failed=False)
    return value


def _observe(seconds: float, *, failed: bool) -> None:
    address = current_entity_address()
    if address is None or not address.entity_type.startswith(TYPE_PREFIX):
        return  # not in an execution (a replay in a test)
    workflow = address.entity_type.removeprefix(TYPE_PREFIX)
    workflow_metrics(current_runner()).observe_step(workflow, seconds, failed=failed)


def _header(name: str, help_text: str, kind: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def _line(name: str, value: float, labels: dict[str, str]) -> str:
    inner = ",".join(f'{key}="{_escape(text)}"' for key, text in sorted(labels.items()))
    return f"{name}{{{inner}}} {value}"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
