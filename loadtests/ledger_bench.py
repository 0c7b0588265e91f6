"""Reserve-then-commit pairs per second through the actor path, write-behind to Postgres on.

Starts a hub (Postgres from RAYLOOP_DATABASE_URL, or embedded), onboards DFSPs through the admin
API, then for each batch size runs concurrent callers that each send a batch of reserves and then
the batch of their commits to the payer's shard, every reply waiting for durability. Payers and
payees sit on different shards, so every commit also carries a credit leg across actors.

    python loadtests/ledger_bench.py --batch-sizes 1,10,100 --duration 10 --runs 3

Writes loadtests/results/ledger_bench.json and prints a Markdown table (median of the runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
import uuid
from pathlib import Path

import asyncpg
import uvloop

from cluster.testing import bench_environment, onboard, running_hub
from core.ledger import Outcome
from core.money import parse_amount
from protos import ledger_pb2 as pb

RESULTS = Path(__file__).with_name("results")


def _peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set size."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def _run_one(hub, pairs: list[tuple[int, int, int]], batch_size: int, duration_s: float, callers: int) -> dict:
    amount = str(parse_amount("0.01"))
    done = 0
    failures = 0
    latencies_ms: list[float] = []
    deadline = time.perf_counter() + duration_s

    async def caller(index: int) -> None:
        nonlocal done, failures
        shard, payer, payee = pairs[index % len(pairs)]
        while time.perf_counter() < deadline:
            ids = [str(uuid.uuid4()) for _ in range(batch_size)]
            started = time.perf_counter()
            reply = await hub.ledger.execute(shard, [pb.Command(reserve=pb.Reserve(
                transfer_id=t, debit_account_id=payer, credit_account_id=payee, amount_minor=amount,
                check=pb.CHECK_LIQUIDITY_AND_LIMIT)) for t in ids])
            ok = [t for t, r in zip(ids, reply.results, strict=True) if r.outcome == Outcome.OK]
            failures += len(ids) - len(ok)
            if ok:
                reply = await hub.ledger.execute(shard, [pb.Command(commit=pb.Commit(transfer_id=t)) for t in ok])
                failures += sum(r.outcome != Outcome.OK for r in reply.results)
            latencies_ms.append((time.perf_counter() - started) * 1000)
            done += len(ok)

    started = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(callers)))
    elapsed = time.perf_counter() - started
    latencies_ms.sort()
    return {
        "pairs": done,
        "seconds": round(elapsed, 3),
        "pairs_per_s": round(done / elapsed, 1),
        "failures": failures,
        "batch_round_trip_p50_ms": round(latencies_ms[len(latencies_ms) // 2], 2),
        "batch_round_trip_p99_ms": round(latencies_ms[int(len(latencies_ms) * 0.99)], 2),
    }


async def main(args: argparse.Namespace) -> dict:
    results: dict = {"machine": f"{platform.node()} {os.cpu_count()} cores {platform.machine()}",
                     "command": "python loadtests/ledger_bench.py " + " ".join(
                         f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, list) else v}"
                         for k, v in vars(args).items() if k != "output"),
                     "shards": args.shards, "callers": args.callers, "duration_s": args.duration, "batches": {}}
    async with bench_environment() as bench_url, running_hub(bench_url, shards=args.shards) as hub:
        names = [f"dfsp{i}" for i in range(2 * args.shards)]
        accounts = await onboard(hub, names, ndc="1000000000", deposit="1000000000")
        connection = await asyncpg.connect(bench_url)
        shard_of = dict(await connection.fetch("SELECT name, shard_id FROM participant"))
        await connection.close()
        # Pair each payer with a payee on another shard: every commit crosses actors.
        pairs = []
        for payer in names:
            payee = next(n for n in names if shard_of[n] != shard_of[payer]) if args.shards > 1 else \
                next(n for n in names if n != payer)
            pairs.append((shard_of[payer], accounts[payer]["POSITION"]["id"], accounts[payee]["POSITION"]["id"]))
        for batch_size in args.batch_sizes:
            await _run_one(hub, pairs, batch_size, min(2.0, args.duration), args.callers)  # warm-up
            runs = [await _run_one(hub, pairs, batch_size, args.duration, args.callers) for _ in range(args.runs)]
            results["batches"][str(batch_size)] = {
                "runs": runs,
                "median_pairs_per_s": statistics.median(r["pairs_per_s"] for r in runs),
            }
            print(f"batch {batch_size}: median {results['batches'][str(batch_size)]['median_pairs_per_s']}"
                  f" pairs/s ({[r['pairs_per_s'] for r in runs]})", flush=True)
        pids = [(await h.ping.remote())["pid"] for h in hub.handles.values()]
        results["peak_rss_mb"] = {
            "driver": round(_peak_rss_mb(os.getpid()), 1),
            "shard_actors": [round(_peak_rss_mb(p), 1) for p in pids],
        }
    return results

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 10, 100])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--callers", type=int, default=32, help="concurrent callers (batches in flight)")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS / "ledger_bench.json")
    arguments = parser.parse_args()
    report = uvloop.run(main(arguments))
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["peak_rss_mb"]))
