"""How the admin API and the ingress talk to the position shards: batched, idempotent retries."""

from __future__ import annotations

import asyncio
import logging
import time

import ray

from actors.position_shard import Overloaded
from cluster import metrics
from protos import ledger_pb2 as pb

log = logging.getLogger(__name__)


class ShardUnavailable(RuntimeError):
    """A shard did not answer within the retries allowed; the outcome of the last try is unknown."""


class LedgerClient:
    """Sends ``CommandBatch``es to shard actors and maps participants to shards."""

    def __init__(self, handles: dict[int, object], *, call_timeout_ms: int, retries: int):
        self.handles = handles
        self.call_timeout_ms = call_timeout_ms
        self.retries = retries

    async def execute(self, shard_id: int, commands: list[pb.Command], *, wait_durable: bool = True) -> pb.BatchResult:
        batch = pb.CommandBatch(commands=commands, wait_durable=wait_durable)
        payload = batch.SerializeToString()
        delay_s = 0.05
        for attempt in range(self.retries + 1):
            try:
                reply = await asyncio.wait_for(
                    _await_ref(self.handles[shard_id].execute.remote(payload)), self.call_timeout_ms / 1000
                )
                return pb.BatchResult.FromString(reply)
            except ray.exceptions.RayTaskError as error:
                if isinstance(error.cause, Overloaded):
                    raise error.cause from None
                raise
            except (ray.exceptions.RayActorError, TimeoutError) as error:
                # Unknown outcome: the actor died or is restarting. Every command is idempotent by
                # its transfer id (or sets an absolute value), so the same batch is sent again.
                log.warning("shard %s call failed (attempt %d): %r", shard_id, attempt + 1, error)
                if attempt == self.retries:
                    raise ShardUnavailable(f"shard {shard_id} unavailable: {error!r}") from error
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 4, 1.0)
        raise AssertionError("unreachable")

    async def describe(self, shard_id: int, participant: str | None = None) -> dict:
        return await _await_ref(self.handles[shard_id].describe.remote(participant))

    async def totals(self) -> dict[str, list[int]]:
        """Per currency over every shard: [values, open reservations, credits owed]."""
        replies = await asyncio.gather(*(_await_ref(h.totals.remote()) for h in self.handles.values()))
        combined: dict[str, list[int]] = {}
        for reply in replies:
            for currency, parts in reply.items():
                entry = combined.setdefault(currency, [0, 0, 0])
                for i, value in enumerate(parts):
                    entry[i] += value
        return combined


class LocalLedger:
    """``LedgerClient.execute`` for shards hosted in this process: the same messages, not serialized, no Ray hop."""

    def __init__(self, shards: dict):
        self.shards = shards

    async def execute(self, shard_id: int, commands: list[pb.Command], *, wait_durable: bool = True) -> pb.BatchResult:
        return await self.shards[shard_id].execute_commands(commands, wait_durable=wait_durable)


async def _await_ref(ref):
    return await ref


class ShardBatcher:
    """Collects commands for one shard from many concurrent requests into few Ray calls.

    A call goes out as soon as fewer than ``max_in_flight`` are in flight; while they are, new
    commands wait and leave together in the next call (up to ``batch_max``). Under light load a
    command leaves at once; under heavy load each Ray call carries many. At most ``queue_max``
    commands wait; beyond that ``submit`` raises ``Overloaded`` (the caller answers 2005).
    """

    def __init__(self, ledger: LedgerClient, shard_id: int, *, batch_max: int = 256, max_in_flight: int = 4,
                 queue_max: int = 20_000):
        self.ledger = ledger
        self.shard_id = shard_id
        self.batch_max = batch_max
        self.max_in_flight = max_in_flight
        self.queue_max = queue_max
        self._waiting: list[tuple[pb.Command, asyncio.Future]] = []
        self._in_flight = 0
        self.calls = 0
        self.commands = 0
        label = str(shard_id)
        self._batch_commands = metrics.INGRESS_BATCH_COMMANDS.labels(label)
        self._call_seconds = metrics.INGRESS_SHARD_CALL_SECONDS.labels(label)
        # Read when scraped; one batcher per shard and process, so a rebuilt one replaces its predecessor.
        metrics.LIVE.register(f"batcher-queue:{label}", "rayloop_ingress_batcher_queue_depth",
                              "Commands waiting in an ingress worker's ShardBatcher for a call to the shard",
                              ["shard"], lambda: [((label,), len(self._waiting))])
        metrics.LIVE.register(f"batcher-in-flight:{label}", "rayloop_ingress_batcher_in_flight",
                              "Calls in flight from an ingress worker's ShardBatcher to the shard",
                              ["shard"], lambda: [((label,), self._in_flight)])

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    async def submit(self, command: pb.Command) -> pb.CommandResult:
        if len(self._waiting) >= self.queue_max:
            raise Overloaded(f"shard {self.shard_id}: {len(self._waiting)} commands waiting")
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((command, future))
        self._pump()
        return await future

    def _pump(self) -> None:
        while self._waiting and self._in_flight < self.max_in_flight:
            batch, self._waiting = self._waiting[: self.batch_max], self._waiting[self.batch_max:]
            self._in_flight += 1
            asyncio.get_running_loop().create_task(self._send(batch))

    async def _send(self, batch: list[tuple[pb.Command, asyncio.Future]]) -> None:
        started = time.perf_counter()
        self._batch_commands.observe(len(batch))
        try:
            reply = await self.ledger.execute(self.shard_id, [command for command, _ in batch])
            self._call_seconds.observe(time.perf_counter() - started)
            self.calls += 1
            self.commands += len(batch)
            for (_, future), result in zip(batch, reply.results, strict=True):
                if not future.done():
                    future.set_result(result)
        except Exception as error:  # every waiter must learn the call failed, whatever the failure
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
        finally:
            self._in_flight -= 1
            self._pump()
