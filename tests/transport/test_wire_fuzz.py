"""Wire fuzzing: Hypothesis-generated input sent over real sockets to a real
runner, one of two in-process runners that share a cluster secret.

What is generated (`tests.transport.wire_strategies` and `.wire_outsiders`):

* from a peer that proves the secret (`scripts`): valid requests in every
  delivery mode and valid broadcasts; hostile envelopes of every kind (a
  REQUEST with exactly one bad field: a wrong type, NaN, infinite, negative
  or huge numbers, empty or over-long or odd text, an unknown entity type or
  handler, a handler run in the wrong mode or a persisted one, the wrong
  shard or one served elsewhere, a payload that does not decode; REPLY,
  NOT_DELIVERED, STREAM_ITEM, STREAM_END, STREAM_CREDIT, INTERRUPT,
  PERSISTED, PERSISTED_REPLY and BROADCAST with fields valid or not, call ids
  known or not; unknown kinds; truncated and over-long envelopes);
  duplicates, any order, a second request under a used call id; any split
  into frames; then maybe a last message that is no proper frame (text,
  truncated, not msgpack, random bytes, empty, over ``max_message_size``,
  not an array, an array holding a non-envelope, thousands of empty
  envelopes); sometimes sent before the listener's ``ACCEPTED``;
* from a peer without it (`outsider_scripts`): bytes that are no WebSocket
  handshake, bad hellos, a hello without a nonce, a challenge answered with
  no valid proof (random proofs, the wrong shape, the proof of another
  secret, the listener's own proofs, a frame, text), frames sent before the
  challenge; announcing its own address, the other member's, or the
  runner's.

What is checked after every example:

1. the runner is up: its block has not raised, and it keeps its connection
   to the other runner (the same one: no outsider replaced it);
2. the other runner's calls still succeed: a call to an entity on the fuzzed
   runner returns the right value;
3. nothing is left behind: once the fuzzing connection is gone, the owner's
   tables of jobs, streams and recent call ids hold nothing of the peer, the
   caller's table of pending calls is empty, the endpoint tracks a bounded
   number of peers and its accepted connections are released; over a whole
   test, the process's resident memory grows within a generous bound;
4. no handler runs unless it should: every handler and the broadcast count
   their runs by the tag of their message; a peer without the secret never
   causes one; a member's hostile envelopes never do (tag `FORBIDDEN`); its
   valid requests run exactly once each (at most once if the script may have
   cut them off), duplicates included; every answer names a call id the
   peer used, and no call is answered twice.

The runners stay open across the examples of a test: Hypothesis runs in a
worker thread (`fuzz`) and hands each example to the Trio loop with
`trio.from_thread.run`. Real sockets, so real time: every example is
bounded by ``trio.fail_after``.

Valid calls of the ``hang`` handler (it never returns) are in the mix: the
peer's INTERRUPT, or its leaving, must cancel it, or its entity stays busy
and a later example's request to it does not run. (They found an
interrupt lost when it came right behind its request: pinned in
``tests/engine/test_inbound.py``.)
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, TypeVar

import attrs
import msgpack
import pytest
import trio
import trio.lowlevel
import trio_websocket
from hypothesis import given, settings, strategies as st

import trio_cluster as tc
from trio_cluster._core._auth import ClusterSecrets
from trio_cluster._engine._wire import Kind, Mode
from trio_cluster.storage import MemoryStorage
from trio_cluster.transport import WebSocketTransport
from trio_cluster.transport._framing import (
    ACCEPTED,
    decode_hello,
    encode_hello,
    encode_proof,
)
from trio_cluster.transport._ws_auth import DIALER, LISTENER

from ..helpers import config
from .test_runner_websocket import endpoint_of
from .wire_outsiders import Computed, OutsiderScript, outsider_scripts
from .wire_peers import OTHER_SECRET, SECRET, handshake, raw_websocket
from .wire_strategies import (
    BROADCAST,
    FORBIDDEN,
    OUTSIDER,
    Mark,
    Place,
    Script,
    Target,
    mark_payload,
    scripts,
)

T = TypeVar("T")

SHARDS = 8
MAX_MESSAGE_SIZE = 64 * 1024
EXAMPLE_TIMEOUT = 10
"""Seconds one example may take (a few tens of milliseconds, normally)."""
SETTLE = 5
"""Seconds the runner has to run or drop what an example sent (on top of
the two of ``connect_timeout`` a connection attempt may hold a slot)."""
ME = tc.RunnerAddress("127.0.0.1", 9)
"""The address the fuzzing member announces (nothing listens there)."""
OUTSIDER_ADDRESS = tc.RunnerAddress("127.0.0.1", 7)
MAX_RSS_GROWTH = 200 * 1024 * 1024
"""Resident memory a whole fuzzing test may add, in bytes (generous: the
process also holds Hypothesis's own records)."""

THOROUGH = settings().max_examples >= 100
"""The `ci` profile: the long variant runs its full count of examples."""

RUNS: Counter[str] = Counter()
"""Handler and broadcast runs, by the tag of their message."""


class Probe(tc.Entity):
    """The fuzzed entity: each handler counts its runs in `RUNS`."""

    type_name = "Probe"

    @tc.rpc
    async def mark(self, msg: Mark) -> str:
        # Cannot suspend: runs on the owner's fast path.
        RUNS[msg.tag] += 1
        return msg.tag

    @tc.rpc
    async def mark_later(self, msg: Mark) -> str:
        RUNS[msg.tag] += 1
        await trio.lowlevel.checkpoint()
        return msg.tag

    @tc.rpc
    async def hang(self, msg: Mark) -> None:
        RUNS[msg.tag] += 1
        await trio.sleep_forever()

    @tc.stream
    async def marks(self, msg: Mark) -> AsyncIterator[str]:
        RUNS[msg.tag] += 1
        for i in range(3):
            yield f"{msg.tag}{i}"

    @tc.rpc(persisted=True)
    async def keep(self, msg: Mark) -> str:
        RUNS[msg.tag] += 1
        return msg.tag


async def on_probe(msg: Mark) -> None:
    RUNS[msg.tag] += 1


def _rss() -> int:
    """This process's resident memory, in bytes (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@asynccontextmanager
async def open_probe_pair() -> AsyncIterator[tuple[tc.Runner, tc.Runner]]:
    """Two runners serving `Probe` over WebSocket with a cluster secret,
    once the shards are split between them."""
    storage = MemoryStorage()
    async with AsyncExitStack() as stack:
        first, second = [
            await stack.enter_async_context(
                tc.open_runner(
                    entities=[Probe],
                    broadcasts=[tc.Broadcast(BROADCAST, on_probe)],
                    config=config(
                        runner_address=tc.RunnerAddress("127.0.0.1", 0),
                        shards_per_group=SHARDS,
                        send_retry_timeout=5.0,
                        entity_termination_timeout=1.0,
                    ),
                    storage=storage,
                    transport=WebSocketTransport(
                        connect_timeout=2.0,
                        close_timeout=0.5,
                        ping_interval=0.5,
                        ping_timeout=2.0,
                        max_message_size=MAX_MESSAGE_SIZE,
                        cluster_secrets=[SECRET],
                    ),
                )
            )
            for _ in range(2)
        ]
        with trio.fail_after(EXAMPLE_TIMEOUT):
            while not (  # noqa: ASYNC110 - membership is polled
                first.statistics().shards
                and second.statistics().shards
                and first.statistics().shards + second.statistics().shards == SHARDS
            ):
                await trio.sleep(0.02)
        yield first, second


def _target(first: tc.Runner) -> Target:
    client = first.client(Probe)
    served: list[Place] = []
    elsewhere: list[Place] = []
    for i in range(200):
        address = client.address_of(f"p{i}")
        place = Place(f"p{i}", address.shard.group, address.shard.number)
        (served if address.shard in first.served_shards() else elsewhere).append(place)

    def shard_of(entity_id: str) -> int | None:
        try:
            return client.address_of(entity_id).shard.number
        except (ValueError, TypeError):
            return None

    return Target(
        entity_type=Probe.type_name,
        # served[0] is the real peer's entity, served[1] the barrier's: no
        # script makes them busy.
        barrier=served[1],
        served=tuple(served[2:7]),
        elsewhere=tuple(elsewhere[:3]),
        shards=SHARDS,
        shard_of=shard_of,
        max_message_size=MAX_MESSAGE_SIZE,
    )


async def _poll(what: str, condition: Callable[[], bool]) -> None:
    """Wait (bounded) until ``condition`` holds."""
    with trio.move_on_after(SETTLE):
        while not condition():  # noqa: ASYNC110 - runner internals are polled
            await trio.sleep(0.005)
        return
    raise AssertionError(f"not within {SETTLE} s: {what} (runs: {dict(RUNS)})")


@attrs.define
class _Answers:
    """What the runner sent a fuzzing member, read in the background."""

    envelopes: list[list[Any]] = attrs.field(factory=list)
    closed: trio_websocket.CloseReason | None = None
    done: trio.Event = attrs.field(factory=trio.Event)
    barrier: int = 0

    async def collect(self, ws: trio_websocket.WebSocketConnection) -> None:
        try:
            while True:  # bounded by the example's fail_after
                message = await ws.get_message()
                assert isinstance(message, bytes), "the runner sent text"
                if message == ACCEPTED:
                    continue
                frame = msgpack.unpackb(message)
                assert isinstance(frame, list)
                self.envelopes.extend(frame)
                if any(e[:2] == [Kind.REPLY, self.barrier] for e in frame):
                    self.done.set()
        except trio_websocket.ConnectionClosed as exc:
            self.closed = exc.reason
            self.done.set()


@attrs.define
class Fuzzed:
    """The runner under test, its peer, and the checks run after each
    example."""

    first: tc.Runner
    second: tc.Runner
    target: Target
    real: str
    """An entity on ``first`` that only ``second`` calls."""
    connects: int = 0
    examples: int = 0

    @classmethod
    async def open(cls, first: tc.Runner, second: tc.Runner) -> Fuzzed:
        """The checks of ``first``, once ``second`` has called it (its
        connection is up)."""
        target = _target(first)
        client = first.client(Probe)
        real = next(
            f"p{i}"
            for i in range(200)
            if client.address_of(f"p{i}").shard in first.served_shards()
        )
        assert real not in {p.entity_id for p in (*target.served, target.barrier)}
        fuzzed = cls(first, second, target, real)
        await fuzzed._check_real_peer()
        endpoint = endpoint_of(first)
        assert endpoint.is_connected(second.address)
        fuzzed.connects = endpoint.statistics().connects
        return fuzzed

    # ------------------------------------------------------------------
    # A member's script

    async def member(self, script: Script) -> None:
        """Send ``script`` as a member, then check everything."""
        RUNS.clear()
        answers = _Answers(barrier=max(script.call_ids, default=0) + 1)
        with trio.fail_after(EXAMPLE_TIMEOUT):
            async with raw_websocket(self.first.address) as ws:
                if script.eager:
                    await self._eager_handshake(ws, script.messages)
                else:
                    await handshake(ws, ME, self.first.address, [SECRET])
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(answers.collect, ws)
                    sent = await _send_all(ws, script.messages)
                    if script.last != "fatal" and sent:
                        await self._barrier(ws, answers)
                    if answers.closed is None and script.last != "fatal":
                        await _poll(
                            f"runs of {script.expected}",
                            lambda: all(
                                RUNS[tag] >= n for tag, n in script.expected.items()
                            ),
                        )
                    else:
                        await answers.done.wait()
                    nursery.cancel_scope.cancel()
        if script.last == "fatal":
            assert answers.closed is not None, "bad input left the connection open"
        elif script.last == "ok" and not script.eager:
            assert answers.closed is None, f"closed on good input: {answers.closed}"
            assert answers.done.is_set(), "the barrier request was not answered"
        await self._settle()
        self._check_answers(script, answers)
        self._check_runs(
            expected=script.expected,
            maybe={**script.maybe, "barrier": 1},
        )
        await self._check_real_peer()

    async def _eager_handshake(
        self, ws: trio_websocket.WebSocketConnection, messages: tuple[bytes | str, ...]
    ) -> None:
        """The handshake, with the first frames right behind the proof."""
        nonce = b"e" * 32
        await ws.send_message(encode_hello(ME, nonce))
        hello = decode_hello(await ws.get_message())
        assert hello.nonce is not None
        parts = (nonce, hello.nonce, str(ME).encode(), str(self.first.address).encode())
        keys = ClusterSecrets.of([SECRET])
        assert keys.verify(LISTENER, parts, list(hello.proofs or ()))
        await ws.send_message(encode_proof(keys.prove(DIALER, parts)))

    async def _barrier(
        self, ws: trio_websocket.WebSocketConnection, answers: _Answers
    ) -> None:
        """A valid call behind the script; its answer means the runner has
        read everything before it."""
        place = self.target.barrier
        barrier = [
            Kind.REQUEST,
            answers.barrier,
            Mode.CALL,
            Probe.type_name,
            place.entity_id,
            place.group,
            place.number,
            "mark",
            mark_payload("barrier"),
            None,
        ]
        try:
            await ws.send_message(msgpack.packb([barrier]))
        except trio_websocket.ConnectionClosed:
            return
        await answers.done.wait()
        if answers.closed is None:
            [reply] = [
                e for e in answers.envelopes if e[:2] == [Kind.REPLY, answers.barrier]
            ]
            assert msgpack.unpackb(reply[2]) == [0, "barrier"]

    def _check_answers(self, script: Script, answers: _Answers) -> None:
        """Only our calls are answered, each at most once."""
        finals: Counter[int] = Counter()
        allowed = {*script.call_ids, answers.barrier}
        for envelope in answers.envelopes:
            kind, call_id, *_ = envelope
            assert kind in (
                Kind.REPLY,
                Kind.NOT_DELIVERED,
                Kind.STREAM_ITEM,
                Kind.STREAM_END,
            ), envelope
            assert call_id in allowed, envelope
            if kind != Kind.STREAM_ITEM:
                finals[call_id] += 1
        assert max(finals.values(), default=0) <= 1, finals

    # ------------------------------------------------------------------
    # An outsider's script

    async def outsider(self, script: OutsiderScript) -> None:
        """Send ``script`` without the secret, then check everything."""
        RUNS.clear()
        connects = endpoint_of(self.first).statistics().connects
        received: list[bytes | str] = []
        with trio.fail_after(EXAMPLE_TIMEOUT):
            async with raw_websocket(self.first.address) as ws:
                await self._outsider_talks(ws, script, received)
        for message in received:
            # Nothing but the listener's challenge: no ACCEPTED, no frame.
            hello = decode_hello(message)
            assert hello.address == self.first.address
        await self._settle()
        self._check_runs(expected={}, maybe={})
        endpoint = endpoint_of(self.first)
        assert endpoint.is_connected(self.second.address)
        assert endpoint.statistics().connects == connects, "a connection changed"
        await self._check_real_peer()

    async def _outsider_talks(
        self,
        ws: trio_websocket.WebSocketConnection,
        script: OutsiderScript,
        received: list[bytes | str],
    ) -> None:
        """Play ``script`` until the runner closes the connection."""
        announced = {
            "outsider": OUTSIDER_ADDRESS,
            "member": self.second.address,
            "listener": self.first.address,
        }[script.announce]
        try:
            await ws.send_message(script.hello)
            challenge = None
            if script.wait_hello:
                received.append(await ws.get_message())
                challenge = decode_hello(received[-1])
            for message in script.then:
                if isinstance(message, Computed):
                    assert challenge is not None
                    message = _proof(message, challenge, announced, self.first)
                await ws.send_message(message)
            while True:  # bounded by fail_after: the runner closes it
                received.append(await ws.get_message())
        except trio_websocket.ConnectionClosed as exc:
            reason = exc.reason
        # Refused: closed by the runner with a close code that says why.
        assert reason is not None
        assert reason.code in (1002, 1008, 1009), reason

    # ------------------------------------------------------------------
    # Shared checks

    async def _settle(self) -> None:
        """Wait until the runner forgot the fuzzing peer; check its tables."""
        endpoint = endpoint_of(self.first)
        handler = endpoint._handler._target  # type: ignore[attr-defined]
        inbound, outbound = handler.inbound, handler.outbound
        peers = (ME, OUTSIDER_ADDRESS)
        checks: dict[str, Callable[[], bool]] = {
            "jobs": lambda: not any(key[0] in peers for key in inbound._jobs),
            "streams": lambda: not any(key[0] in peers for key in inbound._streams),
            "recent calls": lambda: not any(peer in inbound._recent for peer in peers),
            "pending calls": lambda: not outbound._pending,
            # None but the real runner's: it may have dialed again meanwhile
            # (an outsider using its address, a dial race), so a count from
            # before the fuzzing peer came is no baseline.
            "accepted connections": lambda: self._foreign_accepted() == 0,
        }
        with trio.move_on_after(SETTLE + 2.0):
            while not all(check() for check in checks.values()):  # noqa: ASYNC110
                await trio.sleep(0.005)
        left = [name for name, check in checks.items() if not check()]
        assert not left, (
            f"the runner still holds the fuzzing peer's {left}"
            f" (accepted connections open: {endpoint._admission.open},"
            f" not the real runner's: {self._foreign_accepted()})"
        )
        assert len(endpoint._peers) <= 3, endpoint._peers.keys()
        self.examples += 1

    def _foreign_accepted(self) -> int:
        """Connections ``first`` accepted and holds that are not the real
        runner's current one (counted from accept to release: one still in
        its handshake too)."""
        endpoint = endpoint_of(self.first)
        entry = endpoint._peers.get(self.second.address)
        connection = entry.connection if entry is not None else None
        real = connection is not None and not connection.initiated
        return int(endpoint._admission.open) - real

    def _check_runs(self, *, expected: dict[str, int], maybe: dict[str, int]) -> None:
        assert RUNS[FORBIDDEN] == 0, RUNS
        assert RUNS[OUTSIDER] == 0, RUNS
        for tag, count in RUNS.items():
            if tag in expected:
                assert count == expected[tag], (tag, RUNS)
            else:
                assert count <= maybe.get(tag, 0), (tag, RUNS)
        for tag, count in expected.items():
            assert RUNS[tag] == count, (tag, RUNS)

    async def _check_real_peer(self) -> None:
        """The other runner's call still gets its answer."""
        tag = f"real{self.examples}"
        with trio.fail_after(EXAMPLE_TIMEOUT):
            assert await self.second.client(Probe)(self.real).mark(Mark(tag)) == tag
        assert RUNS.pop(tag) == 1


def _proof(
    what: Computed,
    challenge: Any,
    announced: tc.RunnerAddress,
    first: tc.Runner,
) -> bytes:
    if what.what == "echo":
        return encode_proof(challenge.proofs)
    parts = (
        b"n" * 32,
        challenge.nonce,
        str(announced).encode(),
        str(first.address).encode(),
    )
    return encode_proof(ClusterSecrets.of([OTHER_SECRET]).prove(DIALER, parts))


async def _send_all(
    ws: trio_websocket.WebSocketConnection, messages: tuple[bytes | str, ...]
) -> bool:
    """Send ``messages``; False if the runner closed the connection first."""
    try:
        for message in messages:
            await ws.send_message(message)
    except trio_websocket.ConnectionClosed:
        return False
    return True


async def fuzz(
    example: Callable[[T], Awaitable[None]],
    strategy: st.SearchStrategy[T],
    *,
    max_examples: int,
) -> None:
    """Run ``example`` on each value Hypothesis draws from ``strategy``.

    Hypothesis runs in a worker thread, and each example in this Trio loop
    (`trio.from_thread.run`), so the runners stay open across examples;
    a failing example is shrunk as usual, and re-raised here.
    """

    @settings(max_examples=max_examples)
    @given(strategy)
    def run(value: T) -> None:
        trio.from_thread.run(example, value)

    rss = _rss()
    await trio.to_thread.run_sync(run)
    assert _rss() - rss < MAX_RSS_GROWTH


# ----------------------------------------------------------------------
# The tests


@pytest.mark.slow
async def test_a_members_fuzzed_frames():
    async with open_probe_pair() as (first, second):
        fuzzed = await Fuzzed.open(first, second)
        await fuzz(
            fuzzed.member,
            scripts(fuzzed.target),
            max_examples=settings().max_examples,
        )
        assert fuzzed.examples >= settings().max_examples


@pytest.mark.slow
async def test_an_outsiders_fuzzed_handshakes():
    async with open_probe_pair() as (first, second):
        fuzzed = await Fuzzed.open(first, second)
        addresses = {
            "outsider": str(OUTSIDER_ADDRESS),
            "member": str(second.address),
            "listener": str(first.address),
        }
        await fuzz(
            fuzzed.outsider,
            outsider_scripts(fuzzed.target, addresses),
            max_examples=settings().max_examples,
        )
        assert fuzzed.examples >= settings().max_examples


@pytest.mark.simulation
@pytest.mark.slow
async def test_members_and_outsiders_at_length():
    # The `ci` profile's hundreds of examples, of longer scripts, members
    # and outsiders taking turns on the same runners; a few with `dev`.
    examples = settings().max_examples if THOROUGH else 8
    async with open_probe_pair() as (first, second):
        fuzzed = await Fuzzed.open(first, second)
        addresses = {
            "outsider": str(OUTSIDER_ADDRESS),
            "member": str(second.address),
            "listener": str(first.address),
        }

        async def either(script: Script | OutsiderScript) -> None:
            if isinstance(script, Script):
                await fuzzed.member(script)
            else:
                await fuzzed.outsider(script)

        await fuzz(
            either,
            st.one_of(
                scripts(fuzzed.target, max_envelopes=40),
                outsider_scripts(fuzzed.target, addresses),
            ),
            max_examples=examples,
        )
        assert fuzzed.examples >= examples


@pytest.mark.slow
async def test_bytes_that_are_no_websocket_handshake():
    # trio-websocket notices neither a bad HTTP request nor the client
    # closing before the WebSocket handshake: such a connection holds its
    # admission slot until connect_timeout. Bounded, and nothing runs.
    garbage = [
        b"C\xd4",
        b"\x00" * 5000,
        b"GET /trio_cluster HTTP/1.1\r\nHost: \xff\r\n\r\n",
        b"GET /elsewhere HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello
        msgpack.packb([[Kind.REQUEST, 1, Mode.CALL, "Probe", "p1", "default", 1]]),
    ]

    async def send(data: bytes) -> None:
        stream = await trio.open_tcp_stream(first.address.host, first.address.port)
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(data)

    async with open_probe_pair() as (first, second):
        fuzzed = await Fuzzed.open(first, second)
        RUNS.clear()
        with trio.fail_after(EXAMPLE_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for data in garbage:
                    nursery.start_soon(send, data)
        await fuzzed._settle()  # within connect_timeout (2 s) + SETTLE
        fuzzed._check_runs(expected={}, maybe={})
        await fuzzed._check_real_peer()
        assert endpoint_of(first).statistics().connects == fuzzed.connects
