from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AccountState(_message.Message):
    __slots__ = ("account_id", "currency", "ledger_account_type", "value", "reserved_value", "net_debit_cap", "is_active", "in_flight")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    LEDGER_ACCOUNT_TYPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    RESERVED_VALUE_FIELD_NUMBER: _ClassVar[int]
    NET_DEBIT_CAP_FIELD_NUMBER: _ClassVar[int]
    IS_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    account_id: int
    currency: str
    ledger_account_type: str
    value: str
    reserved_value: str
    net_debit_cap: str
    is_active: bool
    in_flight: int
    def __init__(self, account_id: _Optional[int] = ..., currency: _Optional[str] = ..., ledger_account_type: _Optional[str] = ..., value: _Optional[str] = ..., reserved_value: _Optional[str] = ..., net_debit_cap: _Optional[str] = ..., is_active: _Optional[bool] = ..., in_flight: _Optional[int] = ...) -> None: ...

class ParticipantState(_message.Message):
    __slots__ = ("name", "is_active", "shard_id", "accounts")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IS_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    is_active: bool
    shard_id: int
    accounts: _containers.RepeatedCompositeFieldContainer[AccountState]
    def __init__(self, name: _Optional[str] = ..., is_active: _Optional[bool] = ..., shard_id: _Optional[int] = ..., accounts: _Optional[_Iterable[_Union[AccountState, _Mapping]]] = ...) -> None: ...

class ShardState(_message.Message):
    __slots__ = ("shard_id", "actor_id", "node_id", "node_ip", "pid", "participants", "in_flight", "queue_depth", "waiting_calls", "last_seq", "last_durable_seq", "last_flush_ms", "flush_p50_ms", "flush_p99_ms", "credits_pending", "flushes", "was_restarted", "checkpoint_seq")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_IP_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    WAITING_CALLS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_DURABLE_SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_FLUSH_MS_FIELD_NUMBER: _ClassVar[int]
    FLUSH_P50_MS_FIELD_NUMBER: _ClassVar[int]
    FLUSH_P99_MS_FIELD_NUMBER: _ClassVar[int]
    CREDITS_PENDING_FIELD_NUMBER: _ClassVar[int]
    FLUSHES_FIELD_NUMBER: _ClassVar[int]
    WAS_RESTARTED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_SEQ_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    actor_id: str
    node_id: str
    node_ip: str
    pid: int
    participants: int
    in_flight: int
    queue_depth: int
    waiting_calls: int
    last_seq: int
    last_durable_seq: int
    last_flush_ms: float
    flush_p50_ms: float
    flush_p99_ms: float
    credits_pending: int
    flushes: int
    was_restarted: bool
    checkpoint_seq: int
    def __init__(self, shard_id: _Optional[int] = ..., actor_id: _Optional[str] = ..., node_id: _Optional[str] = ..., node_ip: _Optional[str] = ..., pid: _Optional[int] = ..., participants: _Optional[int] = ..., in_flight: _Optional[int] = ..., queue_depth: _Optional[int] = ..., waiting_calls: _Optional[int] = ..., last_seq: _Optional[int] = ..., last_durable_seq: _Optional[int] = ..., last_flush_ms: _Optional[float] = ..., flush_p50_ms: _Optional[float] = ..., flush_p99_ms: _Optional[float] = ..., credits_pending: _Optional[int] = ..., flushes: _Optional[int] = ..., was_restarted: _Optional[bool] = ..., checkpoint_seq: _Optional[int] = ...) -> None: ...

class ParticipantRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ParticipantReply(_message.Message):
    __slots__ = ("participant", "shard")
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    participant: ParticipantState
    shard: ShardState
    def __init__(self, participant: _Optional[_Union[ParticipantState, _Mapping]] = ..., shard: _Optional[_Union[ShardState, _Mapping]] = ...) -> None: ...

class ShardRequest(_message.Message):
    __slots__ = ("shard_id",)
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    def __init__(self, shard_id: _Optional[int] = ...) -> None: ...

class ShardReply(_message.Message):
    __slots__ = ("shard", "participants")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    shard: ShardState
    participants: _containers.RepeatedCompositeFieldContainer[ParticipantState]
    def __init__(self, shard: _Optional[_Union[ShardState, _Mapping]] = ..., participants: _Optional[_Iterable[_Union[ParticipantState, _Mapping]]] = ...) -> None: ...

class ListShardsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListShardsReply(_message.Message):
    __slots__ = ("shards",)
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedCompositeFieldContainer[ShardState]
    def __init__(self, shards: _Optional[_Iterable[_Union[ShardState, _Mapping]]] = ...) -> None: ...
