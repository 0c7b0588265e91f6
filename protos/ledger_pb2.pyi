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

class PrepareTransfer(_message.Message):
    __slots__ = ("transfer_id", "payer", "payee", "currency", "amount_minor", "condition", "expires_at_ms", "prepare_hash", "payer_account_id", "payee_account_id", "version", "request_id")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    PAYER_FIELD_NUMBER: _ClassVar[int]
    PAYEE_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    PREPARE_HASH_FIELD_NUMBER: _ClassVar[int]
    PAYER_ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    PAYEE_ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    payer: str
    payee: str
    currency: str
    amount_minor: str
    condition: str
    expires_at_ms: int
    prepare_hash: str
    payer_account_id: int
    payee_account_id: int
    version: str
    request_id: str
    def __init__(self, transfer_id: _Optional[str] = ..., payer: _Optional[str] = ..., payee: _Optional[str] = ..., currency: _Optional[str] = ..., amount_minor: _Optional[str] = ..., condition: _Optional[str] = ..., expires_at_ms: _Optional[int] = ..., prepare_hash: _Optional[str] = ..., payer_account_id: _Optional[int] = ..., payee_account_id: _Optional[int] = ..., version: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class FulfilTransfer(_message.Message):
    __slots__ = ("transfer_id", "fulfilment", "fulfil_hash", "completed_ms", "reserved_mode", "source", "destination", "request_id")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    FULFILMENT_FIELD_NUMBER: _ClassVar[int]
    FULFIL_HASH_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_MS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_MODE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    fulfilment: str
    fulfil_hash: str
    completed_ms: int
    reserved_mode: bool
    source: str
    destination: str
    request_id: str
    def __init__(self, transfer_id: _Optional[str] = ..., fulfilment: _Optional[str] = ..., fulfil_hash: _Optional[str] = ..., completed_ms: _Optional[int] = ..., reserved_mode: _Optional[bool] = ..., source: _Optional[str] = ..., destination: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class RejectTransfer(_message.Message):
    __slots__ = ("transfer_id", "source", "error_code", "description")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    source: str
    error_code: int
    description: str
    def __init__(self, transfer_id: _Optional[str] = ..., source: _Optional[str] = ..., error_code: _Optional[int] = ..., description: _Optional[str] = ...) -> None: ...

class GetTransfer(_message.Message):
    __slots__ = ("transfer_id",)
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    def __init__(self, transfer_id: _Optional[str] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("reserve", "commit", "abort", "credit", "set_net_debit_cap", "set_account_active", "set_participant_active", "load_account", "prepare_transfer", "fulfil_transfer", "reject_transfer", "get_transfer")
    RESERVE_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    SET_NET_DEBIT_CAP_FIELD_NUMBER: _ClassVar[int]
    SET_ACCOUNT_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    SET_PARTICIPANT_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    LOAD_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    PREPARE_TRANSFER_FIELD_NUMBER: _ClassVar[int]
    FULFIL_TRANSFER_FIELD_NUMBER: _ClassVar[int]
    REJECT_TRANSFER_FIELD_NUMBER: _ClassVar[int]
    GET_TRANSFER_FIELD_NUMBER: _ClassVar[int]
    reserve: Reserve
    commit: Commit
    abort: Abort
    credit: CreditLeg
    set_net_debit_cap: SetNetDebitCap
    set_account_active: SetAccountActive
    set_participant_active: SetParticipantActive
    load_account: LoadAccount
    prepare_transfer: PrepareTransfer
    fulfil_transfer: FulfilTransfer
    reject_transfer: RejectTransfer
    get_transfer: GetTransfer
    def __init__(self, reserve: _Optional[_Union[Reserve, _Mapping]] = ..., commit: _Optional[_Union[Commit, _Mapping]] = ..., abort: _Optional[_Union[Abort, _Mapping]] = ..., credit: _Optional[_Union[CreditLeg, _Mapping]] = ..., set_net_debit_cap: _Optional[_Union[SetNetDebitCap, _Mapping]] = ..., set_account_active: _Optional[_Union[SetAccountActive, _Mapping]] = ..., set_participant_active: _Optional[_Union[SetParticipantActive, _Mapping]] = ..., load_account: _Optional[_Union[LoadAccount, _Mapping]] = ..., prepare_transfer: _Optional[_Union[PrepareTransfer, _Mapping]] = ..., fulfil_transfer: _Optional[_Union[FulfilTransfer, _Mapping]] = ..., reject_transfer: _Optional[_Union[RejectTransfer, _Mapping]] = ..., get_transfer: _Optional[_Union[GetTransfer, _Mapping]] = ...) -> None: ...

class CommandBatch(_message.Message):
    __slots__ = ("commands", "wait_durable")
    COMMANDS_FIELD_NUMBER: _ClassVar[int]
    WAIT_DURABLE_FIELD_NUMBER: _ClassVar[int]
    commands: _containers.RepeatedCompositeFieldContainer[Command]
    wait_durable: bool
    def __init__(self, commands: _Optional[_Iterable[_Union[Command, _Mapping]]] = ..., wait_durable: _Optional[bool] = ...) -> None: ...

class TransferView(_message.Message):
    __slots__ = ("transfer_id", "payer", "payee", "state", "fulfilment", "completed_ms", "reserved_mode", "error_code", "error_description", "currency", "amount_minor", "version", "created_ms")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    PAYER_FIELD_NUMBER: _ClassVar[int]
    PAYEE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FULFILMENT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_MS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_MODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    payer: str
    payee: str
    state: str
    fulfilment: str
    completed_ms: int
    reserved_mode: bool
    error_code: int
    error_description: str
    currency: str
    amount_minor: str
    version: str
    created_ms: int
    def __init__(self, transfer_id: _Optional[str] = ..., payer: _Optional[str] = ..., payee: _Optional[str] = ..., state: _Optional[str] = ..., fulfilment: _Optional[str] = ..., completed_ms: _Optional[int] = ..., reserved_mode: _Optional[bool] = ..., error_code: _Optional[int] = ..., error_description: _Optional[str] = ..., currency: _Optional[str] = ..., amount_minor: _Optional[str] = ..., version: _Optional[str] = ..., created_ms: _Optional[int] = ...) -> None: ...

class CommandResult(_message.Message):
    __slots__ = ("outcome", "seq", "state", "transfer", "error_code", "error_description")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    outcome: str
    seq: int
    state: str
    transfer: TransferView
    error_code: int
    error_description: str
    def __init__(self, outcome: _Optional[str] = ..., seq: _Optional[int] = ..., state: _Optional[str] = ..., transfer: _Optional[_Union[TransferView, _Mapping]] = ..., error_code: _Optional[int] = ..., error_description: _Optional[str] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("results", "durable_seq", "credits_pending")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    DURABLE_SEQ_FIELD_NUMBER: _ClassVar[int]
    CREDITS_PENDING_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[CommandResult]
    durable_seq: int
    credits_pending: int
    def __init__(self, results: _Optional[_Iterable[_Union[CommandResult, _Mapping]]] = ..., durable_seq: _Optional[int] = ..., credits_pending: _Optional[int] = ...) -> None: ...
