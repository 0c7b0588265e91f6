"""Outbound FSPIOP callbacks: where to send them, with which headers, and how they are delivered.

- ``EndpointDirectory``: every participant's callback endpoints (``participant_endpoint``), cached
  in memory and refreshed from Postgres, with the ``{{placeholder}}`` templates expanded into URLs.
- ``forward_headers`` / ``hub_headers``: the FSPIOP headers of a forwarded message (unchanged, so a
  JWS signature still verifies) and of a message the hub itself originates.
- ``CallbackDispatcher``: fire-and-forget delivery with one bounded queue and a fixed set of worker
  tasks per destination DFSP, so a slow or dead DFSP only ever fills its own queue.

Delivery contract: at most ``retries + 1`` attempts; 2xx is *delivered*; 3xx/4xx is *rejected* and
never retried (the DFSP answered, and will answer the same again); timeouts, connection errors and
5xx are retried with capped exponential backoff and then *failed*; a full queue is *dropped*. Nothing
is durable here: a callback queued when the process dies is lost. That is acceptable because every
FSPIOP callback can be recovered by the DFSP with a GET on the resource (RULES §4), and callbacks are
idempotent PUTs, so delivering one twice (a retry after a lost response) is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from enum import StrEnum
from urllib.parse import quote

import asyncpg
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from api.http import ClientPool, HeaderList, HttpConnectionError
from cluster import metrics as hub_metrics

log = logging.getLogger(__name__)

__all__ = [
    "BASE_URL_TYPES",
    "CallbackDispatcher",
    "CallbackMetrics",
    "EndpointDirectory",
    "Outcome",
    "expand",
    "forward_headers",
    "hub_headers",
]

# --------------------------------------------------------------------------------------------------
# Endpoint templates

# Endpoint types whose value is a base URL: the caller appends the resource path itself, because the
# services behind them (quotes, transaction requests, authorizations) have several path shapes.
BASE_URL_TYPES = frozenset(
    {
        "FSPIOP_CALLBACK_URL_QUOTES",
        "FSPIOP_CALLBACK_URL_BULK_QUOTES",
        "FSPIOP_CALLBACK_URL_TRX_REQ_SERVICE",
        "FSPIOP_CALLBACK_URL_AUTHORIZATIONS",
        "FSPIOP_CALLBACK_URL_FX_QUOTES",
        "FSPIOP_CALLBACK_URL",
    }
)

_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")

# Characters left as they are in a substituted path segment: RFC 3986 ``pchar`` (unreserved,
# sub-delims, ':' and '@'). '/', '?', '#', '%', spaces and non-ASCII are encoded. '+' in particular
# stays: MSISDNs are commonly written "+2547...", DFSPs compare the segment literally, and Mojaloop
# sends it raw.
_SEGMENT_SAFE = "!$&'()*+,;=:@"


class _Template:
    """An endpoint value split once into literals and placeholder names, so expansion is a join."""

    __slots__ = ("value", "_parts")

    def __init__(self, value: str):
        self.value = value
        # re.split with one group alternates literal, name, literal, ...: odd indexes are names.
        self._parts = _PLACEHOLDER.split(value)

    def expand(self, path: str | None, params: Mapping[str, object]) -> str:
        parts = self._parts
        if len(parts) == 1:
            url = parts[0]
        else:
            out: list[str] = []
            for index, part in enumerate(parts):
                if index % 2 == 0:
                    out.append(part)
                    continue
                value = params.get(part)
                if value is None:
                    # A programming error (or a template with a placeholder the hub never fills):
                    # expanding it to "" like Mustache would send the callback to a wrong URL.
                    raise ValueError(f"endpoint {self.value!r} needs parameter {part!r}")
                out.append(quote(str(value), safe=_SEGMENT_SAFE))
            url = "".join(out)
        if path:
            url = f"{url.rstrip('/')}/{path.lstrip('/')}"
        return url


def expand(template: str, /, *, path: str | None = None, **params: object) -> str:
    """Substitute ``{{name}}`` placeholders with percent-encoded ``params``; append ``path`` if given.

    ``path`` is joined with exactly one '/' and used as given: the caller builds (and encodes) it.
    Raises ValueError when the template names a parameter that was not given.
    """
    return _Template(template).expand(path, params)


class EndpointDirectory:
    """Every participant's callback endpoints, cached from Postgres.

    One query loads all endpoints of all participants (a few hundred rows at most), every
    ``refresh_ms`` in the background, so admin changes show up without a restart. A lookup that
    misses (a DFSP onboarded since the last refresh) also triggers a reload, but at most one per
    ``reload_min_interval_ms``: misses for a DFSP that really has no endpoint must not turn into a
    query per callback. When a reload fails the previous cache stays in use: stale endpoints beat
    none.
    """

    def __init__(self, pool: asyncpg.Pool, *, refresh_ms: int = 5000, reload_min_interval_ms: int = 1000):
        self._pool = pool
        self._refresh_s = refresh_ms / 1000
        self._reload_min_interval_s = reload_min_interval_ms / 1000
        self._endpoints: dict[str, dict[str, _Template]] = {}
        self._task: asyncio.Task[None] | None = None
        self._reloading: asyncio.Task[None] | None = None  # the reload in flight, shared by all waiters
        self._last_reload_at = float("-inf")  # time.monotonic() when a reload last started
        self.reloads = 0  # completed reloads, for tests and diagnostics

    async def start(self) -> None:
        """Load the cache (errors propagate: a hub without endpoints cannot send callbacks) and
        start the periodic refresh."""
        await self.reload()
        self._task = asyncio.get_running_loop().create_task(self._refresh_forever(), name="endpoint-refresh")

    async def stop(self) -> None:
        tasks = [task for task in (self._task, self._reloading) if task is not None]
        self._task = self._reloading = None
        for task in tasks:
            task.cancel()
        # A reload's own failure is already logged, and irrelevant now.
        await asyncio.gather(*tasks, return_exceptions=True)

    async def reload(self) -> None:
        """Reload now; concurrent callers share one query."""
        # shield: one waiter being cancelled must not cancel the query the others wait on.
        await asyncio.shield(self._start_reload())

    def load(self, endpoints: Mapping[str, Mapping[str, str]]) -> None:
        """Replace the whole cache with ``{fsp: {endpoint_type: value}}`` (what a reload does)."""
        self._endpoints = {
            fsp: {endpoint_type: _Template(value) for endpoint_type, value in types.items()}
            for fsp, types in endpoints.items()
        }

    def url(self, fsp: str, endpoint_type: str, /, *, path: str | None = None, **params: object) -> str | None:
        """The expanded URL, or None when ``fsp`` has no ``endpoint_type`` endpoint (in the cache).

        A miss schedules a (rate-bounded) background reload, so the next lookup may find an endpoint
        added since the last refresh; use ``resolve`` to wait for that reload instead.
        """
        template = self._endpoints.get(fsp, {}).get(endpoint_type)
        if template is None:
            hub_metrics.ENDPOINT_DIRECTORY_MISS.inc()
            self._reload_soon()
            return None
        hub_metrics.ENDPOINT_DIRECTORY_HIT.inc()
        return template.expand(path, params)

    async def resolve(
        self, fsp: str, endpoint_type: str, /, *, path: str | None = None, since: float | None = None,
        **params: object,
    ) -> str | None:
        """Like ``url``, but on a miss waits for a reload and looks again.

        Without ``since``, at most one reload per ``reload_min_interval_ms`` (a storm of misses for a
        DFSP with no endpoints costs nothing). With ``since`` (a time.monotonic()), the cache is made to have
        been loaded after it: an endpoint registered before the caller's request is found even if a
        reload was running, or had just run, when it was registered; concurrent callers share one
        query.
        """
        template = self._endpoints.get(fsp, {}).get(endpoint_type)
        (hub_metrics.ENDPOINT_DIRECTORY_MISS if template is None else hub_metrics.ENDPOINT_DIRECTORY_HIT).inc()
        if template is None and since is None:
            if not self._may_reload():
                return None
            since = time.monotonic()
        if template is None:
            for _ in range(2):  # twice when the reload we joined had started before ``since``
                # time.monotonic(), not the loop's clock: uvloop caches that per iteration in whole ms,
                # and a reload stamped with the same ms may have queried before the endpoint existed.
                if self._last_reload_at > since:
                    break
                try:
                    await self.reload()
                except Exception:
                    return None  # logged by _reload_done; the answer is still "no endpoint known"
            template = self._endpoints.get(fsp, {}).get(endpoint_type)
            if template is None:
                return None
        return template.expand(path, params)

    def endpoints(self, fsp: str) -> dict[str, str]:
        """The raw (unexpanded) endpoints of ``fsp``, from the cache."""
        return {endpoint_type: t.value for endpoint_type, t in self._endpoints.get(fsp, {}).items()}

    # ---- internals

    async def _load(self) -> None:
        try:
            rows = await self._pool.fetch(
                "SELECT p.name, e.endpoint_type, e.value"
                " FROM participant_endpoint e JOIN participant p USING (participant_id)"
            )
        finally:
            # Cleared here, not only in the done callback (which runs a loop iteration later), so
            # that a reload asked for right after this one finishes really queries again.
            self._reloading = None
        endpoints: dict[str, dict[str, _Template]] = {}
        for row in rows:
            endpoints.setdefault(row["name"], {})[row["endpoint_type"]] = _Template(row["value"])
        self._endpoints = endpoints  # one assignment: lookups see the old or the new cache, never a mix
        self.reloads += 1

    def _reload_done(self, task: asyncio.Task[None]) -> None:
        if self._reloading is task:
            self._reloading = None  # cancelled before it ran
        if not task.cancelled() and task.exception() is not None:
            log.warning("endpoints: reload failed, keeping the previous cache: %r", task.exception())

    def _may_reload(self) -> bool:
        if self._reloading is not None:
            return True  # joining the reload in flight costs nothing
        return time.monotonic() - self._last_reload_at >= self._reload_min_interval_s

    def _reload_soon(self) -> None:
        if self._task is None or self._reloading is not None or not self._may_reload():
            return  # not started (no loop to run on), or a reload is running or ran just now
        self._start_reload()

    def _start_reload(self) -> asyncio.Task[None]:
        # A finished task whose done-callback has not run yet counts as none: never join a past load.
        if self._reloading is None or self._reloading.done():
            loop = asyncio.get_running_loop()
            self._last_reload_at = time.monotonic()
            self._reloading = loop.create_task(self._load(), name="endpoint-reload")
            self._reloading.add_done_callback(self._reload_done)
        return self._reloading

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.reload()
            except Exception:
                pass  # logged by _reload_done; try again next period


# --------------------------------------------------------------------------------------------------
# Headers

# Canonical spelling (as Mojaloop sends them) of the headers a forwarded message keeps, in order.
# Everything else is dropped: hop-by-hop headers (Host, Connection, Keep-Alive, Transfer-Encoding,
# Expect) describe the inbound connection, and Content-Length is recomputed by the client.
_FORWARDED = (
    ("content-type", "Content-Type"),
    ("accept", "Accept"),
    ("date", "Date"),
    ("x-forwarded-for", "X-Forwarded-For"),
    ("fspiop-source", "FSPIOP-Source"),
    ("fspiop-destination", "FSPIOP-Destination"),
    ("fspiop-encryption", "FSPIOP-Encryption"),
    ("fspiop-signature", "FSPIOP-Signature"),
    ("fspiop-uri", "FSPIOP-URI"),
    ("fspiop-http-method", "FSPIOP-HTTP-Method"),
    ("traceparent", "traceparent"),
    ("tracestate", "tracestate"),
)

# Only requests carry Accept; callbacks (PUT) and notifications (PATCH) must not [AD §10.4.8].
_ACCEPT_METHODS = frozenset({"GET", "POST", "DELETE"})


def forward_headers(
    incoming: Mapping[str, str], *, method: str, destination: str | None = None
) -> list[tuple[str, str]]:
    """The FSPIOP headers of ``incoming`` to send on unchanged, canonically capitalised.

    ``method`` is the method of the outgoing message: Accept is kept only for GET/POST/DELETE.
    ``destination`` fills FSPIOP-Destination when the sender left it out (e.g. ``GET /parties``,
    where the switch learns the payee FSP from the oracle); a value the sender set is never changed,
    since it may be covered by the signature.
    """
    lowered = {name.lower(): value for name, value in incoming.items()}
    keep_accept = method.upper() in _ACCEPT_METHODS
    headers: list[tuple[str, str]] = []
    for key, name in _FORWARDED:
        value = lowered.get(key)
        if key == "fspiop-destination" and not value and destination:
            value = destination
        if value is None or (key == "accept" and not keep_accept):
            continue
        headers.append((name, value))
    return headers


def imf_fixdate() -> str:
    """Now as an RFC 7231 IMF-fixdate, e.g. ``Tue, 15 Nov 1994 08:12:31 GMT``."""
    return formatdate(usegmt=True)


def hub_headers(
    *,
    resource: str,
    version: str,
    source: str,
    destination: str,
    method: str,
    uri: str,
    date: str | None = None,
) -> list[tuple[str, str]]:
    """Headers of a message the hub originates (error callbacks, PATCH notifications, GET answers).

    ``source`` is the hub's own name (RULES §2.1: switch-generated errors come from the hub),
    ``destination`` the DFSP it goes to, ``uri`` the FSPIOP-URI path (e.g. ``/transfers/{id}/error``)
    and ``version`` the ``major.minor`` of ``resource`` used in the body. No FSPIOP-Signature: the
    hub does not sign here (signing, when enabled, wraps these headers).
    """
    method = method.upper()
    media = f"application/vnd.interoperability.{resource}+json"
    headers = [("Content-Type", f"{media};version={version}")]
    if method in _ACCEPT_METHODS:
        # Accept with the major version only: "version=1" means any 1.x [AD §3.3].
        headers.append(("Accept", f"{media};version={version.split('.', 1)[0]}"))
    headers += [
        ("Date", date or imf_fixdate()),
        ("FSPIOP-Source", source),
        ("FSPIOP-Destination", destination),
        ("FSPIOP-HTTP-Method", method),
        ("FSPIOP-URI", uri),
    ]
    return headers


# --------------------------------------------------------------------------------------------------
# Delivery


def _headers_of(headers: HeaderList) -> Iterable[tuple[str, str]]:
    return headers.items() if isinstance(headers, dict) else headers


class Outcome(StrEnum):
    DELIVERED = "delivered"  # 2xx
    REJECTED = "rejected"  # 3xx/4xx: the DFSP answered no; not retried
    FAILED = "failed"  # timeouts, connection errors, 5xx, after all retries; or an unusable URL
    DROPPED = "dropped"  # never attempted (queue full, dispatcher closed) or cut off by close()


class CallbackMetrics:
    """Prometheus metrics of callback delivery, registered on ``registry``.

    Tests pass a fresh ``CollectorRegistry``: registering the same names twice on one registry fails.
    """

    # 1 ms (a DFSP on the same host) to 10 s (beyond the default timeout, with retries).
    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.registry = registry
        self.seconds = Histogram(
            "rayloop_callback_seconds",
            "Time from queueing a callback to its final outcome (waiting, attempts, backoff);"
            " callbacks refused by a full queue are only counted in rayloop_callbacks_total",
            ["kind", "outcome"],
            buckets=self.BUCKETS,
            registry=registry,
        )
        self.total = Counter(
            "rayloop_callbacks_total",
            "Callbacks by final outcome: delivered, rejected (3xx/4xx), failed, dropped",
            ["kind", "outcome"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "rayloop_callback_queue_depth",
            "Callbacks waiting in a destination DFSP's queue (not counting those in flight)",
            ["fsp"],
            registry=registry,
        )
        # Kinds whose counters exist for every outcome. A series that first appears at 1 hides that
        # increment from rate(), so a DFSP's first rejected (or dropped) callbacks would never show on the
        # dashboard's error panel; the first callback of a kind creates them all at 0. Kinds are a fixed
        # set in the code (resource and method).
        self._kinds: set[str] = set()
        # fsp -> readers of its queue depth, summed when scraped: nothing is recorded per callback, and
        # several dispatchers in one process (an ingress worker and its hosted shards) add up.
        self._depth_readers: dict[str, list[Callable[[], int]]] = {}
        # (kind, outcome) -> (counter child, histogram child): labels() takes a lock and hashes every time.
        self._outcome_children: dict[tuple[str, Outcome], tuple[Counter, Histogram]] = {}

    def watch_depth(self, fsp: str, read: Callable[[], int]) -> None:
        """``rayloop_callback_queue_depth{fsp}`` includes ``read()`` from now until ``unwatch_depth``."""
        readers = self._depth_readers.get(fsp)
        if readers is None:
            readers = self._depth_readers[fsp] = []
            # A scrape runs on another thread: it sums a copy, the loop thread may append meanwhile.
            self.queue_depth.labels(fsp).set_function(lambda: sum(reader() for reader in tuple(readers)))
        readers.append(read)

    def unwatch_depth(self, fsp: str, read: Callable[[], int]) -> None:
        readers = self._depth_readers.get(fsp, [])
        if read in readers:
            readers.remove(read)

    def finished(self, kind: str, outcome: Outcome, seconds: float) -> None:
        """A callback reached its final outcome ``seconds`` after it was queued."""
        children = self._outcome_children.get((kind, outcome))
        if children is None:
            children = self._outcome_children[(kind, outcome)] = (
                self.total.labels(kind, outcome), self.seconds.labels(kind, outcome))
        children[0].inc()
        children[1].observe(seconds)

    def refused(self, kind: str) -> None:
        """A callback dropped before it was queued (queue full, dispatcher closed): counted, not timed."""
        self.total.labels(kind, Outcome.DROPPED).inc()

    def start_kind(self, kind: str) -> None:
        """Creates ``kind``'s counter for every outcome at 0, the first time a callback of that kind comes."""
        if kind not in self._kinds:
            self._kinds.add(kind)
            for outcome in Outcome:
                self.total.labels(kind, outcome)


@dataclass(slots=True)
class _Job:
    method: str
    url: str
    headers: HeaderList
    body: bytes
    kind: str
    # perf_counter, not loop.time(): uvloop's clock has 1 ms resolution and is cached per loop
    # iteration, which would record most loopback callbacks as taking 0 s.
    queued_at: float
    done: asyncio.Future[Outcome] | None  # set by send_and_wait
    on_outcome: Callable[[Outcome], None] | None = None  # told the final outcome (transfer flow metrics)


class _Lane:
    """One destination DFSP: its queue, its workers, and its log throttle."""

    __slots__ = ("fsp", "queue", "workers", "logged_at", "suppressed")

    def __init__(self, fsp: str, maxsize: int):
        self.fsp = fsp
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize)
        self.workers: list[asyncio.Task[None]] = []
        self.logged_at = float("-inf")
        self.suppressed = 0


def _tell(on_outcome: Callable[[Outcome], None] | None, outcome: Outcome) -> None:
    if on_outcome is None:
        return
    try:
        on_outcome(outcome)
    except Exception:  # an observer's bug must not stop a lane's worker (it would stop delivery to that DFSP)
        log.exception("callbacks: on_outcome observer failed")


_LOG_INTERVAL_S = 1.0  # per DFSP: at most one failure line per second, so a dead DFSP cannot flood the log


def _check_delivery_options(queue_max_per_fsp: int, concurrency_per_fsp: int, timeout_ms: int, retries: int) -> None:
    if queue_max_per_fsp < 1 or concurrency_per_fsp < 1 or retries < 0 or timeout_ms <= 0:
        raise ValueError("queue_max_per_fsp and concurrency_per_fsp must be >= 1, retries >= 0, timeout_ms > 0")


def delivery_options(**options: int) -> dict[str, int]:
    """``CallbackDispatcher``'s delivery options with its defaults filled in, checked as it checks them
    (for a dispatcher that runs elsewhere: api/fspiop/callback_sender.py)."""
    bound = inspect.signature(CallbackDispatcher).bind(**options)
    bound.apply_defaults()
    chosen = {name: value for name, value in bound.arguments.items() if name not in ("pool", "metrics")}
    _check_delivery_options(chosen["queue_max_per_fsp"], chosen["concurrency_per_fsp"], chosen["timeout_ms"],
                            chosen["retries"])
    return chosen


async def wait_until_set(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait for ``event``; False if ``timeout_s`` passed first."""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True


_NO_LIMIT = contextlib.nullcontext()  # stateless, so one instance serves every delivery


class CallbackDispatcher:
    """Delivers callbacks without ever making the caller wait on a DFSP. See the module docstring.

    Each destination DFSP gets, on its first callback, a queue of ``queue_max_per_fsp`` and
    ``concurrency_per_fsp`` workers. A worker holds its slot through the retries and backoff of one
    callback, so a DFSP that is slow or down gets at most that many requests at once and its backlog
    waits in its own queue; the other DFSPs' workers are unaffected.

    Order is not preserved among one DFSP's workers. Nothing relies on it: each FSPIOP resource gets
    one final callback, and a DFSP that needs the latest state asks with a GET.

    ``metrics`` defaults to a ``CallbackMetrics`` on the global registry, so only one dispatcher
    per process may be created without passing its own.

    With a shared ``pool`` whose origins serve several DFSPs (one simulator, many FSP ids), the
    per-origin connection limit of the pool is shared too; give each such origin enough connections.
    """

    def __init__(
        self,
        pool: ClientPool | None = None,
        *,
        queue_max_per_fsp: int = 10_000,
        concurrency_per_fsp: int = 8,
        timeout_ms: int = 5_000,
        retries: int = 2,
        backoff_ms: int = 100,
        backoff_max_ms: int = 2_000,
        metrics: CallbackMetrics | None = None,
    ):
        _check_delivery_options(queue_max_per_fsp, concurrency_per_fsp, timeout_ms, retries)
        self._timeout_s = timeout_ms / 1000
        self._owns_pool = pool is None
        # Our own pool gets our timeout, and connections enough for every worker of a DFSP.
        self._pool = pool or ClientPool(
            request_timeout_s=self._timeout_s,
            connect_timeout_s=min(2.0, self._timeout_s),
            max_connections=max(16, concurrency_per_fsp),
        )
        self._queue_max = queue_max_per_fsp
        self._concurrency = concurrency_per_fsp
        self._retries = retries
        self._backoff_s = backoff_ms / 1000
        self._backoff_max_s = backoff_max_ms / 1000
        self.metrics = metrics or CallbackMetrics()
        self._lanes: dict[str, _Lane] = {}
        self._pending = 0  # queued or in flight, over all lanes
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    def send(
        self, fsp: str, method: str, url: str, headers: HeaderList, body: bytes, *, kind: str,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> bool:
        """Queue a callback to ``fsp``; False (counted as dropped) when its queue is full or we are closed.

        ``kind`` labels the metrics: "transfer_put", "transfer_error", "transfer_patch", ...
        ``on_outcome`` is called with the final outcome (also when dropped), on the loop thread.
        Must be called on the event loop thread.
        """
        return self._enqueue(fsp, method, url, headers, body, kind, None, on_outcome)

    async def send_and_wait(
        self, fsp: str, method: str, url: str, headers: HeaderList, body: bytes, *, kind: str
    ) -> Outcome:
        """Queue a callback like ``send`` and wait for its final outcome."""
        done: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        if not self._enqueue(fsp, method, url, headers, body, kind, done):
            return Outcome.DROPPED
        return await done

    def queue_depth(self, fsp: str) -> int:
        """Callbacks waiting (not in flight) for ``fsp``."""
        lane = self._lanes.get(fsp)
        return lane.queue.qsize() if lane is not None else 0

    @property
    def pending(self) -> int:
        """Callbacks queued or in flight, over all DFSPs."""
        return self._pending

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every queued callback reached its outcome; False if ``timeout_s`` passed first."""
        return await wait_until_set(self._idle, timeout_s)

    async def close(self) -> None:
        """Stop at once: cancel the workers, drop what is still queued or in flight, close our pool.

        For a graceful shutdown call ``drain`` first.
        """
        self._closed = True
        workers = [worker for lane in self._lanes.values() for worker in lane.workers]
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        dropped = 0
        for lane in self._lanes.values():
            while not lane.queue.empty():
                self._finish(lane, lane.queue.get_nowait(), Outcome.DROPPED)
                dropped += 1
            lane.workers.clear()
            self.metrics.unwatch_depth(lane.fsp, lane.queue.qsize)
        if dropped:
            log.warning("callbacks: closed with %d callbacks still queued; they were dropped", dropped)
        if self._owns_pool:
            await self._pool.close()

    # ---- internals

    def _enqueue(
        self,
        fsp: str,
        method: str,
        url: str,
        headers: HeaderList,
        body: bytes,
        kind: str,
        done: asyncio.Future[Outcome] | None,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> bool:
        self.metrics.start_kind(kind)
        if self._closed:
            self.metrics.refused(kind)
            _tell(on_outcome, Outcome.DROPPED)
            return False
        lane = self._lanes.get(fsp) or self._open_lane(fsp)
        method = method.upper()
        if method not in _ACCEPT_METHODS:
            # Safety net for RULES §2: whoever built the headers, a callback never carries Accept.
            headers = [(name, value) for name, value in _headers_of(headers) if name.lower() != "accept"]
        job = _Job(method, url, headers, body, kind, time.perf_counter(), done, on_outcome)
        try:
            lane.queue.put_nowait(job)
        except asyncio.QueueFull:
            self.metrics.refused(kind)
            _tell(on_outcome, Outcome.DROPPED)
            self._log_failure(
                lane, "callbacks: queue for %s full (%d); dropped %s %s", fsp, self._queue_max, method, url
            )
            return False
        self._pending += 1
        self._idle.clear()
        return True

    def _open_lane(self, fsp: str) -> _Lane:
        lane = self._lanes[fsp] = _Lane(fsp, self._queue_max)
        self.metrics.watch_depth(fsp, lane.queue.qsize)
        loop = asyncio.get_running_loop()
        lane.workers = [
            loop.create_task(self._work(lane), name=f"callbacks-{fsp}-{n}") for n in range(self._concurrency)
        ]
        return lane

    async def _work(self, lane: _Lane) -> None:
        queue = lane.queue
        while True:
            job = await queue.get()
            try:
                outcome = await self._deliver(lane, job)
            except asyncio.CancelledError:
                self._finish(lane, job, Outcome.DROPPED)  # close(): the outcome is unknown, call it dropped
                raise
            except Exception:
                # A bug, not a DFSP problem: record it and keep the lane's worker alive.
                log.exception("callbacks: delivering %s %s failed unexpectedly", job.method, job.url)
                outcome = Outcome.FAILED
            self._finish(lane, job, outcome)

    async def _deliver(self, lane: _Lane, job: _Job) -> Outcome:
        attempts = self._retries + 1
        for attempt in range(attempts):
            # Our own pool's clients bound the whole request (slot, connect, exchange) by the same timeout:
            # a second timer per callback would only cost the event loop. A pool passed in gets our limit.
            limit = _NO_LIMIT if self._owns_pool else asyncio.timeout(self._timeout_s)
            try:
                async with limit:
                    status, _, answer = await self._pool.request(job.method, job.url, job.headers, job.body)
            except (TimeoutError, HttpConnectionError, OSError) as exc:
                # TimeoutError covers HttpTimeout and our own limit; OSError a failed connect.
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            except ValueError as exc:
                # A URL the client cannot use (https://, relative) or a header with CR/LF: retrying
                # cannot help.
                self._log_failure(lane, "callbacks: %s %s %s cannot be sent: %s", job.kind, job.method, job.url, exc)
                return Outcome.FAILED
            else:
                if 200 <= status < 300:
                    return Outcome.DELIVERED
                if status < 500:
                    self._log_failure(
                        lane, "callbacks: %s %s %s rejected with %d: %r",
                        job.kind, job.method, job.url, status, answer[:200],
                    )
                    return Outcome.REJECTED
                reason = f"HTTP {status}"
            if attempt + 1 < attempts:
                await asyncio.sleep(self._backoff(attempt))
        self._log_failure(
            lane, "callbacks: %s %s %s failed after %d attempts: %s", job.kind, job.method, job.url, attempts, reason
        )
        return Outcome.FAILED

    def _backoff(self, attempt: int) -> float:
        """Exponential and capped, with jitter so a DFSP coming back is not hit by every retry at once."""
        delay = min(self._backoff_max_s, self._backoff_s * (2**attempt))
        return delay / 2 + random.random() * delay / 2

    def _finish(self, lane: _Lane, job: _Job, outcome: Outcome) -> None:
        self.metrics.finished(job.kind, outcome, time.perf_counter() - job.queued_at)
        if job.done is not None and not job.done.done():
            job.done.set_result(outcome)
        if job.on_outcome is not None:
            _tell(job.on_outcome, outcome)
        self._pending -= 1
        if self._pending == 0:
            self._idle.set()

    def _log_failure(self, lane: _Lane, message: str, *args: object) -> None:
        now = asyncio.get_running_loop().time()
        if now - lane.logged_at < _LOG_INTERVAL_S:
            lane.suppressed += 1
            return
        if lane.suppressed:
            message += " (and %d more failures for this DFSP not logged)"
            args = (*args, lane.suppressed)
        lane.logged_at = now
        lane.suppressed = 0
        log.warning(message, *args)
