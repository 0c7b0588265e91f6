"""What one write-behind flush costs: the one-call flush (``rayloop_flush``) against statement by statement.

A shard's flush is on the path of every reply that waits for durability, and it runs on the ingress
worker's event loop when shards are hosted there. This measures the two ways ``ShardStore`` writes a
batch, each with asyncpg's default pool reset on release and with the reset skipped (as the shard's
pool does), in alternating rounds against a fresh database:

* wall milliseconds per flush (one flush at a time, as one shard does);
* CPU milliseconds per flush in this process (building the batch, encoding, the protocol);
* CPU milliseconds per flush in the Postgres backend that ran it (from ``/proc``).

Each flush carries what a shard under transfer load flushes: ``--transfers`` new transfers (prepare:
a RESERVE journal row and a transfer insert) and as many earlier ones fulfilled (a COMMIT and a CREDIT
row, a transfer update), over 16 accounts.

    python -m loadtests.flush_bench --flushes 400 --rounds 3

Uses RAYLOOP_DATABASE_URL's server (a fresh database, dropped afterwards) or an embedded Postgres.
Writes loadtests/results/flush_bench.json and prints a Markdown table (medians over the rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import uuid
from base64 import urlsafe_b64encode
from pathlib import Path

import asyncpg
import uvloop

from actors.store import ShardStore
from cluster.db import migrate, skip_session_reset
from cluster.testing import bench_environment
from core.transfers import TransferDesk, TransferRecord, Verdict, condition_of

RESULTS = Path(__file__).with_name("results")
ACCOUNTS = 16


async def _seed(url: str) -> list[int]:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute("INSERT INTO shard (shard_id) VALUES (0)")
        account_ids = []
        for index in range(ACCOUNTS):
            participant_id = await connection.fetchval(
                "INSERT INTO participant (name, shard_id) VALUES ($1, 0) RETURNING participant_id", f"dfsp{index}"
            )
            account_ids.append(await connection.fetchval(
                "INSERT INTO account (participant_id, currency, ledger_account_type, is_active, net_debit_cap)"
                " VALUES ($1, 'XTS', 'POSITION', true, 1000000000) RETURNING account_id",
                participant_id,
            ))
            # Liquidity cover for the prepares (a scratch database: only the flush cost is measured).
            await connection.execute(
                "INSERT INTO account (participant_id, currency, ledger_account_type, is_active, value)"
                " VALUES ($1, 'XTS', 'SETTLEMENT', true, -1000000000)",
                participant_id,
            )
        return account_ids
    finally:
        await connection.close()


def _backend_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _measure(url: str, account_ids: list[int], *, one_call: bool, skip_reset: bool, flushes: int,
                   transfers: int) -> dict:
    pool = await asyncpg.create_pool(
        url, min_size=1, max_size=1, reset=skip_session_reset if skip_reset else None,
        server_settings={"plan_cache_mode": "force_custom_plan"},  # as the shard's pool
    )
    try:
        store = ShardStore(pool, 0)
        book = await store.load(dedupe_window=100_000)
        desk = TransferDesk(book, window=100_000)
        backend = await pool.fetchval("SELECT pg_backend_pid()")
        write = store._flush_in_one_call if one_call else store._flush_by_statements
        now_ms = int(time.time() * 1000)
        open_ids: list[tuple[str, str, str]] = []
        rows = 0
        wall_s = cpu_s = 0.0
        backend_before = _backend_cpu_s(backend)
        for flush in range(flushes):
            for _, (transfer_id, fulfilment, payer, payee) in zip(range(transfers), open_ids, strict=False):
                decision = desk.fulfil(transfer_id, fulfilment=fulfilment, fulfil_hash=fulfilment,
                                       completed_ms=now_ms, reserved_mode=False, source=payee, destination=payer,
                                       now_ms=now_ms)
                assert decision.verdict is Verdict.COMMITTED, decision
            open_ids = open_ids[transfers:]
            for index in range(transfers):
                transfer_id = str(uuid.uuid4())
                fulfilment = urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
                payer, payee = (flush + index) % ACCOUNTS, (flush + index + 1) % ACCOUNTS
                decision = desk.prepare(TransferRecord(
                    transfer_id=transfer_id, payer=f"dfsp{payer}", payee=f"dfsp{payee}", currency="XTS",
                    amount_minor=10_000, condition=condition_of(fulfilment), expires_at_ms=now_ms + 60_000,
                    prepare_hash=transfer_id, payer_account_id=account_ids[payer],
                    payee_account_id=account_ids[payee], created_ms=now_ms,
                ), now_ms)
                assert decision.verdict is Verdict.RESERVED, decision
                open_ids.append((transfer_id, fulfilment, f"dfsp{payer}", f"dfsp{payee}"))
            started_wall, started_cpu = time.perf_counter(), time.process_time()
            batch = book.drain()
            batch.transfer_inserts, batch.transfer_updates = desk.drain()
            await write(batch)
            wall_s += time.perf_counter() - started_wall
            cpu_s += time.process_time() - started_cpu
            rows += len(batch.entries) + len(batch.accounts) + len(batch.transfer_inserts) + len(
                batch.transfer_updates)
        backend_s = _backend_cpu_s(backend) - backend_before
        return {
            "wall_ms_per_flush": round(1000 * wall_s / flushes, 3),
            "client_cpu_ms_per_flush": round(1000 * cpu_s / flushes, 3),
            "postgres_cpu_ms_per_flush": round(1000 * backend_s / flushes, 3),
            "rows_per_flush": round(rows / flushes, 1),
        }
    finally:
        await pool.close()


async def main(args) -> dict:
    variants = [(one_call, skip) for one_call in (False, True) for skip in (False, True)]
    rounds: dict[str, list[dict]] = {}
    async with bench_environment() as url:
        await migrate(url)
        account_ids = await _seed(url)
        for _ in range(args.rounds):
            for one_call, skip in variants:
                name = f"{'one call' if one_call else 'statements'}, reset {'skipped' if skip else 'default'}"
                rounds.setdefault(name, []).append(await _measure(
                    url, account_ids, one_call=one_call, skip_reset=skip, flushes=args.flushes,
                    transfers=args.transfers))
    medians = {
        name: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for name, results in rounds.items()
    }
    return {
        "command": "python -m loadtests.flush_bench " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "output"),
        "machine": f"{platform.node()} {os.cpu_count()} cores {platform.machine()}, Python {platform.python_version()}",
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rounds": rounds,
        "median": medians,
    }


def _table(report: dict) -> str:
    lines = ["| flush | wall ms | client CPU ms | Postgres CPU ms | rows |", "|---|---:|---:|---:|---:|"]
    for name, m in report["median"].items():
        lines.append(f"| {name} | {m['wall_ms_per_flush']} | {m['client_cpu_ms_per_flush']} |"
                     f" {m['postgres_cpu_ms_per_flush']} | {m['rows_per_flush']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flushes", type=int, default=400, help="flushes per variant and round")
    parser.add_argument("--transfers", type=int, default=16, help="new transfers (and as many fulfils) per flush")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS / "flush_bench.json")
    arguments = parser.parse_args()
    result = uvloop.run(main(arguments))
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(result, indent=1) + "\n")
    print(_table(result))
