"""The hub's Prometheus metrics: what each process records, and how a process hands them over.

Every process that serves traffic (ingress workers, shard actors, the hub process) records into its
own ``prometheus_client`` default registry. ``process_snapshot()`` turns that registry into plain
data that a Ray call can carry; ``cluster/metrics_hub.py`` gathers the snapshots of all processes
and merges them into the one exposition served on the admin port's ``GET /metrics``
(docs/METRICS.md has every metric, its labels and the reasons).

This module imports nothing from the project, so the core, the actors and the API can all use it.
Recording must stay cheap on the hot path: label children are looked up once and cached here, so a
transfer pays a few counter increments and histogram observations (about 1 us each), no more.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily

log = logging.getLogger(__name__)

# Identifies this process's registry: a new value after a restart tells the aggregator that the
# counters it saw before belong to a dead process (see metrics_hub.MetricsMerger).
INCARNATION = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"

# Seconds: 1 ms to 30 s, with 1 s a bucket boundary so "share over one second" is exact
# (1 - bucket{le="1.0"} / count); Mojaloop's baseline target is under 1 % of transfers over 1 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
# Commands per shard call and journal rows per flush: powers of two up to past the default bounds
# (ingress batch_max 256, a flush under load a few thousand rows).
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

UNKNOWN_PARTICIPANT = "unknown"  # a name the hub does not know (refused with 3100): never a label of its own
OTHER_PARTICIPANT = "other"  # a known participant past the label bound

# ---------------------------------------------------------------------------------------------- transfers

# Mojaloop's names (central-services-metrics prefixes them with "moja_"; the seed's Grafana panels
# query moja_tx_transfer...). Label ``success``: whether the callback that ends the flow was delivered.
TX_TRANSFER = Histogram(
    "moja_tx_transfer",
    "End-to-end financial transfer: from the payer's shard recording the prepare to the final outcome of the"
    " callback that tells the payer how the fulfil (or the payee's error) ended",
    ["success"], buckets=LATENCY_BUCKETS,
)
TX_TRANSFER_PREPARE = Histogram(
    "moja_tx_transfer_prepare",
    "Prepare flow: from POST /transfers arriving at an ingress worker to the final outcome of the callback it"
    " causes (the prepare forwarded to the payee, or the error to the payer)",
    ["success"], buckets=LATENCY_BUCKETS,
)
TX_TRANSFER_FULFIL = Histogram(
    "moja_tx_transfer_fulfil",
    "Fulfil flow: from the payee's PUT /transfers/{ID} (or .../error) arriving at an ingress worker to the final"
    " outcome of the callback that tells the payer",
    ["success"], buckets=LATENCY_BUCKETS,
)

TRANSFER_PREPARES = Counter(
    "rayloop_transfer_prepares",
    "POST /transfers by payer and what the hub decided: reserved, refused (liquidity, limit, payee...),"
    " invalid (3100 before the ledger), duplicate, busy (2005), unavailable (shard did not answer)",
    ["payer", "outcome"],
)
TRANSFER_RESULTS = Counter(
    "rayloop_transfer_results",
    "Transfers that reached a final state, once per side: role payer or payee, state committed, aborted"
    " (invalid fulfilment or the payee's error) or expired",
    ["participant", "role", "state"],
)

# ---------------------------------------------------------------------------------------------- ledger calls

INGRESS_BATCH_COMMANDS = Histogram(
    "rayloop_ingress_batch_commands",
    "Commands per call from an ingress worker's ShardBatcher to a shard",
    ["shard"], buckets=SIZE_BUCKETS,
)
INGRESS_SHARD_CALL_SECONDS = Histogram(
    "rayloop_ingress_shard_call_seconds",
    "One ShardBatcher call to a shard, retries and the wait for durability included",
    ["shard"], buckets=LATENCY_BUCKETS,
)
SHARD_BATCH_COMMANDS = Histogram(
    "rayloop_shard_batch_commands",
    "Commands per CommandBatch a shard actor applied (from every caller: ingress, admin, peer shards)",
    ["shard"], buckets=SIZE_BUCKETS,
)

# ---------------------------------------------------------------------------------------------- write-behind

SHARD_FLUSH_SECONDS = Histogram(
    "rayloop_shard_flush_seconds",
    "One write-behind flush: the Postgres transaction, retries included",
    ["shard"], buckets=LATENCY_BUCKETS,
)
SHARD_FLUSH_CHANGES = Histogram(
    "rayloop_shard_flush_changes",
    "Journal rows (ledger changes) written by one flush",
    ["shard"], buckets=SIZE_BUCKETS,
)
SHARD_DURABLE_LAG_SECONDS = Histogram(
    "rayloop_shard_durable_lag_seconds",
    "Per flush, how long its oldest change waited from being applied in memory to being durable",
    ["shard"], buckets=LATENCY_BUCKETS,
)

# ---------------------------------------------------------------------------------------------- caches

CACHE_LOOKUPS = Counter(
    "rayloop_cache_lookups",
    "Lookups by cache (participant_directory, endpoint_directory, transfer_prefetch) and result: hit, or miss"
    " (a reload from Postgres, or for transfer_prefetch a transfer id looked up in Postgres)",
    ["cache", "result"],
)
PARTICIPANT_DIRECTORY_HIT = CACHE_LOOKUPS.labels("participant_directory", "hit")
PARTICIPANT_DIRECTORY_MISS = CACHE_LOOKUPS.labels("participant_directory", "miss")
ENDPOINT_DIRECTORY_HIT = CACHE_LOOKUPS.labels("endpoint_directory", "hit")
ENDPOINT_DIRECTORY_MISS = CACHE_LOOKUPS.labels("endpoint_directory", "miss")
TRANSFER_PREFETCH_HIT = CACHE_LOOKUPS.labels("transfer_prefetch", "hit")
TRANSFER_PREFETCH_MISS = CACHE_LOOKUPS.labels("transfer_prefetch", "miss")

_SUCCESS = {True: "true", False: "false"}
_TX_PREPARE = {ok: TX_TRANSFER_PREPARE.labels(text) for ok, text in _SUCCESS.items()}
_TX_FULFIL = {ok: TX_TRANSFER_FULFIL.labels(text) for ok, text in _SUCCESS.items()}
_TX_TRANSFER = {ok: TX_TRANSFER.labels(text) for ok, text in _SUCCESS.items()}


# ---------------------------------------------------------------------------------------------- participant labels


class ParticipantLabels:
    """Bounds the label values that name participants.

    Participants are a bounded set, but a hub with thousands of DFSPs (or a bug) must not turn every
    per-participant metric into thousands of series per process: the first ``max_values`` names seen
    keep their own label, later ones share ``other``. The bound is per process, so on a hub past it
    two processes may have admitted different names (docs/METRICS.md).
    """

    def __init__(self, max_values: int = 500):
        self.max_values = max_values
        self._admitted: set[str] = set()
        self._children: dict[tuple, object] = {}
        self._lock = threading.Lock()  # only taken for a new label combination, never on the common path

    def name(self, participant: str | None) -> str:
        if not participant:
            return UNKNOWN_PARTICIPANT
        if participant in self._admitted:
            return participant
        with self._lock:
            if len(self._admitted) < self.max_values:
                self._admitted.add(participant)
                return participant
        return OTHER_PARTICIPANT

    def child(self, metric, participant: str | None, *labels: str):
        """``metric.labels(participant, *labels)`` with the participant bounded, cached per combination."""
        key = (id(metric), participant, labels)
        found = self._children.get(key)
        if found is None:
            found = metric.labels(self.name(participant), *labels)
            if len(self._children) < 64 * (self.max_values + 2):  # the cache is bounded like the labels
                self._children[key] = found
        return found


PARTICIPANTS = ParticipantLabels()


def configure(*, participants_max: int) -> None:
    """Set the per-process participant label bound (RAYLOOP_METRICS_PARTICIPANTS_MAX); call at process start."""
    PARTICIPANTS.max_values = participants_max


def count_prepare(payer: str | None, outcome: str) -> None:
    PARTICIPANTS.child(TRANSFER_PREPARES, payer, outcome).inc()


def count_result(payer: str, payee: str, state: str) -> None:
    PARTICIPANTS.child(TRANSFER_RESULTS, payer, "payer", state).inc()
    PARTICIPANTS.child(TRANSFER_RESULTS, payee, "payee", state).inc()


# ---------------------------------------------------------------------------------------------- flow timers
# Handed to CallbackDispatcher.send(on_outcome=...): called with the callback's final outcome.


def _observe_prepare(received_at: float, outcome) -> None:
    _TX_PREPARE[outcome == "delivered"].observe(time.perf_counter() - received_at)


def _observe_fulfil(received_at: float, prepared_ms: int, outcome) -> None:
    success = outcome == "delivered"
    _TX_FULFIL[success].observe(time.perf_counter() - received_at)
    if prepared_ms:
        # Wall clock: the prepare was recorded by the payer's shard, possibly on another node (docs/METRICS.md).
        _TX_TRANSFER[success].observe(max(0.0, time.time() - prepared_ms / 1000))


def prepare_timer(received_at: float | None) -> Callable | None:
    """The ``on_outcome`` that records the prepare flow of a request received at ``received_at`` (perf_counter)."""
    return None if received_at is None else functools.partial(_observe_prepare, received_at)


def fulfil_timer(received_at: float | None, prepared_ms: int) -> Callable | None:
    """The ``on_outcome`` that records the fulfil flow and, given when the prepare was recorded, the whole transfer."""
    return None if received_at is None else functools.partial(_observe_fulfil, received_at, prepared_ms)


# ---------------------------------------------------------------------------------------------- live gauges


class LiveGauges:
    """Gauges read when scraped (queue depths, unflushed changes): nothing is recorded on the hot path.

    A component registers a function returning ``[(label values, value), ...]`` under a key; registering
    the same key again replaces it (a component rebuilt in the same process).
    """

    def __init__(self):
        self._sources: dict[str, tuple[str, str, tuple[str, ...], Callable[[], Iterable]]] = {}
        self._lock = threading.Lock()

    def register(self, key: str, name: str, documentation: str, labelnames: Iterable[str],
                 read: Callable[[], Iterable[tuple[Iterable[str], float]]]) -> None:
        with self._lock:
            self._sources[key] = (name, documentation, tuple(labelnames), read)

    def unregister(self, key: str) -> None:
        with self._lock:
            self._sources.pop(key, None)

    def collect(self):
        with self._lock:
            sources = list(self._sources.values())
        families: dict[str, GaugeMetricFamily] = {}
        for name, documentation, labelnames, read in sources:
            family = families.get(name)
            if family is None:
                family = families[name] = GaugeMetricFamily(name, documentation, labels=labelnames)
            try:
                for labelvalues, value in read():
                    family.add_metric([str(v) for v in labelvalues], float(value))
            except Exception:  # a scrape must never fail because one component is half built
                log.exception("live gauge %s could not be read", name)
        return list(families.values())


LIVE = LiveGauges()
REGISTRY.register(LIVE)


# ---------------------------------------------------------------------------------------------- snapshots


def process_snapshot(registry=REGISTRY) -> dict:
    """This process's metrics as plain data (for a Ray call): families with their samples.

    ``{"incarnation": str, "families": [(name, type, documentation, [(sample, ((label, value), ...), value)])]}``
    """
    families = []
    for family in registry.collect():
        samples = [
            (sample.name, tuple(sorted(sample.labels.items())), float(sample.value)) for sample in family.samples
        ]
        families.append((family.name, family.type, family.documentation, samples))
    return {"incarnation": INCARNATION, "families": families}
