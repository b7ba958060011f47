"""Structured logs (`trio_cluster.logs`): context fields and JSON records."""

from __future__ import annotations

import json
import logging

import trio_cluster as tc
from trio_cluster.logs import ContextFilter, JsonFormatter

from .helpers import Echo, Ping, config


async def test_log_records_carry_runner_shard_and_entity(autojump_clock, caplog):
    context = ContextFilter()
    caplog.handler.addFilter(context)
    try:
        with caplog.at_level(logging.WARNING, logger="trio_cluster.test"):
            async with tc.open_runner(entities=[Echo], config=config()) as runner:
                await runner.client(Echo)("alice").ping(Ping("hi"))
                address = runner.client(Echo).address_of("alice")
    finally:
        caplog.handler.removeFilter(context)
    [record] = [r for r in caplog.records if r.name == "trio_cluster.test"]
    assert record.runner == str(runner.address)
    assert record.entity == str(address)
    assert record.shard == str(address.shard)
    document = json.loads(JsonFormatter().format(record))
    assert document["message"] == "pinged with hi"
    assert document["level"] == "WARNING"
    assert document["entity"] == str(address)
    assert document["runner"] == str(runner.address)


def test_records_outside_a_runner_get_empty_context():
    record = logging.LogRecord(
        "trio_cluster.x", logging.INFO, __file__, 1, "m", (), None
    )
    assert ContextFilter().filter(record)
    fields = record.__dict__
    context = (fields["runner"], fields["shard"], fields["entity"])
    assert context == ("", "", "")
    document = json.loads(JsonFormatter().format(record))
    assert "runner" not in document
    record.shard = "default:3"
    assert ContextFilter().filter(record)
    assert record.__dict__["shard"] == "default:3"  # explicit extra= wins


def test_json_formatter_includes_the_exception():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord(
            "trio_cluster.x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    document = json.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in document["exception"]
