from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Check(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHECK_NONE: _ClassVar[Check]
    CHECK_LIQUIDITY_AND_LIMIT: _ClassVar[Check]
    CHECK_FUNDS_AVAILABLE: _ClassVar[Check]
CHECK_NONE: Check
CHECK_LIQUIDITY_AND_LIMIT: Check
CHECK_FUNDS_AVAILABLE: Check

class Reserve(_message.Message):
    __slots__ = ("transfer_id", "debit_account_id", "credit_account_id", "amount_minor", "check", "expires_at_ms", "commit_now")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    DEBIT_ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    CREDIT_ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    CHECK_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    COMMIT_NOW_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    debit_account_id: int
    credit_account_id: int
    amount_minor: str
    check: Check
    expires_at_ms: int
    commit_now: bool
    def __init__(self, transfer_id: _Optional[str] = ..., debit_account_id: _Optional[int] = ..., credit_account_id: _Optional[int] = ..., amount_minor: _Optional[str] = ..., check: _Optional[_Union[Check, str]] = ..., expires_at_ms: _Optional[int] = ..., commit_now: _Optional[bool] = ...) -> None: ...

class Commit(_message.Message):
    __slots__ = ("transfer_id",)
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    def __init__(self, transfer_id: _Optional[str] = ...) -> None: ...

class Abort(_message.Message):
    __slots__ = ("transfer_id", "reason")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    reason: str
    def __init__(self, transfer_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CreditLeg(_message.Message):
    __slots__ = ("transfer_id", "credit_account_id", "amount_minor", "currency")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    CREDIT_ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    credit_account_id: int
    amount_minor: str
    currency: str
    def __init__(self, transfer_id: _Optional[str] = ..., credit_account_id: _Optional[int] = ..., amount_minor: _Optional[str] = ..., currency: _Optional[str] = ...) -> None: ...

class SetNetDebitCap(_message.Message):
    __slots__ = ("account_id", "cap_minor")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    CAP_MINOR_FIELD_NUMBER: _ClassVar[int]
    account_id: int
    cap_minor: str
    def __init__(self, account_id: _Optional[int] = ..., cap_minor: _Optional[str] = ...) -> None: ...

class SetAccountActive(_message.Message):
    __slots__ = ("account_id", "is_active")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    IS_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    account_id: int
    is_active: bool
    def __init__(self, account_id: _Optional[int] = ..., is_active: _Optional[bool] = ...) -> None: ...

class SetParticipantActive(_message.Message):
    __slots__ = ("participant", "is_active")
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    IS_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    participant: str
    is_active: bool
    def __init__(self, participant: _Optional[str] = ..., is_active: _Optional[bool] = ...) -> None: ...

class LoadAccount(_message.Message):
    __slots__ = ("account_id",)
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    account_id: int
    def __init__(self, account_id: _Optional[int] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("reserve", "commit", "abort", "credit", "set_net_debit_cap", "set_account_active", "set_participant_active", "load_account")
    RESERVE_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    SET_NET_DEBIT_CAP_FIELD_NUMBER: _ClassVar[int]
    SET_ACCOUNT_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    SET_PARTICIPANT_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    LOAD_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    reserve: Reserve
    commit: Commit
    abort: Abort
    credit: CreditLeg
    set_net_debit_cap: SetNetDebitCap
    set_account_active: SetAccountActive
    set_participant_active: SetParticipantActive
    load_account: LoadAccount
    def __init__(self, reserve: _Optional[_Union[Reserve, _Mapping]] = ..., commit: _Optional[_Union[Commit, _Mapping]] = ..., abort: _Optional[_Union[Abort, _Mapping]] = ..., credit: _Optional[_Union[CreditLeg, _Mapping]] = ..., set_net_debit_cap: _Optional[_Union[SetNetDebitCap, _Mapping]] = ..., set_account_active: _Optional[_Union[SetAccountActive, _Mapping]] = ..., set_participant_active: _Optional[_Union[SetParticipantActive, _Mapping]] = ..., load_account: _Optional[_Union[LoadAccount, _Mapping]] = ...) -> None: ...

class CommandBatch(_message.Message):
    __slots__ = ("commands", "wait_durable")
    COMMANDS_FIELD_NUMBER: _ClassVar[int]
    WAIT_DURABLE_FIELD_NUMBER: _ClassVar[int]
    commands: _containers.RepeatedCompositeFieldContainer[Command]
    wait_durable: bool
    def __init__(self, commands: _Optional[_Iterable[_Union[Command, _Mapping]]] = ..., wait_durable: _Optional[bool] = ...) -> None: ...

class CommandResult(_message.Message):
    __slots__ = ("outcome", "seq", "state")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    outcome: str
    seq: int
    state: str
    def __init__(self, outcome: _Optional[str] = ..., seq: _Optional[int] = ..., state: _Optional[str] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("results", "durable_seq", "credits_pending")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    DURABLE_SEQ_FIELD_NUMBER: _ClassVar[int]
    CREDITS_PENDING_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[CommandResult]
    durable_seq: int
    credits_pending: int
    def __init__(self, results: _Optional[_Iterable[_Union[CommandResult, _Mapping]]] = ..., durable_seq: _Optional[int] = ..., credits_pending: _Optional[int] = ...) -> None: ...
