"""Serialization: the one cattrs converter for messages and replies.

Messages are plain ``attrs.frozen`` classes. `make_converter` builds the strict
msgpack converter a runner uses; register hooks for your own types on it and
pass it to `trio_cluster.open_runner`. Use `register_tagged_union` for union
fields, so the wire format carries explicit, stable tags.
"""

from __future__ import annotations

from .._metadata import fixup_module_metadata
from ._converter import (
    Codec as Codec,
    make_converter as make_converter,
    register_tagged_union as register_tagged_union,
)

__all__ = ["Codec", "make_converter", "register_tagged_union"]

fixup_module_metadata(__name__, globals())
del fixup_module_metadata
