"""Dead letters between real runner processes on real PostgreSQL: a
persisted message whose handler ends its runner's process is dead-lettered
after its attempts, while the cluster serves everything else; then
``trio-cluster dlq`` lists, shows and purges it."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest
import trio

from .entities import Explode, Poison
from .helpers import MultiCluster, log
from .loads import Load, entity_ids, warm_up

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [pytest.mark.postgres, pytest.mark.multiprocess, pytest.mark.slow]

ENTITIES = entity_ids(60)


async def dlq(cluster: MultiCluster, *args: str) -> tuple[int, str]:
    """``trio-cluster dlq ARGS --json`` on the cluster: exit status, stdout."""
    code, out, _ = await cluster.command("dlq", *args)
    return code, out


async def test_a_message_that_kills_its_runners_is_dead_lettered(
    cluster: MultiCluster, tmp_path: Path
) -> None:
    runners = await cluster.start("a", "b", "c")
    attempts_log = tmp_path / "attempts"
    async with cluster.client() as client:
        await warm_up(client, ENTITIES)
        async with Load(client, ENTITIES).running() as load:
            await client.client(Poison)("bomb").explode.discard(
                Explode(str(attempts_log))
            )
            # Two attempts, each ending its runner; the third claim
            # dead-letters the request without running it.
            with trio.fail_after(60):
                while True:
                    letters = await client.dead_letters.list()
                    if letters:
                        break
                    await trio.sleep(0.2)
            [letter] = letters
            exited = [r for r in runners if r.process and r.process.returncode == 3]
            assert len(exited) == 2, runners
            survivor = next(r for r in runners if r not in exited)
            # Everybody else answers, from the survivor.
            await load.wait_all_answer(ENTITIES, after=trio.current_time(), seconds=30)
            assert {load.owner(e) for e in ENTITIES} == {survivor.address}
        assert not load.unexpected, load.unexpected[:5]
        load.check_single_owner()
    ran_on = attempts_log.read_text().split()
    assert sorted(ran_on) == sorted(r.address for r in exited)
    assert (letter.entity_type, letter.entity_id, letter.tag) == (
        Poison.type_name,
        "bomb",
        "explode",
    )
    assert letter.error == "its runner stopped during attempt 2"
    log.info("poison message dead-lettered after killing %s", ran_on)

    # The command line sees it too, then purges it.
    code, out = await dlq(cluster, "list")
    assert code == 0, out
    [listed] = json.loads(out)
    assert (listed["id"], listed["attempts"]) == (letter.request_id, letter.attempts)
    code, out = await dlq(cluster, "show", str(letter.request_id))
    assert code == 0, out
    assert json.loads(out)["handler"] == "explode"
    code, out = await dlq(cluster, "show", "1")
    assert code == 1
    code, out = await dlq(cluster, "purge", str(letter.request_id))
    assert (code, json.loads(out)) == (0, {"purged": 1})
    code, out = await dlq(cluster, "list")
    assert (code, json.loads(out)) == (0, [])
    assert survivor.process is not None
    assert survivor.process.returncode is None  # still serving
