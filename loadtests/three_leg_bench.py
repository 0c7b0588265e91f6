"""End-to-end 3-leg FSPIOP flows per second: lookup -> quote -> transfer, each ended by the payer's callback.

Starts a hub (Postgres from RAYLOOP_DATABASE_URL, or embedded; a private local Ray), the DFSP
simulator (payee FSPs answer lookups from their party registries, quote with the RULES.md 8
equations and fulfil at once) and a lean closed-loop driver in this process: ``--users`` concurrent
virtual payers, each running one whole flow and waiting for its end before the next:

1. ``GET /parties/MSISDN/{id}`` -> the payee FSP's ``PUT /parties/...`` reaches the payer;
2. ``POST /quotes`` -> the payee FSP's ``PUT /quotes/{ID}`` (ILP packet, condition) reaches the payer;
3. ``POST /transfers`` -> the payer hears ``PUT /transfers/{ID}`` COMMITTED.

A flow counts when step 3 ends COMMITTED; its latency is from the lookup sent to the transfer
callback received (each leg's latency is reported too). Target on the 2-core reference machine:
>= 300 flows/s with p99 <= 500 ms (docs/BENCHMARKS.md). Conservation is checked at the end.

    python loadtests/three_leg_bench.py --duration 30 --runs 3 --users 64

Writes loadtests/results/three_leg_bench.json.
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

from cluster.testing import admin, assert_conserved, bench_environment, running_hub
from sim.flows import FlowError, FlowTimeout
from sim.onboarding import onboard_simulated
from sim.parties import SimParty
from sim.simulator import Behaviour, Simulator

RESULTS = Path(__file__).with_name("results")
CURRENCY = "XTS"
LEGS = ("lookup", "quote", "transfer")


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pct(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(len(ordered) * p))], 1) if ordered else 0.0

    return {"p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99)}


async def _run_once(sim: Simulator, pairs: list[tuple[str, str, list[SimParty]]], users: int,
                    duration_s: float, timeout_s: float) -> dict:
    flows = sim.flows
    end_to_end_ms: list[float] = []
    legs_ms: dict[str, list[float]] = {leg: [] for leg in LEGS}
    errors: dict[str, int] = {}
    timeouts: dict[str, int] = {}
    per_second: dict[int, int] = {}
    started = time.perf_counter()
    deadline = started + duration_s

    async def user(index: int) -> None:
        payer, _, parties = pairs[index % len(pairs)]
        payer_party = flows.payer_party(payer).to_fspiop(payer)
        turn = 0
        while time.perf_counter() < deadline:
            party = parties[(index + turn) % len(parties)]
            turn += 1
            step = "lookup"
            try:
                sent = time.perf_counter()
                found = await flows.lookup(payer, party.party_id_type, party.party_identifier, timeout_s=timeout_s)
                looked_up = time.perf_counter()
                step = "quote"
                request = flows.quote_request(payer, found, "1", CURRENCY, amount_type="SEND",
                                              transaction={"scenario": "TRANSFER", "initiator": "PAYER",
                                                           "initiatorType": "CONSUMER"}, payer_party=payer_party)
                quote = await flows.quote(payer, found["partyIdInfo"]["fspId"], request, timeout_s=timeout_s)
                quoted = time.perf_counter()
                step = "transfer"
                result = await flows.transfer(payer, found["partyIdInfo"]["fspId"], quote,
                                              transfer_id=request["transactionId"], timeout_s=timeout_s)
                done = time.perf_counter()
            except FlowTimeout:
                timeouts[step] = timeouts.get(step, 0) + 1
                continue
            except FlowError:
                errors[step] = errors.get(step, 0) + 1
                continue
            if result.get("transferState") != "COMMITTED":
                errors["transfer"] = errors.get("transfer", 0) + 1
                continue
            end_to_end_ms.append((done - sent) * 1000)
            legs_ms["lookup"].append((looked_up - sent) * 1000)
            legs_ms["quote"].append((quoted - looked_up) * 1000)
            legs_ms["transfer"].append((done - quoted) * 1000)
            second = int(done - started)
            per_second[second] = per_second.get(second, 0) + 1

    await asyncio.gather(*(user(i) for i in range(users)))
    elapsed = time.perf_counter() - started
    return {
        "flows": len(end_to_end_ms),
        "seconds": round(elapsed, 2),
        "flows_per_s": round(len(end_to_end_ms) / elapsed, 1),
        **_percentiles(end_to_end_ms),
        "legs": {leg: _percentiles(values) for leg, values in legs_ms.items()},
        "errors": errors,
        "timeouts": timeouts,
        "per_second": [per_second.get(s, 0) for s in range(int(elapsed) + 1)],
    }


async def main(args: argparse.Namespace) -> dict:
    report: dict = {
        "machine": f"{platform.node()} {os.cpu_count()} cores {platform.machine()}",
        "command": "python loadtests/three_leg_bench.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "output"),
        "users": args.users, "shards": args.shards, "ingress_workers": args.ingress_workers,
        "transfer_quote_check": args.quote_check,
    }
    async with (
        bench_environment() as bench_url,
        running_hub(bench_url, shards=args.shards, ingress_workers=args.ingress_workers,
                    transfer_quote_check=args.quote_check) as hub,
    ):
        sim = Simulator(f"http://127.0.0.1:{hub.fspiop_port}", record=False, max_connections=4 * args.users,
                        auto_answer=True)
        await sim.start()
        try:
            pairs = []
            for i in range(args.pairs):
                payer, payee = f"payer{i}", f"payee{i}"
                payees = [SimParty.named("MSISDN", f"2557{i:02d}{n:05d}", f"Payee {n} Ñúñez")
                          for n in range(args.parties)]
                parties = {payer: [SimParty("MSISDN", f"2556{i:02d}00000")], payee: payees}
                await onboard_simulated(hub, sim, [payer, payee], CURRENCY, ndc="100000000", deposit="100000000",
                                        behaviour=Behaviour(flow_timeout_ms=args.timeout * 1000), parties=parties)
                await sim.flows.register_parties(payer, currency=CURRENCY)
                await sim.flows.register_parties(payee, currency=CURRENCY)
                pairs.append((payer, payee, payees))
            warmup = await _run_once(sim, pairs, args.users, args.warmup, args.timeout)
            runs = [await _run_once(sim, pairs, args.users, args.duration, args.timeout) for _ in range(args.runs)]
            await asyncio.sleep(1.0)
            await assert_conserved(hub)
            report["conserved"] = True
            # Every committed flow moved 1 XTS from a payer to its payee: the positions must say so.
            total = 0
            for payer, _, _ in pairs:
                _, body = await admin(hub, "GET", f"/participants/{payer}/positions?currency={CURRENCY}")
                total += body["value"]
            committed = warmup["flows"] + sum(run["flows"] for run in runs)
            report["payer_positions_total"] = str(total)
            report["positions_match_flows"] = total == committed
        finally:
            await sim.stop()
    report["runs"] = runs
    report["median_flows_per_s"] = statistics.median(r["flows_per_s"] for r in runs)
    report["median_p99_ms"] = statistics.median(r["p99_ms"] for r in runs)
    report["target_met"] = report["median_flows_per_s"] >= 300 and report["median_p99_ms"] <= 500
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--users", type=int, default=64, help="concurrent virtual payers (closed loop)")
    parser.add_argument("--pairs", type=int, default=4, help="payer/payee DFSP pairs")
    parser.add_argument("--parties", type=int, default=50, help="parties each payee FSP holds (looked up in turn)")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--ingress-workers", type=int, default=1)
    parser.add_argument("--quote-check", choices=("off", "known", "valid"), default="off",
                        help="RAYLOOP_TRANSFER_QUOTE_CHECK of the hub (off: Mojaloop's pass-through quoting)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds a leg may wait for its callback")
    parser.add_argument("--output", type=Path, default=RESULTS / "three_leg_bench.json")
    arguments = parser.parse_args()
    result = uvloop.run(main(arguments))
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    for run in result["runs"]:
        print({k: v for k, v in run.items() if k != "per_second"})
