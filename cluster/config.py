"""Every setting of a hub, read from RAYLOOP_* environment variables, with the embedded defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from actors.position_shard import ShardSettings


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def _env_str(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value in (None, "") else value


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
    allow_on_us: bool = False  # transfers where payer and payee are the same DFSP
    ingress_batch_max: int = 256  # commands per Ray call from an ingress to a shard
    ingress_batch_in_flight: int = 4  # Ray calls in flight per ingress and shard
    ingress_queue_max: int = 20_000  # commands waiting per ingress and shard before 2005
    callback_timeout_ms: int = 5_000
    callback_retries: int = 2
    callback_queue_max: int = 10_000  # per destination DFSP and ingress process
    actor_call_timeout_ms: int = 30_000  # one Ray call to a shard, durability wait included
    shard_ping_interval_ms: int = 1_000  # the hub's watchdog: restarted shards resume at once
    # Retries of a call whose outcome is unknown (the actor died): 12 with backoff capped at 1 s span
    # about 10 s, longer than a shard takes to restart and rebuild.
    actor_call_retries: int = 12
    shard: ShardSettings = field(default_factory=lambda: ShardSettings(dsn=""))

    @classmethod
    def from_env(cls, **overrides) -> HubConfig:
        shard_values = {
            f.name: _env_int(f"RAYLOOP_SHARD_{f.name.upper()}", f.default)
            for f in fields(ShardSettings)
            if f.name not in ("dsn", "hub_name")
        }
        shard_values["hub_name"] = _env_str("RAYLOOP_HUB_NAME", "Hub")
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
            allow_on_us=os.environ.get("RAYLOOP_ALLOW_ON_US", "").lower() in ("1", "true", "yes"),
            ingress_batch_max=_env_int("RAYLOOP_INGRESS_BATCH_MAX", 256),
            ingress_batch_in_flight=_env_int("RAYLOOP_INGRESS_BATCH_IN_FLIGHT", 4),
            ingress_queue_max=_env_int("RAYLOOP_INGRESS_QUEUE_MAX", 20_000),
            callback_timeout_ms=_env_int("RAYLOOP_CALLBACK_TIMEOUT_MS", 5_000),
            callback_retries=_env_int("RAYLOOP_CALLBACK_RETRIES", 2),
            callback_queue_max=_env_int("RAYLOOP_CALLBACK_QUEUE_MAX", 10_000),
            actor_call_timeout_ms=_env_int("RAYLOOP_ACTOR_CALL_TIMEOUT_MS", 30_000),
            shard_ping_interval_ms=_env_int("RAYLOOP_SHARD_PING_INTERVAL_MS", 1_000),
            actor_call_retries=_env_int("RAYLOOP_ACTOR_CALL_RETRIES", 12),
            shard=ShardSettings(dsn="", **shard_values),
        )
        values.update(overrides)
        return cls(**values)
