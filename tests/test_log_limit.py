"""`trio_cluster._log_limit`: warnings a peer causes, rate-limited per
(peer, kind), summarized once per interval, each value shortened (issue 12,
item 8). The clock is a plain variable here: no Trio, no task."""

from __future__ import annotations

import logging

import pytest

from trio_cluster._log_limit import LogLimiter, shorten

LOGGER = "trio_cluster.test_log_limit"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(autouse=True)
def _capture(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records]


def limiter(clock: FakeClock, **options: object) -> LogLimiter:
    return LogLimiter(logger=logging.getLogger(LOGGER), clock=clock, **options)  # type: ignore[arg-type]


def test_the_first_occurrences_are_logged_then_one_summary_per_interval(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    limit = limiter(clock, burst=3, interval=10.0)
    written = [limit.warning("p", "bad things", "bad thing %d", n) for n in range(100)]
    assert written == [True] * 3 + [False] * 97
    assert messages(caplog) == ["bad thing 0", "bad thing 1", "bad thing 2"]
    clock.now = 9.9
    limit.warning("p", "bad things", "bad thing %d", 100)
    assert len(caplog.records) == 3  # not an interval yet
    clock.now = 10.0
    assert not limit.warning("p", "bad things", "bad thing %d", 101)
    assert messages(caplog)[3:] == [
        "... and 98 more bad things from p in the last 10 s"
    ]
    # Still flooding: one summary line per interval, no more detail lines.
    for step in range(1, 100):
        clock.now = 10.0 + step * 0.5
        limit.warning("p", "bad things", "bad thing")
    assert messages(caplog)[4:] == [
        "... and 20 more bad things from p in the last 10 s",
        "... and 20 more bad things from p in the last 10 s",
        "... and 20 more bad things from p in the last 10 s",
        "... and 20 more bad things from p in the last 10 s",
    ]


def test_keys_are_peer_and_kind(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    limit = limiter(clock, burst=1)
    for peer in ("a", "b"):
        for kind in ("x", "y"):
            for _ in range(5):
                limit.warning(peer, kind, "%s %s", peer, kind)
    assert messages(caplog) == ["a x", "a y", "b x", "b y"]
    limit.flush("a")
    assert messages(caplog)[4:] == [
        "... and 4 more x from a in the last 0 s",
        "... and 4 more y from a in the last 0 s",
    ]
    limit.flush()
    assert len(caplog.records) == 8
    limit.flush()  # nothing left to summarize
    assert len(caplog.records) == 8
    # A flushed key starts afresh.
    assert limit.warning("a", "x", "again")


def test_a_quiet_key_starts_afresh(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    limit = limiter(clock, burst=2, interval=10.0)
    for _ in range(2):
        limit.warning("p", "k", "detail")
    clock.now = 30.0
    assert limit.warning("p", "k", "detail")
    assert messages(caplog) == ["detail"] * 3
    # A summary window with nothing left out writes nothing.
    for _ in range(3):
        limit.warning("p", "k", "detail")
    clock.now = 45.0
    limit.warning("p", "k", "detail")
    assert messages(caplog)[4:] == ["... and 2 more k from p in the last 15 s"]


def test_every_argument_is_shortened_and_kept_on_one_line(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    limit = limiter(clock, max_length=20)
    hostile = "x" * 1000 + "\nFORGED LINE"
    limit.warning("p", "k", "got %s and %r", hostile, ValueError(hostile))
    [line] = messages(caplog)
    assert "\n" not in line
    assert line == (
        "got " + "x" * 20 + "... (992 more characters) and "
        "ValueError('" + "x" * 8 + "... (1007 more characters)"
    )
    assert len(line) < 200


def test_shorten() -> None:
    assert shorten("short") == "short"
    assert shorten(12) == "12"
    assert shorten("a\nb\x00c") == "a\\nb\\x00c"
    assert shorten("é" * 300) == "é" * 200 + "... (100 more characters)"
    assert shorten("y" * 5000, 10) == "y" * 10 + "... (4990 more characters)"


def test_other_levels_and_a_disabled_level_are_still_limited(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    limit = limiter(clock, burst=2)
    assert limit.log(logging.INFO, "p", "k", "info")  # counted as written
    assert limit.log(logging.INFO, "p", "k", "info")
    assert not limit.log(logging.INFO, "p", "k", "info")
    assert caplog.records == []
    clock.now = 10.0
    limit.log(logging.INFO, "p", "k", "info")
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == "... and 1 more k from p in the last 10 s"


def test_the_keys_remembered_are_bounded(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    limit = limiter(clock, burst=1, max_keys=3)
    for peer in range(10):
        for _ in range(3):
            limit.warning(peer, "k", "from %s", peer)
    assert len(limit._counts) == 3
    # Each peer forgotten to make room had its summary written first.
    summaries = [line for line in messages(caplog) if line.startswith("...")]
    assert summaries == [
        f"... and 2 more k from {peer} in the last 0 s" for peer in range(7)
    ]
