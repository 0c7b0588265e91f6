"""The FSPIOP ingress: route, check headers and body, answer at once, then do the work.

Each ingress worker is a process (a Ray actor, ``IngressWorker``) running its own uvloop event
loop with an ``HttpServer``; several workers share the port (``SO_REUSEPORT``), so ingress scales
with processes and nodes. A worker keeps no transfer state: the payer's shard has it.

Synchronous answers: 404/3002 unknown URI, 405/3000 method, 406/3001 version, 400/31xx for
headers and schema (RULES.md 2), 413/3104 too large, 501/2002 for what the hub does not serve,
503/2005 when a shard's queue is full; everything else is 202 (requests) or 200 (callbacks), and the
outcome arrives as a callback.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, generate_latest

from api.fspiop import routes, schema
from api.fspiop.headers import HeaderChecker
from api.http import HttpServer, Request, Response
from cluster import metrics
from core.errors import FspiopError

log = logging.getLogger(__name__)

_ERROR_TYPE = "application/vnd.interoperability.transfers+json;version=1.1"


_PER_PROCESS_NOTE = (
    b"# rayloop: the metrics of ONE ingress worker process (the port is shared, a scrape reaches any one).\n"
    b"# Scrape the admin API's GET /metrics for the whole hub, every worker and shard merged (docs/METRICS.md).\n"
)

REQUESTS = Counter(
    "rayloop_fspiop_requests_total", "FSPIOP requests answered by this ingress process",
    ["resource", "method", "status"],
)


# (resource, method, status) -> counter child: labels() takes a lock and hashes its arguments on every
# call, twice per transfer. Every part is bounded (routes.RESOURCES or "other", httptools' method names,
# the hub's own statuses), so the cache is too.
_REQUEST_COUNTERS: dict[tuple[str, str, str], object] = {}


def _count_request(resource: str, method: str, status: str) -> None:
    key = (resource, method, status)
    child = _REQUEST_COUNTERS.get(key)
    if child is None:
        child = _REQUEST_COUNTERS[key] = REQUESTS.labels(resource, method, status)
    child.inc()


def _error_response(error: FspiopError) -> Response:
    return Response(error.http_status, orjson.dumps(error.to_body()), content_type="application/json")


def _resource_of(path: str) -> str:
    # A bounded label: the first path segment if it is an FSPIOP resource, else "other".
    first = path.strip("/").split("/", 1)[0]
    return first if first in routes.RESOURCES else "other"


class FspiopIngress:
    """The HTTP handler: turns requests into work for the resource handlers."""

    def __init__(
        self, transfers, *, resources: dict | None = None, max_background_tasks: int = 50_000,
        checker: HeaderChecker | None = None,
    ):
        self.transfers = transfers
        # Handlers of the other FSPIOP resources by resource name ("parties", "quotes", ...); each has
        # ``work_for(route, request, body, version)``.
        self.resources = dict(resources or {})
        self.checker = checker or HeaderChecker()
        self.max_background_tasks = max_background_tasks
        # The work after each answer, by a number of its own: the strong reference asyncio needs, dropped by
        # the task itself when it ends (a done callback would cost a turn of the loop per request).
        self._tasks: dict[int, asyncio.Task] = {}
        self._task_numbers = itertools.count()
        self.requests = 0

    def handle(self, request: Request) -> Response:
        """Synchronous (the server answers from its parser, api/http.py): the work goes on in a task."""
        received = time.perf_counter()  # the start of a transfer's prepare or fulfil flow (docs/METRICS.md)
        self.requests += 1
        if request.method == "GET" and request.path == "/health":
            return Response(200, b'{"status":"OK"}', content_type="application/json")
        if request.method == "GET" and request.path == "/metrics":
            # One worker's registry only: several workers share this port, so a scrape reaches a random one.
            return Response(200, _PER_PROCESS_NOTE + generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
        try:
            route = routes.resolve(request.method, request.path)
            negotiated = self.checker.check(route, request.headers)
            if b"\\u0000" in request.body:
                # Postgres text cannot hold NUL; refusing it here keeps a DFSP from crashing a shard's flush.
                raise FspiopError(3101, "NUL character in the body")
            body = schema.validate(route, request.body) if schema.has_body(route) else None
            work = self._work_for(route, request, body, negotiated, received)
        except FspiopError as error:
            _count_request(_resource_of(request.path), request.method, str(error.http_status))
            return _error_response(error)
        if len(self._tasks) >= self.max_background_tasks:
            _count_request(route.resource, request.method, "503")
            return _error_response(FspiopError(2005, "too many requests in progress"))
        number = next(self._task_numbers)
        self._tasks[number] = asyncio.get_running_loop().create_task(self._run(work, number, request))
        status = 202 if request.method in ("POST", "GET", "DELETE") else 200
        _count_request(route.resource, request.method, str(status))
        return Response(status)

    def _work_for(self, route, request: Request, body, negotiated, received: float | None = None):
        version = f"{negotiated.response[0]}.{negotiated.response[1]}"
        headers = request.headers
        if route.resource != "transfers":
            handler = self.resources.get(route.resource)
            if handler is None:
                raise FspiopError(2002, f"{route.resource} is not served by this hub yet")
            # A resource handler checks what it must synchronously (raising FspiopError) and returns
            # the coroutine that does the rest after the 202/200 answer.
            return handler.work_for(route, request, body, version)
        template = route.template
        if template == "/transfers" and route.method == "POST":
            return self.transfers.prepare(headers, request.body, body, version, received_at=received)
        transfer_id = route.params.get("ID", "")
        if template == "/transfers/{ID}" and route.method == "PUT":
            self.transfers.check_fulfil(body, version)
            return self.transfers.fulfil(headers, request.body, body, transfer_id, version, received_at=received)
        if template == "/transfers/{ID}/error" and route.method == "PUT":
            return self.transfers.reject(headers, request.body, body, transfer_id, version, received_at=received)
        if template == "/transfers/{ID}" and route.method == "GET":
            return self.transfers.get(headers, transfer_id, version)
        # PATCH /transfers/{ID} goes from the hub to payees, never the other way (RULES.md 4).
        raise FspiopError(2002, f"{route.method} {template} is sent by the hub, not received")

    async def _run(self, work, number: int, request: Request) -> None:
        try:
            await work
        except Exception:  # a failed request must never take the worker down; it is logged with its trace
            log.exception("FSPIOP %s %s failed after it was accepted", request.method, request.path)
        finally:
            self._tasks.pop(number, None)

    async def drain(self, timeout_s: float = 10.0) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=timeout_s)


class IngressWorker:
    """One ingress process: its own uvloop thread with the HTTP server, the batchers and the callbacks.

    Ray hosts it as an actor (``cluster/hub.py``); the event loop runs in a thread of its own so it
    is uvloop whatever loop Ray uses for actor calls.
    """

    def __init__(self, settings: dict):
        self.settings = settings
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._quiesce: asyncio.Event | None = None  # stop serving HTTP (hosted shards still answer)
        self._drained = threading.Event()  # set once the server is closed and accepted requests are done
        self._error: BaseException | None = None
        self.port = 0
        self._stats: dict = {}
        self._hosted: dict = {}  # shard id -> PositionShard, when shards live in the ingress workers
        self._peer_handles: dict = {}
        if settings.get("start_now", True):
            # Started here, not only by start(): a worker Ray restarts after a crash serves again at once.
            try:
                self.start()
            except RuntimeError:
                if _restarted_by_ray():
                    # Ray does not restart an actor whose constructor raised: crash instead, so it tries
                    # again (Postgres, say, may be back by then). A first start reports to the hub.
                    log.critical("restarted ingress worker could not start; exiting for Ray to retry",
                                 exc_info=True)
                    time.sleep(1.0)
                    _exit_process()
                raise

    def start(self) -> int:
        if self._thread is not None:
            return self.port
        self._thread = threading.Thread(target=self._run_thread, name="fspiop-ingress", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=120):
            raise RuntimeError("ingress worker did not start")
        if self._error is not None:
            raise RuntimeError(f"ingress worker failed to start: {self._error!r}")
        return self.port

    # The actor is an asyncio actor (shard_call is a coroutine): methods that wait do it in a thread, so
    # calls to the shards hosted here go on meanwhile; the rest return at once.

    async def stop_serving(self) -> None:
        """Stop taking requests and finish those accepted (within ``RAYLOOP_INGRESS_STOP_TIMEOUT_MS``); shards
        hosted here keep answering other processes until ``stop``. The hub calls it on every worker first."""
        if self._call_in_loop(lambda: self._quiesce.set()):
            await asyncio.to_thread(self._drained.wait, self.settings.get("stop_timeout_ms", 60_000) / 1000)

    async def stop(self) -> None:
        self._call_in_loop(lambda: (self._quiesce.set(), self._stopped.set()))
        if self._thread is not None:
            # Bounds the worker's teardown, its shards' final checkpoint included (what they acknowledged
            # is durable already; a checkpoint cut short only means a longer replay at the next start).
            await asyncio.to_thread(self._thread.join, self.settings.get("stop_timeout_ms", 60_000) / 1000)

    def _call_in_loop(self, callback) -> bool:
        """Run ``callback`` on the worker's event loop; False when the loop has already ended."""
        if self._loop is None or self._stopped is None:
            return False
        try:
            self._loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop is closed: with no hosted shards, the worker ends once drained
            return False
        return True

    def stats(self) -> dict:
        return dict(self._stats)

    def metrics_snapshot(self) -> dict:
        """This process's metrics, for the hub's aggregated scrape (cluster/metrics_hub.py)."""
        return metrics.process_snapshot()

    async def shard_call(self, shard_id: int, method: str, *args):
        """A call from another process (the hub, another worker, a peer shard) to a shard hosted here; it
        runs on this worker's event loop, like the requests that reach the shard in-process. Awaited, not
        waited for in a thread: like a shard actor's call, one the caller gave up on holds nothing."""
        from actors.ray_shard import SHARD_METHODS

        if method not in SHARD_METHODS:
            raise LookupError(f"{method!r} is not a shard method callable from other processes")
        shard = self._hosted.get(shard_id)
        if shard is None:
            raise LookupError(f"shard {shard_id} is not hosted by this ingress worker")
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(getattr(shard, method)(*args), self._loop))

    async def _call_peer(self, shard_id: int, payload: bytes) -> bytes:
        """How a hosted shard delivers credit legs to a shard in another process (those hosted here are
        reached in-process: ``local_peer``)."""
        return await self._peer_handles[shard_id].execute.remote(payload)

    def _hosted_shard(self, shard_id: int):
        return self._hosted.get(shard_id)

    def _run_thread(self) -> None:
        import uvloop

        try:
            uvloop.run(self._main())
        except BaseException as error:  # reported to start() through _error, never lost
            self._error = error
            if self._ready.is_set() and not (self._quiesce is not None and self._quiesce.is_set()):
                # The loop ended on its own after serving: a live actor with no server and no shards would
                # answer nothing. Crash, so Ray restarts it and it rebuilds.
                log.critical("ingress worker loop ended unexpectedly", exc_info=True)
                _exit_process()
            self._ready.set()

    async def _main(self) -> None:
        import asyncpg
        import ray

        from actors.position_shard import PositionShard
        from actors.ray_shard import HostedShardHandle, ingress_actor_name, shard_actor_name, shard_host_index
        from api.fspiop.agreement import AgreementHandler, RequestStore
        from api.fspiop.directory import ParticipantDirectory
        from api.fspiop.lookup import LookupCallbacks, ParticipantsHandler, PartiesHandler
        from api.fspiop.oracle import OracleRegistry
        from api.fspiop.transfers import TransferNotifier, TransfersHandler
        from cluster.ledger_client import LedgerClient, LocalLedger, ShardBatcher

        s = self.settings
        metrics.configure(participants_max=s.get("metrics_participants_max", 500))
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._quiesce = asyncio.Event()
        pool = await asyncpg.create_pool(s["dsn"], min_size=1, max_size=s.get("pool_size", 4), command_timeout=60)
        directory = ParticipantDirectory(pool, refresh_ms=s.get("directory_refresh_ms", 2_000))
        await directory.start()
        notifier = await TransferNotifier.create(
            pool, hub_name=s["hub_name"], timeout_ms=s.get("callback_timeout_ms", 5_000),
            retries=s.get("callback_retries", 2), queue_max_per_fsp=s.get("callback_queue_max", 10_000),
            sender_process=s.get("callback_process", False),
        )
        shard_count = s["shard_count"]
        if s.get("shard_host", "actors") == "ingress":
            # Shards hosted in the ingress workers: this worker's own shards are called in-process (no
            # Ray hop, no second process); the others through the worker that hosts them.
            workers = s["ingress_workers"]
            handles = {
                shard_id: HostedShardHandle(shard_id, host_name=ingress_actor_name(shard_host_index(shard_id, workers)),
                                            namespace=s["namespace"])
                for shard_id in range(shard_count) if shard_host_index(shard_id, workers) != s["worker_index"]
            }
            self._hosted = {
                shard_id: PositionShard(shard_id, s["shard_settings"], call_peer=self._call_peer,
                                        local_peer=self._hosted_shard)
                for shard_id in range(shard_count) if shard_host_index(shard_id, workers) == s["worker_index"]
            }
        else:
            handles = {
                shard_id: ray.get_actor(shard_actor_name(shard_id), namespace=s["namespace"])
                for shard_id in range(shard_count)
            }
        self._peer_handles = handles
        ledger = LedgerClient(handles, call_timeout_ms=s.get("actor_call_timeout_ms", 30_000),
                              retries=s.get("actor_call_retries", 12))
        local = LocalLedger(self._hosted)
        batchers = {
            shard_id: ShardBatcher(local if shard_id in self._hosted else ledger, shard_id,
                                   batch_max=s.get("batch_max", 256), max_in_flight=s.get("batch_in_flight", 1),
                                   queue_max=s.get("queue_max", 20_000))
            for shard_id in range(shard_count)
        }
        transfers = TransfersHandler(directory=directory, batchers=batchers, notifier=notifier, pool=pool,
                                     hub_name=s["hub_name"], allow_on_us=s.get("allow_on_us", False),
                                     quote_check=_quote_check(pool, s.get("transfer_quote_check", "off")))
        resources: dict = {}
        # Account lookup (docs/LOOKUP.md): the oracle registry cached here, callbacks through the shared delivery.
        oracles = OracleRegistry(pool, refresh_ms=s.get("oracle_refresh_ms", 1_000),
                                 timeout_ms=s.get("oracle_timeout_ms", 3_000),
                                 connections_max=s.get("oracle_connections_max", 16))
        await oracles.start()
        lookup_parts = dict(directory=directory, registry=oracles,
                            callbacks=LookupCallbacks(notifier.endpoints, notifier.dispatcher, hub_name=s["hub_name"]))
        resources["parties"] = PartiesHandler(fanout_max=s.get("lookup_fanout_max", 10), **lookup_parts)
        resources["participants"] = ParticipantsHandler(**lookup_parts)
        # Quotes, transaction requests, authorizations, transactions (docs/AGREEMENT.md): relayed and stored here.
        agreement_store = RequestStore(pool, batch_max=s.get("agreement_batch_max", 256),
                                       queue_max=s.get("agreement_queue_max", 10_000),
                                       flushes_max=s.get("agreement_flushes_max", 2))
        agreement = AgreementHandler(directory=directory, endpoints=notifier.endpoints, dispatcher=notifier.dispatcher,
                                     pool=pool, hub_name=s["hub_name"], store=agreement_store)
        for resource in ("quotes", "transactionRequests", "authorizations", "transactions"):
            resources[resource] = agreement
        ingress = FspiopIngress(transfers, resources=resources)
        server = HttpServer(ingress.handle, s.get("host", "127.0.0.1"), s["port"], reuse_port=True,
                            too_large_response=lambda status: _error_response(FspiopError(3104)))
        self.port = await server.start()
        self._ready.set()
        started = time.monotonic()
        try:
            while not self._quiesce.is_set():
                try:
                    await asyncio.wait_for(self._quiesce.wait(), 1.0)
                except TimeoutError:
                    pass
                self._stats = {
                    "requests": ingress.requests, "uptime_s": round(time.monotonic() - started, 1),
                    "ledger_calls": sum(b.calls for b in batchers.values()),
                    "ledger_commands": sum(b.commands for b in batchers.values()),
                    "callbacks_pending": notifier.dispatcher.pending,
                }
        finally:
            await server.stop()
            await ingress.drain()
            self._drained.set()
            if self._hosted and self._quiesce.is_set():
                # Other workers may still be sending their last commands to the shards hosted here: those
                # flush and checkpoint what they hold once the hub says stop (after every worker drained).
                await self._stopped.wait()
            # Each flushes and checkpoints on its own: one that fails must not keep the others from it.
            results = await asyncio.gather(*(shard.stop() for shard in self._hosted.values()), return_exceptions=True)
            for shard_id, result in zip(self._hosted, results, strict=True):
                if isinstance(result, BaseException):
                    log.error("hosted shard %s did not stop cleanly: %r", shard_id, result)
            await notifier.dispatcher.drain(5.0)
            await notifier.close()
            await oracles.stop()
            await directory.stop()
            await pool.close()


def _restarted_by_ray() -> bool:
    from actors.position_shard import _ray_runtime

    return _ray_runtime()["was_restarted"]


def _exit_process() -> None:
    from actors.position_shard import _exit_process as exit_process

    exit_process("ingress worker cannot serve")


def _quote_check(pool, mode: str):
    """None when the check is off: a prepare then pays for no extra await at all (the hot path)."""
    from api.fspiop.agreement import QuoteCheckMode, QuoteLinkCheck

    check = QuoteLinkCheck(pool, mode)
    return None if check.mode is QuoteCheckMode.OFF else check
