"""The benchmark's pure helpers: onboarding order (which decides shard placement), Grafana's variables
as the dashboard check fills them, and the report's dashboard table."""

from __future__ import annotations

import pytest

from loadtests.bench import _dashboard_markdown, _hub_line, onboarding_order
from loadtests.prometheus import dashboard_targets, grafana_expression, grafana_rate_interval_ms

PAIRS = [("payer0", "payee0"), ("payer1", "payee1"), ("payer2", "payee2")]


def test_onboarding_order():
    assert onboarding_order(PAIRS, "pairs") == ["payer0", "payee0", "payer1", "payee1", "payer2", "payee2"]
    # Payee first in every other pair: with the Hub on shard 0 and fewest-participants placement over 2
    # shards, payer0 -> 1, payee0 -> 0, payee1 -> 1, payer1 -> 0, ...: the payers share the shards.
    assert onboarding_order(PAIRS, "spread") == ["payer0", "payee0", "payee1", "payer1", "payer2", "payee2"]


def test_grafana_rate_interval_is_four_scrapes_or_step_plus_one():
    assert grafana_rate_interval_ms(1_000, 1_000) == 4_000
    assert grafana_rate_interval_ms(15_000, 60_000) == 75_000  # a long range: the step dominates


def test_grafana_variables_are_filled_as_grafana_does():
    expr = 'sum by (payer) (rate(rayloop_transfer_prepares_total{payer=~"$participant"}[$__rate_interval]))'
    assert grafana_expression(expr, rate_interval_ms=4_000) == (
        'sum by (payer) (rate(rayloop_transfer_prepares_total{payer=~".*"}[4000ms]))')
    assert "${participant}" not in grafana_expression('x{p=~"${participant}"}', rate_interval_ms=1, participant="a")


def test_every_dashboard_target_is_read_with_its_panel():
    targets = dashboard_targets()
    assert len(targets) >= 40
    assert all(t.panel and t.ref_id and t.expr for t in targets)
    assert ("Transfers per second", "A") in {(t.panel, t.ref_id) for t in targets}


def _panel(name: str, *, medians=None, maxima=None, error=None) -> dict:
    medians = medians or {}
    return {"panel": name, "ref_id": "A", "query": "q", "series": len(medians), "points": len(medians),
            "has_data": bool(medians) and error is None, "medians": medians, "maxima": maxima or medians,
            "error": error}


def test_dashboard_table_shows_medians_maxima_and_gaps():
    report = {"dashboard_check": "Prometheus scraping", "runs": [{"rayloop": {"dashboard": [
        _panel("Transfers per second", medians={"completed": 1049.5}, maxima={"completed": 1210.0}),
        _panel("Flush latency", medians={"p50 0": 0.0019}, maxima={"p50 0": 0.0021}),
        _panel("Callback errors", medians={}),
        _panel("Broken", error="bad_data: parse error"),
    ]}}]}
    text = "\n".join(_dashboard_markdown(report))
    assert "2 of 4 queries had data" in text
    assert "| Transfers per second | A | completed: 1,049.5 (1,210) |" in text
    assert "p50 0: 1.90e-03 (2.10e-03)" in text
    assert "| Callback errors | A | *no data* |" in text
    assert "query refused: bad_data: parse error" in text


def test_dashboard_table_says_why_it_is_missing():
    report = {"dashboard_check": "skipped: no prometheus binary", "runs": [{"rayloop": {}}]}
    assert "Not evaluated: skipped: no prometheus binary." in _dashboard_markdown(report)


def test_dashboard_as_typed_typescript_for_grafanas_schema_check():
    """tools/check_dashboard_schema.py: what it hands to tsc (tsc itself needs npm; docs/METRICS.md)."""
    import json

    from loadtests.prometheus import DASHBOARD
    from tools.check_dashboard_schema import typescript_source

    board = json.loads(DASHBOARD.read_text())
    source = typescript_source(board)
    assert "export const dashboard: Lit<Dashboard> = {" in source
    assert '"__inputs"' not in source and '"__requires"' not in source  # import metadata, not the model
    panels = board["panels"]
    assert source.count(": TimeSeriesPanel = {") == sum(p["type"] == "timeseries" for p in panels) > 0
    assert source.count(": Lit<RowPanel> = {") == sum(p["type"] == "row" for p in panels) > 0
    # What the schema check found missing: every legend names its calcs (Grafana writes [] for none).
    assert all("calcs" in p["options"]["legend"] for p in panels if p["type"] == "timeseries")
    with pytest.raises(ValueError, match="'stat'"):  # a panel type without schema types is not passed unchecked
        typescript_source({"panels": [{"type": "stat", "title": "x"}]})


def test_hub_line_names_where_shards_run_and_the_settings_given():
    hub = {"shard_host": "ingress", "ingress_workers": 1, "shards": 2, "batch_in_flight": 1,
           "environment": {"RAYLOOP_INGRESS_BATCH_IN_FLIGHT": "4"}}
    line = _hub_line(hub)
    assert line.startswith("2 shards, in the ingress workers (RAYLOOP_SHARD_HOST=ingress); 1 ingress worker(s)")
    assert line.endswith("environment: `RAYLOOP_INGRESS_BATCH_IN_FLIGHT=4`")
    assert "Ray actors of their own" in _hub_line(dict(hub, shard_host="actors", environment={}))
    assert _hub_line({}) == "not recorded"
    assert "niceness" not in line  # an older report, which did not record it
    assert _hub_line(dict(hub, worker_niceness=0, environment={})).endswith("; Ray workers at niceness 0")
