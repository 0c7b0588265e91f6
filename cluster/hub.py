"""One hub process: Postgres (given or embedded), migrations, Ray, the shard actors, admin API, ops gRPC.

``rayloop up`` runs a ``Hub`` until it is told to stop. Tests start one in-process the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket

import asyncpg
import ray

from actors.ray_shard import HostedShardHandle, ingress_actor_name, shard_host_index, start_shard_actor
from api.admin import AdminApi
from api.fspiop.ingress import IngressWorker
from api.http import HttpServer
from api.ops_grpc import OpsService, start_ops_server
from api.settlement import SettlementApi
from cluster.config import HubConfig
from cluster.db import create_pool, migrate
from cluster.ledger_client import LedgerClient
from cluster.local_ray import init_local_ray
from cluster.metrics_hub import HubMetrics, ray_sources
from cluster.postgres import EmbeddedPostgres
from cluster.settlement import SettlementService

log = logging.getLogger(__name__)


class Hub:
    def __init__(self, config: HubConfig):
        self.config = config
        self.database_url: str | None = None
        self.embedded: EmbeddedPostgres | None = None
        self.pool: asyncpg.Pool | None = None
        self.ledger: LedgerClient | None = None
        self.admin_server: HttpServer | None = None
        self.ops_server = None
        self.ops_port = 0
        self._started_ray = False
        self.handles: dict[int, object] = {}
        self.ingress: list = []
        self._watchdog: asyncio.Task | None = None
        self.settlement: SettlementService | None = None  # windows, settlements, post-commit moves
        self.fspiop_port = 0

    @property
    def admin_port(self) -> int:
        return self.admin_server.port

    async def start(self) -> None:
        config = self.config
        if config.database_url:
            self.database_url = config.database_url
        else:
            self.embedded = EmbeddedPostgres(config.data_dir.resolve() / "pgdata")
            # initdb and the server start block; keep the event loop free while they run.
            self.database_url = await asyncio.to_thread(self.embedded.start)
            log.info("embedded PostgreSQL at %s", self.database_url)
        await migrate(self.database_url)
        self.pool = await create_pool(self.database_url, max_size=8)
        await self._bootstrap()

        self._init_ray()
        settings = dataclasses.replace(config.shard, dsn=self.database_url, hub_name=config.hub_name,
                                       metrics_participants_max=config.metrics_participants_max)
        if config.shard_host == "ingress":
            await self._start_ingress(settings)
            workers = config.ingress_workers
            self.handles = {
                shard_id: HostedShardHandle(shard_id, host=self.ingress[shard_host_index(shard_id, workers)])
                for shard_id in range(config.shard_count)
            }
            await asyncio.gather(*(_await(h.ping.remote()) for h in self.handles.values()))
        else:
            self.handles = {
                shard_id: start_shard_actor(shard_id, settings, config.ray_namespace,
                                            task_events=config.ray_task_events)
                for shard_id in range(config.shard_count)
            }
            # Wait until every shard has rebuilt its book and checked its invariants.
            await asyncio.gather(*(_await(h.ping.remote()) for h in self.handles.values()))
            await self._start_ingress(settings)
        self.ledger = LedgerClient(
            self.handles, call_timeout_ms=config.actor_call_timeout_ms, retries=config.actor_call_retries
        )
        self._watchdog = asyncio.get_running_loop().create_task(self._watch_shards(), name="shard-watchdog")
        ops = OpsService(self.pool, self.ledger)
        self.ops_server, self.ops_port = await start_ops_server(ops, config.ops_grpc_host, config.ops_grpc_port)
        admin = AdminApi(self.pool, self.ledger, hub_name=config.hub_name, shard_count=config.shard_count, ops=ops)
        # GET /metrics on the admin port: every ingress worker's and shard's metrics, merged (docs/METRICS.md).
        # Hosted shards' metrics are their ingress worker's: one snapshot per process.
        shard_sources = {} if config.shard_host == "ingress" else self.handles
        admin.hub_metrics = HubMetrics(ray_sources(self.ingress, shard_sources),
                                       timeout_ms=config.metrics_scrape_timeout_ms)
        self.settlement = SettlementService(self.pool, self.ledger, hub_name=config.hub_name,
                                            settings=config.settlement)
        self.settlement.start()
        admin.settlement = SettlementApi(self.pool, self.settlement)
        self.admin_server = HttpServer(admin.handle, config.admin_host, config.admin_port)
        await self.admin_server.start()
        log.info(
            "rayloop hub up: FSPIOP http://%s:%d (%d ingress workers), admin http://%s:%d, ops gRPC %s:%d, %d shards",
            config.fspiop_host, self.fspiop_port, config.ingress_workers, config.admin_host, self.admin_server.port,
            config.ops_grpc_host, self.ops_port, config.shard_count,
        )

    async def _watch_shards(self) -> None:
        """Ping every shard each second. A shard Ray restarted rebuilds itself on its first call, and
        its expiry timers only run once it has: the ping makes sure that happens without traffic."""
        while True:
            await asyncio.sleep(self.config.shard_ping_interval_ms / 1000)
            for shard_id, handle in list(self.handles.items()):
                try:
                    await asyncio.wait_for(_await(handle.ping.remote()), self.config.actor_call_timeout_ms / 1000)
                except (ray.exceptions.RayActorError, TimeoutError) as error:
                    log.warning("shard %s not answering: %r", shard_id, error)

    async def _start_ingress(self, settings) -> None:
        """FSPIOP ingress workers: Ray actors, each a process with its own uvloop HTTP server."""
        config = self.config
        port = config.fspiop_port or _free_port(config.fspiop_host)
        worker_settings = {
            "dsn": self.database_url, "hub_name": config.hub_name, "namespace": config.ray_namespace,
            "shard_count": config.shard_count, "host": config.fspiop_host, "port": port,
            "allow_on_us": config.allow_on_us, "batch_max": config.ingress_batch_max,
            "batch_in_flight": config.ingress_batch_in_flight, "queue_max": config.ingress_queue_max,
            "callback_timeout_ms": config.callback_timeout_ms, "callback_retries": config.callback_retries,
            "callback_queue_max": config.callback_queue_max, "callback_process": config.callback_process,
            "actor_call_timeout_ms": config.actor_call_timeout_ms,
            "actor_call_retries": config.actor_call_retries, "stop_timeout_ms": config.ingress_stop_timeout_ms,
            "oracle_refresh_ms": config.oracle_refresh_ms, "oracle_timeout_ms": config.oracle_timeout_ms,
            "oracle_connections_max": config.oracle_connections_max, "lookup_fanout_max": config.lookup_fanout_max,
            "transfer_quote_check": config.transfer_quote_check, "agreement_batch_max": config.agreement_batch_max,
            "agreement_queue_max": config.agreement_queue_max, "agreement_flushes_max": config.agreement_flushes_max,
        }
        worker_settings["metrics_participants_max"] = config.metrics_participants_max
        worker_settings.update(shard_host=config.shard_host, ingress_workers=config.ingress_workers,
                               shard_settings=settings)
        self.ingress = [
            IngressActor.options(name=ingress_actor_name(i), namespace=config.ray_namespace,
                                 enable_task_events=config.ray_task_events,
                                 ).remote(dict(worker_settings, worker_index=i))
            for i in range(config.ingress_workers)
        ]
        ports = await asyncio.gather(*(_await(w.start.remote()) for w in self.ingress))
        self.fspiop_port = ports[0]

    def _init_ray(self) -> None:
        if ray.is_initialized():
            return
        config = self.config
        if config.ray_address:
            ray.init(address=config.ray_address, namespace=config.ray_namespace, log_to_driver=True)
        else:
            # A private local Ray: loopback only, no dashboard.
            init_local_ray(namespace=config.ray_namespace, include_dashboard=False, configure_logging=False,
                           log_to_driver=True, worker_niceness=config.ray_worker_niceness)
        self._started_ray = True

    async def _bootstrap(self) -> None:
        """Shard rows and the hub's own participant (on shard 0); refuse a shard count that shrank."""
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.executemany(
                "INSERT INTO shard (shard_id) VALUES ($1) ON CONFLICT DO NOTHING",
                [(i,) for i in range(self.config.shard_count)],
            )
            highest = await connection.fetchval("SELECT max(shard_id) FROM participant")
            if highest is not None and highest >= self.config.shard_count:
                raise RuntimeError(
                    f"participants are assigned to shard {highest}; start with RAYLOOP_SHARDS > {highest}"
                )
            await connection.execute(
                "INSERT INTO participant (name, is_hub, shard_id) VALUES ($1, true, 0) ON CONFLICT (name) DO NOTHING",
                self.config.hub_name,
            )

    async def stop(self) -> None:
        if self.settlement is not None:
            await self.settlement.stop()
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        if self.admin_server is not None:
            await self.admin_server.stop()
        if self.ops_server is not None:
            await self.ops_server.stop(grace=1)
        # Every worker stops taking requests and finishes those accepted before any stops: with shards
        # hosted in the workers, one worker's last requests may still need another's shards.
        drained = await asyncio.gather(*(_await(w.stop_serving.remote()) for w in self.ingress),
                                       return_exceptions=True)
        for result in drained:
            if isinstance(result, BaseException):
                log.warning("ingress stop_serving: %r", result)
        for worker in self.ingress:
            try:
                await _await(worker.stop.remote())
            except ray.exceptions.RayActorError as error:
                log.warning("ingress stop: %r", error)
            ray.kill(worker, no_restart=True)
        self.ingress = []
        if self.config.shard_host == "ingress":
            self.handles = {}  # each worker stopped (flushed) the shards it hosted
        if self.handles:
            # Let each shard flush what it holds before its process goes.
            results = await asyncio.gather(
                *(_await(h.stop.remote()) for h in self.handles.values()), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException):
                    log.warning("shard stop: %r", result)
            for handle in self.handles.values():
                ray.kill(handle, no_restart=True)
            self.handles = {}
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
        if self.pool is not None:
            await self.pool.close()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)


async def _await(ref):
    return await ref


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


# Ingress workers are restarted by Ray if their process dies (the shards they host rebuild from Postgres
# in the new process); num_cpus=0 lets several share a node with the shards.
# An asyncio actor (shard_call is a coroutine): max_concurrency bounds the calls to the shards a worker
# hosts that may wait at once (durability, a rebuild), as on a shard actor.
IngressActor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=1000)(IngressWorker)
