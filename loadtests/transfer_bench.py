"""End-to-end FSPIOP transfers per second: prepare -> payee fulfils -> payer's COMMITTED callback.

Starts a hub (Postgres from RAYLOOP_DATABASE_URL, or embedded; a private local Ray), the DFSP
simulator (every payee fulfils at once) and a lean closed-loop driver in this process: ``--users``
concurrent virtual payers, each sending a prepare and waiting for its payer's callback before the
next. A transfer counts when the payer hears COMMITTED; its latency is prepare sent to callback
received. Positions and conservation are checked at the end.

    python loadtests/transfer_bench.py --duration 30 --runs 3 --users 64

Writes loadtests/results/transfer_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

import uvloop

from cluster.testing import assert_conserved, bench_environment, onboard_dfsps, running_hub
from sim.simulator import Simulator

RESULTS = Path(__file__).with_name("results")
_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_by_component() -> dict[str, float]:
    """CPU seconds used so far by each kind of process on this machine (from /proc)."""
    totals: dict[str, float] = {}
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / _TICKS
        if int(entry) == me:
            name = "driver+simulator"
        elif "IngressWorker" in cmdline:
            name = "ingress"
        elif "PositionShard" in cmdline:
            name = "shards"
        elif cmdline.startswith("postgres") or "/postgres" in cmdline.split(" ")[0]:
            name = "postgres"
        elif "raylet" in cmdline or "gcs_server" in cmdline or "ray/" in cmdline:
            name = "ray-system"
        else:
            continue
        totals[name] = totals.get(name, 0.0) + cpu
    return totals
CURRENCY = "XTS"


async def _run_once(sim: Simulator, pairs: list[tuple[str, str]], users: int, duration_s: float) -> dict:
    waiting: dict[str, asyncio.Future] = {}

    def on_request(received) -> None:
        if received.method == "PUT" and received.path.startswith("/transfers/"):
            transfer_id = received.path.split("/")[2]
            future = waiting.pop(transfer_id, None)
            if future is not None and not future.done():
                future.set_result(received.path.endswith("/error"))

    sim.on_request = on_request
    latencies_ms: list[float] = []
    errors = 0
    timeouts = 0
    deadline = time.perf_counter() + duration_s
    per_second: dict[int, int] = {}
    started = time.perf_counter()

    async def user(index: int) -> None:
        nonlocal errors, timeouts
        payer, payee = pairs[index % len(pairs)]
        loop = asyncio.get_running_loop()
        while time.perf_counter() < deadline:
            body = sim.prepare_body(payer, payee, "1", CURRENCY)
            future = loop.create_future()
            waiting[body["transferId"]] = future
            sent = time.perf_counter()
            status, _ = await sim.send("POST", "/transfers", body, source=payer, destination=payee)
            if status != 202:
                errors += 1
                waiting.pop(body["transferId"], None)
                continue
            try:
                failed = await asyncio.wait_for(future, 30)
            except TimeoutError:
                timeouts += 1
                waiting.pop(body["transferId"], None)
                continue
            if failed:
                errors += 1
                continue
            now = time.perf_counter()
            latencies_ms.append((now - sent) * 1000)
            second = int(now - started)
            per_second[second] = per_second.get(second, 0) + 1

    await asyncio.gather(*(user(i) for i in range(users)))
    elapsed = time.perf_counter() - started
    latencies_ms.sort()

    def pct(p: float) -> float:
        return round(latencies_ms[min(len(latencies_ms) - 1, int(len(latencies_ms) * p))], 1) if latencies_ms else 0.0

    return {
        "transfers": len(latencies_ms),
        "seconds": round(elapsed, 2),
        "transfers_per_s": round(len(latencies_ms) / elapsed, 1),
        "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99),
        "share_over_1s": round(sum(1 for x in latencies_ms if x > 1000) / max(1, len(latencies_ms)), 5),
        "errors": errors, "timeouts": timeouts,
        "per_second": [per_second.get(s, 0) for s in range(int(elapsed) + 1)],
    }


async def main(args: argparse.Namespace) -> dict:
    report: dict = {
        "machine": f"{platform.node()} {os.cpu_count()} cores {platform.machine()}",
        "command": "python loadtests/transfer_bench.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "output"),
        "users": args.users, "shards": args.shards, "ingress_workers": args.ingress_workers,
    }
    async with (
        bench_environment() as bench_url,
        running_hub(bench_url, shards=args.shards, ingress_workers=args.ingress_workers) as hub,
    ):
        sim = Simulator(f"http://127.0.0.1:{hub.fspiop_port}", record=False, max_connections=4 * args.users)
        await sim.start()
        try:
            names = [f"dfsp{i}" for i in range(2 * args.pairs)]
            await onboard_dfsps(hub, sim, names, ndc="100000000", deposit="100000000")
            pairs = [(names[2 * i], names[2 * i + 1]) for i in range(args.pairs)]
            await _run_once(sim, pairs, args.users, args.warmup)
            runs = []
            for _ in range(args.runs):
                before = _cpu_by_component()
                run = await _run_once(sim, pairs, args.users, args.duration)
                after = _cpu_by_component()
                run["cpu_ms_per_transfer"] = {
                    k: round(1000 * (after[k] - before.get(k, 0.0)) / max(1, run["transfers"]), 3)
                    for k in sorted(after)
                }
                shards = [(await hub.ledger.describe(s))["shard"] for s in sorted(hub.handles)]
                run["shards"] = [{k: round(v, 2) if isinstance(v, float) else v for k, v in state.items()
                                  if k in ("shard_id", "flushes", "flush_p50_ms", "flush_p99_ms", "in_flight",
                                           "queue_depth", "credits_pending")} for state in shards]
                runs.append(run)
            await asyncio.sleep(1.0)
            await assert_conserved(hub)
            report["conserved"] = True
        finally:
            await sim.stop()
    report["runs"] = runs
    report["median_transfers_per_s"] = statistics.median(r["transfers_per_s"] for r in runs)
    report["median_p99_ms"] = statistics.median(r["p99_ms"] for r in runs)
    return report

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--users", type=int, default=64, help="concurrent virtual payers (closed loop)")
    parser.add_argument("--pairs", type=int, default=4, help="payer/payee DFSP pairs")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--ingress-workers", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS / "transfer_bench.json")
    arguments = parser.parse_args()
    result = uvloop.run(main(arguments))
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    for run in result["runs"]:
        print({k: v for k, v in run.items() if k != "per_second"})
