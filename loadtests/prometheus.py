"""A real Prometheus scraping the hub, and the Grafana dashboard's queries evaluated on it.

Grafana itself cannot run here, but what a panel shows is what Prometheus answers to its query over
the panel's time range. ``PrometheusServer`` runs the ``prometheus`` binary (Debian's package, or any
2.x on ``PATH``) on loopback, scraping the hub's admin ``/metrics``; ``evaluate_dashboard`` runs every
target of ``dashboards/rayloop.json`` as a range query, with Grafana's variables filled in the way
Grafana fills them, and says for each whether it has data and what it shows. Used by
``python -m loadtests.bench --prometheus`` and
``tests/test_metrics.py::test_every_dashboard_panel_has_data_in_a_real_prometheus``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from loadtests.null_forwarder import free_port

DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "rayloop.json"


def prometheus_binary() -> str | None:
    """``RAYLOOP_PROMETHEUS_BIN`` or ``prometheus`` on ``PATH``; None when there is none."""
    configured = os.environ.get("RAYLOOP_PROMETHEUS_BIN")
    if configured:
        if not os.access(configured, os.X_OK):
            raise FileNotFoundError(f"RAYLOOP_PROMETHEUS_BIN={configured} is not an executable file")
        return configured
    return shutil.which("prometheus")


# Loopback only: never through an HTTP(S)_PROXY the environment may name.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class PrometheusServer:
    """One Prometheus process with its own scratch storage; ``stop()`` removes both."""

    def __init__(self, targets: list[str], *, scrape_interval_ms: int = 1000, binary: str | None = None,
                 ready_timeout_s: float = 30.0):
        self.binary = binary or prometheus_binary()
        if not self.binary:
            raise FileNotFoundError("no prometheus binary (apt-get install prometheus, or set RAYLOOP_PROMETHEUS_BIN)")
        self.targets = targets
        self.scrape_interval_ms = scrape_interval_ms
        self.ready_timeout_s = ready_timeout_s
        self.port = free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        self._directory: str | None = None
        self._process: subprocess.Popen | None = None
        self._log = None

    def start(self) -> PrometheusServer:
        try:
            return self._start()
        except BaseException:
            self.stop()  # the process, its log file and its directory, whatever got made
            raise

    def _start(self) -> PrometheusServer:
        self._directory = tempfile.mkdtemp(prefix="rayloop-prometheus-")
        interval = f"{self.scrape_interval_ms}ms"
        config = {
            # The scrape timeout may not exceed the interval; the hub answers well within either.
            "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "scrape_configs": [{"job_name": "rayloop", "metrics_path": "/metrics",
                                "static_configs": [{"targets": self.targets}]}],
        }
        config_path = Path(self._directory, "prometheus.yml")
        config_path.write_text(json.dumps(config))  # JSON is YAML
        self._log = open(Path(self._directory, "prometheus.log"), "wb")  # noqa: SIM115 (closed in stop())
        self._process = subprocess.Popen(
            [self.binary, f"--config.file={config_path}", f"--storage.tsdb.path={self._directory}/data",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"prometheus exited at start: {self.log_tail()}")
            try:
                with _OPENER.open(f"{self.url}/-/ready", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus not ready after {self.ready_timeout_s} s: {self.log_tail()}")
            time.sleep(0.1)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def log_tail(self, characters: int = 2000) -> str:
        if not self._directory:
            return ""
        path = Path(self._directory, "prometheus.log")
        return path.read_text(errors="replace")[-characters:] if path.exists() else ""

    def stop(self) -> None:
        """Safe to call more than once, and after a failed start."""
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=15)
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._directory:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _get(self, path: str, params: dict[str, str]) -> dict:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with _OPENER.open(url, timeout=30) as answer:
                body = json.loads(answer.read())
        except urllib.error.HTTPError as error:  # a bad query is a 400 with Prometheus's reason
            body = json.loads(error.read() or b"{}")
        if body.get("status") != "success":
            raise ValueError(f"{params.get('query')}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, query: str) -> list[dict]:
        """An instant query now: ``[{"metric": labels, "value": [t, "v"]}, ...]``."""
        return self._get("/api/v1/query", {"query": query})["result"]

    def query_range(self, query: str, start: float, end: float, step_s: float) -> list[dict]:
        """``[{"metric": labels, "values": [[t, "v"], ...]}, ...]``."""
        data = self._get("/api/v1/query_range", {"query": query, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                                 "step": f"{step_s:g}"})
        return data["result"]

    def wait_for_scrapes(self, timeout_s: float = 30.0) -> None:
        """Until every target has been scraped once. Prometheus applies new targets only every 5 s, so
        its first scrape comes seconds after it is ready; traffic before that would be invisible to rate()."""
        deadline = time.monotonic() + timeout_s
        while True:
            up = self.query("up")
            if len(up) == len(self.targets) and all(series["value"][1] == "1" for series in up):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus has not scraped {self.targets} after {timeout_s} s: {up}")
            time.sleep(0.2)

    def label_values(self, metric: str, label: str) -> list[str]:
        """What Grafana's ``label_values(metric, label)`` variable query lists."""
        return self._get(f"/api/v1/label/{label}/values", {"match[]": metric})

    def series_scraped(self, start: float, end: float) -> int:
        """How many successful scrapes of the hub there were in [start, end] (the ``up`` series at 1)."""
        result = self.query_range("up", start, end, self.scrape_interval_ms / 1000)
        return sum(1 for series in result for _, v in series["values"] if v == "1")


# ----------------------------------------------------------------------------------------------- the dashboard


@dataclass(frozen=True)
class Target:
    panel: str
    ref_id: str
    expr: str
    legend: str


def dashboard_targets(path: Path = DASHBOARD) -> list[Target]:
    """Every query of every panel (rows have none), in the dashboard's order."""
    board = json.loads(path.read_text())
    targets = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            targets.append(Target(panel["title"], target["refId"], target["expr"], target.get("legendFormat", "")))
    return targets


def grafana_rate_interval_ms(scrape_interval_ms: int, step_ms: int) -> int:
    """Grafana's ``$__rate_interval``: max(``$__interval`` + scrape interval, 4 x scrape interval)."""
    return max(step_ms + scrape_interval_ms, 4 * scrape_interval_ms)


def grafana_expression(expr: str, *, rate_interval_ms: int, participant: str = ".*") -> str:
    """The PromQL Grafana sends: its variables replaced (``$participant`` set to All, a regex)."""
    for name, value in (("$__rate_interval", f"{rate_interval_ms}ms"), ("${participant}", participant),
                        ("$participant", participant)):
        expr = expr.replace(name, value)
    return expr


@dataclass
class PanelData:
    target: Target
    query: str
    series: int = 0
    points: int = 0  # finite values over all series ("No data" in Grafana when 0)
    medians: dict[str, float] = field(default_factory=dict)  # legend -> median over the range
    maxima: dict[str, float] = field(default_factory=dict)  # legend -> largest value over the range
    error: str | None = None

    @property
    def has_data(self) -> bool:
        return self.error is None and self.points > 0

    def as_dict(self) -> dict:
        return {"panel": self.target.panel, "ref_id": self.target.ref_id, "query": self.query,
                "series": self.series, "points": self.points, "has_data": self.has_data,
                "medians": self.medians, "maxima": self.maxima, "error": self.error}


def _legend(template: str, labels: dict[str, str]) -> str:
    if not template:
        return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__") + "}"
    text = template
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value).replace("{{ " + key + " }}", value)
    return text


def evaluate_dashboard(prometheus: PrometheusServer, start: float, end: float, *, step_s: float = 1.0,
                       path: Path = DASHBOARD) -> list[PanelData]:
    """Run every dashboard query over [start, end] the way a Grafana panel would."""
    rate_interval_ms = grafana_rate_interval_ms(prometheus.scrape_interval_ms, round(step_s * 1000))
    results = []
    for target in dashboard_targets(path):
        query = grafana_expression(target.expr, rate_interval_ms=rate_interval_ms)
        data = PanelData(target, query)
        try:
            for series in prometheus.query_range(query, start, end, step_s):
                values = [float(v) for _, v in series["values"]]
                finite = [v for v in values if math.isfinite(v)]
                data.series += 1
                data.points += len(finite)
                if finite:
                    legend = _legend(target.legend, series["metric"])
                    if legend in data.medians:  # two series drawn with the same legend: keep both
                        legend = f"{legend} ({data.series})"
                    data.medians[legend] = statistics.median(finite)
                    data.maxima[legend] = max(finite)
        except ValueError as error:
            data.error = str(error)
        results.append(data)
    return results
