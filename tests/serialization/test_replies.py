"""Reply codecs (`trio_cluster.serialization._replies`): the end of a stream."""

from __future__ import annotations

import attrs
import pytest

import trio_cluster as tc
from trio_cluster.serialization import make_converter
from trio_cluster.serialization._replies import (
    STREAM_END,
    Exit,
    ReplyCodec,
    value_exit,
)


@attrs.frozen
class Item:
    n: int


@pytest.mark.parametrize("item_type", [int, Item, str, list[Item]])
def test_a_stream_ends_the_same_way_whatever_its_item_type(item_type):
    codec = ReplyCodec(make_converter(), item_type, (), "test stream")
    assert codec.encode_stream_end(Exit()) == STREAM_END
    assert codec.decode_stream_end(STREAM_END) == Exit()


def test_a_stream_that_failed_ends_with_its_error():
    codec = ReplyCodec(make_converter(), Item, (), "test stream")
    error = tc.MailboxFullError(address="a", reason="full")
    data = codec.encode_stream_end(Exit(error=error))
    assert data != STREAM_END
    ended = codec.decode_stream_end(data)
    assert isinstance(ended.error, tc.MailboxFullError)


def test_stream_end_matches_what_a_none_able_item_codec_made():
    # Peers that encode the end with an item codec that can encode None
    # (ints, optional types) send the same bytes: the wire is unchanged there.
    codec = ReplyCodec(make_converter(), int | None, (), "test stream")
    assert codec.encode_value(None) == STREAM_END


@pytest.mark.parametrize("error", [tc.InvalidIdError, tc.PersistenceError])
def test_plain_cluster_errors_travel_as_their_message(error):
    # An invalid id read back from storage is answered with InvalidIdError
    # (issue 11, item 6): the caller gets the type and the message.
    codec = ReplyCodec(make_converter(), int, (), "test")
    exit_ = codec.decode_exit(codec.encode_error(error("entity id must be ...")))
    assert type(exit_.error) is error
    assert str(exit_.error) == "entity id must be ..."


@pytest.mark.parametrize("value", [None, 0, "text", Item(3), [1, 2]])
def test_value_exit_is_the_exit_attrs_makes(value):
    made = value_exit(value)
    assert type(made) is Exit
    assert made == Exit(value=value)
    assert made.error is None
    assert made.unwrap() is value
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        made.value = 1  # type: ignore[misc]
