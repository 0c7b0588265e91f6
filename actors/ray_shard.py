"""The Ray shell around ``PositionShard``: naming, restart policy and the peer transport."""

from __future__ import annotations

import dataclasses

import ray

from actors.position_shard import PositionShard, ShardSettings
from cluster.metrics import process_snapshot

SHARD_ACTOR_PREFIX = "rayloop-shard-"


def shard_actor_name(shard_id: int) -> str:
    return f"{SHARD_ACTOR_PREFIX}{shard_id}"


class _RayPositionShard(PositionShard):
    def __init__(self, shard_id: int, settings: ShardSettings, namespace: str):
        super().__init__(shard_id, settings, call_peer=self._call_peer_actor)
        self._namespace = namespace
        self._peer_handles: dict[int, ray.actor.ActorHandle] = {}

    async def metrics_snapshot(self) -> dict:
        """This process's metrics, for the hub's aggregated scrape (cluster/metrics_hub.py)."""
        return process_snapshot()

    async def _call_peer_actor(self, shard_id: int, payload: bytes) -> bytes:
        handle = self._peer_handles.get(shard_id)
        if handle is None:
            handle = ray.get_actor(shard_actor_name(shard_id), namespace=self._namespace)
            self._peer_handles[shard_id] = handle
        try:
            return await handle.execute.remote(payload)
        except ray.exceptions.RayActorError:
            # The peer is restarting; drop the cached handle state and let the outbox retry.
            self._peer_handles.pop(shard_id, None)
            raise


# Restarted forever on failure (it rebuilds from Postgres); calls are never retried by Ray itself,
# because callers retry idempotently. num_cpus=0: shards are I/O-bound and many fit on one node;
# SPREAD puts them on different nodes when the cluster has several.
PositionShardActor = ray.remote(
    max_restarts=-1,
    max_task_retries=0,
    max_concurrency=1000,
    num_cpus=0,
    scheduling_strategy="SPREAD",
)(_RayPositionShard)


def start_shard_actor(shard_id: int, settings: ShardSettings, namespace: str, *, task_events: bool = False):
    """Create (or find, if it already runs) the named actor of one shard."""
    return PositionShardActor.options(
        name=shard_actor_name(shard_id), namespace=namespace, get_if_exists=True, enable_task_events=task_events,
    ).remote(shard_id, dataclasses.replace(settings), namespace)
