"""The FSPIOP transfer state machine of the payer's shard (pure, synchronous, no I/O).

``TransferDesk`` sits on a ``PositionBook``: a prepare reserves on the payer's POSITION account,
a valid fulfil commits (the payee's credit leg follows), a payee error, an invalid fulfil or the
expiration aborts. It also answers duplicates (RULES.md section 5) and remembers recent finished
transfers, bounded. Every state change it reports has a journal sequence number, so the actor can
hold the callback until the change is durable.

Outcomes, checked in this order for a fulfil: unknown transfer (3208), sender not the payee (3100,
nothing changes), duplicate of a finished fulfil (same hash: resend; other hash: 3106), not
RESERVED any more, expired (3303, aborted), destination not the payer (3100, aborted), fulfilment
not matching the condition (3100, aborted), committed.
"""

from __future__ import annotations

import base64
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum

from core.ledger import Check, Credit, JournalKind, Outcome, PositionBook, Result, TransferState, invariant

INVALID_FULFILMENT = "invalid fulfilment"


class Verdict(StrEnum):
    RESERVED = "RESERVED"  # prepare accepted and reserved: forward it to the payee
    COMMITTED = "COMMITTED"
    ABORTED = "ABORTED"  # aborted now (payee error, invalid fulfil, expiry)
    REFUSED = "REFUSED"  # prepare refused (liquidity, limit, inactive): error to the payer
    RESEND = "RESEND"  # duplicate with the same hash of a finished transfer: send its state again
    IGNORE = "IGNORE"  # duplicate with the same hash while still in progress
    MODIFIED = "MODIFIED"  # same id, different content: 3106
    UNKNOWN = "UNKNOWN"  # 3208
    WRONG_SENDER = "WRONG_SENDER"  # the sender has no say on this transfer: 3100 to it, nothing changes


@dataclass(slots=True)
class TransferRecord:
    transfer_id: str
    payer: str
    payee: str
    currency: str
    amount_minor: int
    condition: str
    expires_at_ms: int
    prepare_hash: str
    payer_account_id: int
    payee_account_id: int
    created_ms: int
    state: TransferState = TransferState.RESERVED
    fulfilment: str | None = None
    fulfil_hash: str | None = None
    completed_ms: int | None = None
    reserved_mode: bool = False  # the payee answered RESERVED and expects a PATCH (v1.1)
    error_code: int | None = None
    error_description: str | None = None
    version: str = "1.1"  # the transfers resource version the payer used; callbacks use it
    # Ids of the ingress requests that made the prepare and the fulfil decisions (memory only): a
    # retry of the same request after a lost reply gets the original decision again, not "duplicate".
    prepare_request_id: str = ""
    fulfil_request_id: str = ""
    refused: bool = False  # the prepare itself was refused (never reserved)


@dataclass(slots=True)
class Decision:
    verdict: Verdict
    record: TransferRecord | None = None
    seq: int = 0  # the change to wait for before telling anyone; 0 when nothing changed
    error_code: int | None = None
    error_description: str | None = None
    credit: Credit | None = None  # the payee's credit leg, owed to another shard (commit only)


_REFUSALS = {
    Outcome.INSUFFICIENT_LIQUIDITY: (4001, "Payer FSP insufficient liquidity"),
    Outcome.LIMIT_EXCEEDED: (4200, "Payer limit error"),
    Outcome.PARTICIPANT_INACTIVE: (3100, "Generic validation error - payer FSP is not active"),
    Outcome.ACCOUNT_INACTIVE: (3100, "Generic validation error - payer's account for the currency is not active"),
    Outcome.UNKNOWN_ACCOUNT: (3100, "Generic validation error - payer has no account for the currency"),
    Outcome.INVALID_AMOUNT: (3100, "Generic validation error - invalid amount"),
}


def condition_of(fulfilment: str) -> str | None:
    """base64url(SHA-256(preimage)) without padding, or None if the fulfilment is not 32 bytes."""
    try:
        preimage = base64.urlsafe_b64decode(fulfilment + "=" * (-len(fulfilment) % 4))
    except (ValueError, TypeError):
        return None
    if len(preimage) != 32:
        return None
    return base64.urlsafe_b64encode(hashlib.sha256(preimage).digest()).rstrip(b"=").decode()


class TransferDesk:
    """Transfers whose payer belongs to this shard."""

    def __init__(self, book: PositionBook, *, window: int = 200_000):
        invariant(window > 0, "window must be positive")
        self.book = book
        self.window = window
        self.open: dict[str, TransferRecord] = {}
        self._recent: OrderedDict[str, tuple[TransferRecord, int]] = OrderedDict()  # finished: (record, seq)
        self._dirty: dict[str, TransferRecord] = {}
        self._new: set[str] = set()
        # True while the desk has seen every transfer this shard ever had (nothing evicted from the
        # window, everything loaded at start): then an unknown id is certainly new, and the actor
        # need not ask Postgres about it.
        self.complete = True

    # ------------------------------------------------------------------ recovery

    def load(self, record: TransferRecord) -> None:
        if record.state is TransferState.RESERVED:
            invariant(record.transfer_id in self.book.reservations, f"open transfer {record.transfer_id} unreserved")
            self.open[record.transfer_id] = record
        else:
            self._remember(record, 0)

    def knows(self, transfer_id: str) -> bool:
        return transfer_id in self.open or transfer_id in self._recent

    # ------------------------------------------------------------------ commands

    def prepare(self, record: TransferRecord, now_ms: int) -> Decision:
        existing = self._find(record.transfer_id)
        if existing is not None:
            found, seq = existing
            if found.prepare_hash != record.prepare_hash:
                return Decision(Verdict.MODIFIED, found, seq, 3106, "Modified request - transfer ID already used")
            if record.prepare_request_id and record.prepare_request_id == found.prepare_request_id:
                return self._replay_prepare(found, seq)
            if found.state is TransferState.RESERVED:
                return Decision(Verdict.IGNORE, found, seq)
            return Decision(Verdict.RESEND, found, seq)
        result = self.book.reserve(
            record.transfer_id, record.payer_account_id, record.payee_account_id, record.amount_minor, now_ms,
            check=Check.LIQUIDITY_AND_LIMIT, expires_at_ms=record.expires_at_ms,
        )
        if result.outcome is Outcome.OK:
            self.open[record.transfer_id] = record
            self._touch(record, new=True)
            return Decision(Verdict.RESERVED, record, result.seq)
        invariant(result.outcome is not Outcome.DUPLICATE, f"{record.transfer_id} reserved but unknown to the desk")
        code, description = _REFUSALS[result.outcome]
        record.state = TransferState.ABORTED
        record.refused = True
        record.error_code, record.error_description = code, description
        record.completed_ms = now_ms
        # Refusals move no money but are journaled, so the record (and duplicates of it) are durable.
        seq = self.book.note(JournalKind.REFUSE, record.transfer_id, record.payer_account_id, now_ms, description)
        self._remember(record, seq)
        self._touch(record, new=True)
        return Decision(Verdict.REFUSED, record, seq, code, description)

    def fulfil(
        self,
        transfer_id: str,
        *,
        fulfilment: str,
        fulfil_hash: str,
        completed_ms: int | None,
        reserved_mode: bool,
        source: str,
        destination: str,
        now_ms: int,
        request_id: str = "",
    ) -> Decision:
        existing = self._find(transfer_id)
        if existing is None:
            return Decision(Verdict.UNKNOWN, None, 0, 3208, "Transfer ID not found")
        record, seq = existing
        if request_id and request_id == record.fulfil_request_id and record.state is not TransferState.RESERVED:
            # The same request again (its reply was lost): the decision it got, not a duplicate.
            verdict = Verdict.COMMITTED if record.state is TransferState.COMMITTED else Verdict.ABORTED
            return Decision(verdict, record, seq, record.error_code, record.error_description)
        if source != record.payee:
            return Decision(Verdict.WRONG_SENDER, record, 0, 3100,
                            "Generic validation error - FSPIOP-Source is not the payee of the transfer")
        if record.state is not TransferState.RESERVED:
            if record.fulfil_hash is not None:
                if record.fulfil_hash == fulfil_hash:
                    return Decision(Verdict.RESEND, record, seq)
                return Decision(Verdict.MODIFIED, record, seq, 3106, "Modified request - fulfilment differs")
            code = record.error_code or 3100
            return Decision(Verdict.RESEND, record, seq, code, record.error_description)
        record.fulfil_hash = fulfil_hash
        record.reserved_mode = reserved_mode
        record.fulfil_request_id = request_id
        if now_ms >= record.expires_at_ms:
            return self._abort(record, now_ms, 3303, "Transfer expired", JournalKind.EXPIRE)
        if destination != record.payer:
            return self._abort(record, now_ms, 3100,
                               "Generic validation error - FSPIOP-Destination is not the payer of the transfer")
        if condition_of(fulfilment) != record.condition:
            return self._abort(record, now_ms, 3100, f"Generic validation error - {INVALID_FULFILMENT}")
        result = self.book.commit(transfer_id, now_ms)
        invariant(result.outcome is Outcome.OK, f"commit of reserved {transfer_id} failed: {result.outcome}")
        del self.open[transfer_id]
        record.state = TransferState.COMMITTED
        record.fulfilment = fulfilment
        record.completed_ms = completed_ms if completed_ms is not None else now_ms
        self._remember(record, result.seq)
        self._touch(record)
        return Decision(Verdict.COMMITTED, record, result.seq, credit=result.credit)

    def reject(self, transfer_id: str, *, source: str, error_code: int, description: str, now_ms: int) -> Decision:
        """The payee's ``PUT /transfers/{ID}/error``."""
        existing = self._find(transfer_id)
        if existing is None:
            return Decision(Verdict.UNKNOWN, None, 0, 3208, "Transfer ID not found")
        record, seq = existing
        if source != record.payee:
            return Decision(Verdict.WRONG_SENDER, record, 0, 3100,
                            "Generic validation error - FSPIOP-Source is not the payee of the transfer")
        if record.state is not TransferState.RESERVED:
            return Decision(Verdict.IGNORE, record, seq)
        return self._abort(record, now_ms, error_code, description, JournalKind.ABORT)

    def expire(self, now_ms: int) -> tuple[list[Decision], list[tuple[str, Result]]]:
        """Expire what is due: decisions for transfers, plain results for other reservations."""
        decisions = []
        others = []
        for transfer_id, result in self.book.expire(now_ms):
            record = self.open.pop(transfer_id, None)
            if record is None:
                others.append((transfer_id, result))
                continue
            record.state = TransferState.ABORTED
            record.error_code, record.error_description = 3303, "Transfer expired"
            record.completed_ms = now_ms
            self._remember(record, result.seq)
            self._touch(record)
            decisions.append(Decision(Verdict.ABORTED, record, result.seq, 3303, "Transfer expired"))
        return decisions, others

    def _replay_prepare(self, record: TransferRecord, seq: int) -> Decision:
        if record.refused:
            return Decision(Verdict.REFUSED, record, seq, record.error_code, record.error_description)
        # Reserved: its forward to the payee was lost with the reply, so it is owed again.
        return Decision(Verdict.RESERVED, record, seq)

    def get(self, transfer_id: str) -> tuple[TransferRecord, int] | None:
        return self._find(transfer_id)

    # ------------------------------------------------------------------ write-behind

    def drain(self) -> tuple[list[TransferRecord], list[TransferRecord]]:
        """Records to insert and records to update since the last drain (copies)."""
        inserts = [_copy(r) for t, r in self._dirty.items() if t in self._new]
        updates = [_copy(r) for t, r in self._dirty.items() if t not in self._new]
        self._dirty = {}
        self._new = set()
        return inserts, updates

    # ------------------------------------------------------------------ internals

    def _abort(
        self, record: TransferRecord, now_ms: int, code: int, description: str,
        kind: JournalKind = JournalKind.ABORT,
    ) -> Decision:
        result = self.book.abort(record.transfer_id, now_ms, description, kind=kind)
        invariant(result.outcome is Outcome.OK, f"abort of reserved {record.transfer_id} failed: {result.outcome}")
        del self.open[record.transfer_id]
        record.state = TransferState.ABORTED
        record.error_code, record.error_description = code, description
        record.completed_ms = now_ms
        self._remember(record, result.seq)
        self._touch(record)
        return Decision(Verdict.ABORTED, record, result.seq, code, description)

    def _find(self, transfer_id: str) -> tuple[TransferRecord, int] | None:
        record = self.open.get(transfer_id)
        if record is not None:
            return record, self.book.reservations[transfer_id].reserved_seq
        return self._recent.get(transfer_id)

    def _remember(self, record: TransferRecord, seq: int) -> None:
        self._recent[record.transfer_id] = (record, seq)
        if len(self._recent) > self.window:
            self._recent.popitem(last=False)
            self.complete = False

    def _touch(self, record: TransferRecord, *, new: bool = False) -> None:
        self._dirty[record.transfer_id] = record
        if new:
            self._new.add(record.transfer_id)


def _copy(record: TransferRecord) -> TransferRecord:
    return TransferRecord(**{name: getattr(record, name) for name in TransferRecord.__slots__})
