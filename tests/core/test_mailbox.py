"""Mailbox accounting: FIFO admission under a concurrency limit."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from trio_cluster import ClusterInternalError
from trio_cluster._core._mailbox import Admission, Mailbox


def test_first_job_runs_then_others_queue_in_order():
    box: Mailbox[str] = Mailbox(capacity=3, concurrency=1)
    assert box.idle
    assert box.offer("a") is Admission.RUN
    assert box.offer("b") is Admission.QUEUED
    assert box.offer("c") is Admission.QUEUED
    assert (box.running, box.queued, box.depth) == (1, 2, 3)
    assert box.offer("d") is Admission.FULL
    assert box.offer("d", force=True) is Admission.QUEUED
    assert box.release() == "b"
    assert box.release() == "c"
    assert box.release() == "d"
    assert box.release() is None
    assert box.idle


def test_late_arrival_cannot_overtake_the_queue():
    box: Mailbox[str] = Mailbox(capacity=10, concurrency=2)
    assert box.offer("a") is Admission.RUN
    assert box.offer("b") is Admission.RUN
    assert box.offer("c") is Admission.QUEUED
    assert box.release() == "c"  # the permit passes straight on
    assert box.offer("d") is Admission.QUEUED
    assert box.running == 2


def test_release_without_running_job_is_a_bug():
    box: Mailbox[str] = Mailbox(capacity=1, concurrency=1)
    with pytest.raises(ClusterInternalError):
        box.release()


@pytest.mark.parametrize(("capacity", "concurrency"), [(0, 1), (1, 0)])
def test_invalid_sizes(capacity, concurrency):
    with pytest.raises(ValueError, match=">= 1"):
        Mailbox(capacity=capacity, concurrency=concurrency)


def test_remove_withdraws_only_queued_jobs():
    box: Mailbox[str] = Mailbox(capacity=5, concurrency=1)
    assert not box.remove("x")  # nothing queued at all
    box.offer("a")
    box.offer("b")
    assert box.remove("b")
    assert not box.remove("b")
    assert not box.remove("a")  # running, not queued
    assert box.queued == 0


def test_pause_queues_everything_and_resume_starts_in_order():
    box: Mailbox[str] = Mailbox(capacity=5, concurrency=2)
    box.pause()
    assert box.offer("a") is Admission.QUEUED
    assert box.offer("b") is Admission.QUEUED
    assert box.offer("c") is Admission.QUEUED
    assert box.resume() == ["a", "b"]
    assert not box.paused
    assert box.release() == "c"


def test_paused_release_grants_nothing():
    box: Mailbox[str] = Mailbox(capacity=5, concurrency=1)
    box.offer("a")
    box.offer("b")
    box.pause()
    assert box.release() is None
    assert box.resume() == ["b"]


def test_requeue_front_keeps_order():
    box: Mailbox[str] = Mailbox(capacity=5, concurrency=1)
    box.requeue_front([])
    box.requeue_front(["x", "y"])
    assert box.queued == 2
    box.offer("z")
    assert box.resume() == ["x"]
    assert box.release() == "y"
    assert box.release() == "z"


def test_drain_empties_the_queue():
    box: Mailbox[str] = Mailbox(capacity=5, concurrency=1)
    assert box.drain() == []
    box.offer("a")
    box.offer("b")
    box.offer("c")
    assert box.drain() == ["b", "c"]
    assert box.queued == 0
    assert box.drain() == []


@given(
    st.lists(st.sampled_from(["offer", "release", "remove_last"]), max_size=60),
    st.integers(1, 3),
)
def test_invariants_hold_for_any_sequence(operations, concurrency):
    box: Mailbox[int] = Mailbox(capacity=8, concurrency=concurrency)
    running: list[int] = []
    queued: list[int] = []
    started: list[int] = []
    for n, operation in enumerate(operations):
        if operation == "offer":
            admission = box.offer(n)
            if admission is Admission.RUN:
                running.append(n)
                started.append(n)
            elif admission is Admission.QUEUED:
                queued.append(n)
            else:
                assert len(running) + len(queued) >= 8
        elif operation == "release" and running:
            running.pop(0)
            granted = box.release()
            if granted is not None:
                assert granted == queued.pop(0)
                running.append(granted)
                started.append(granted)
        elif operation == "remove_last" and queued:
            assert box.remove(queued.pop())
        assert box.running == len(running) <= concurrency
        assert box.queued == len(queued)
        assert (
            not queued or box.running == concurrency
        )  # no idle permit while work waits
    assert started == sorted(started)  # FIFO: jobs start in the order offered


def test_remove_of_an_unknown_job_from_a_busy_queue():
    box: Mailbox[str] = Mailbox(capacity=5, concurrency=1)
    box.offer("a")
    box.offer("b")
    assert not box.remove("zzz")
    assert box.queued == 1


def test_requeue_front_before_existing_queue():
    box: Mailbox[str] = Mailbox(capacity=5, concurrency=1)
    box.offer("running")
    box.offer("later")
    box.requeue_front(["replayed"])
    assert box.release() == "replayed"
    assert box.release() == "later"
