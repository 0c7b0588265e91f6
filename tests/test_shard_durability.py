"""PositionShard against real Postgres, without Ray: write-behind, cross-shard credits, recovery."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
import uvloop

from actors.position_shard import PositionShard, ShardSettings
from core.ledger import Check, Outcome
from core.money import parse_amount, to_decimal
from protos import ledger_pb2 as pb


async def _seed(url: str) -> dict[str, int]:
    """Hub on shard 0 with hub accounts, payer on shard 0, payee on shard 1, all in XTS."""
    connection = await asyncpg.connect(url)
    try:
        await connection.execute("INSERT INTO shard (shard_id) VALUES (0), (1)")
        ids: dict[str, int] = {}
        for name, shard, is_hub in (("Hub", 0, True), ("payer", 0, False), ("payee", 1, False)):
            participant_id = await connection.fetchval(
                "INSERT INTO participant (name, shard_id, is_hub) VALUES ($1, $2, $3) RETURNING participant_id",
                name, shard, is_hub,
            )
            types = ("HUB_RECONCILIATION", "HUB_MULTILATERAL_SETTLEMENT") if is_hub else ("POSITION", "SETTLEMENT")
            for account_type in types:
                ids[f"{name}.{account_type}"] = await connection.fetchval(
                    "INSERT INTO account (participant_id, currency, ledger_account_type, is_active)"
                    " VALUES ($1, 'XTS', $2, true) RETURNING account_id",
                    participant_id, account_type,
                )
        return ids
    finally:
        await connection.close()


def _reserve(transfer_id, debit, credit, amount, *, check=pb.CHECK_LIQUIDITY_AND_LIMIT, commit_now=False,
             expires_at_ms=0):
    return pb.Command(reserve=pb.Reserve(
        transfer_id=transfer_id, debit_account_id=debit, credit_account_id=credit,
        amount_minor=str(parse_amount(amount)), check=check, commit_now=commit_now, expires_at_ms=expires_at_ms,
    ))


class Cluster:
    """Two in-process shards that call each other directly: with serialized batches (the Ray transport's
    stand-in), or, ``local=True``, handing messages over as shards hosted by one ingress worker do."""

    def __init__(self, url: str, *, local: bool = False, **settings):
        self.settings = ShardSettings(dsn=url, **{"credit_retry_ms": 20, "expiry_tick_ms": 10, **settings})
        self.local = local
        self.shards: dict[int, PositionShard] = {}
        for shard_id in (0, 1):
            self.restart(shard_id)

    def restart(self, shard_id: int) -> PositionShard:
        self.shards[shard_id] = PositionShard(shard_id, self.settings, call_peer=self._call, on_fatal=_raise,
                                              local_peer=self.shards.get if self.local else None)
        return self.shards[shard_id]

    async def _call(self, shard_id: int, payload: bytes) -> bytes:
        return await self.shards[shard_id].execute(payload)

    async def run(self, shard_id: int, *commands: pb.Command) -> pb.BatchResult:
        batch = pb.CommandBatch(commands=list(commands), wait_durable=True)
        return pb.BatchResult.FromString(await self.shards[shard_id].execute(batch.SerializeToString()))

    async def stop(self) -> None:
        for shard in self.shards.values():
            await shard.stop()


async def _fund_payer(cluster: Cluster, ids: dict[str, int], *, deposit: str, cap: str) -> None:
    """Funds in to the payer's settlement account (from the hub, shard 0) and its net debit cap."""
    reply = await cluster.run(0, _reserve(str(uuid.uuid4()), ids["Hub.HUB_RECONCILIATION"], ids["payer.SETTLEMENT"],
                                          deposit, check=pb.CHECK_NONE, commit_now=True),
                              pb.Command(set_net_debit_cap=pb.SetNetDebitCap(
                                  account_id=ids["payer.POSITION"], cap_minor=str(parse_amount(cap)))))
    assert [r.outcome for r in reply.results] == [Outcome.OK, Outcome.OK]


def _raise(reason: str) -> None:
    raise AssertionError(f"shard died: {reason}")


async def _assert_conserved(url: str, cluster: Cluster | None = None) -> None:
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch("SELECT currency, imbalance FROM currency_conservation")
    finally:
        await connection.close()
    assert rows, "no accounts"
    for row in rows:
        assert row["imbalance"] == 0, f"{row['currency']} imbalance {row['imbalance']}"
    if cluster is not None:
        totals: dict[str, list[int]] = {}
        for shard in cluster.shards.values():
            for currency, parts in (await shard.totals()).items():
                entry = totals.setdefault(currency, [0, 0, 0])
                for i, value in enumerate(parts):
                    entry[i] += value
        for currency, (values, reserved, owed) in totals.items():
            assert values - reserved - owed == 0, f"live {currency}: {values} - {reserved} - {owed}"


@pytest.mark.parametrize("local", [False, True], ids=["serialized peers", "in-process peers"])
def test_transfers_are_durable_conserved_and_survive_restart(database_url, local):
    async def scenario():
        ids = await _seed(database_url)
        cluster = Cluster(database_url, local=local)
        try:
            # Funds in: hub reconciliation (shard 0) -> payee's and payer's settlement accounts.
            for name in ("payer", "payee"):
                reply = await cluster.run(0, _reserve(str(uuid.uuid4()), ids["Hub.HUB_RECONCILIATION"],
                                                      ids[f"{name}.SETTLEMENT"], "1000", check=pb.CHECK_NONE,
                                                      commit_now=True))
                assert reply.results[0].outcome == Outcome.OK
                assert reply.credits_pending == 0  # the payee's shard is up: its credit is delivered in the call
            for shard, name in ((0, "payer"), (1, "payee")):
                reply = await cluster.run(shard, pb.Command(set_net_debit_cap=pb.SetNetDebitCap(
                    account_id=ids[f"{name}.POSITION"], cap_minor=str(parse_amount("500")))))
                assert reply.results[0].outcome == Outcome.OK
            await _assert_conserved(database_url, cluster)

            # 20 transfers payer -> payee: reserve on shard 0, commit there, credit on shard 1.
            transfer_ids = [str(uuid.uuid4()) for _ in range(20)]
            reply = await cluster.run(0, *(_reserve(t, ids["payer.POSITION"], ids["payee.POSITION"], "10.5")
                                           for t in transfer_ids))
            assert [r.outcome for r in reply.results] == [Outcome.OK] * 20
            await _assert_conserved(database_url, cluster)
            reply = await cluster.run(0, *(pb.Command(commit=pb.Commit(transfer_id=t)) for t in transfer_ids[:15]),
                                      *(pb.Command(abort=pb.Abort(transfer_id=t)) for t in transfer_ids[15:]))
            assert [r.outcome for r in reply.results] == [Outcome.OK] * 20
            assert reply.credits_pending == 0
            await _assert_conserved(database_url, cluster)

            # Over the cap: 500 - 15 * 10.5 = 342.5 left.
            reply = await cluster.run(0, _reserve(str(uuid.uuid4()), ids["payer.POSITION"], ids["payee.POSITION"],
                                                  "342.6"))
            assert reply.results[0].outcome == Outcome.LIMIT_EXCEEDED

            before = {s: await cluster.shards[s].describe() for s in (0, 1)}
            # Restart both shards from Postgres: the same state, and duplicates still recognised.
            await cluster.stop()
            cluster.restart(0)
            cluster.restart(1)
            after = {s: await cluster.shards[s].describe() for s in (0, 1)}
            for s in (0, 1):
                assert before[s]["participants"] == after[s]["participants"]
            reply = await cluster.run(0, _reserve(transfer_ids[0], ids["payer.POSITION"], ids["payee.POSITION"],
                                                  "10.5"))
            assert reply.results[0].outcome == Outcome.DUPLICATE
            assert reply.results[0].state == "COMMITTED"
            await _assert_conserved(database_url, cluster)
        finally:
            await cluster.stop()

    uvloop.run(scenario())


def test_expiry_releases_reservation_durably(database_url):
    async def scenario():
        ids = await _seed(database_url)
        cluster = Cluster(database_url)
        try:
            await _fund_payer(cluster, ids, deposit="100", cap="100")
            transfer_id = str(uuid.uuid4())
            now_ms = cluster.shards[0]._clock_ms()
            reply = await cluster.run(0, _reserve(transfer_id, ids["payer.POSITION"], ids["payee.POSITION"], "60",
                                                  expires_at_ms=now_ms + 100))
            assert reply.results[0].outcome == Outcome.OK
            events = await cluster.shards[0].wait_events(0, timeout_ms=3_000)
            assert [e[1] for e in events] == [transfer_id]
            reply = await cluster.run(0, pb.Command(commit=pb.Commit(transfer_id=transfer_id)))
            assert reply.results[0].outcome == Outcome.ALREADY_ABORTED
            connection = await asyncpg.connect(database_url)
            try:
                assert await connection.fetchval("SELECT count(*) FROM open_reservation") == 0
                assert await connection.fetchval(
                    "SELECT value FROM account WHERE account_id = $1", ids["payer.POSITION"]) == 0
            finally:
                await connection.close()
            await _assert_conserved(database_url, cluster)
        finally:
            await cluster.stop()

    uvloop.run(scenario())


@pytest.mark.parametrize("wait_ms", [0, 1])
def test_credits_arrive_when_commits_do_not_wait_for_them(database_url, wait_ms):
    """credit_wait_timeout_ms 0 (or shorter than a delivery): the commit answers once it is durable and the
    credit legs still reach the payee's shard (one delivery attempt may take credit_delivery_timeout_ms)."""
    async def scenario():
        ids = await _seed(database_url)
        cluster = Cluster(database_url, credit_wait_timeout_ms=wait_ms, credit_retry_ms=60_000)
        try:
            await _fund_payer(cluster, ids, deposit="1000", cap="1000")
            transfer_ids = [str(uuid.uuid4()) for _ in range(15)]
            reply = await cluster.run(0, *(_reserve(t, ids["payer.POSITION"], ids["payee.POSITION"], "2")
                                           for t in transfer_ids))
            assert [r.outcome for r in reply.results] == [Outcome.OK] * 15
            reply = await cluster.run(0, *(pb.Command(commit=pb.Commit(transfer_id=t)) for t in transfer_ids))
            assert [r.outcome for r in reply.results] == [Outcome.OK] * 15
            if wait_ms == 0:
                assert reply.credits_pending == 15  # answered without waiting for shard 1
            # Durable rows only: the live sum read shard by shard would catch a credit between apply and ack.
            await _assert_conserved(database_url)
            # No outbox round runs within the test (60 s): the background delivery alone brings them.
            for _ in range(200):
                owed = sum(parts[2] for parts in (await cluster.shards[0].totals()).values())
                if owed == 0:
                    break
                await asyncio.sleep(0.01)
            assert owed == 0, "credits still owed"
            [payee] = (await cluster.shards[1].describe("payee"))["participants"]
            position = next(a for a in payee["accounts"] if a["ledger_account_type"] == "POSITION")
            assert position["value"] == "-30"  # 15 credits of 2, each applied once
            await _assert_conserved(database_url, cluster)
        finally:
            await cluster.stop()

    uvloop.run(scenario())


@pytest.mark.parametrize("batch_size", [1, 50])
def test_concurrent_callers_share_flushes(database_url, batch_size):
    """Many callers at once: each reply comes after its own changes are durable (group commit)."""
    async def scenario():
        ids = await _seed(database_url)
        cluster = Cluster(database_url)
        try:
            await _fund_payer(cluster, ids, deposit="100000", cap="100000")

            async def caller() -> None:
                transfer_ids = [str(uuid.uuid4()) for _ in range(batch_size)]
                reply = await cluster.run(0, *(_reserve(t, ids["payer.POSITION"], ids["payee.POSITION"], "1")
                                               for t in transfer_ids))
                durable = reply.durable_seq
                assert all(r.seq <= durable for r in reply.results)
                await cluster.run(0, *(pb.Command(commit=pb.Commit(transfer_id=t)) for t in transfer_ids))

            await asyncio.gather(*(caller() for _ in range(20)))
            state = await cluster.shards[0].describe()
            assert state["shard"]["flushes"] < 20 * 2 * 2  # fewer flushes than changes: batched
            await _assert_conserved(database_url, cluster)
        finally:
            await cluster.stop()

    uvloop.run(scenario())


def test_crash_between_checkpoints_replays_the_journal_tail(database_url):
    """Reservations and owed credits written only to the journal since the last checkpoint come back."""
    async def scenario():
        ids = await _seed(database_url)
        cluster = Cluster(database_url, checkpoint_interval_ms=3_600_000)
        try:
            await _fund_payer(cluster, ids, deposit="1000", cap="1000")
            open_ids = [str(uuid.uuid4()) for _ in range(5)]
            committed_ids = [str(uuid.uuid4()) for _ in range(5)]
            await cluster.run(0, *(_reserve(t, ids["payer.POSITION"], ids["payee.POSITION"], "3")
                                   for t in open_ids + committed_ids))
            # Commit while the payee's shard is down: the credit legs stay owed.
            payee_shard = cluster.shards.pop(1)
            await payee_shard.stop()
            reply = await cluster.run(0, *(pb.Command(commit=pb.Commit(transfer_id=t)) for t in committed_ids))
            assert [r.outcome for r in reply.results] == [Outcome.OK] * 5
            assert reply.credits_pending == 5
            before = await cluster.shards[0].describe()
            # Crash shard 0: its loops stop without a checkpoint, as after SIGKILL.
            crashed = cluster.shards[0]
            for task in crashed._tasks:
                task.cancel()
            await asyncio.gather(*crashed._tasks, return_exceptions=True)
            await crashed._pool.close()
            connection = await asyncpg.connect(database_url)
            try:
                assert await connection.fetchval("SELECT count(*) FROM open_reservation") == 0
                assert await connection.fetchval("SELECT count(*) FROM pending_credit") == 0
            finally:
                await connection.close()
            cluster.restart(0)
            cluster.restart(1)
            after = await cluster.shards[0].describe()
            assert after["participants"] == before["participants"]
            assert sorted(cluster.shards[0].book.reservations) == sorted(open_ids)
            # The owed credits are delivered once the payee's shard is back.
            for _ in range(200):
                if not cluster.shards[0].book.outbox:
                    break
                await asyncio.sleep(0.02)
            assert not cluster.shards[0].book.outbox
            reply = await cluster.run(0, *(pb.Command(abort=pb.Abort(transfer_id=t)) for t in open_ids))
            assert [r.outcome for r in reply.results] == [Outcome.OK] * 5
            await _assert_conserved(database_url, cluster)
        finally:
            await cluster.stop()

    uvloop.run(scenario())


def test_forgotten_transfers_are_still_duplicates(database_url):
    """Beyond the desk's window (or after a restart), Postgres answers whether an id was used."""
    async def scenario():
        ids = await _seed(database_url)
        cluster = Cluster(database_url, dedupe_window=3)
        try:
            await _fund_payer(cluster, ids, deposit="1000", cap="1000")
            expires = cluster.shards[0]._clock_ms() + 60_000

            def prepare(transfer_id: str, amount: str, hash_: str) -> pb.Command:
                return pb.Command(prepare_transfer=pb.PrepareTransfer(
                    transfer_id=transfer_id, payer="payer", payee="payee", currency="XTS",
                    amount_minor=str(parse_amount(amount)), condition="c" * 43, expires_at_ms=expires,
                    prepare_hash=hash_, payer_account_id=ids["payer.POSITION"],
                    payee_account_id=ids["payee.POSITION"], version="1.1"))

            first = str(uuid.uuid4())
            reply = await cluster.run(0, prepare(first, "1", "h1"))
            assert reply.results[0].outcome == "RESERVED"
            await cluster.run(0, pb.Command(reject_transfer=pb.RejectTransfer(
                transfer_id=first, source="payee", error_code=5104, description="no")))
            assert cluster.shards[0].desk.complete
            for _ in range(4):  # push the first transfer out of the 3-transfer window
                t = str(uuid.uuid4())
                await cluster.run(0, prepare(t, "1", t))
                await cluster.run(0, pb.Command(reject_transfer=pb.RejectTransfer(
                    transfer_id=t, source="payee", error_code=5104, description="no")))
            assert not cluster.shards[0].desk.complete
            assert not cluster.shards[0].desk.knows(first)
            reply = await cluster.run(0, prepare(first, "1", "h1"))
            assert (reply.results[0].outcome, reply.results[0].state) == ("RESEND", "ABORTED")
            reply = await cluster.run(0, prepare(first, "2", "h2"))
            assert (reply.results[0].outcome, reply.results[0].error_code) == ("MODIFIED", 3106)
            await _assert_conserved(database_url, cluster)
        finally:
            await cluster.stop()

    uvloop.run(scenario())


def test_a_repeated_call_after_a_restart_gets_the_decision_not_a_duplicate(database_url):
    """The ingress repeats a call whose reply was lost when the shard died after the change was durable.

    The restarted shard must recognise its own request (by the ingress's request id, kept in Postgres) and
    answer the decision (RESERVED, COMMITTED), so the ingress forwards the prepare and tells the payer; a DFSP's
    repeat of the same message (another request id) is still a duplicate."""
    import base64
    import hashlib

    async def scenario():
        ids = await _seed(database_url)
        cluster = Cluster(database_url)
        try:
            await _fund_payer(cluster, ids, deposit="100", cap="100")
            fulfilment = base64.urlsafe_b64encode(b"f" * 32).rstrip(b"=").decode()
            condition = base64.urlsafe_b64encode(hashlib.sha256(b"f" * 32).digest()).rstrip(b"=").decode()
            transfer_id = str(uuid.uuid4())
            prepare = pb.Command(prepare_transfer=pb.PrepareTransfer(
                transfer_id=transfer_id, payer="payer", payee="payee", currency="XTS",
                amount_minor=str(parse_amount("7")), condition=condition,
                expires_at_ms=cluster.shards[0]._clock_ms() + 60_000, prepare_hash="h", version="1.1",
                payer_account_id=ids["payer.POSITION"], payee_account_id=ids["payee.POSITION"],
                request_id="ingress-a:1"))
            fulfil = pb.Command(fulfil_transfer=pb.FulfilTransfer(
                transfer_id=transfer_id, fulfilment=fulfilment, fulfil_hash="fh", source="payee",
                destination="payer", request_id="ingress-a:2"))

            assert (await cluster.run(0, prepare)).results[0].outcome == "RESERVED"
            await cluster.stop()
            cluster.restart(0)
            cluster.restart(1)
            assert (await cluster.run(0, prepare)).results[0].outcome == "RESERVED"  # the same call again
            assert (await cluster.run(0, fulfil)).results[0].outcome == "COMMITTED"
            await cluster.stop()
            cluster.restart(0)
            cluster.restart(1)
            reply = await cluster.run(0, fulfil)  # the same call again, after a restart
            assert (reply.results[0].outcome, reply.results[0].transfer.state) == ("COMMITTED", "COMMITTED")
            fulfil.fulfil_transfer.request_id = "ingress-b:9"  # the payee sent its PUT twice
            assert (await cluster.run(0, fulfil)).results[0].outcome == "RESEND"
            prepare.prepare_transfer.request_id = "ingress-b:10"
            assert (await cluster.run(0, prepare)).results[0].outcome == "RESEND"
            await asyncio.sleep(0.1)  # the credit leg reaches the payee's shard
            await _assert_conserved(database_url, cluster)
        finally:
            await cluster.stop()

    uvloop.run(scenario())


def test_a_failed_start_is_tried_again_by_the_next_call(server_url, template_url):
    """A shard hosted in an ingress worker shares its process: when its rebuild fails (here its database
    does not exist yet), the next call tries again instead of failing forever."""
    name = f"rayloop_late_{uuid.uuid4().hex[:10]}"
    url = f"{server_url.rpartition('/')[0]}/{name}"
    template = template_url.rpartition("/")[2]

    async def admin(statement: str) -> None:
        connection = await asyncpg.connect(server_url)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    async def scenario():
        shard = PositionShard(0, ShardSettings(dsn=url), on_fatal=_raise)
        with pytest.raises(asyncpg.InvalidCatalogNameError):
            await shard.ping()
        await admin(f"CREATE DATABASE {name} TEMPLATE {template}")
        try:
            await _seed(url)
            assert (await shard.ping())["shard_id"] == 0
            assert await shard.check_invariants()
            await shard.stop()
        finally:
            await admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    uvloop.run(scenario())


@pytest.mark.parametrize("with_checkpoint", [False, True], ids=["one-call flush", "statement flush"])
def test_a_stale_incarnation_is_fenced_out_and_writes_nothing(database_url, with_checkpoint):
    """Two books loaded from the same durable state: the first flush wins, the second is refused whole
    (ordinary flushes go through rayloop_flush, checkpoints statement by statement; both keep the fence)."""
    from actors.store import FencedOut, ShardStore

    async def scenario():
        ids = await _seed(database_url)
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        try:
            store = ShardStore(pool, 0)
            live = await store.load(dedupe_window=100)
            stale = await store.load(dedupe_window=100)
            for book, transfer_id in ((live, "t-live"), (stale, "t-stale")):
                result = book.reserve(transfer_id, ids["Hub.HUB_RECONCILIATION"], ids["payer.SETTLEMENT"],
                                      parse_amount("5"), 1_000, check=Check.NONE)
                assert result.outcome is Outcome.OK
            await store.flush(live.drain(checkpoint=with_checkpoint))
            with pytest.raises(FencedOut):
                await store.flush(stale.drain(checkpoint=with_checkpoint))
            rows = await pool.fetch("SELECT transfer_id FROM journal WHERE shard_id = 0 ORDER BY seq")
            assert [r["transfer_id"] for r in rows] == ["t-live"]
            assert await pool.fetchval("SELECT last_durable_seq FROM shard WHERE shard_id = 0") == live.seq
            reserved = await pool.fetchval(
                "SELECT reserved_value FROM account WHERE account_id = $1", ids["Hub.HUB_RECONCILIATION"])
            assert reserved == to_decimal(parse_amount("5"))
            await _assert_conserved(database_url)
        finally:
            await pool.close()

    uvloop.run(scenario())
