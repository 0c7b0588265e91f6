"""How the admin API and the ingress talk to the position shards: batched, idempotent retries."""

from __future__ import annotations

import asyncio
import logging

import ray

from actors.position_shard import Overloaded
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
                delay_s = min(delay_s * 4, 2.0)
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


async def _await_ref(ref):
    return await ref
