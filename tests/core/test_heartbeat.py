"""Tests of trio_cluster._core._heartbeat: one timer structure for many sockets."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, strategies as st

from trio_cluster import ConfigError
from trio_cluster._core._heartbeat import Disconnect, Heartbeats, SendPing


def test_a_quiet_peer_is_pinged_then_disconnected() -> None:
    beats = Heartbeats(interval=10.0, timeout=3.0)
    assert beats.add(1, 0.0) == 10.0
    assert beats.next_deadline() == 10.0
    assert beats.due(9.9) == []
    assert beats.due(10.0) == [SendPing(1)]
    assert beats.next_deadline() == 13.0
    assert beats.due(13.0) == [Disconnect(1)]
    assert len(beats) == 0
    assert beats.next_deadline() == math.inf


def test_an_answered_ping_keeps_the_peer() -> None:
    beats = Heartbeats(interval=10.0, timeout=3.0)
    beats.add(1, 0.0)
    assert beats.due(10.0) == [SendPing(1)]
    beats.seen(1, 11.0)  # the pong
    assert beats.due(13.0) == []
    assert beats.next_deadline() == 21.0
    assert beats.due(21.0) == [SendPing(1)]


def test_traffic_postpones_the_ping_without_heap_work() -> None:
    beats = Heartbeats(interval=10.0, timeout=3.0)
    beats.add(1, 0.0)
    beats.seen(1, 6.0)
    assert beats.due(10.0) == []
    assert beats.next_deadline() == 16.0


def test_removed_and_re_added_keys_drop_their_old_entries() -> None:
    beats = Heartbeats(interval=10.0, timeout=3.0)
    beats.add(1, 0.0)
    beats.add(2, 0.0)
    beats.remove(1)
    beats.seen(1, 5.0)  # unknown now: ignored
    assert beats.due(10.0) == [SendPing(2)]
    beats.add(2, 11.0)  # restarted: the pending ping check is stale
    assert beats.due(13.0) == []
    assert beats.next_deadline() == 21.0


@pytest.mark.parametrize("value", [0, -1.0, math.inf, math.nan, True, "1"])
def test_durations_are_validated(value: object) -> None:
    with pytest.raises(ConfigError):
        Heartbeats(interval=value, timeout=1.0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Heartbeats(interval=1.0, timeout=value)  # type: ignore[arg-type]


@given(
    interval=st.floats(0.5, 30.0),
    timeout=st.floats(0.5, 30.0),
    traffic=st.lists(st.floats(0.0, 100.0), max_size=20),
)
def test_a_silent_peer_is_dropped_within_interval_plus_timeout(
    interval: float, timeout: float, traffic: list[float]
) -> None:
    """Whatever it sent before, a peer silent from ``t`` is disconnected at
    the latest at ``t + interval + timeout``, and never while it is heard
    within each ping's timeout."""
    beats = Heartbeats(interval=interval, timeout=timeout)
    beats.add(7, 0.0)
    last = 0.0
    pinged: float | None = None
    for at in sorted(traffic):
        # The driver runs `due` at each deadline before the frame at `at`.
        while beats.next_deadline() <= at:
            deadline = beats.next_deadline()
            commands = beats.due(deadline)
            if SendPing(7) in commands:
                pinged = deadline
            if Disconnect(7) in commands:
                assert pinged is not None
                assert deadline >= pinged + timeout  # the answer had its time
                assert deadline <= last + interval + timeout + 1e-9
                return
        beats.seen(7, at)  # answers any ping sent before
        last = at
    while True:
        deadline = beats.next_deadline()
        assert deadline <= last + interval + timeout + 1e-9
        if Disconnect(7) in beats.due(deadline):
            return


def test_a_timeout_longer_than_the_interval_keeps_pings_on_time() -> None:
    beats = Heartbeats(interval=2.0, timeout=5.0)
    beats.add(1, 0.0)
    assert beats.due(2.0) == [SendPing(1)]
    assert beats.next_deadline() == 4.0
    beats.seen(1, 2.0)  # an immediate pong
    assert beats.due(4.0) == [SendPing(1)]  # on time: 2 s after the pong
    assert beats.due(6.0) == []  # waiting for the answer
    assert beats.next_deadline() == 8.0
    assert beats.due(8.0) == []
    assert beats.due(9.0) == [Disconnect(1)]


def test_pings_due_soon_are_sent_early_together() -> None:
    beats = Heartbeats(interval=10.0, timeout=5.0)
    beats.add(1, 0.0)
    beats.add(2, 0.05)
    beats.add(3, 0.5)
    assert beats.due(10.0, early=0.1) == [SendPing(1), SendPing(2)]
    # The early ping counts from when it was sent: a pong heard before its
    # due time keeps the peer.
    beats.seen(2, 10.02)
    assert beats.next_deadline() == 10.5
    assert beats.due(10.5, early=0.1) == [SendPing(3)]
    assert beats.due(15.0, early=0.1) == [Disconnect(1)]
    assert 2 in beats._beats


def test_a_disconnection_is_never_early() -> None:
    beats = Heartbeats(interval=10.0, timeout=5.0)
    beats.add(1, 0.0)
    assert beats.due(10.0) == [SendPing(1)]
    assert beats.due(14.95, early=0.1) == []
    assert beats.due(15.0, early=0.1) == [Disconnect(1)]
