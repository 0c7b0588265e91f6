"""The pure ledger core: one shard's participants, accounts, limits and open reservations.

``PositionBook`` is synchronous and does no I/O; time comes in as ``now_ms``. A Ray actor
(``actors/position_shard.py``) owns one book, feeds it commands one at a time and writes what
``drain()`` returns behind to Postgres. Everything the book decides is visible in its journal.

Money moves as two-legged transfers between accounts, as in central-ledger:

* ``reserve`` applies the *debit* leg on the debit account (which this shard owns), after the
  checks the transfer asks for (liquidity 4001, net debit cap 4200, or funds available);
* ``commit`` closes the reservation and applies the *credit* leg: locally when this shard owns
  the credit account, otherwise it is queued in the outbox for the owning shard, which applies it
  with ``apply_credit`` exactly once (deduplicated by transfer id);
* ``abort`` (and ``expire``) reverses the debit leg.

Sign convention (the hub's view, RULES.md section 13): a debit adds to ``value``. A POSITION above
zero means the DFSP owes; a SETTLEMENT balance is negative when the DFSP has deposited funds, so
the liquidity cover is ``-SETTLEMENT.value``. Per currency the sum of every account's value, minus
the amounts of open reservations and of credits still in flight, is zero at all times.

Expected outcomes are ``Outcome`` values; impossible states raise ``InvariantViolation`` (always
on, unlike ``assert``), which crashes the actor so Ray restarts it and it rebuilds from Postgres.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum

from core.money import MAX_AMOUNT_MINOR


class InvariantViolation(RuntimeError):
    """A state the ledger must never reach. Crash, restart, rebuild from Postgres."""


def invariant(condition: bool, message: str) -> None:
    if not condition:
        raise InvariantViolation(message)


class AccountType(StrEnum):
    POSITION = "POSITION"
    SETTLEMENT = "SETTLEMENT"
    HUB_RECONCILIATION = "HUB_RECONCILIATION"
    HUB_MULTILATERAL_SETTLEMENT = "HUB_MULTILATERAL_SETTLEMENT"
    HUB_FEE = "HUB_FEE"
    INTERCHANGE_FEE = "INTERCHANGE_FEE"
    INTERCHANGE_FEE_SETTLEMENT = "INTERCHANGE_FEE_SETTLEMENT"


DFSP_ACCOUNT_TYPES = (AccountType.POSITION, AccountType.SETTLEMENT)
HUB_ACCOUNT_TYPES = (AccountType.HUB_RECONCILIATION, AccountType.HUB_MULTILATERAL_SETTLEMENT)


class Check(IntEnum):
    """What a reservation checks on its debit account before applying the debit."""

    NONE = 0  # hub and settlement moves: unconditional
    LIQUIDITY_AND_LIMIT = 1  # a transfer prepare on a POSITION account: 4001, then 4200
    FUNDS_AVAILABLE = 2  # funds out of a SETTLEMENT account: it must stay at or below zero


class Outcome(StrEnum):
    """Expected results, in the order the checks run (see ``reserve``)."""

    OK = "OK"
    INVALID_AMOUNT = "INVALID_AMOUNT"
    DUPLICATE = "DUPLICATE"
    UNKNOWN_ACCOUNT = "UNKNOWN_ACCOUNT"
    PARTICIPANT_INACTIVE = "PARTICIPANT_INACTIVE"
    ACCOUNT_INACTIVE = "ACCOUNT_INACTIVE"
    INSUFFICIENT_LIQUIDITY = "INSUFFICIENT_LIQUIDITY"  # FSPIOP 4001
    LIMIT_EXCEEDED = "LIMIT_EXCEEDED"  # FSPIOP 4200
    INSUFFICIENT_FUNDS = "INSUFFICIENT_FUNDS"  # funds out beyond the deposited balance
    UNKNOWN_TRANSFER = "UNKNOWN_TRANSFER"
    ALREADY_COMMITTED = "ALREADY_COMMITTED"
    ALREADY_ABORTED = "ALREADY_ABORTED"
    EXPIRED = "EXPIRED"  # FSPIOP 3303


class TransferState(StrEnum):
    RESERVED = "RESERVED"
    COMMITTED = "COMMITTED"
    ABORTED = "ABORTED"


class JournalKind(IntEnum):
    """One row of the shard's journal; the numbers are stored in Postgres, never renumber."""

    RESERVE = 1  # debit leg applied (value += amount, reserved += amount)
    COMMIT = 2  # reservation closed as committed (reserved -= amount); credit leg queued or applied
    ABORT = 3  # debit leg reversed (value -= amount, reserved -= amount)
    EXPIRE = 4  # as ABORT, because the reservation passed its expiration
    CREDIT = 5  # credit leg applied on the credit account (value -= amount)
    # 6 was CREDIT_ACKED in an unreleased draft; acknowledgements are not money and are not journaled.
    LIMIT = 7  # net debit cap set (amount = new cap)
    ACCOUNT_ACTIVE = 8  # account activated (amount 1) or deactivated (amount 0)
    PARTICIPANT_ACTIVE = 9  # participant activated (amount 1) or deactivated (amount 0)
    REFUSE = 10  # a transfer prepare refused (liquidity, limit, inactive): no money moved


TERMINAL_KINDS = (JournalKind.COMMIT, JournalKind.ABORT, JournalKind.EXPIRE)


@dataclass(slots=True)
class Account:
    account_id: int
    participant: str
    currency: str
    account_type: AccountType
    value_minor: int = 0
    reserved_minor: int = 0  # the part of value_minor held by open reservations
    is_active: bool = True
    net_debit_cap_minor: int | None = None  # POSITION accounts only


@dataclass(slots=True)
class Participant:
    name: str
    is_active: bool = True


@dataclass(slots=True)
class Reservation:
    transfer_id: str
    debit_account_id: int
    credit_account_id: int
    amount_minor: int
    expires_at_ms: int | None
    reserved_seq: int


@dataclass(slots=True)
class Credit:
    """A committed transfer's credit leg owed to another shard's account."""

    transfer_id: str
    credit_account_id: int
    amount_minor: int
    currency: str


@dataclass(slots=True)  # not frozen: frozen dataclasses construct several times slower, and this is per change
class JournalEntry:
    seq: int
    kind: JournalKind
    transfer_id: str | None
    account_id: int
    amount_minor: int
    at_ms: int
    reason: str = ""
    # RESERVE and COMMIT rows carry what recovery needs to rebuild open reservations and the
    # outbox from the journal tail: the other account of the transfer, and the expiry.
    counter_account_id: int = 0
    expires_at_ms: int | None = None


@dataclass(slots=True)
class Checkpoint:
    """Open reservations and owed credits not yet in their tables, and those to delete from them.

    Between checkpoints they live only in memory and in the journal; recovery loads the tables
    (the state at the last checkpoint) and replays the journal rows written after it. Most
    reservations open and close between two checkpoints and never touch the tables at all.
    """

    reservations_insert: list[Reservation]
    reservations_delete: list[str]
    credits_insert: list[Credit]
    credits_delete: list[str]


@dataclass(slots=True)
class FlushBatch:
    """Everything that changed since the last drain, ready to be written in one transaction."""

    entries: list[JournalEntry]
    accounts: list[Account]  # snapshots (copies) of the accounts touched
    participants: list[Participant]
    last_seq: int
    previous_seq: int  # the durable sequence number this batch follows (the fence)
    checkpoint: Checkpoint | None = None
    # FSPIOP transfer records (core.transfers.TransferRecord) new and changed since the last drain.
    transfer_inserts: list = field(default_factory=list)
    transfer_updates: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entries)

    def is_empty(self) -> bool:
        return not self.entries and self.checkpoint is None


@dataclass(slots=True)
class Result:
    outcome: Outcome
    # The journal sequence number that made the change durable-trackable; 0 if none. A DUPLICATE or
    # ALREADY_* result carries the seq of the earlier change it reports (0 once known durable), so a
    # caller that waits for durability does not answer before that change is durable.
    seq: int = 0
    state: TransferState | None = None
    credit: Credit | None = None  # a credit leg to deliver to another shard (commit only)


@dataclass
class _Pending:
    entries: list[JournalEntry] = field(default_factory=list)
    account_ids: set[int] = field(default_factory=set)
    participant_names: set[str] = field(default_factory=set)


class PositionBook:
    """The positions of one shard's participants. Synchronous, deterministic, no I/O."""

    def __init__(self, shard_id: int, *, last_seq: int = 0, dedupe_window: int = 200_000):
        invariant(dedupe_window > 0, "dedupe_window must be positive")
        self.shard_id = shard_id
        self.seq = last_seq
        self.dedupe_window = dedupe_window
        self.participants: dict[str, Participant] = {}
        self.accounts: dict[int, Account] = {}
        self._account_index: dict[tuple[str, str, str], int] = {}
        self.reservations: dict[str, Reservation] = {}
        self._expiry_heap: list[tuple[int, str]] = []
        self.outbox: dict[str, Credit] = {}
        # Finished transfers and applied credits, newest last, so retries after a crash or a lost
        # reply are recognised instead of applied twice. Bounded by dedupe_window.
        # Values carry the seq of the change (0 when loaded, i.e. already durable).
        self._finished: OrderedDict[str, tuple[TransferState, int]] = OrderedDict()
        self._credited: OrderedDict[str, int] = OrderedDict()
        # Net flow per currency applied by this book since load: debits minus credits minus reversals.
        self._flow_minor: dict[str, int] = defaultdict(int)
        self._baseline_minor: dict[str, int] = {}
        self._pending = _Pending()
        self._drained_seq = last_seq
        # Which open reservations and owed credits are in their tables (written at a checkpoint),
        # and which of those have since closed, so the next checkpoint deletes them.
        self._persisted_reservations: set[str] = set()
        self._closed_persisted_reservations: set[str] = set()
        self._persisted_credits: set[str] = set()
        self._acked_persisted_credits: set[str] = set()

    # ------------------------------------------------------------------ loading (recovery)

    def load_participant(self, name: str, is_active: bool) -> None:
        self.participants[name] = Participant(name, is_active)

    def load_account(self, account: Account) -> None:
        invariant(account.participant in self.participants, f"account {account.account_id} of unknown participant")
        invariant(account.account_id not in self.accounts, f"account {account.account_id} loaded twice")
        self.accounts[account.account_id] = account
        self._account_index[(account.participant, account.currency, account.account_type)] = account.account_id
        self._baseline_minor[account.currency] = self._baseline_minor.get(account.currency, 0) + account.value_minor

    def load_reservation(self, reservation: Reservation, *, persisted: bool = True) -> None:
        """An open reservation: from its table (``persisted``) or replayed from the journal tail."""
        invariant(reservation.debit_account_id in self.accounts, "reservation on an account this shard lacks")
        self.reservations[reservation.transfer_id] = reservation
        if persisted:
            self._persisted_reservations.add(reservation.transfer_id)
        if reservation.expires_at_ms is not None:
            heapq.heappush(self._expiry_heap, (reservation.expires_at_ms, reservation.transfer_id))
        currency = self.accounts[reservation.debit_account_id].currency
        # A loaded reservation is already in the loaded account value; count it as flow so the
        # conservation check below compares like with like.
        self._baseline_minor[currency] -= reservation.amount_minor
        self._flow_minor[currency] += reservation.amount_minor

    def load_outbox_credit(self, credit: Credit, *, persisted: bool = True) -> None:
        self.outbox[credit.transfer_id] = credit
        if persisted:
            self._persisted_credits.add(credit.transfer_id)

    def load_closed_since_checkpoint(self, reservation_ids: list[str], credit_ids: list[str]) -> None:
        """Rows still in the tables whose reservation closed (or credit arrived) after the checkpoint."""
        self._closed_persisted_reservations.update(reservation_ids)
        self._acked_persisted_credits.update(credit_ids)

    def load_finished(self, transfer_id: str, state: TransferState) -> None:
        self._remember(self._finished, transfer_id, (state, 0))

    def load_credited(self, transfer_id: str) -> None:
        self._remember(self._credited, transfer_id, 0)

    # ------------------------------------------------------------------ configuration changes

    def add_participant(self, name: str, is_active: bool = True) -> None:
        """A participant newly assigned to this shard (its row already exists in Postgres)."""
        if name not in self.participants:
            self.participants[name] = Participant(name, is_active)

    def add_account(self, account: Account) -> None:
        """An account newly created by the admin layer (its row already exists in Postgres)."""
        if account.account_id in self.accounts:
            return
        invariant(account.value_minor == 0 and account.reserved_minor == 0, "new accounts start at zero")
        self.load_account(account)

    def set_participant_active(self, name: str, is_active: bool, now_ms: int) -> Result:
        participant = self.participants.get(name)
        if participant is None:
            return Result(Outcome.UNKNOWN_ACCOUNT)
        participant.is_active = is_active
        self._pending.participant_names.add(name)
        seq = self._journal(JournalKind.PARTICIPANT_ACTIVE, None, 0, int(is_active), now_ms, name)
        return Result(Outcome.OK, seq)

    def set_account_active(self, account_id: int, is_active: bool, now_ms: int) -> Result:
        account = self.accounts.get(account_id)
        if account is None:
            return Result(Outcome.UNKNOWN_ACCOUNT)
        account.is_active = is_active
        seq = self._journal(JournalKind.ACCOUNT_ACTIVE, None, account_id, int(is_active), now_ms)
        return Result(Outcome.OK, seq)

    def set_net_debit_cap(self, account_id: int, cap_minor: int, now_ms: int) -> Result:
        account = self.accounts.get(account_id)
        if account is None or account.account_type != AccountType.POSITION:
            return Result(Outcome.UNKNOWN_ACCOUNT)
        if not 0 <= cap_minor <= MAX_AMOUNT_MINOR:
            return Result(Outcome.INVALID_AMOUNT)
        account.net_debit_cap_minor = cap_minor
        seq = self._journal(JournalKind.LIMIT, None, account_id, cap_minor, now_ms)
        return Result(Outcome.OK, seq)

    # ------------------------------------------------------------------ money

    def reserve(
        self,
        transfer_id: str,
        debit_account_id: int,
        credit_account_id: int,
        amount_minor: int,
        now_ms: int,
        *,
        check: Check = Check.LIQUIDITY_AND_LIMIT,
        expires_at_ms: int | None = None,
    ) -> Result:
        """Apply the debit leg of a transfer. Checks run in FSPIOP precedence order."""
        if not 0 < amount_minor <= MAX_AMOUNT_MINOR:
            return Result(Outcome.INVALID_AMOUNT)
        if transfer_id in self.reservations:
            return Result(Outcome.DUPLICATE, self.reservations[transfer_id].reserved_seq, TransferState.RESERVED)
        finished = self._finished.get(transfer_id)
        if finished is not None:
            return Result(Outcome.DUPLICATE, finished[1], finished[0])
        debit = self.accounts.get(debit_account_id)
        if debit is None:
            return Result(Outcome.UNKNOWN_ACCOUNT)
        if not self.participants[debit.participant].is_active:
            return Result(Outcome.PARTICIPANT_INACTIVE)
        if not debit.is_active:
            return Result(Outcome.ACCOUNT_INACTIVE)
        if debit.account_type == AccountType.SETTLEMENT:
            # Only funds out may debit a settlement account, so its balance never goes above zero.
            invariant(check == Check.FUNDS_AVAILABLE, "a SETTLEMENT debit must check funds available")
        if check == Check.LIQUIDITY_AND_LIMIT:
            outcome = self._check_liquidity_and_limit(debit, amount_minor)
            if outcome is not Outcome.OK:
                return Result(outcome)
        elif check == Check.FUNDS_AVAILABLE:
            if debit.value_minor + amount_minor > 0:
                return Result(Outcome.INSUFFICIENT_FUNDS)

        debit.value_minor += amount_minor
        debit.reserved_minor += amount_minor
        self._flow_minor[debit.currency] += amount_minor
        seq = self._journal(
            JournalKind.RESERVE, transfer_id, debit_account_id, amount_minor, now_ms,
            counter_account_id=credit_account_id, expires_at_ms=expires_at_ms,
        )
        reservation = Reservation(
            transfer_id, debit_account_id, credit_account_id, amount_minor, expires_at_ms, seq
        )
        self.reservations[transfer_id] = reservation
        if expires_at_ms is not None:
            heapq.heappush(self._expiry_heap, (expires_at_ms, transfer_id))
        return Result(Outcome.OK, seq, TransferState.RESERVED)

    def _check_liquidity_and_limit(self, position: Account, amount_minor: int) -> Outcome:
        invariant(position.account_type == AccountType.POSITION, "liquidity checks apply to POSITION accounts")
        settlement_id = self._account_index.get((position.participant, position.currency, AccountType.SETTLEMENT))
        settlement_value = self.accounts[settlement_id].value_minor if settlement_id is not None else 0
        liquidity_cover_minor = -settlement_value
        # value_minor already includes open reservations (central-ledger's "effective position").
        if liquidity_cover_minor - position.value_minor < amount_minor:
            return Outcome.INSUFFICIENT_LIQUIDITY
        cap = position.net_debit_cap_minor
        if cap is None or cap - position.value_minor < amount_minor:
            return Outcome.LIMIT_EXCEEDED
        return Outcome.OK

    def commit(self, transfer_id: str, now_ms: int) -> Result:
        """Close a reservation as committed and apply (or queue) its credit leg."""
        reservation = self.reservations.get(transfer_id)
        if reservation is None:
            return self._finished_result(transfer_id)
        if reservation.expires_at_ms is not None and now_ms >= reservation.expires_at_ms:
            seq = self._reverse(reservation, JournalKind.EXPIRE, now_ms, "expired before commit")
            return Result(Outcome.EXPIRED, seq, TransferState.ABORTED)
        debit = self.accounts[reservation.debit_account_id]
        debit.reserved_minor -= reservation.amount_minor
        invariant(debit.reserved_minor >= 0, f"negative reservation on account {debit.account_id}")
        seq = self._journal(
            JournalKind.COMMIT, transfer_id, reservation.debit_account_id, reservation.amount_minor, now_ms,
            counter_account_id=reservation.credit_account_id,
        )
        self._close(reservation, TransferState.COMMITTED, seq)
        credit = Credit(transfer_id, reservation.credit_account_id, reservation.amount_minor, debit.currency)
        if reservation.credit_account_id in self.accounts:
            outcome = self.apply_credit(credit, now_ms)
            invariant(outcome.outcome is Outcome.OK, f"local credit of {transfer_id} failed: {outcome.outcome}")
            return Result(Outcome.OK, outcome.seq, TransferState.COMMITTED)
        self.outbox[transfer_id] = credit
        return Result(Outcome.OK, seq, TransferState.COMMITTED, credit)

    def abort(
        self, transfer_id: str, now_ms: int, reason: str = "", *, kind: JournalKind = JournalKind.ABORT
    ) -> Result:
        """Reverse the debit leg of an open reservation (``kind`` EXPIRE when it is past its expiry)."""
        invariant(kind in (JournalKind.ABORT, JournalKind.EXPIRE), f"abort cannot journal {kind}")
        reservation = self.reservations.get(transfer_id)
        if reservation is None:
            return self._finished_result(transfer_id)
        seq = self._reverse(reservation, kind, now_ms, reason)
        return Result(Outcome.OK, seq, TransferState.ABORTED)

    def note(self, kind: JournalKind, transfer_id: str, account_id: int, now_ms: int, reason: str) -> int:
        """Journal an event that moves no money (a refused prepare), so it is durable and ordered."""
        invariant(kind is JournalKind.REFUSE, f"note cannot journal {kind}")
        return self._journal(kind, transfer_id, account_id, 0, now_ms, reason[:200])

    def expire(self, now_ms: int) -> list[tuple[str, Result]]:
        """Abort every open reservation whose expiration is at or before ``now_ms``."""
        expired: list[tuple[str, Result]] = []
        heap = self._expiry_heap
        if len(heap) > 2 * len(self.reservations) + 1024:
            # Entries of closed reservations stay until their time comes; a far-future expiration
            # would keep them forever, so rebuild from what is open when they dominate.
            self._expiry_heap = heap = [
                (r.expires_at_ms, t) for t, r in self.reservations.items() if r.expires_at_ms is not None
            ]
            heapq.heapify(heap)
        while heap and heap[0][0] <= now_ms:
            expires_at_ms, transfer_id = heapq.heappop(heap)
            reservation = self.reservations.get(transfer_id)
            # Stale heap entries (already committed or aborted) are skipped, not removed eagerly.
            if reservation is None or reservation.expires_at_ms != expires_at_ms:
                continue
            seq = self._reverse(reservation, JournalKind.EXPIRE, now_ms, "expired")
            expired.append((transfer_id, Result(Outcome.EXPIRED, seq, TransferState.ABORTED)))
        return expired

    def next_expiry_ms(self) -> int | None:
        heap = self._expiry_heap
        while heap and heap[0][1] not in self.reservations:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def apply_credit(self, credit: Credit, now_ms: int) -> Result:
        """Apply a committed transfer's credit leg on an account of this shard, at most once."""
        credited_seq = self._credited.get(credit.transfer_id)
        if credited_seq is not None:
            return Result(Outcome.DUPLICATE, credited_seq)
        account = self.accounts.get(credit.credit_account_id)
        if account is None:
            return Result(Outcome.UNKNOWN_ACCOUNT)
        invariant(account.currency == credit.currency, f"credit {credit.transfer_id} in the wrong currency")
        invariant(credit.amount_minor > 0, "credits are positive")
        account.value_minor -= credit.amount_minor
        self._flow_minor[account.currency] -= credit.amount_minor
        if account.account_type == AccountType.SETTLEMENT:
            invariant(account.value_minor <= 0, f"settlement account {account.account_id} above zero")
        seq = self._journal(JournalKind.CREDIT, credit.transfer_id, account.account_id, credit.amount_minor, now_ms)
        self._remember(self._credited, credit.transfer_id, seq)
        return Result(Outcome.OK, seq)

    def ack_credits(self, transfer_ids: list[str]) -> int:
        """The owning shards made these credits durable: drop them from the outbox.

        Not journaled: the receiving shard's CREDIT row is the durable proof of delivery, and
        recovery drops owed credits that have one. Returns how many were dropped.
        """
        dropped = 0
        for transfer_id in transfer_ids:
            if self.outbox.pop(transfer_id, None) is None:
                continue
            dropped += 1
            if transfer_id in self._persisted_credits:
                self._persisted_credits.discard(transfer_id)
                self._acked_persisted_credits.add(transfer_id)
        return dropped

    # ------------------------------------------------------------------ queries

    def account_id(self, participant: str, currency: str, account_type: AccountType) -> int | None:
        return self._account_index.get((participant, currency, account_type))

    def transfer_state(self, transfer_id: str) -> TransferState | None:
        if transfer_id in self.reservations:
            return TransferState.RESERVED
        finished = self._finished.get(transfer_id)
        return None if finished is None else finished[0]

    def currency_totals(self) -> dict[str, tuple[int, int, int]]:
        """Per currency: (sum of account values, open reservations, outbound credits in flight)."""
        totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        for account in self.accounts.values():
            totals[account.currency][0] += account.value_minor
        for reservation in self.reservations.values():
            totals[self.accounts[reservation.debit_account_id].currency][1] += reservation.amount_minor
        for credit in self.outbox.values():
            totals[credit.currency][2] += credit.amount_minor
        return {currency: (v[0], v[1], v[2]) for currency, v in totals.items()}

    # ------------------------------------------------------------------ write-behind

    def drain(self, *, checkpoint: bool = False) -> FlushBatch:
        """Hand over everything changed since the last drain for one atomic write.

        With ``checkpoint``, the batch also brings the reservation and credit tables up to date
        with memory. The caller must write the batch (retrying it as is) or die: the book
        counts it as handed over.
        """
        pending = self._pending
        self._pending = _Pending()
        batch = FlushBatch(
            entries=pending.entries,
            accounts=[_copy_account(self.accounts[a]) for a in sorted(pending.account_ids)],
            participants=[Participant(p, self.participants[p].is_active) for p in sorted(pending.participant_names)],
            last_seq=self.seq,
            previous_seq=self._drained_seq,
        )
        self._drained_seq = self.seq
        if checkpoint:
            batch.checkpoint = Checkpoint(
                reservations_insert=[
                    r for t, r in self.reservations.items() if t not in self._persisted_reservations
                ],
                reservations_delete=sorted(self._closed_persisted_reservations),
                credits_insert=[c for t, c in self.outbox.items() if t not in self._persisted_credits],
                credits_delete=sorted(self._acked_persisted_credits),
            )
            self._persisted_reservations.update(r.transfer_id for r in batch.checkpoint.reservations_insert)
            self._persisted_credits.update(c.transfer_id for c in batch.checkpoint.credits_insert)
            self._closed_persisted_reservations.clear()
            self._acked_persisted_credits.clear()
        return batch

    def checkpoint_pending(self) -> bool:
        """Whether the tables differ from memory (a checkpoint would write something)."""
        return (
            len(self._persisted_reservations) != len(self.reservations)
            or len(self._persisted_credits) != len(self.outbox)
            or bool(self._closed_persisted_reservations or self._acked_persisted_credits)
        )

    # ------------------------------------------------------------------ invariants

    def check_invariants(self) -> None:
        """The full check, run after every reload and in tests. Raises ``InvariantViolation``."""
        reserved_by_account: dict[int, int] = defaultdict(int)
        for reservation in self.reservations.values():
            invariant(reservation.amount_minor > 0, f"reservation {reservation.transfer_id} not positive")
            invariant(reservation.debit_account_id in self.accounts, "reservation on unknown account")
            reserved_by_account[reservation.debit_account_id] += reservation.amount_minor
        values_by_currency: dict[str, int] = defaultdict(int)
        for account in self.accounts.values():
            invariant(account.participant in self.participants, f"orphan account {account.account_id}")
            invariant(
                account.reserved_minor == reserved_by_account.get(account.account_id, 0),
                f"account {account.account_id} reserved {account.reserved_minor} "
                f"!= open reservations {reserved_by_account.get(account.account_id, 0)}",
            )
            invariant(account.reserved_minor >= 0, f"account {account.account_id} negative reservation")
            if account.account_type == AccountType.SETTLEMENT:
                invariant(account.value_minor <= 0, f"settlement account {account.account_id} above zero")
            values_by_currency[account.currency] += account.value_minor
        for currency in set(values_by_currency) | set(self._flow_minor):
            expected = self._baseline_minor.get(currency, 0) + self._flow_minor.get(currency, 0)
            invariant(
                values_by_currency.get(currency, 0) == expected,
                f"{currency}: account values {values_by_currency.get(currency, 0)} != applied flow {expected}",
            )
        invariant(len(self._finished) <= self.dedupe_window, "finished-transfer window over its bound")
        invariant(len(self._credited) <= self.dedupe_window, "credit window over its bound")

    # ------------------------------------------------------------------ internals

    def _reverse(self, reservation: Reservation, kind: JournalKind, now_ms: int, reason: str) -> int:
        debit = self.accounts[reservation.debit_account_id]
        debit.value_minor -= reservation.amount_minor
        debit.reserved_minor -= reservation.amount_minor
        self._flow_minor[debit.currency] -= reservation.amount_minor
        invariant(debit.reserved_minor >= 0, f"negative reservation on account {debit.account_id}")
        seq = self._journal(kind, reservation.transfer_id, debit.account_id, reservation.amount_minor, now_ms, reason)
        self._close(reservation, TransferState.ABORTED, seq)
        return seq

    def _close(self, reservation: Reservation, state: TransferState, seq: int) -> None:
        del self.reservations[reservation.transfer_id]
        self._remember(self._finished, reservation.transfer_id, (state, seq))
        if reservation.transfer_id in self._persisted_reservations:
            self._persisted_reservations.discard(reservation.transfer_id)
            self._closed_persisted_reservations.add(reservation.transfer_id)

    def _finished_result(self, transfer_id: str) -> Result:
        state, seq = self._finished.get(transfer_id, (None, 0))
        if state is TransferState.COMMITTED:
            return Result(Outcome.ALREADY_COMMITTED, seq, state)
        if state is TransferState.ABORTED:
            return Result(Outcome.ALREADY_ABORTED, seq, state)
        return Result(Outcome.UNKNOWN_TRANSFER)

    def _remember(self, window: OrderedDict, key: str, value) -> None:
        window[key] = value
        if len(window) > self.dedupe_window:
            window.popitem(last=False)

    def _journal(
        self,
        kind: JournalKind,
        transfer_id: str | None,
        account_id: int,
        amount_minor: int,
        now_ms: int,
        reason: str = "",
        *,
        counter_account_id: int = 0,
        expires_at_ms: int | None = None,
    ) -> int:
        self.seq += 1
        self._pending.entries.append(
            JournalEntry(
                self.seq, kind, transfer_id, account_id, amount_minor, now_ms, reason, counter_account_id, expires_at_ms
            )
        )
        if account_id in self.accounts:  # outbox acknowledgements name another shard's account
            self._pending.account_ids.add(account_id)
        return self.seq


def _copy_account(account: Account) -> Account:
    return Account(
        account.account_id,
        account.participant,
        account.currency,
        account.account_type,
        account.value_minor,
        account.reserved_minor,
        account.is_active,
        account.net_debit_cap_minor,
    )
