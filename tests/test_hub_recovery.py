"""An actor process SIGKILLed in the middle of a stream of changes loses nothing durable and applies nothing twice."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

import asyncpg
import pytest
import ray
import uvloop

from cluster.ledger_client import ShardUnavailable
from cluster.testing import assert_conserved, onboard, running_hub, start_local_ray
from core.ledger import Outcome
from core.money import parse_amount, to_decimal
from protos import ledger_pb2 as pb


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    start_local_ray()
    yield
    ray.shutdown()


async def _ping_when_back(handle, attempts: int = 100) -> dict:
    for _ in range(attempts):
        try:
            return await handle.ping.remote()
        except ray.exceptions.RayActorError:
            await asyncio.sleep(0.1)
    raise AssertionError("the shard actor did not come back")


# "ingress": the process killed is the ingress worker hosting the payer's shard (Ray restarts it, the
# shard rebuilds in it); "actors": the shard's own actor process.
@pytest.mark.parametrize("shard_host", ["ingress", "actors"])
def test_sigkill_mid_stream_loses_nothing_durable_and_applies_nothing_twice(database_url, shard_host):
    async def scenario():
        async with running_hub(database_url, shards=2, actor_call_retries=8, shard_host=shard_host) as hub:
            accounts = await onboard(hub, ["payerfsp", "payeefsp"], ndc="1000000", deposit="1000000")
            connection = await asyncpg.connect(database_url)
            shard_of = dict(await connection.fetch("SELECT name, shard_id FROM participant"))
            await connection.close()
            payer_shard = shard_of["payerfsp"]
            payer_position = accounts["payerfsp"]["POSITION"]["id"]
            payee_position = accounts["payeefsp"]["POSITION"]["id"]
            victim_pid = (await hub.handles[payer_shard].ping.remote())["pid"]

            acknowledged: list[str] = []  # transfers whose commit was reported durable
            unknown: list[list[str]] = []  # batches whose outcome the caller could not learn

            async def stream(worker: int) -> None:
                for _ in range(30):
                    ids = [str(uuid.uuid4()) for _ in range(20)]
                    reserve = [pb.Command(reserve=pb.Reserve(
                        transfer_id=t, debit_account_id=payer_position, credit_account_id=payee_position,
                        amount_minor=str(parse_amount("1.25")), check=pb.CHECK_LIQUIDITY_AND_LIMIT)) for t in ids]
                    commit = [pb.Command(commit=pb.Commit(transfer_id=t)) for t in ids]
                    try:
                        reply = await hub.ledger.execute(payer_shard, reserve)
                        assert all(r.outcome in (Outcome.OK, Outcome.DUPLICATE) for r in reply.results), reply
                        reply = await hub.ledger.execute(payer_shard, commit)
                        assert all(r.outcome in (Outcome.OK, Outcome.ALREADY_COMMITTED) for r in reply.results), reply
                        acknowledged.extend(ids)
                    except ShardUnavailable:
                        unknown.append(ids)

            killed_at: list[float] = []

            async def killer() -> None:
                await asyncio.sleep(0.3)
                os.kill(victim_pid, signal.SIGKILL)
                killed_at.append(time.monotonic())

            await asyncio.gather(*(stream(w) for w in range(4)), killer())
            finished_at = time.monotonic()
            new_pid = (await _ping_when_back(hub.handles[payer_shard]))["pid"]
            assert new_pid != victim_pid, "the shard actor was not restarted"
            assert killed_at and finished_at > killed_at[0], "the kill did not land mid-stream"

            # Retry every batch with an unknown outcome, as a caller must: duplicates are recognised.
            for ids in unknown:
                for t in ids:
                    await hub.ledger.execute(payer_shard, [pb.Command(reserve=pb.Reserve(
                        transfer_id=t, debit_account_id=payer_position, credit_account_id=payee_position,
                        amount_minor=str(parse_amount("1.25")), check=pb.CHECK_LIQUIDITY_AND_LIMIT))])
                    await hub.ledger.execute(payer_shard, [pb.Command(commit=pb.Commit(transfer_id=t))])
                acknowledged.extend(ids)

            # Replaying every acknowledged transfer changes nothing: each is already committed.
            replay = await hub.ledger.execute(payer_shard, [pb.Command(commit=pb.Commit(transfer_id=t))
                                                            for t in acknowledged])
            assert {r.outcome for r in replay.results} == {Outcome.ALREADY_COMMITTED}

            # Let the outbox deliver the credit legs, then check exact positions and conservation.
            for _ in range(100):
                totals = await hub.ledger.totals()
                if totals["XTS"][2] == 0:
                    break
                await asyncio.sleep(0.1)
            connection = await asyncpg.connect(database_url)
            try:
                committed = await connection.fetchval(
                    "SELECT count(DISTINCT transfer_id) FROM journal WHERE kind = 2 AND transfer_id = ANY($1::text[])",
                    acknowledged)
                credited = await connection.fetchval(
                    "SELECT count(*) FROM journal WHERE kind = 5 AND transfer_id = ANY($1::text[])", acknowledged)
                reserved = await connection.fetchval(
                    "SELECT count(*) FROM journal WHERE kind = 1 AND transfer_id = ANY($1::text[])", acknowledged)
                payer_value = await connection.fetchval("SELECT value FROM account WHERE account_id = $1",
                                                        payer_position)
                payee_value = await connection.fetchval("SELECT value FROM account WHERE account_id = $1",
                                                        payee_position)
            finally:
                await connection.close()
            total = len(acknowledged)
            assert total == 4 * 30 * 20
            assert committed == total, "a transfer reported durable was lost"
            assert reserved == total and credited == total, "a transfer was applied twice"
            assert payer_value == to_decimal(parse_amount("1.25") * total)
            assert payee_value == -payer_value
            await assert_conserved(hub)

    uvloop.run(scenario())
