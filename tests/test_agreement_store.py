"""RequestStore (api/fspiop/agreement.py) against real Postgres: batches, duplicates, its bound."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
import uvloop

from api.fspiop.agreement import NewRequest, RequestStore, StoreFull


def row(request_id: str, request_hash: str = "h") -> NewRequest:
    return NewRequest("quotes", request_id, "payer", "payee", request_hash, None, f"tx-{request_id}", None, "1.1",
                      1_700_000_000_000)


def test_concurrent_inserts_share_statements_and_duplicates_are_told(database_url):
    async def scenario():
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        try:
            store = RequestStore(pool, batch_max=50, queue_max=1_000, flushes_max=1)
            rows = [row(f"q{n}") for n in range(200)] + [row("q7", "other"), row("q8")]
            results = await asyncio.gather(*(store.insert(r) for r in rows))
            # Each id is new exactly once, whichever of its rows got there first.
            assert results[:200] == [True] * 200 and results[200:] == [False, False]
            assert store.batches <= 6  # 202 rows in batches of at most 50, joined while one flush runs
            stored = await pool.fetch("SELECT request_id, request_hash, state, transaction_id FROM agreement_request")
            assert len(stored) == 200
            q7 = next(r for r in stored if r["request_id"] == "q7")
            assert (q7["request_hash"], q7["state"], q7["transaction_id"]) == ("h", "PENDING", "tx-q7")
            # Two rows with one id in the same batch: the first is stored, the second is a duplicate.
            same = await asyncio.gather(store.insert(row("dup", "first")), store.insert(row("dup", "second")))
            assert same == [True, False]
            assert await pool.fetchval("SELECT request_hash FROM agreement_request WHERE request_id = 'dup'") == "first"
        finally:
            await pool.close()

    uvloop.run(scenario())


def test_a_full_queue_refuses_instead_of_waiting(database_url):
    async def scenario():
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
        try:
            store = RequestStore(pool, batch_max=1, queue_max=2, flushes_max=1)
            async with pool.acquire():  # the only connection is busy: nothing can be flushed yet
                first = asyncio.ensure_future(store.insert(row("a")))
                await asyncio.sleep(0)  # the flush takes "a" off the queue and waits for a connection
                waiting = [asyncio.ensure_future(store.insert(row(name))) for name in ("b", "c")]
                await asyncio.sleep(0)
                with pytest.raises(StoreFull):
                    await store.insert(row("d"))
            assert await asyncio.gather(first, *waiting) == [True, True, True]
        finally:
            await pool.close()

    uvloop.run(scenario())
