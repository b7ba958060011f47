"""The transactional outbox under the simulator: a transactional handler
sends a persisted note, then its runner is killed before the transaction
commits; the note of that run is never delivered, the note of the run that
commits is. With the note saved outside the transaction (a planted bug) the
killed run's note is delivered too: a phantom."""

from __future__ import annotations

from typing import ClassVar

import attrs
import pytest
import trio

import trio_cluster as tc
from trio_cluster.testing import open_simulated_cluster, run_simulation

from .planted import outbox_outside_the_transaction

pytestmark = pytest.mark.simulation


@attrs.frozen
class Forward:
    key: str
    work: float


@attrs.frozen
class Note:
    key: str
    run: int


class Notebook(tc.Entity):
    type_name = "sim.Notebook"
    notes: ClassVar[list[Note]] = []

    @tc.rpc(persisted=True)
    async def note(self, msg: Note) -> None:
        Notebook.notes.append(msg)


class Forwarder(tc.Entity):
    """Sends a note in its transaction, then works (a kill may land there)."""

    type_name = "sim.Forwarder"
    runs: ClassVar[list[int]] = []

    @tc.rpc(persisted=True, transactional=True, primary_key=lambda m: m.key)
    async def forward(self, msg: Forward) -> int:
        run = int(tc.current_runner().new_id())
        Forwarder.runs.append(run)
        await (
            tc.current_runner()
            .client(Notebook)(msg.key)
            .note.discard(Note(msg.key, run))
        )
        await trio.sleep(msg.work)
        return run


async def kill_a_forward_after_its_send() -> tuple[int, list[int], list[Note]]:
    """Forward once; kill the runner running it after it sent its note;
    return the committed run, every run, and the notes delivered."""
    Notebook.notes, Forwarder.runs = [], []
    async with open_simulated_cluster([Forwarder, Notebook], runners=3) as cluster:
        await cluster.wait_stable()
        address = cluster.client(Forwarder)("f").address
        owner = cluster.owner_of(address)
        assert owner is not None
        via = next(h.index for h in cluster.up() if h.index != owner)
        client = cluster.client(Forwarder, via=via)("f")
        result: list[int] = []

        async def call() -> None:
            result.append(await client.forward(Forward("f", work=5.0)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            with trio.fail_after(30):
                while not Forwarder.runs:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            await cluster.kill(owner)
        with trio.fail_after(60):
            while not Notebook.notes:  # noqa: ASYNC110
                await trio.sleep(0.1)
        await trio.sleep(10)  # a phantom note would arrive meanwhile
        return result[0], list(Forwarder.runs), list(Notebook.notes)


def test_only_the_committed_runs_note_is_delivered():
    committed, runs, notes = run_simulation(kill_a_forward_after_its_send)
    assert len(runs) == 2  # the killed run, then the one that committed
    assert committed == runs[-1]
    assert notes == [Note("f", committed)]


def test_a_note_saved_outside_the_transaction_is_a_phantom(monkeypatch):
    outbox_outside_the_transaction(monkeypatch)
    committed, runs, notes = run_simulation(kill_a_forward_after_its_send)
    assert len(runs) == 2
    assert {note.run for note in notes} == set(runs)  # the killed run's too
    assert committed == runs[-1]
