"""One scrape for the whole hub: every process's metrics, gathered through Ray and merged.

Why Ray calls and not prometheus_client's multiprocess mode: its files live in a directory per
host, so on a multi-node cluster a scrape of one node would miss the others' actors; and the
ingress workers share one port (SO_REUSEPORT), so a scrape of port 3000 reaches one random worker.
Here the hub process asks every ingress worker and every shard actor for a snapshot of its
registry (``cluster.metrics.process_snapshot``), wherever it runs, and merges them:

* ``rayloop_*`` and ``moja_*`` families are summed over processes: counters and histograms sample by
  sample (same name and labels), gauges too (every such gauge is additive: queue depths, waiting
  calls, labelled by shard where it matters).
* Any other family (``process_*``, ``python_*`` of prometheus_client's default collectors) is not
  additive; it is passed through with a ``source`` label naming the process.
* A process that restarted (new incarnation) starts its counters from zero. Its predecessor's last
  values are kept ("retired") and added forever after, so the merged counters never go backwards
  and Prometheus' rate() sees no false reset. Increments made between the last scrape and the
  crash are lost, a small undercount.
* A process that does not answer within the timeout contributes its last counters (they cannot have
  decreased) but no gauges (their current value is unknown); ``rayloop_metrics_source_up`` says so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric

from cluster.metrics import process_snapshot

log = logging.getLogger(__name__)

_ADDITIVE_PREFIXES = ("rayloop_", "moja_")
_MONOTONIC_TYPES = ("counter", "histogram", "summary")


def _additive(name: str) -> bool:
    return name.startswith(_ADDITIVE_PREFIXES)


class MetricsMerger:
    """Pure merge state (no I/O): feed it each source's snapshot, then render the families."""

    def __init__(self):
        self._last: dict[str, dict] = {}  # source -> its latest snapshot
        self._up: dict[str, bool] = {}
        # (family, sample, labels) -> counts of incarnations that are gone
        self._retired: dict[tuple[str, str, tuple], float] = {}
        self._meta: dict[str, tuple[str, str]] = {}  # family -> (type, documentation)

    def update(self, source: str, snapshot: dict | None) -> None:
        """The source's new snapshot, or None when it did not answer this time."""
        if snapshot is None:
            self._up[source] = False
            return
        for name, kind, documentation, _ in snapshot["families"]:
            self._meta.setdefault(name, (kind, documentation))
        previous = self._last.get(source)
        if previous is not None and previous["incarnation"] != snapshot["incarnation"]:
            self._retire(previous)
        self._last[source] = snapshot
        self._up[source] = True

    def _retire(self, snapshot: dict) -> None:
        for name, kind, _, samples in snapshot["families"]:
            if not (_additive(name) and kind in _MONOTONIC_TYPES):
                continue
            for sample, labels, value in samples:
                if sample.endswith("_created"):
                    continue
                key = (name, sample, labels)
                self._retired[key] = self._retired.get(key, 0.0) + value

    def families(self) -> list[Metric]:
        summed: dict[str, dict[tuple[str, tuple], float]] = {}
        passed: dict[str, list[tuple[str, dict, float]]] = {}
        for (name, sample, labels), value in self._retired.items():
            bucket = summed.setdefault(name, {})
            bucket[(sample, labels)] = bucket.get((sample, labels), 0.0) + value
        for source, snapshot in self._last.items():
            up = self._up.get(source, False)
            for name, kind, _, samples in snapshot["families"]:
                if not _additive(name):
                    if up:
                        passed.setdefault(name, []).extend(
                            (sample, {**dict(labels), "source": source}, value) for sample, labels, value in samples
                        )
                    continue
                monotonic = kind in _MONOTONIC_TYPES
                if not (monotonic or up):
                    continue  # a gauge of a process that did not answer: its value now is unknown
                bucket = summed.setdefault(name, {})
                for sample, labels, value in samples:
                    if monotonic and sample.endswith("_created"):
                        continue  # a creation time summed over processes means nothing
                    bucket[(sample, labels)] = bucket.get((sample, labels), 0.0) + value
        out: list[Metric] = []
        for name in sorted(summed):
            kind, documentation = self._meta[name]
            family = Metric(name, documentation, kind)
            for (sample, labels), value in sorted(summed[name].items(), key=_sample_order):
                family.add_sample(sample, dict(labels), value)
            out.append(family)
        for name in sorted(passed):
            kind, documentation = self._meta[name]
            family = Metric(name, documentation, kind)
            for sample, labels, value in passed[name]:
                family.add_sample(sample, labels, value)
            out.append(family)
        up = Metric("rayloop_metrics_source_up", "1 when the process answered this scrape, 0 when it did not"
                    " (its counters are then its last known values)", "gauge")
        for source in sorted(self._up):
            up.add_sample("rayloop_metrics_source_up", {"source": source}, 1.0 if self._up[source] else 0.0)
        out.append(up)
        return out


def _sample_order(item):
    (sample, labels), _ = item
    # Buckets in ascending "le" order (as Prometheus writes them), the rest by name and labels.
    le = dict(labels).get("le")
    return (sample, tuple((k, v) for k, v in labels if k != "le"), float(le) if le is not None else 0.0)


class _Families:
    """What generate_latest needs: an object with collect()."""

    def __init__(self, families: list[Metric]):
        self._families = families

    def collect(self):
        return self._families


SnapshotCall = Callable[[], Awaitable[dict]]


class HubMetrics:
    """Scrapes every process of the hub and renders the merged exposition.

    ``sources`` maps a stable source name ("ingress-0", "shard-1") to an async function returning
    that process's snapshot (a Ray call); the hub process itself is the source "hub". Each call is
    bounded by ``timeout_ms`` (RAYLOOP_METRICS_SCRAPE_TIMEOUT_MS); all run concurrently.
    """

    def __init__(self, sources: dict[str, SnapshotCall], *, timeout_ms: int = 2_000):
        self.sources = dict(sources)
        self.timeout_ms = timeout_ms
        self.merger = MetricsMerger()
        self._lock = asyncio.Lock()  # concurrent scrapes must not interleave their merger updates
        self._scrape_seconds = 0.0

    async def _one(self, source: str, call: SnapshotCall) -> dict | None:
        try:
            return await asyncio.wait_for(call(), self.timeout_ms / 1000)
        except Exception as error:  # a dead, restarting or slow process: reported as down, never a failed scrape
            log.warning("metrics: %s did not answer: %r", source, error)
            return None

    async def collect(self) -> list[Metric]:
        async with self._lock:
            started = time.perf_counter()
            names = list(self.sources)
            snapshots = await asyncio.gather(*(self._one(name, self.sources[name]) for name in names))
            self.merger.update("hub", process_snapshot())
            for name, snapshot in zip(names, snapshots, strict=True):
                self.merger.update(name, snapshot)
            families = self.merger.families()
            self._scrape_seconds = time.perf_counter() - started
        took = Metric("rayloop_metrics_scrape_seconds", "How long gathering this scrape from every process took",
                      "gauge")
        took.add_sample("rayloop_metrics_scrape_seconds", {}, self._scrape_seconds)
        return [*families, took]

    async def exposition(self) -> bytes:
        return generate_latest(_Families(await self.collect()))


def ray_sources(ingress: list, shards: dict[int, object]) -> dict[str, SnapshotCall]:
    """Snapshot calls for the hub's Ray actors (ingress workers and shards), named by role and index."""

    def call(handle) -> SnapshotCall:
        async def snapshot() -> dict:
            return await handle.metrics_snapshot.remote()

        return snapshot

    sources = {f"ingress-{i}": call(handle) for i, handle in enumerate(ingress)}
    sources.update({f"shard-{shard_id}": call(handle) for shard_id, handle in shards.items()})
    return sources
