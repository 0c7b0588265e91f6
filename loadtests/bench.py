"""One benchmark command: rayloop's FSPIOP transfers end to end, side by side with a null forwarder.

    python -m loadtests.bench --duration 60                 # a minute per phase (the default)
    python -m loadtests.bench --duration 3600 --null-duration 60 --rate 400   # the seed deck's hour at 400/s
    python -m loadtests.bench --duration 20 --runs 3        # medians of three runs

It starts everything on this machine: a fresh database (on RAYLOOP_DATABASE_URL's server, else an
embedded PostgreSQL) and a private local Ray; a hub (``--shards``, ``--ingress-workers``); the DFSP
simulator as payees in its own process (``loadtests/sim_process.py``); the null forwarder
(``loadtests/null_forwarder.py``, as many processes as the hub has ingress workers, with a payee
simulator of its own); and the lean driver in this process (``loadtests/driver.py``). Each run has two
phases driven the same way, the null forwarder first and then the hub, each after ``--warmup`` seconds
of unmeasured load, so rayloop's throughput is stated as a share of what the same HTTP stack and
simulators do with no hub work at all.

The report (``--output-dir``, default ``loadtests/results/bench_{duration}s/``): ``report.json``
(everything, per second), ``REPORT.md`` (a summary) and ``throughput_latency.png`` (matplotlib; the
report says so when it is not installed): transfers/s per second, p50/p95/p99, share over 1 s, errors
by kind, CPU (cores and ms per transfer) and RSS per component from /proc (``loadtests/procstat.py``),
shard flush statistics, and at the end conservation and exact positions on the hub. With a
``prometheus`` binary on this machine (``--prometheus auto``, the default), a real Prometheus scrapes
the hub while the benchmark runs, and every query of the Grafana dashboard (``dashboards/rayloop.json``)
is evaluated over each measured phase: the report lists what each panel showed, and which had no data.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import asyncpg
import uvloop

from cluster.testing import admin, assert_conserved, bench_environment, onboard, running_hub
from loadtests.driver import PayerDriver, RunResult
from loadtests.null_forwarder import ForwarderProcesses, free_port
from loadtests.procstat import ComponentMap, Sampler
from loadtests.prometheus import PrometheusServer, evaluate_dashboard, prometheus_binary
from loadtests.sim_process import PayeeProcess
from sim.ilp import new_secret

RESULTS = Path(__file__).with_name("results")
CURRENCY = "XTS"
_MB = 1024 * 1024


def transfer_endpoints(base_url: str) -> dict[str, str]:
    """The three transfer callback endpoints of a simulated DFSP at ``base_url``."""
    return {
        "FSPIOP_CALLBACK_URL_TRANSFER_POST": f"{base_url}/transfers",
        "FSPIOP_CALLBACK_URL_TRANSFER_PUT": f"{base_url}/transfers/{{{{transferId}}}}",
        "FSPIOP_CALLBACK_URL_TRANSFER_ERROR": f"{base_url}/transfers/{{{{transferId}}}}/error",
    }


async def register_endpoints(hub, table: dict[str, dict[str, str]]) -> None:
    """``{dfsp: {endpoint type: URL}}`` through the admin API."""
    for name, endpoints in table.items():
        for endpoint_type, value in endpoints.items():
            status, body = await admin(hub, "POST", f"/participants/{name}/endpoints",
                                       {"type": endpoint_type, "value": value})
            if status != 201:
                raise RuntimeError(f"registering {endpoint_type} of {name}: {status} {body}")


def onboarding_order(pairs: list[tuple[str, str]], placement: str) -> list[str]:
    """The order the DFSPs are onboarded in, which decides their shards: the hub puts each new participant on
    the shard with the fewest. ``pairs`` order (payer0, payee0, payer1, ...) after the Hub (on shard 0) puts
    every payer on shard 1 of 2, so one shard does all the reserving and committing and the other only takes
    credits. ``spread`` alternates payer-first and payee-first pairs, so the payers share the shards the way
    a scheme's many DFSPs, each both payer and payee, do."""
    if placement == "pairs":
        return [name for pair in pairs for name in pair]
    return [name for index, (payer, payee) in enumerate(pairs)
            for name in ((payer, payee) if index % 2 == 0 else (payee, payer))]


async def _placement(database_url: str) -> dict[str, int]:
    """``{participant: shard}``, from the hub's database."""
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch("SELECT name, shard_id FROM participant ORDER BY name")
    finally:
        await connection.close()
    return {row["name"]: row["shard_id"] for row in rows}


class Target:
    """One thing to drive (the hub, or the null forwarder): its payee process and its payer driver."""

    def __init__(self, name: str, url: str, payees: PayeeProcess, secrets: dict[str, bytes],
                 pairs: list[tuple[str, str]], args: argparse.Namespace):
        self.name = name
        self.url = url
        self.payees = payees
        self.driver = PayerDriver(url, secrets, pairs, CURRENCY, args.amount, connections_max=args.connections,
                                  callback_timeout_s=args.callback_timeout_s)
        self.pairs = pairs

    @classmethod
    async def start(cls, name: str, url: str, secrets: dict[str, bytes], pairs: list[tuple[str, str]],
                    args: argparse.Namespace) -> Target:
        # The payee process takes a second to import; the hub's own loop (this one) keeps serving meanwhile.
        payees = await asyncio.to_thread(PayeeProcess.start, url, secrets, max_connections=args.connections)
        target = cls(name, url, payees, secrets, pairs, args)
        try:
            await target.driver.start()
        except BaseException:
            await asyncio.to_thread(payees.stop)
            raise
        return target

    def endpoints(self) -> dict[str, dict[str, str]]:
        table = {payee: transfer_endpoints(self.payees.base_url(payee)) for _, payee in self.pairs}
        table.update({payer: self.driver.endpoints(payer) for payer, _ in self.pairs})
        return table

    async def stop(self) -> dict:
        await self.driver.stop()
        return await asyncio.to_thread(self.payees.stop)


async def _measure(target: Target, sampler: Sampler, args: argparse.Namespace,
                   duration_s: float) -> tuple[RunResult, dict]:
    """One measured phase, with CPU and RSS sampled once a second."""
    samples: list[tuple[float, dict[str, float], dict[str, int]]] = []
    stop = asyncio.Event()

    async def sample() -> None:
        while True:
            cpu, rss = await asyncio.to_thread(sampler.sample)
            samples.append((time.perf_counter(), cpu, rss))
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
                return
            except TimeoutError:
                continue

    sampling = asyncio.get_running_loop().create_task(sample())
    try:
        result = await _drive(target, args, duration_s)
    finally:
        stop.set()
        await sampling
    cpu, rss = await asyncio.to_thread(sampler.sample)
    samples.append((time.perf_counter(), cpu, rss))
    (t0, cpu0, _), (t1, cpu1, _) = samples[0], samples[-1]
    span_s = max(1e-9, t1 - t0)
    components = sorted(set(cpu1) | set(cpu0))
    resources = {
        "cpu_cores": {c: round((cpu1.get(c, 0.0) - cpu0.get(c, 0.0)) / span_s, 3) for c in components},
        "cpu_ms_per_transfer": {
            c: round(1000 * (cpu1.get(c, 0.0) - cpu0.get(c, 0.0)) / max(1, result.transfers), 3) for c in components
        },
        "rss_peak_mb": {c: round(max(s[2].get(c, 0) for s in samples) / _MB, 1) for c in components},
        "rss_end_mb": {c: round(samples[-1][2].get(c, 0) / _MB, 1) for c in components},
        # Memory over the phase (a trend, e.g. Ray's own processes over an hour), every 10th sample.
        "rss_mb_every_10s": [{c: round(s[2].get(c, 0) / _MB, 1) for c in components} for s in samples[::10]],
        "cpu_cores_per_second": [
            {c: round((b[1].get(c, 0.0) - a[1].get(c, 0.0)) / max(1e-9, b[0] - a[0]), 3) for c in components}
            for a, b in zip(samples, samples[1:], strict=False)
        ],
    }
    return result, resources


async def _drive(target: Target, args: argparse.Namespace, duration_s: float) -> RunResult:
    if args.rate:
        return await target.driver.run(duration_s, rate_per_s=args.rate, in_flight_max=args.in_flight_max)
    return await target.driver.run(duration_s, users=args.users)


async def _phase(target: Target, sampler: Sampler, args: argparse.Namespace,
                 committed: dict[tuple[str, str], int], unknown: list[int]) -> dict:
    warm = await _drive(target, args, args.warmup)
    duration_s = args.null_duration if target.name == "null" and args.null_duration else args.duration
    measured_from = time.time()
    result, resources = await _measure(target, sampler, args, duration_s)
    measured_to = time.time()
    for run in (warm, result):
        for pair, count in run.committed_by_pair.items():
            committed[pair] = committed.get(pair, 0) + count
        unknown[0] += run.timeouts + run.connection_errors
    summary = result.summary()
    summary["warmup_errors"] = warm.errors
    summary["measured_s"] = duration_s
    summary["measured_unix_s"] = [round(measured_from, 3), round(measured_to, 3)]
    summary.update(resources)
    print(f"  {target.name}: {summary['transfers_per_s']} transfers/s, p50 {summary['p50_ms']} ms, "
          f"p99 {summary['p99_ms']} ms, errors {summary['errors']}", flush=True)
    return summary


async def check_positions(hub, committed: dict[tuple[str, str], int], amount: str) -> dict:
    """Every DFSP's position is exactly what the committed transfers add up to: payers owe what they sent,
    payees are owed what they received. Returns the DFSPs where it is not so (empty: all exact)."""
    expected: dict[str, Decimal] = {}
    for (payer, payee), count in committed.items():
        share = Decimal(amount) * count
        expected[payer] = expected.get(payer, Decimal(0)) + share
        expected[payee] = expected.get(payee, Decimal(0)) - share
    mismatches = {}
    for name, value in expected.items():
        status, body = await admin(hub, "GET", f"/participants/{name}/positions?currency={CURRENCY}")
        if status != 200 or Decimal(str(body["value"])) != value:
            mismatches[name] = {"expected": str(value), "actual": body.get("value") if status == 200 else body}
    return mismatches


async def settled_positions(hub, committed: dict[tuple[str, str], int], amount: str,
                            timeout_s: float = 15.0) -> dict:
    """``check_positions`` once the payees' credit legs have landed: a commit's credit travels from the
    payer's shard to the payee's (the outbox) and may still be on its way when the last callback arrives."""
    deadline = time.monotonic() + timeout_s
    while (mismatches := await check_positions(hub, committed, amount)) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return mismatches


async def _start_prometheus(hub, args: argparse.Namespace, report: dict) -> PrometheusServer | None:
    """A Prometheus scraping the hub's admin /metrics, ready and with a first scrape done; None when off.

    With ``--prometheus auto`` a Prometheus that is missing or will not start is reported, never the end of
    the benchmark; with ``on`` it is an error."""
    if args.prometheus == "off":
        report["dashboard_check"] = "off"
        return None
    try:
        binary = prometheus_binary()
        if binary is None:
            raise FileNotFoundError("no prometheus binary (apt-get install prometheus, or set RAYLOOP_PROMETHEUS_BIN)")
        server = PrometheusServer([f"127.0.0.1:{hub.admin_port}"], scrape_interval_ms=args.prometheus_scrape_ms,
                                  binary=binary)
        await asyncio.to_thread(server.start)
        try:
            await asyncio.to_thread(server.wait_for_scrapes)
        except BaseException:
            await asyncio.to_thread(server.stop)
            raise
    except Exception as error:
        if args.prometheus == "on":
            raise SystemExit(f"--prometheus on: {error}") from error
        report["dashboard_check"] = f"skipped: {error}"
        return None
    report["dashboard_check"] = (f"Prometheus ({binary}) scraping the hub every {args.prometheus_scrape_ms} ms "
                                 "(through the whole benchmark: in the null phases the hub is idle but answers "
                                 "the scrapes); every dashboard query evaluated over each measured rayloop phase")
    return server


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 1) if values else 0.0


async def main(args: argparse.Namespace) -> dict:
    report: dict = {
        "machine": f"{platform.node()} {os.cpu_count()} cores {platform.machine()}, Python {platform.python_version()}",
        "command": "python -m loadtests.bench " + " ".join(sys.argv[1:]),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "mode": f"open loop at {args.rate} transfers/s" if args.rate else f"closed loop, {args.users} users",
        "database": "RAYLOOP_DATABASE_URL" if os.environ.get("RAYLOOP_DATABASE_URL") else "embedded",
    }
    secrets = {f"payee{i}": new_secret() for i in range(args.pairs)}
    pairs = [(f"payer{i}", f"payee{i}") for i in range(args.pairs)]
    runs: list[dict] = []
    committed: dict[tuple[str, str], int] = {}
    unknown = [0]
    async with bench_environment() as database_url, running_hub(
        database_url, shards=args.shards, ingress_workers=args.ingress_workers
    ) as hub:
        config = hub.config
        report["hub"] = {
            "shard_host": config.shard_host, "ingress_workers": config.ingress_workers,
            "shards": config.shard_count, "batch_in_flight": config.ingress_batch_in_flight,
            "worker_niceness": config.ray_worker_niceness,
            # Every RAYLOOP_* setting this run was given (the database URL aside): what a rerun needs.
            "environment": {k: v for k, v in sorted(os.environ.items())
                            if k.startswith("RAYLOOP_") and k != "RAYLOOP_DATABASE_URL"},
        }
        components = ComponentMap(database=database_url.rsplit("/", 1)[1])
        sampler = Sampler(components)
        targets: dict[str, Target] = {}
        forwarder = None
        handle = None
        prometheus = None
        try:
            prometheus = await _start_prometheus(hub, args, report)
            if prometheus is not None:
                components.named_pids[prometheus.pid] = "prometheus"
            hub_target = targets["rayloop"] = await Target.start(
                "rayloop", f"http://127.0.0.1:{hub.fspiop_port}", secrets, pairs, args)
            null_port = free_port("127.0.0.1")
            null_target = targets["null"] = await Target.start(
                "null", f"http://127.0.0.1:{null_port}", secrets, pairs, args)
            await onboard(hub, onboarding_order(pairs, args.placement), CURRENCY, ndc=args.ndc, deposit=args.ndc)
            report["placement"] = await _placement(database_url)
            await register_endpoints(hub, hub_target.endpoints())
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
                json.dump(null_target.endpoints(), handle)
            forwarder = await asyncio.to_thread(ForwarderProcesses, Path(handle.name), workers=args.ingress_workers,
                                                port=null_port, connections_max=args.connections)
            components.named_pids.update({hub_target.payees.pid: "simulator", null_target.payees.pid: "simulator"})
            components.named_pids.update({pid: "null-forwarder" for pid in forwarder.pids})
            for index in range(args.runs):
                print(f"run {index + 1}/{args.runs}", flush=True)
                run = {"null": await _phase(null_target, sampler, args, {}, [0])}
                run["rayloop"] = await _phase(hub_target, sampler, args, committed, unknown)
                run["rayloop"]["shards"] = [
                    {k: round(v, 2) if isinstance(v, float) else v for k, v in state.items()
                     if k in ("shard_id", "flushes", "flush_p50_ms", "flush_p99_ms", "queue_depth", "credits_pending")}
                    for state in [(await hub.ledger.describe(s))["shard"] for s in sorted(hub.handles)]
                ]
                if prometheus is not None:
                    start, end = run["rayloop"]["measured_unix_s"]
                    try:
                        panels = await asyncio.to_thread(evaluate_dashboard, prometheus, start, end,
                                                         step_s=args.prometheus_scrape_ms / 1000)
                    except OSError as error:  # Prometheus died or stalled: the run's own figures still stand
                        run["rayloop"]["dashboard_error"] = repr(error)
                        print(f"  dashboard: not evaluated: {error!r}", flush=True)
                    else:
                        run["rayloop"]["dashboard"] = [panel.as_dict() for panel in panels]
                        empty = sum(1 for panel in panels if not panel.has_data)
                        print(f"  dashboard: {len(panels) - empty} of {len(panels)} queries had data", flush=True)
                null_tps = run["null"]["transfers_per_s"]
                run["ratio_to_null"] = round(run["rayloop"]["transfers_per_s"] / null_tps, 3) if null_tps else None
                runs.append(run)
            try:
                await assert_conserved(hub)
                report["conserved"] = True
            except AssertionError as error:
                report["conserved"] = False
                report["conservation_error"] = str(error)
            if unknown[0]:
                report["positions"] = f"not checked: {unknown[0]} transfers with an unknown outcome"
            else:
                mismatches = await settled_positions(hub, committed, args.amount)
                report["positions"] = "exact" if not mismatches else {"mismatches": mismatches}
        finally:
            if prometheus is not None:
                await asyncio.to_thread(prometheus.stop)
            if forwarder is not None:
                report["null_forwarder_counters"] = await asyncio.to_thread(forwarder.stop)
            if handle is not None:
                os.unlink(handle.name)
            report["simulator_counters"] = {name: await target.stop() for name, target in targets.items()}
    report["runs"] = runs
    report["median"] = {
        phase: {key: _median([run[phase][key] for run in runs])
                for key in ("transfers_per_s", "p50_ms", "p95_ms", "p99_ms", "share_over_1s", "errors")}
        for phase in ("null", "rayloop")
    }
    ratios = [run["ratio_to_null"] for run in runs if run["ratio_to_null"] is not None]
    report["median"]["ratio_to_null"] = round(statistics.median(ratios), 3) if ratios else None
    return report


# ---------------------------------------------------------------------------------------------- output


def _whole_seconds(per_second: list[dict], duration_s: float) -> list[dict]:
    """The seconds wholly inside the measured phase: the last, partial one (transfers still completing
    after the deadline) would read as a drop in throughput."""
    return [second for second in per_second if second["t"] + 1 <= duration_s]


def _plot(report: dict, path: Path) -> str | None:
    """The PNG, or why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped: matplotlib is not installed (pip install -e '.[load]')"
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    for index, run in enumerate(report["runs"]):
        for phase, style in (("null", "--"), ("rayloop", "-")):
            seconds = _whole_seconds(run[phase]["per_second"], run[phase]["measured_s"])
            label = f"{phase} run {index + 1}"
            top.plot([s["t"] for s in seconds], [s["transfers"] for s in seconds], style, label=label)
        seconds = _whole_seconds(run["rayloop"]["per_second"], run["rayloop"]["measured_s"])
        for key, style in (("p50_ms", "-"), ("p99_ms", ":")):
            label = f"rayloop {key[:3]} run {index + 1}"
            bottom.plot([s["t"] for s in seconds], [s[key] for s in seconds], style, label=label)
    top.set_ylabel("transfers committed / s")
    top.set_title(f"{report['mode']}: null forwarder vs rayloop")
    top.legend(fontsize=7)
    bottom.set_ylabel("latency (ms, per second)")
    bottom.set_xlabel("seconds into the measured phase")
    bottom.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return None


def _baseline(report: dict) -> str:
    """The seed deck's performance baseline: 400 transfers/s for an hour, under 1 % of them over 1 s."""
    runs = [run["rayloop"] for run in report["runs"]]
    rate_ok = all(run["transfers_per_s"] >= 400 for run in runs)
    latency_ok = all(run["share_over_1s"] < 0.01 for run in runs)
    errors_ok = all(run["errors"] == 0 for run in runs)
    hour = all(run["measured_s"] >= 3600 for run in runs)
    verdict = "met" if rate_ok and latency_ok and errors_ok and hour else "not met"
    rate = "ok" if rate_ok else "below 400/s in a run"
    latency = "ok" if latency_ok else "over 1 % in a run"
    return (f"Seed baseline (400 transfers/s for an hour, under 1 % over 1 s, no errors): **{verdict}** "
            f"(rate {rate}, latency {latency}, errors {'none' if errors_ok else 'some'}, "
            f"duration {'an hour' if hour else 'shorter than an hour'}).")


def _hub_line(hub: dict) -> str:
    if not hub:
        return "not recorded"
    where = "in the ingress workers" if hub["shard_host"] == "ingress" else "Ray actors of their own"
    line = (f"{hub['shards']} shards, {where} (RAYLOOP_SHARD_HOST={hub['shard_host']}); "
            f"{hub['ingress_workers']} ingress worker(s); {hub['batch_in_flight']} call(s) in flight per shard")
    if "worker_niceness" in hub:  # reports before 2026-11-25 ran Ray's default, 15
        line += f"; Ray workers at niceness {hub['worker_niceness']}"
    if hub.get("environment"):
        line += "; environment: " + ", ".join(f"`{k}={v}`" for k, v in hub["environment"].items())
    return line


def _markdown(report: dict, plot_note: str | None) -> str:
    median = report["median"]
    lines = [
        "# rayloop benchmark report",
        "",
        f"`{report['command']}` on {report['machine']}, started {report['started_utc']}; {report['mode']}; "
        f"database: {report['database']}.",
        "",
        "Hub: " + _hub_line(report.get("hub", {})) + ".",
        "",
        "Shards: " + _shards_line(report.get("placement", {})) + ".",
        "",
        "| run | phase | transfers/s | p50 ms | p95 ms | p99 ms | over 1 s | errors | not sent |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for index, run in enumerate(report["runs"]):
        for phase in ("null", "rayloop"):
            r = run[phase]
            lines.append(f"| {index + 1} | {phase} | {r['transfers_per_s']} | {r['p50_ms']} | {r['p95_ms']} | "
                         f"{r['p99_ms']} | {r['share_over_1s']:.3%} | {r['errors']} | {r['not_sent']} |")
    for phase in ("null", "rayloop"):
        m = median[phase]
        lines.append(f"| **median** | {phase} | **{m['transfers_per_s']}** | {m['p50_ms']} | {m['p95_ms']} | "
                     f"{m['p99_ms']} | | {m['errors']} | |")
    conservation = "held" if report.get("conserved") else "BROKEN: " + report.get("conservation_error", "?")
    lines += [
        "",
        f"rayloop / null forwarder throughput (median of the per-run ratios): **{median['ratio_to_null']}**"
        + (" (open loop: both phases are offered the same rate, so this says whether rayloop kept up, not how "
           "far it could go; run closed loop for the ceiling)." if report["settings"]["rate"] else "."),
        f"Conservation at the end: {conservation}; positions: {report.get('positions')}.",
        "",
        _baseline(report),
        "",
        "Errors by kind (rayloop, per run): "
        + "; ".join(json.dumps(run["rayloop"]["errors_by_kind"]) for run in report["runs"]) + ".",
        "",
        "## CPU and memory per component (last run)",
        "",
        "| component | rayloop cores | rayloop CPU ms/transfer | rayloop peak RSS MB | null cores | null peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    last = report["runs"][-1]
    names = sorted(set(last["rayloop"]["cpu_cores"]) | set(last["null"]["cpu_cores"]))
    hub, null = last["rayloop"], last["null"]
    for name in names:
        lines.append(f"| {name} | {hub['cpu_cores'].get(name, 0)} | {hub['cpu_ms_per_transfer'].get(name, 0)} | "
                     f"{hub['rss_peak_mb'].get(name, 0)} | {null['cpu_cores'].get(name, 0)} | "
                     f"{null['rss_peak_mb'].get(name, 0)} |")
    lines += [
        "",
        "Components: `driver` is this process (the payers and their callback server, the /proc sampler, and the "
        "hub's own process: admin API, ops service, shard watchdog); `simulator` the payee process of the phase; "
        "`ingress` and `shards` the hub's Ray actors (with shards hosted in the ingress workers, the default, "
        "`ingress` includes them and there is no `shards`); `ray-overhead` every other process of this benchmark's "
        "private Ray (gcs, raylet, idle workers); `postgres` the backends of the benchmark's database (a shared "
        "server's background writers are not included); `null-forwarder` its worker processes.",
        "",
        "## Throughput and latency over time",
        "",
        plot_note or "![throughput and latency](throughput_latency.png)",
        "",
    ]
    lines += _dashboard_markdown(report)
    return "\n".join(lines)


def _shards_line(placement: dict[str, int]) -> str:
    by_shard: dict[int, list[str]] = {}
    for name, shard in sorted(placement.items()):
        by_shard.setdefault(shard, []).append(name)
    return "; ".join(f"{shard}: {', '.join(names)}" for shard, names in sorted(by_shard.items())) or "unknown"


def _number(value: float) -> str:
    if value != 0 and abs(value) < 0.01:
        return f"{value:.2e}"
    return f"{value:,.3f}".rstrip("0").rstrip(".")


def _dashboard_markdown(report: dict, legends_max: int = 8) -> list[str]:
    """What each Grafana panel showed over the last run's rayloop phase: per series, median and max."""
    lines = ["## The Grafana dashboard's queries, evaluated by Prometheus (rayloop phase, last run)", ""]
    panels = report["runs"][-1]["rayloop"].get("dashboard") if report["runs"] else None
    if not panels:
        reason = (report["runs"][-1]["rayloop"].get("dashboard_error") if report["runs"] else None) \
            or report.get("dashboard_check", "no runs")
        return lines + [f"Not evaluated: {reason}.", ""]
    empty = [p for p in panels if not p["has_data"]]
    lines += [
        f"{report['dashboard_check']}. {len(panels) - len(empty)} of {len(panels)} queries had data"
        + (": every panel of `dashboards/rayloop.json` would show data." if not empty else
           "; the others would show *No data*."),
        "",
        "| panel | query | series: median (max) over the phase |",
        "|---|---|---|",
    ]
    for panel in panels:
        if panel["error"]:
            shown = f"query refused: {panel['error']}"
        elif not panel["has_data"]:
            shown = "*no data*"
        else:
            items = sorted(panel["medians"].items())
            shown = "; ".join(f"{legend}: {_number(value)} ({_number(panel['maxima'][legend])})"
                              for legend, value in items[:legends_max])
            if len(items) > legends_max:
                shown += f"; and {len(items) - legends_max} more"
        lines.append(f"| {panel['panel']} | {panel['ref_id']} | {shown.replace('|', '/')} |")
    return lines + [""]


def write_report(report: dict, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    plot_note = _plot(report, output_dir / "throughput_latency.png") if report["runs"] else "skipped: no runs"
    report["plot"] = plot_note or "throughput_latency.png"
    (output_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (output_dir / "REPORT.md").write_text(_markdown(report, plot_note))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds per phase (3600: the hour)")
    parser.add_argument("--null-duration", type=float, default=None,
                        help="measured seconds of the null phase (default --duration; e.g. 60 for the hour run)")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds before each phase")
    parser.add_argument("--runs", type=int, default=1, help="runs (null then rayloop each); medians are reported")
    parser.add_argument("--users", type=int, default=64, help="closed loop: concurrent virtual payers")
    parser.add_argument("--rate", type=float, default=None, help="open loop instead: prepares per second")
    parser.add_argument("--in-flight-max", type=int, default=2_000, help="open loop: outstanding transfers at most")
    parser.add_argument("--pairs", type=int, default=4, help="payer/payee DFSP pairs")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--placement", choices=("pairs", "spread"), default="pairs",
                        help="onboarding order: pairs (payer0, payee0, ...: with 2 shards every payer on one, every "
                             "payee on the other) or spread (payer-first and payee-first pairs alternate: with 2 "
                             "shards half the payers on each)")
    parser.add_argument("--ingress-workers", type=int, default=1, help="also the null forwarder's process count")
    parser.add_argument("--amount", default="1", help="each transfer's amount (XTS)")
    parser.add_argument("--ndc", default="1000000000", help="net debit cap and deposit of every DFSP")
    parser.add_argument("--connections", type=int, default=256, help="HTTP connections per origin, each client")
    parser.add_argument("--callback-timeout-s", type=float, default=30.0, help="a transfer without callback: error")
    parser.add_argument("--prometheus", choices=("auto", "on", "off"), default="auto",
                        help="evaluate the Grafana dashboard's queries in a real Prometheus scraping the hub "
                             "(auto: when a prometheus binary is on PATH or in RAYLOOP_PROMETHEUS_BIN)")
    parser.add_argument("--prometheus-scrape-ms", type=int, default=1000, help="its scrape interval")
    parser.add_argument("--output-dir", type=Path, default=None, help="default loadtests/results/bench_{duration}s")
    return parser


def run(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.runs < 1 or args.duration <= 0:
        raise SystemExit("--runs must be >= 1 and --duration > 0")
    output_dir = args.output_dir or RESULTS / f"bench_{args.duration:g}s"
    report = uvloop.run(main(args))
    write_report(report, output_dir)
    print(json.dumps({"median": report["median"], "conserved": report.get("conserved"),
                      "positions": report.get("positions"), "plot": report["plot"]}, indent=1))
    print(f"report: {output_dir / 'REPORT.md'}")
    positions = str(report.get("positions"))
    return 0 if report.get("conserved") and (positions == "exact" or positions.startswith("not checked")) else 1


if __name__ == "__main__":
    raise SystemExit(run())
