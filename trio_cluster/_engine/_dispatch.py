"""The endpoint handler: every envelope from a peer, dispatched to the part
that answers it (Trio driver).

`ClusterHandler` parses each envelope (`_wire`) and hands it to the caller
side (`OutboundCalls`: replies, stream items and ends), the owner side
(`InboundCalls`: requests, stream credits, interrupts), persisted delivery
(notices and replies) or broadcasts. A malformed envelope is counted, logged
(a few per peer in full, then one summary line per interval: `LogLimiter`)
and dropped; it never disturbs other requests. `HandlerRelay` stands in for
it while the runner's parts are being built.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import attrs

from .._context import RunnerContext, current_entity_var, current_runner_var
from .._errors import MalformedMessageError
from .._log_limit import LogLimiter
from .._transport_abc import EndpointHandler
from ._broadcasts import Broadcasts
from ._inbound import InboundCalls
from ._persisted import PersistedDelivery
from ._remote import OutboundCalls
from ._sharding import Sharding
from ._wire import MAX_CALL_ID, Kind, address_from, parse

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .._core._addresses import RunnerAddress
    from .._transport_abc import Envelope

__all__ = ["ClusterHandler", "HandlerRelay"]

log = logging.getLogger("trio_cluster.transport")

# The two kinds of every remote call, as module constants: on Python 3.11
# reading a member from its enum class costs a Python-level lookup, twice
# per envelope here.
_REQUEST = Kind.REQUEST
_REPLY = Kind.REPLY
_REPLY_VALUE = int(Kind.REPLY)


@attrs.define(eq=False, kw_only=True)
class ClusterHandler(EndpointHandler):
    """Dispatches envelopes from peers to the caller and owner sides."""

    outbound: OutboundCalls
    """The caller side (replies, stream items)."""
    inbound: InboundCalls
    """The owner side (requests, credits, interrupts)."""
    _sharding: Sharding
    """Polled again when a peer is lost."""
    _persisted: PersistedDelivery
    """Persisted-request notices and replies."""
    _broadcasts: Broadcasts
    """Broadcasts from peers."""
    _context: RunnerContext
    """The current runner handlers dispatched from here see."""
    malformed: int = attrs.field(init=False, default=0)
    """Malformed envelopes received, all counted (only a few are logged)."""
    warnings: LogLimiter = attrs.field(
        init=False, factory=lambda: LogLimiter(logger=log)
    )
    """Bounds the warnings a peer causes (issue 12, item 8)."""

    def envelope_received(self, peer: RunnerAddress, envelope: Envelope) -> None:
        self.envelopes_received(peer, (envelope,))

    def envelopes_received(
        self, peer: RunnerAddress, envelopes: Sequence[Envelope]
    ) -> None:
        # The transport may call from any task (a memory link runs in the
        # sender's context): dispatch in this runner's context, so handlers,
        # tasks they start and log records see the right runner. Set once
        # for all the envelopes (a WebSocket connection hands over a frame's
        # envelopes at once), and each only if it is not so already (a
        # WebSocket connection's reader has no current entity, and setting a
        # variable costs).
        runner_token = (
            None
            if current_runner_var.get(None) is self._context
            else current_runner_var.set(self._context)
        )
        entity_token = (
            None
            if current_entity_var.get(None) is None
            else current_entity_var.set(None)
        )
        try:
            dispatch = self._dispatch
            for envelope in envelopes:
                dispatch(peer, envelope)
        finally:
            if entity_token is not None:
                current_entity_var.reset(entity_token)
            if runner_token is not None:
                current_runner_var.reset(runner_token)

    def _dispatch(self, peer: RunnerAddress, envelope: Envelope) -> None:
        outbound = self.outbound
        if len(envelope) == 3:
            # A well-formed ``REPLY`` (the answer to every remote call),
            # checked here in one expression as `_wire._plain` checks it:
            # no `parse` call, no copy of its fields. Anything else, and
            # every malformed envelope, goes through `parse` below.
            kind, call_id, payload = envelope
            if (
                kind == _REPLY_VALUE
                and type(kind) is int
                and type(call_id) is int
                and 0 <= call_id <= MAX_CALL_ID
                and type(payload) is bytes
            ):
                outbound.reply(peer, call_id, payload)
                return
        inbound = self.inbound
        persisted, broadcasts = self._persisted, self._broadcasts
        try:
            kind, fields = parse(envelope)
            if kind is _REQUEST:
                inbound.request(peer, fields)
            elif kind is _REPLY:
                outbound.reply(peer, *fields)
            elif kind is Kind.NOT_DELIVERED:
                outbound.not_delivered(peer, *fields)
            elif kind is Kind.STREAM_ITEM:
                outbound.stream_item(peer, *fields)
            elif kind is Kind.STREAM_END:
                outbound.stream_end(peer, *fields)
            elif kind is Kind.STREAM_CREDIT:
                inbound.credit(peer, *fields)
            elif kind is Kind.INTERRUPT:
                inbound.interrupt(peer, *fields)
            elif kind is Kind.PERSISTED:
                request_id, *where, wants_reply = fields
                persisted.remote_notice(
                    request_id, address_from(where), peer if wants_reply else None
                )
            elif kind is Kind.PERSISTED_REPLY:
                persisted.remote_reply(peer, *fields)
            else:
                broadcasts.received_from(peer, *fields)
        except MalformedMessageError as exc:
            self.malformed += 1
            self.warnings.warning(
                peer,
                "malformed envelopes",
                "dropped a malformed envelope from %s: %s",
                peer,
                exc,
            )

    def peer_lost(self, peer: RunnerAddress, reason: str) -> None:
        log.info("lost the connection to %s: %s", peer, reason)
        self.warnings.flush(peer)
        self.outbound.peer_lost(peer, reason)
        self.inbound.peer_lost(peer)
        self._sharding.table.lost_peers.add(peer)
        self._sharding.peer_lost(peer)


class HandlerRelay(EndpointHandler):
    """The endpoint's handler until the runner's parts exist.

    A transport needs its handler to open the endpoint, and the parts that
    answer envelopes need the open endpoint: the assembly opens the endpoint
    with a relay and binds the `ClusterHandler` once, when the parts are
    built. Envelopes before that are dropped (no peer knows this runner
    before it registers, which happens after the binding).
    """

    __slots__ = ("_target",)

    def __init__(self) -> None:
        self._target: EndpointHandler | None = None

    def bind(self, target: EndpointHandler) -> None:
        """Send every envelope and loss to ``target`` from now on (once)."""
        assert self._target is None, "a relay is bound once"
        self._target = target

    def envelope_received(self, peer: RunnerAddress, envelope: Envelope) -> None:
        if self._target is not None:
            self._target.envelope_received(peer, envelope)

    def envelopes_received(
        self, peer: RunnerAddress, envelopes: Sequence[Envelope]
    ) -> None:
        if self._target is not None:
            self._target.envelopes_received(peer, envelopes)

    def peer_lost(self, peer: RunnerAddress, reason: str) -> None:
        if self._target is not None:
            self._target.peer_lost(peer, reason)
