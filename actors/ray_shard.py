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


# The methods a hosted shard answers from other processes, named as on a shard actor. Not ``stop``: the
# worker stops the shards it hosts itself, after it stopped serving (a shard stopped by another process
# would live on in a worker that Ray has no reason to restart, applying changes it never flushes).
SHARD_METHODS = frozenset({"execute", "describe", "totals", "ping", "check_invariants", "wait_events"})


class _HostedMethod:
    __slots__ = ("_handle", "_name")

    def __init__(self, handle: HostedShardHandle, name: str):
        self._handle = handle
        self._name = name

    def remote(self, *args):
        return self._handle.resolve_host().shard_call.remote(self._handle.shard_id, self._name, *args)


class HostedShardHandle:
    """A shard hosted inside an ingress worker (``RAYLOOP_SHARD_HOST=ingress``), addressed like a shard
    actor: ``handle.execute.remote(payload)`` is ``worker.shard_call.remote(shard_id, "execute", payload)``.

    The worker is looked up by name on first use when only its name is given (workers start together and
    find each other's shards this way). Ray keeps an actor's handle valid across its restarts.
    """

    def __init__(self, shard_id: int, *, host=None, host_name: str = "", namespace: str = ""):
        self.shard_id = shard_id
        self.host = host
        self._host_name = host_name
        self._namespace = namespace

    def resolve_host(self):
        if self.host is None:
            self.host = ray.get_actor(self._host_name, namespace=self._namespace)
        return self.host

    def __getattr__(self, name: str) -> _HostedMethod:
        if name not in SHARD_METHODS:
            raise AttributeError(name)
        return _HostedMethod(self, name)


def ingress_actor_name(index: int) -> str:
    return f"rayloop-ingress-{index}"


def shard_host_index(shard_id: int, ingress_workers: int) -> int:
    """Which ingress worker hosts a shard when shards live in the ingress workers."""
    return shard_id % ingress_workers
