"""The ops gRPC service: live actor state for a participant or a shard.

``rayloop state`` calls it over gRPC; the admin API's ``/state/...`` routes call the same servicer
in-process and render its protobuf replies as JSON, so both always show the same thing.
"""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
from google.protobuf.json_format import MessageToDict

from cluster.ledger_client import LedgerClient
from protos import ops_pb2, ops_pb2_grpc


def _shard_message(state: dict) -> ops_pb2.ShardState:
    return ops_pb2.ShardState(**{k: v for k, v in state.items() if k in ops_pb2.ShardState.DESCRIPTOR.fields_by_name})


def _participant_message(state: dict) -> ops_pb2.ParticipantState:
    return ops_pb2.ParticipantState(
        name=state["name"], is_active=state["is_active"], shard_id=state["shard_id"],
        accounts=[
            ops_pb2.AccountState(**{k: v for k, v in a.items() if k in ops_pb2.AccountState.DESCRIPTOR.fields_by_name})
            for a in state["accounts"]
        ],
    )


class OpsService(ops_pb2_grpc.OpsServicer):
    def __init__(self, pool: asyncpg.Pool, ledger: LedgerClient):
        self.pool = pool
        self.ledger = ledger

    async def GetParticipant(self, request, context):  # noqa: N802 (gRPC method name)
        shard_id = await self.pool.fetchval("SELECT shard_id FROM participant WHERE name = $1", request.name)
        if shard_id is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"participant {request.name} not found")
        reply = await self.ledger.describe(shard_id, request.name)
        participant = reply["participants"][0] if reply["participants"] else None
        if participant is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"shard {shard_id} does not hold {request.name} yet")
        return ops_pb2.ParticipantReply(participant=_participant_message(participant),
                                        shard=_shard_message(reply["shard"]))

    async def GetShard(self, request, context):  # noqa: N802
        if request.shard_id not in self.ledger.handles:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"shard {request.shard_id} does not exist")
        reply = await self.ledger.describe(request.shard_id)
        return ops_pb2.ShardReply(shard=_shard_message(reply["shard"]),
                                  participants=[_participant_message(p) for p in reply["participants"]])

    async def ListShards(self, request, context):  # noqa: N802
        replies = await asyncio.gather(*(self.ledger.describe(s) for s in sorted(self.ledger.handles)))
        return ops_pb2.ListShardsReply(shards=[_shard_message(r["shard"]) for r in replies])

    # The admin API's JSON views of the same calls.
    async def participant_json(self, name: str) -> dict:
        return _to_dict(await self.GetParticipant(ops_pb2.ParticipantRequest(name=name), _InProcessContext()))

    async def shard_json(self, shard_id: int) -> dict:
        return _to_dict(await self.GetShard(ops_pb2.ShardRequest(shard_id=shard_id), _InProcessContext()))

    async def shards_json(self) -> dict:
        return _to_dict(await self.ListShards(ops_pb2.ListShardsRequest(), _InProcessContext()))


def _to_dict(message) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


class _InProcessContext:
    """Stands in for a gRPC context when the admin API calls the servicer directly."""

    async def abort(self, code, details):
        if code == grpc.StatusCode.NOT_FOUND:
            from api.admin import AdminError

            raise AdminError(3200, details, status=404)
        raise RuntimeError(details)


async def start_ops_server(service: OpsService, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    ops_pb2_grpc.add_OpsServicer_to_server(service, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound


def query_state(target: str, *, participant: str | None = None, shard: int | None = None,
                timeout_s: float = 10.0) -> dict:
    """Blocking client used by ``rayloop state``."""
    with grpc.insecure_channel(target) as channel:
        stub = ops_pb2_grpc.OpsStub(channel)
        if participant is not None:
            reply = stub.GetParticipant(ops_pb2.ParticipantRequest(name=participant), timeout=timeout_s)
        elif shard is not None:
            reply = stub.GetShard(ops_pb2.ShardRequest(shard_id=shard), timeout=timeout_s)
        else:
            reply = stub.ListShards(ops_pb2.ListShardsRequest(), timeout=timeout_s)
    return _to_dict(reply)
