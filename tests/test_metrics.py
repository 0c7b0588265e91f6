"""Metrics: the merge of every process's registry, and a real hub's scrape after real transfers.

The unit tests drive ``MetricsMerger`` with hand-made snapshots (sums, restarts, silent processes).
The integration tests run one hub for the module with two ingress workers and two shards, send
transfers through the DFSP simulator, and read the admin port's ``GET /metrics``: counts must be
exact, every process must be in the merge, and every metric the Grafana dashboard queries must be
in the scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import itertools
import json
import os
import re
import time
import uuid
from pathlib import Path

import pytest
import ray
import uvloop
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from cluster import metrics
from cluster.config import HubConfig
from cluster.metrics import ParticipantLabels, process_snapshot
from cluster.metrics_hub import MetricsMerger, _Families
from cluster.testing import HubThread, assert_conserved, module_hub
from loadtests.prometheus import PrometheusServer, evaluate_dashboard, prometheus_binary
from sim.simulator import Behaviour, Simulator

CURRENCY = "XTS"
DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "rayloop.json"
_names = itertools.count()


# ---------------------------------------------------------------------------------------------- merge (pure)


def _registry(counter_value: float, gauge_value: float, observations: list[float], *, incarnation: str) -> dict:
    registry = CollectorRegistry()
    Counter("rayloop_things", "things", ["kind"], registry=registry).labels("a").inc(counter_value)
    Gauge("rayloop_depth", "depth", ["shard"], registry=registry).labels("0").set(gauge_value)
    histogram = Histogram("moja_tx_transfer", "latency", ["success"], buckets=(0.1, 1.0), registry=registry)
    for value in observations:
        histogram.labels("true").observe(value)
    Gauge("process_open_fds", "fds", registry=registry).set(7)
    snapshot = process_snapshot(registry)
    snapshot["incarnation"] = incarnation
    return snapshot


def _values(merger: MetricsMerger) -> dict[tuple[str, frozenset], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in merger.families()
        for sample in family.samples
    }


def test_merge_sums_counters_histograms_and_gauges_over_processes():
    merger = MetricsMerger()
    merger.update("ingress-0", _registry(3, 2, [0.05, 2.0], incarnation="a"))
    merger.update("ingress-1", _registry(4, 5, [0.5], incarnation="b"))
    values = _values(merger)
    assert values[("rayloop_things_total", frozenset({("kind", "a")}))] == 7
    assert values[("rayloop_depth", frozenset({("shard", "0")}))] == 7
    assert values[("moja_tx_transfer_count", frozenset({("success", "true")}))] == 3
    assert values[("moja_tx_transfer_bucket", frozenset({("success", "true"), ("le", "0.1")}))] == 1
    assert values[("moja_tx_transfer_bucket", frozenset({("success", "true"), ("le", "1.0")}))] == 2
    assert values[("moja_tx_transfer_bucket", frozenset({("success", "true"), ("le", "+Inf")}))] == 3
    assert values[("moja_tx_transfer_sum", frozenset({("success", "true")}))] == pytest.approx(2.55)
    # Not additive: one series per process, never a sum.
    assert values[("process_open_fds", frozenset({("source", "ingress-0")}))] == 7
    assert values[("process_open_fds", frozenset({("source", "ingress-1")}))] == 7
    assert not any(name.endswith("_created") for name, _ in values)
    # And it renders as a valid exposition that parses back to the same numbers.
    from prometheus_client.exposition import generate_latest

    parsed = _parse(generate_latest(_Families(merger.families())).decode())
    assert parsed[("rayloop_things_total", frozenset({("kind", "a")}))] == 7


def test_merge_never_goes_backwards_when_a_process_restarts():
    merger = MetricsMerger()
    merger.update("shard-0", _registry(10, 4, [0.2, 0.3], incarnation="first"))
    before = _values(merger)
    # The process died and Ray restarted it: its registry starts from zero.
    merger.update("shard-0", _registry(1, 1, [0.4], incarnation="second"))
    after = _values(merger)
    assert after[("rayloop_things_total", frozenset({("kind", "a")}))] == 11
    assert after[("moja_tx_transfer_count", frozenset({("success", "true")}))] == 3
    for key, value in before.items():
        if key[0].startswith(("rayloop_things", "moja_")):
            assert after[key] >= value, key
    # A gauge is the new process's value, not a sum with the dead one's.
    assert after[("rayloop_depth", frozenset({("shard", "0")}))] == 1


def test_a_silent_process_keeps_its_counters_but_not_its_gauges():
    merger = MetricsMerger()
    merger.update("ingress-0", _registry(5, 9, [], incarnation="a"))
    merger.update("ingress-0", None)
    values = _values(merger)
    assert values[("rayloop_things_total", frozenset({("kind", "a")}))] == 5
    assert ("rayloop_depth", frozenset({("shard", "0")})) not in values
    assert values[("rayloop_metrics_source_up", frozenset({("source", "ingress-0")}))] == 0


def test_participant_labels_are_bounded():
    labels = ParticipantLabels(max_values=2)
    assert [labels.name(n) for n in ("a", "b", "c", "a", None)] == ["a", "b", "other", "a", "unknown"]
    registry = CollectorRegistry()
    counter = Counter("rayloop_x", "x", ["participant", "state"], registry=registry)
    for name in ("a", "b", "c", "d"):
        labels.child(counter, name, "committed").inc()
    assert registry.get_sample_value("rayloop_x_total", {"participant": "other", "state": "committed"}) == 2


def test_instrumentation_cost_per_transfer_is_microseconds():
    """What one transfer adds on the ingress and the shard (amortised batch metrics left out): measured, bounded."""
    rounds = 20_000
    started = time.perf_counter()
    for _ in range(rounds):
        received = time.perf_counter()
        metrics.PARTICIPANT_DIRECTORY_HIT.inc(2)  # payer and payee resolved
        metrics.ENDPOINT_DIRECTORY_HIT.inc()
        metrics.count_prepare("costfsp", "reserved")
        metrics.prepare_timer(received)("delivered")  # prepare flow, at the payee's 202
        metrics.ENDPOINT_DIRECTORY_HIT.inc()
        metrics.count_result("costfsp", "costfsp2", "committed")
        metrics.fulfil_timer(received, int(time.time() * 1000))("delivered")  # fulfil and end to end
    per_transfer_us = (time.perf_counter() - started) / rounds * 1e6
    print(f"metrics cost per transfer: {per_transfer_us:.1f} us")
    # About 10 us on the 2-core CI machine; a transfer costs hundreds of us of CPU in the hub.
    assert per_transfer_us < 100


# ---------------------------------------------------------------------------------------------- a real hub


@pytest.fixture(scope="module")
def hub(module_database_url):
    with module_hub(module_database_url, hub_accounts=(CURRENCY,), shards=2, ingress_workers=2) as thread:
        yield thread


@pytest.fixture(autouse=True)
def conserved(request):
    yield
    if "hub" in request.fixturenames:
        thread = request.getfixturevalue("hub")
        thread.call(assert_conserved(thread.hub))


def _http(port: int, method: str, path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def _parse(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(hub: HubThread) -> dict[tuple[str, frozenset], float]:
    status, text = _http(hub.hub.admin_port, "GET", "/metrics")
    assert status == 200, text
    return _parse(text)


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: dict, name: str, **labels) -> float:
    """Sum over every series of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (sample, series), v in samples.items() if sample == name and wanted <= series)


def wait_scrape(hub: HubThread, ready, timeout_s: float = 20.0) -> dict:
    """Scrape until ``ready(samples)``: a callback's outcome is recorded just after the DFSP has it."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(hub)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def onboard(hub: HubThread, sim: Simulator, name: str, *, behaviour: Behaviour | None = None) -> None:
    sim.add_dfsp(name, behaviour)
    status, body = hub.admin("POST", "/participants", {"name": name, "currency": CURRENCY})
    assert status == 201, body
    status, body = hub.admin("POST", f"/participants/{name}/initialPositionAndLimits", {
        "currency": CURRENCY, "limit": {"type": "NET_DEBIT_CAP", "value": "1000"}, "initialPosition": 0})
    assert status == 201, body
    for endpoint_type, url in sim.endpoints(name).items():
        status, body = hub.admin("POST", f"/participants/{name}/endpoints", {"type": endpoint_type, "value": url})
        assert status == 201, body
    status, accounts = hub.admin("GET", f"/participants/{name}/accounts")
    settlement = next(a for a in accounts if a["ledgerAccountType"] == "SETTLEMENT")
    status, body = hub.admin("POST", f"/participants/{name}/accounts/{settlement['id']}", {
        "transferId": str(uuid.uuid4()), "externalReference": "metrics", "action": "recordFundsIn",
        "reason": "test deposit", "amount": {"amount": "1000", "currency": CURRENCY}})
    assert status == 202, body


def pair() -> tuple[str, str]:
    n = next(_names)
    return f"met{n}payer", f"met{n}payee"


@contextlib.asynccontextmanager
async def simulator(hub: HubThread):
    sim = Simulator(hub.fspiop_url)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


async def committed_transfers(hub: HubThread, sim: Simulator, payer: str, payee: str, count: int) -> None:
    for _ in range(count):
        status, _, prepare = await sim.send_prepare(payer, payee, "1.25", CURRENCY)
        assert status == 202
        transfer_id = prepare["transferId"]
        found = await sim.wait_for(payer, lambda r, t=transfer_id: r.method == "PUT" and t in r.path, 15)
        assert found.body.get("transferState") == "COMMITTED", found.body


def test_transfers_are_counted_exactly(hub):
    transfers = 5
    payer, payee = pair()

    async def scenario():
        async with simulator(hub) as sim:
            onboard(hub, sim, payer)
            onboard(hub, sim, payee)
            before = scrape(hub)
            await committed_transfers(hub, sim, payer, payee, transfers)
            return before

    before = uvloop.run(scenario())

    def delta(samples, name, **labels):
        return value(samples, name, **labels) - value(before, name, **labels)

    after = wait_scrape(hub, lambda s: delta(s, "moja_tx_transfer_count", success="true") >= transfers)
    for name in ("moja_tx_transfer", "moja_tx_transfer_prepare", "moja_tx_transfer_fulfil"):
        assert delta(after, f"{name}_count", success="true") == transfers, name
        assert delta(after, f"{name}_count", success="false") == 0, name
        # Loopback transfers: every one under a second, so the "over 1 s" share is exactly zero.
        assert delta(after, f"{name}_bucket", success="true", le="1.0") == transfers, name
        assert delta(after, f"{name}_bucket", success="true", le="+Inf") == transfers, name
    # End to end spans the fulfil flow (the prepare's time is recorded in whole milliseconds).
    e2e = delta(after, "moja_tx_transfer_sum", success="true")
    fulfil = delta(after, "moja_tx_transfer_fulfil_sum", success="true")
    assert e2e + 0.001 * transfers >= fulfil > 0
    # Per participant, from this test's own DFSPs: exact.
    assert value(after, "rayloop_transfer_prepares_total", payer=payer, outcome="reserved") == transfers
    assert total(after, "rayloop_transfer_prepares_total", payer=payer) == transfers
    assert value(after, "rayloop_transfer_results_total", participant=payer, role="payer",
                 state="committed") == transfers
    assert value(after, "rayloop_transfer_results_total", participant=payee, role="payee",
                 state="committed") == transfers
    assert total(after, "rayloop_transfer_results_total", participant=payee) == transfers
    # Callbacks: the prepare forwarded to the payee and the fulfil forwarded to the payer, each delivered.
    assert delta(after, "rayloop_callbacks_total", kind="transfer_post", outcome="delivered") == transfers
    assert delta(after, "rayloop_callbacks_total", kind="transfer_put", outcome="delivered") == transfers
    assert delta(after, "rayloop_callback_seconds_count", kind="transfer_put", outcome="delivered") == transfers
    # The shards applied them: one prepare and one fulfil command each, in batches.
    assert total(after, "rayloop_shard_batch_commands_sum") - total(before, "rayloop_shard_batch_commands_sum") \
        >= 2 * transfers
    assert total(after, "rayloop_ingress_batch_commands_sum") - total(before, "rayloop_ingress_batch_commands_sum") \
        == 2 * transfers
    assert delta(after, "rayloop_cache_lookups_total", cache="participant_directory", result="hit") >= 2 * transfers


def test_refused_and_expired_transfers_are_counted(hub):
    payer, payee = pair()

    async def scenario():
        async with simulator(hub) as sim:
            onboard(hub, sim, payer)
            onboard(hub, sim, payee, behaviour=Behaviour(mode="ignore"))
            before = scrape(hub)
            # Beyond the net debit cap (1000): refused by the payer's shard with 4200.
            status, _, refused = await sim.send_prepare(payer, payee, "5000", CURRENCY)
            assert status == 202
            await sim.wait_for(payer, lambda r: r.path.endswith("/error") and refused["transferId"] in r.path, 15)
            # The payee never answers: the payer's shard expires it and itself sends 3303 to both.
            status, _, expiring = await sim.send_prepare(payer, payee, "1", CURRENCY, expiration_ms=300)
            assert status == 202
            for dfsp in (payer, payee):
                await sim.wait_for(dfsp, lambda r: r.path.endswith("/error") and expiring["transferId"] in r.path, 15)
            return before

    before = uvloop.run(scenario())
    after = wait_scrape(hub, lambda s: value(s, "rayloop_transfer_results_total", participant=payee, role="payee",
                                             state="expired") >= 1
                        and value(s, "moja_tx_transfer_prepare_count", success="true")
                        - value(before, "moja_tx_transfer_prepare_count", success="true") >= 2)
    assert value(after, "rayloop_transfer_prepares_total", payer=payer, outcome="refused") == 1
    assert value(after, "rayloop_transfer_prepares_total", payer=payer, outcome="reserved") == 1
    # Counted by the shard process that expired it: the merge includes the shards' registries.
    assert value(after, "rayloop_transfer_results_total", participant=payer, role="payer", state="expired") == 1
    assert value(after, "rayloop_transfer_results_total", participant=payee, role="payee", state="expired") == 1
    # Both prepares ended with a delivered callback (the refusal to the payer, the forward to the payee);
    # neither has a fulfil, so no end-to-end observation.
    assert value(after, "moja_tx_transfer_prepare_count", success="true") \
        - value(before, "moja_tx_transfer_prepare_count", success="true") == 2
    assert value(after, "moja_tx_transfer_count", success="true") == value(before, "moja_tx_transfer_count",
                                                                           success="true")


def test_scrape_covers_every_ingress_worker_and_shard(hub):
    before = scrape(hub)
    config = hub.hub.config
    # Shards hosted in the ingress workers report through their worker's process; shard actors on their own.
    shard_sources = [f"shard-{i}" for i in range(config.shard_count)] if config.shard_host == "actors" else []
    sources = ("hub", "ingress-0", "ingress-1", *shard_sources)
    for source in sources:
        assert value(before, "rayloop_metrics_source_up", source=source) == 1, source
    assert total(before, "rayloop_metrics_source_up") == len(sources)
    for shard in range(config.shard_count):
        assert ("rayloop_shard_unflushed_changes", frozenset({("shard", str(shard))})) in before, shard
    # Forty requests on forty new connections: the kernel spreads them over both workers (SO_REUSEPORT).
    requests = 40
    for _ in range(requests):
        status, _ = _http(hub.hub.fspiop_port, "GET", "/no-such-resource")
        assert status == 404
    labels = {"resource": "other", "method": "GET", "status": "404"}
    per_worker = []
    for handle in hub.hub.ingress:
        snapshot = ray.get(handle.metrics_snapshot.remote(), timeout=30)
        per_worker.append(sum(
            v for family, _, _, samples in snapshot["families"] if family == "rayloop_fspiop_requests"
            for sample, series, v in samples if sample == "rayloop_fspiop_requests_total" and dict(series) == labels
        ))
    after = scrape(hub)
    merged = value(after, "rayloop_fspiop_requests_total", **labels)
    assert merged == sum(per_worker)
    assert merged - value(before, "rayloop_fspiop_requests_total", **labels) == requests
    assert all(count > 0 for count in per_worker), per_worker  # both workers served, both are in the merge
    # Each shard's own process reported its batches and flushes (onboarding alone moves money on both).
    for shard in ("0", "1"):
        assert value(after, "rayloop_shard_batch_commands_count", shard=shard) > 0, shard
        assert value(after, "rayloop_shard_flush_seconds_count", shard=shard) > 0, shard
        assert ("rayloop_shard_unflushed_changes", frozenset({("shard", shard)})) in after, shard
    # Per-process metrics of the default collectors stay per process.
    for source in sources:
        assert ("process_start_time_seconds", frozenset({("source", source)})) in after, source


def test_ingress_port_metrics_say_they_are_one_process(hub):
    status, text = _http(hub.hub.fspiop_port, "GET", "/metrics")
    assert status == 200
    assert text.startswith("# rayloop: the metrics of ONE ingress worker process")
    assert "rayloop_fspiop_requests_total" in text


# ---------------------------------------------------------------------------------------------- the dashboard

_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
                 "unless"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords or label lists."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges (and Grafana's $__rate_interval)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", expr):
        if match.group(2) or match.group(1) in _PROMQL_WORDS:
            continue  # a function call or a keyword
        names.add(match.group(1))
    return names


def test_promql_metric_names():
    expr = ('histogram_quantile(0.95, sum by (le, shard) (rate(rayloop_x_bucket{outcome!="a b"}[$__rate_interval])))'
            ' / on (shard) sum(rate(moja_y_count[5m])) + rayloop_z')
    assert promql_metric_names(expr) == {"rayloop_x_bucket", "moja_y_count", "rayloop_z"}


def dashboard_expressions() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    assert board["schemaVersion"] >= 36 and board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    expressions = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}" and target["refId"], panel["title"]
            expressions.append(target["expr"])
    expressions.append(re.sub(r"label_values\((\w+), \w+\)", r"\1", dashboard_variable_query("participant")))
    return expressions


def dashboard_variable_query(name: str) -> str:
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    return variables[name]["query"]["query"]


def test_every_dashboard_metric_is_in_a_real_scrape(hub):
    payer, payee = pair()

    async def scenario():
        async with simulator(hub) as sim:
            onboard(hub, sim, payer)
            onboard(hub, sim, payee)
            await committed_transfers(hub, sim, payer, payee, 2)
            # A refused one, so error callbacks exist too.
            status, _, refused = await sim.send_prepare(payer, payee, "5000", CURRENCY)
            assert status == 202
            await sim.wait_for(payer, lambda r: r.path.endswith("/error") and refused["transferId"] in r.path, 15)

    uvloop.run(scenario())
    samples = wait_scrape(hub, lambda s: value(s, "rayloop_transfer_results_total", participant=payee, role="payee",
                                               state="committed") >= 2)
    scraped = {name for name, _ in samples}
    expressions = dashboard_expressions()
    wanted = set().union(*(promql_metric_names(expr) for expr in expressions))
    assert {"moja_tx_transfer_bucket", "moja_tx_transfer_prepare_bucket", "moja_tx_transfer_fulfil_bucket"} <= wanted
    assert len(wanted) >= 25, sorted(wanted)
    missing = sorted(wanted - scraped)
    assert not missing, f"the dashboard queries metrics the hub does not export: {missing}"


def test_every_dashboard_panel_has_data_in_a_real_prometheus(hub):
    """A real Prometheus scrapes the hub while transfers run; every panel's query, as Grafana sends it, has data.

    Needs the ``prometheus`` binary (``apt-get install prometheus``; ``.ci/run`` installs it). Without it
    the test is skipped, unless ``RAYLOOP_REQUIRE_PROMETHEUS=1`` (CI) makes that a failure.
    """
    if prometheus_binary() is None:
        if os.environ.get("RAYLOOP_REQUIRE_PROMETHEUS") == "1":
            pytest.fail("RAYLOOP_REQUIRE_PROMETHEUS=1 but there is no prometheus binary")
        pytest.skip("no prometheus binary: apt-get install prometheus")
    payer, payee = pair()
    deaf = f"{payer}deaf"  # answers the hub's callbacks with 400 (rejected): the callback error panels get data
    scrape_interval_ms = 500
    with PrometheusServer([f"127.0.0.1:{hub.hub.admin_port}"], scrape_interval_ms=scrape_interval_ms) as prom:
        prom.wait_for_scrapes()
        start = time.time()

        async def scenario():
            async with simulator(hub) as sim:
                onboard(hub, sim, payer)
                onboard(hub, sim, payee)
                onboard(hub, sim, deaf, behaviour=Behaviour(fail_http=400))
                # Enough traffic for rates over several scrape windows (Grafana's $__rate_interval is 4
                # scrapes), with a refused prepare and callbacks the deaf DFSP rejects in the middle.
                await committed_transfers(hub, sim, payer, payee, 5)
                # Traffic runs long before an error in real life: Prometheus has seen the error series at 0
                # (the dispatcher creates every outcome of a kind with its first callback).
                deadline = time.monotonic() + 20
                while not await asyncio.to_thread(
                        prom.query, 'rayloop_callbacks_total{kind="transfer_put", outcome="rejected"} == 0'):
                    assert time.monotonic() < deadline, "no rejected transfer_put series at 0 in the scrapes"
                    await asyncio.sleep(0.1)
                status, _, refused = await sim.send_prepare(payer, payee, "5000", CURRENCY)
                assert status == 202
                await sim.wait_for(payer, lambda r: r.path.endswith("/error") and refused["transferId"] in r.path, 15)
                until = time.monotonic() + 6.0
                while time.monotonic() < until:
                    # Rejected callbacks spread over the traffic, so a missed scrape cannot hide them all.
                    status, _, _ = await sim.send_prepare(deaf, payee, "1", CURRENCY)
                    assert status == 202
                    await committed_transfers(hub, sim, payer, payee, 5)
                    # Paced: the payer's net debit cap (1000) allows 800 transfers of 1.25, whatever the speed.
                    await asyncio.sleep(0.1)

        uvloop.run(scenario())
        wait_scrape(hub, lambda s: total(s, "rayloop_callbacks_total", outcome="rejected") >= 3)
        time.sleep(4 * scrape_interval_ms / 1000)  # the last transfers in a few scrapes
        end = time.time()
        panels = evaluate_dashboard(prom, start, end, step_s=scrape_interval_ms / 1000)
        # The Participant variable's own query, as Grafana runs it.
        variable = re.fullmatch(r"label_values\((\w+), (\w+)\)", dashboard_variable_query("participant"))
        participants = prom.label_values(variable.group(1), variable.group(2))
        scrapes = prom.series_scraped(start, end)
        expected_scrapes = (end - start) * 1000 / scrape_interval_ms
    assert len(panels) == len(dashboard_expressions()) - 1  # every target (the last one is the variable's)
    invalid = [(p.target.panel, p.error) for p in panels if p.error]
    assert not invalid, f"queries Prometheus refuses: {invalid}"
    empty = [f"{p.target.panel} ({p.target.ref_id}): {p.query}" for p in panels if not p.has_data]
    assert not empty, f"{scrapes} of ~{expected_scrapes:.0f} scrapes; panels with no data:\n" + "\n".join(empty)
    assert {payer, payee, deaf} <= set(participants)
    by_panel = {(p.target.panel, p.target.ref_id): p for p in panels}
    completed = by_panel[("Transfers per second", "A")]
    assert max(completed.maxima.values()) > 0
    errors = by_panel[("Callback errors (rejected, failed, dropped)", "A")].maxima
    assert any("rejected" in legend and peak > 0 for legend, peak in errors.items()), (scrapes, errors)


def test_each_shard_answers_from_the_worker_that_hosts_it(hub):
    """With shards in the ingress workers, shard k lives in worker k mod workers: the other worker refuses
    calls for it, and the hub's handle reaches it in its host's process. With shard actors, no worker
    hosts any."""
    config = hub.hub.config
    workers = hub.hub.ingress
    if config.shard_host != "ingress":
        # Shards are actors of their own in this run (RAYLOOP_SHARD_HOST=actors): no worker hosts any.
        for shard_id in range(config.shard_count):
            for worker in workers:
                with pytest.raises(ray.exceptions.RayTaskError, match="not hosted by this ingress worker"):
                    ray.get(worker.shard_call.remote(shard_id, "ping"), timeout=30)
        return
    assert len(workers) == config.shard_count == 2
    pids = []
    for shard_id in range(config.shard_count):
        host = shard_id % len(workers)
        answer = ray.get(workers[host].shard_call.remote(shard_id, "ping"), timeout=30)
        assert answer["shard_id"] == shard_id
        assert hub.call(_ping(hub.hub.handles[shard_id]))["pid"] == answer["pid"]
        pids.append(answer["pid"])
        other = workers[(host + 1) % len(workers)]
        with pytest.raises(ray.exceptions.RayTaskError, match="not hosted by this ingress worker"):
            ray.get(other.shard_call.remote(shard_id, "ping"), timeout=30)
        # Only the shard-actor methods, and not stop: the worker stops its shards itself, after serving.
        for method in ("_apply", "stop"):
            with pytest.raises(ray.exceptions.RayTaskError, match="not a shard method callable"):
                ray.get(workers[host].shard_call.remote(shard_id, method), timeout=30)
    assert len(set(pids)) == 2, "two workers, one shard each: two processes"


async def _ping(handle) -> dict:
    return await handle.ping.remote()


def test_hot_path_actors_report_no_ray_task_events(hub):
    """Ray's GCS keeps an event per actor call for `ray list tasks`, growing Ray's memory by hundreds of MB
    over an hour of transfers; the shard and ingress actors are created with them off by default
    (RAYLOOP_RAY_TASK_EVENTS=1 turns them on)."""
    assert HubConfig.from_env().ray_task_events is (
        os.environ.get("RAYLOOP_RAY_TASK_EVENTS", "").lower() in ("1", "true", "yes"))
    assert HubConfig().ray_task_events is False
    shard_actors = list(hub.hub.handles.values()) if hub.hub.config.shard_host == "actors" else []
    actors = [*shard_actors, *hub.hub.ingress]
    assert actors and all(actor._ray_enable_task_events is hub.hub.config.ray_task_events for actor in actors)


def test_scrape_while_transfers_run_is_consistent(hub):
    """Scrapes during traffic: every counter only grows, and the hub answers each scrape quickly."""
    payer, payee = pair()

    async def scenario():
        async with simulator(hub) as sim:
            onboard(hub, sim, payer)
            onboard(hub, sim, payee)
            previous = await asyncio.to_thread(scrape, hub)
            sending = asyncio.ensure_future(committed_transfers(hub, sim, payer, payee, 6))
            while not sending.done():
                current = await asyncio.to_thread(scrape, hub)
                for key, v in previous.items():
                    if key[0].endswith(("_total", "_count", "_bucket")) and key in current:
                        assert current[key] >= v, key
                assert value(current, "rayloop_metrics_scrape_seconds") < 2
                previous = current
                await asyncio.sleep(0.05)
            await sending

    uvloop.run(scenario())


def test_counters_never_go_backwards_when_an_ingress_worker_restarts(hub):
    """Last in the module: it kills a worker. Ray restarts it with an empty registry; the merge keeps its counts."""
    for _ in range(20):
        status, _ = _http(hub.hub.fspiop_port, "GET", "/no-such-resource")
        assert status == 404
    before = scrape(hub)
    victim = hub.hub.ingress[0]
    old = ray.get(victim.metrics_snapshot.remote(), timeout=30)["incarnation"]
    ray.kill(victim, no_restart=False)
    deadline = time.monotonic() + 60
    while True:
        try:
            new = ray.get(victim.metrics_snapshot.remote(), timeout=10)["incarnation"]
            if new != old:
                break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        assert time.monotonic() < deadline, "the ingress worker did not come back"
        time.sleep(0.2)
    after = scrape(hub)
    assert value(after, "rayloop_metrics_source_up", source="ingress-0") == 1
    regressed = [
        key for key, v in before.items()
        if key[0].startswith(("rayloop_", "moja_")) and key[0].endswith(("_total", "_count", "_bucket", "_sum"))
        and after.get(key, 0.0) < v
    ]
    assert not regressed, regressed
    labels = {"resource": "other", "method": "GET", "status": "404"}
    assert value(after, "rayloop_fspiop_requests_total", **labels) >= value(before, "rayloop_fspiop_requests_total",
                                                                            **labels) >= 20
