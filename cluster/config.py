"""Every setting of a hub, read from RAYLOOP_* environment variables, with the embedded defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from actors.position_shard import ShardSettings
from cluster.settlement import SettlementSettings


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def _env_str(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value in (None, "") else value


def _env_flag(name: str) -> bool:
    """A switch: on for 1, true, yes or on (any case), off when unset or anything else."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class HubConfig:
    database_url: str | None = None  # RAYLOOP_DATABASE_URL; None starts an embedded PostgreSQL
    data_dir: Path = Path(".rayloop")  # RAYLOOP_DATA_DIR: embedded database and logs
    hub_name: str = "Hub"  # RAYLOOP_HUB_NAME: FSPIOP-Source of hub-originated messages
    shard_count: int = 2  # RAYLOOP_SHARDS: position actors; participants are spread over them
    ray_address: str | None = None  # RAYLOOP_RAY_ADDRESS: join a cluster ("auto" or host:port)
    ray_namespace: str = "rayloop"
    admin_host: str = "127.0.0.1"
    admin_port: int = 3001
    ops_grpc_host: str = "127.0.0.1"
    ops_grpc_port: int = 50051
    fspiop_host: str = "127.0.0.1"
    fspiop_port: int = 3000
    ingress_workers: int = 1  # FSPIOP ingress processes sharing the port (SO_REUSEPORT)
    # Where the position shards run (docs/ARCHITECTURE.md): "ingress", inside the ingress worker actors
    # (shard k in worker k mod ingress_workers; a worker reaches its own shards with no Ray hop: 1.4x the
    # transfers per CPU, docs/BENCHMARKS.md), or "actors", each shard a Ray actor of its own.
    shard_host: str = "ingress"
    allow_on_us: bool = False  # transfers where payer and payee are the same DFSP
    ingress_batch_max: int = 256  # commands per call from an ingress to a shard (Ray or in-process)
    # Calls in flight per ingress and shard. One: commands queue while a call is out and go as one large
    # batch, which costs the shards a third less CPU per transfer than 4 small calls (docs/BENCHMARKS.md).
    ingress_batch_in_flight: int = 1
    ingress_queue_max: int = 20_000  # commands waiting per ingress and shard before 2005
    # How long stopping a worker may take: its accepted requests, then its shards' final flush and checkpoint.
    ingress_stop_timeout_ms: int = 60_000
    callback_timeout_ms: int = 5_000
    callback_retries: int = 2
    callback_queue_max: int = 10_000  # per destination DFSP and ingress process
    # Deliver callbacks from a sender process beside each ingress worker (api/fspiop/callback_sender.py)
    # instead of on the worker's own event loop.
    callback_process: bool = False
    actor_call_timeout_ms: int = 30_000  # one Ray call to a shard, durability wait included
    shard_ping_interval_ms: int = 1_000  # the hub's watchdog: restarted shards resume at once
    # Retries of a call whose outcome is unknown (the actor died): 12 with backoff capped at 1 s span
    # about 10 s, longer than a shard takes to restart and rebuild.
    actor_call_retries: int = 12
    # Account lookup (docs/LOOKUP.md): oracle registry reload period per ingress, one external oracle call,
    # connections per external oracle, and how many FSPs one GET /parties is forwarded to at most.
    oracle_refresh_ms: int = 1_000
    oracle_timeout_ms: int = 3_000
    oracle_connections_max: int = 16
    lookup_fanout_max: int = 10
    # Transfers checked against the quotes the hub relayed (docs/AGREEMENT.md): off, known or valid.
    transfer_quote_check: str = "off"
    # Quotes and transaction requests stored per ingress: rows per INSERT, rows waiting (then 2005), INSERTs at once.
    agreement_batch_max: int = 256
    agreement_queue_max: int = 10_000
    agreement_flushes_max: int = 2
    # Metrics (docs/METRICS.md): how long the admin /metrics waits for each process, and how many
    # participants get a label of their own per process (the rest share "other").
    metrics_scrape_timeout_ms: int = 2_000
    metrics_participants_max: int = 500
    # Ray's task events (per actor call, kept by the GCS for `ray list tasks` and the dashboard) for the
    # shard and ingress actors; rayloop's own state API does not need them (docs/ARCHITECTURE.md).
    ray_task_events: bool = False
    # Niceness of the private local Ray's worker processes, the ingress workers and shards among them
    # (RAYLOOP_RAY_WORKER_NICENESS, 0 to 19). Ray's own default is 15, which left the hub's data path
    # behind Postgres and everything else at 0 whenever the cores were busy (docs/BENCHMARKS.md). A
    # cluster joined with RAYLOOP_RAY_ADDRESS keeps what its `ray start` was given (RAY_worker_niceness).
    ray_worker_niceness: int = 0
    shard: ShardSettings = field(default_factory=lambda: ShardSettings(dsn=""))
    # RAYLOOP_SETTLEMENT_TICK_MS, _SCAN_MAX, _BATCH_MAX, _CLOSE_WAIT_MS, _AGGREGATE_LATE_MS (docs/SETTLEMENT.md)
    settlement: SettlementSettings = field(default_factory=SettlementSettings)

    @classmethod
    def from_env(cls, **overrides) -> HubConfig:
        shard_values = {
            f.name: _env_int(f"RAYLOOP_SHARD_{f.name.upper()}", f.default)
            for f in fields(ShardSettings)
            if f.name not in ("dsn", "hub_name", "metrics_participants_max")
        }
        shard_values["hub_name"] = _env_str("RAYLOOP_HUB_NAME", "Hub")
        shard_values["metrics_participants_max"] = _env_int("RAYLOOP_METRICS_PARTICIPANTS_MAX", 500)
        values = dict(
            database_url=os.environ.get("RAYLOOP_DATABASE_URL") or None,
            data_dir=Path(_env_str("RAYLOOP_DATA_DIR", ".rayloop")),
            hub_name=_env_str("RAYLOOP_HUB_NAME", "Hub"),
            shard_count=_env_int("RAYLOOP_SHARDS", 2),
            ray_address=os.environ.get("RAYLOOP_RAY_ADDRESS") or None,
            ray_namespace=_env_str("RAYLOOP_RAY_NAMESPACE", "rayloop"),
            admin_host=_env_str("RAYLOOP_ADMIN_HOST", "127.0.0.1"),
            admin_port=_env_int("RAYLOOP_ADMIN_PORT", 3001),
            ops_grpc_host=_env_str("RAYLOOP_OPS_GRPC_HOST", "127.0.0.1"),
            ops_grpc_port=_env_int("RAYLOOP_OPS_GRPC_PORT", 50051),
            fspiop_host=_env_str("RAYLOOP_FSPIOP_HOST", "127.0.0.1"),
            fspiop_port=_env_int("RAYLOOP_FSPIOP_PORT", 3000),
            ingress_workers=_env_int("RAYLOOP_INGRESS_WORKERS", 1),
            shard_host=_env_str("RAYLOOP_SHARD_HOST", "ingress").lower(),
            allow_on_us=_env_flag("RAYLOOP_ALLOW_ON_US"),
            ingress_batch_max=_env_int("RAYLOOP_INGRESS_BATCH_MAX", 256),
            ingress_batch_in_flight=_env_int("RAYLOOP_INGRESS_BATCH_IN_FLIGHT", 1),
            ingress_queue_max=_env_int("RAYLOOP_INGRESS_QUEUE_MAX", 20_000),
            ingress_stop_timeout_ms=_env_int("RAYLOOP_INGRESS_STOP_TIMEOUT_MS", 60_000),
            callback_timeout_ms=_env_int("RAYLOOP_CALLBACK_TIMEOUT_MS", 5_000),
            callback_retries=_env_int("RAYLOOP_CALLBACK_RETRIES", 2),
            callback_queue_max=_env_int("RAYLOOP_CALLBACK_QUEUE_MAX", 10_000),
            callback_process=_env_flag("RAYLOOP_CALLBACK_PROCESS"),
            actor_call_timeout_ms=_env_int("RAYLOOP_ACTOR_CALL_TIMEOUT_MS", 30_000),
            shard_ping_interval_ms=_env_int("RAYLOOP_SHARD_PING_INTERVAL_MS", 1_000),
            actor_call_retries=_env_int("RAYLOOP_ACTOR_CALL_RETRIES", 12),
            oracle_refresh_ms=_env_int("RAYLOOP_ORACLE_REFRESH_MS", 1_000),
            oracle_timeout_ms=_env_int("RAYLOOP_ORACLE_TIMEOUT_MS", 3_000),
            oracle_connections_max=_env_int("RAYLOOP_ORACLE_CONNECTIONS_MAX", 16),
            lookup_fanout_max=_env_int("RAYLOOP_LOOKUP_FANOUT_MAX", 10),
            transfer_quote_check=_env_str("RAYLOOP_TRANSFER_QUOTE_CHECK", "off").lower(),
            agreement_batch_max=_env_int("RAYLOOP_AGREEMENT_BATCH_MAX", 256),
            agreement_queue_max=_env_int("RAYLOOP_AGREEMENT_QUEUE_MAX", 10_000),
            agreement_flushes_max=_env_int("RAYLOOP_AGREEMENT_FLUSHES_MAX", 2),
            metrics_scrape_timeout_ms=_env_int("RAYLOOP_METRICS_SCRAPE_TIMEOUT_MS", 2_000),
            metrics_participants_max=_env_int("RAYLOOP_METRICS_PARTICIPANTS_MAX", 500),
            ray_task_events=_env_flag("RAYLOOP_RAY_TASK_EVENTS"),
            ray_worker_niceness=_env_int("RAYLOOP_RAY_WORKER_NICENESS", 0),
            shard=ShardSettings(dsn="", **shard_values),
            settlement=SettlementSettings(**{
                f.name: _env_int(f"RAYLOOP_SETTLEMENT_{f.name.upper()}", f.default) for f in fields(SettlementSettings)
            }),
        )
        values.update(overrides)
        if values["ingress_workers"] < 1:
            raise ValueError("RAYLOOP_INGRESS_WORKERS must be at least 1")
        if not 0 <= values["ray_worker_niceness"] <= 19:
            # Below 0 would need privileges Ray's workers do not have; 19 is the lowest priority.
            raise ValueError("RAYLOOP_RAY_WORKER_NICENESS must be from 0 to 19")
        if values["shard_host"] not in ("ingress", "actors"):
            raise ValueError("RAYLOOP_SHARD_HOST must be ingress or actors")
        if values["transfer_quote_check"] not in ("off", "known", "valid"):
            raise ValueError("RAYLOOP_TRANSFER_QUOTE_CHECK must be off, known or valid")
        return cls(**values)
