"""Seeded simulation of the ledger core across shards, checked against a reference model.

Two or three ``PositionBook`` shards own the participants between them. Random transfers, funds in
and out, net debit cap changes, activations, commits, aborts and expiries run against them with an
injected clock. Credit legs travel between shards over a fake transport that delays, drops and
duplicates messages (the sender retries from its outbox). Every ``drain()`` goes to a fake durable
store that sometimes fails the write (the same batch is retried), sometimes commits it but loses the
reply (the retry would be fenced out: the shard crashes), and shards crash at random: the book is
then rebuilt from the durable store the way ``actors/store.py`` does.

The reference model is plain dicts per shard, kept twice: *live* (every operation the book accepted)
and *durable* (the operations whose journal sequence number reached the store). A crash resets live
to durable. After every step: the invariants hold, each book equals its model, money is conserved
across the shards (live and durable, counting credits in flight), and every answer given to a
caller as durable (the actor answers once ``result.seq`` is durable) is in the durable journal.

Replay a failure with ``RAYLOOP_SIM_SEED=<seed>``; the seed is in every failure message.
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from core.ledger import (
    DFSP_ACCOUNT_TYPES,
    HUB_ACCOUNT_TYPES,
    TERMINAL_KINDS,
    Account,
    AccountType,
    Check,
    Credit,
    FlushBatch,
    InvariantViolation,
    JournalEntry,
    JournalKind,
    Outcome,
    PositionBook,
    Reservation,
    TransferState,
)
from core.money import MAX_AMOUNT_MINOR, MINOR_PER_MAJOR

SEED_COUNT = 20
STEPS = 400
_ENV_SEED = os.environ.get("RAYLOOP_SIM_SEED")
_BASE_SEED = int(_ENV_SEED) if _ENV_SEED else random.SystemRandom().randrange(2**32)
SEEDS = [_BASE_SEED] if _ENV_SEED else [_BASE_SEED + i for i in range(SEED_COUNT)]

CURRENCIES = ("XTS", "XXX")
HUB = "Hub"
WINDOW = 100_000  # large enough that no dedupe window evicts during a run

# Fault rates, per attempt or per step.
P_WRITE_FAILS = 0.15  # the write fails before it commits; the same batch is retried
P_REPLY_LOST = 0.05  # the write commits but the reply is lost; the retry is fenced out: crash
P_CRASH = 0.03  # a shard crashes between commands
P_DROP = 0.15
P_DUPLICATE = 0.15
MAX_DELAY_STEPS = 6


def major(units: int) -> int:
    return units * MINOR_PER_MAJOR


# ------------------------------------------------------------------ the fake durable store


class FakeDurableStore:
    """What Postgres holds for one shard: the accumulated result of every FlushBatch written."""

    def __init__(self, shard_id: int):
        self.shard_id = shard_id
        self.last_seq = 0
        self.participants: dict[str, bool] = {}
        self.accounts: dict[int, Account] = {}
        self.reservations: dict[str, Reservation] = {}
        self.outbox: dict[str, Credit] = {}
        self.journal: list[JournalEntry] = []
        self.kinds: dict[str, set[JournalKind]] = defaultdict(set)

    def write(self, batch: FlushBatch) -> None:
        """One atomic transaction, with the checks the schema and the fence would make."""
        entries = batch.entries
        assert entries, "an empty batch reached the journal"
        seqs = [e.seq for e in entries]
        assert seqs == list(range(self.last_seq + 1, self.last_seq + 1 + len(entries))), (
            f"shard {self.shard_id}: journal sequence must grow by one from {self.last_seq}: {seqs}"
        )
        assert batch.last_seq == seqs[-1]
        for entry in entries:
            if entry.transfer_id is None:
                continue
            kinds = self.kinds[entry.transfer_id]
            assert entry.kind not in kinds, f"{entry.transfer_id}: {entry.kind.name} journaled twice"
            if entry.kind in TERMINAL_KINDS:
                assert not kinds & set(TERMINAL_KINDS), f"{entry.transfer_id} finished twice"
            kinds.add(entry.kind)
        self.journal.extend(entries)
        for account in batch.accounts:
            assert account.account_id in self.accounts, "snapshot of an account the store lacks"
            self.accounts[account.account_id] = _copy_account(account)
        for participant in batch.participants:
            self.participants[participant.name] = participant.is_active
        for transfer_id in batch.reservations_removed:
            assert self.reservations.pop(transfer_id, None) is not None, f"removed unknown {transfer_id}"
        for r in batch.reservations_added:
            assert r.transfer_id not in self.reservations, f"reservation {r.transfer_id} added twice"
            self.reservations[r.transfer_id] = Reservation(
                r.transfer_id,
                r.debit_account_id,
                r.credit_account_id,
                r.amount_minor,
                r.expires_at_ms,
                r.reserved_seq,
            )
        for transfer_id in batch.credits_removed:
            assert self.outbox.pop(transfer_id, None) is not None, f"removed unknown credit {transfer_id}"
        for c in batch.credits_added:
            assert c.transfer_id not in self.outbox, f"credit {c.transfer_id} added twice"
            self.outbox[c.transfer_id] = Credit(
                c.transfer_id, c.credit_account_id, c.amount_minor, c.currency
            )
        self.last_seq = batch.last_seq

    def load(self) -> PositionBook:
        """Rebuild a book as ``actors/store.py`` ``load`` does."""
        book = PositionBook(self.shard_id, last_seq=self.last_seq, dedupe_window=WINDOW)
        for name, is_active in self.participants.items():
            book.load_participant(name, is_active)
        for account_id in sorted(self.accounts):
            book.load_account(_copy_account(self.accounts[account_id]))
        for r in sorted(self.reservations.values(), key=lambda r: r.reserved_seq):
            book.load_reservation(
                Reservation(
                    r.transfer_id,
                    r.debit_account_id,
                    r.credit_account_id,
                    r.amount_minor,
                    r.expires_at_ms,
                    r.reserved_seq,
                )
            )
        for c in self.outbox.values():
            book.load_outbox_credit(Credit(c.transfer_id, c.credit_account_id, c.amount_minor, c.currency))
        finished = [e for e in self.journal if e.kind in TERMINAL_KINDS][-WINDOW:]
        for e in finished:
            state = TransferState.COMMITTED if e.kind == JournalKind.COMMIT else TransferState.ABORTED
            book.load_finished(e.transfer_id, state)
        for e in [e for e in self.journal if e.kind == JournalKind.CREDIT][-WINDOW:]:
            book.load_credited(e.transfer_id)
        book.check_invariants()
        return book

    def credited(self) -> set[str]:
        return {t for t, kinds in self.kinds.items() if JournalKind.CREDIT in kinds}


def _copy_account(a: Account) -> Account:
    return Account(
        a.account_id,
        a.participant,
        a.currency,
        a.account_type,
        a.value_minor,
        a.reserved_minor,
        a.is_active,
        a.net_debit_cap_minor,
    )


# ------------------------------------------------------------------ the reference model


@dataclass
class ModelState:
    """One shard as plain dicts."""

    values: dict[int, int]
    caps: dict[int, int | None]
    account_active: dict[int, bool]
    participant_active: dict[str, bool]
    reservations: dict[str, tuple[int, int, int, int | None]] = field(default_factory=dict)
    finished: dict[str, TransferState] = field(default_factory=dict)
    outbox: dict[str, tuple[int, int, str]] = field(default_factory=dict)
    credited: set[str] = field(default_factory=set)

    def copy(self) -> ModelState:
        return ModelState(
            dict(self.values),
            dict(self.caps),
            dict(self.account_active),
            dict(self.participant_active),
            dict(self.reservations),
            dict(self.finished),
            dict(self.outbox),
            set(self.credited),
        )


Effect = Callable[[ModelState], None]


class ShardModel:
    """Live and durable reference state of one shard; effects become durable with their seq."""

    def __init__(self, sim: Simulation, shard_id: int, state: ModelState):
        self.sim = sim
        self.shard_id = shard_id
        self.live = state
        self.durable = state.copy()
        self.pending: list[tuple[int, Effect]] = []

    def record(self, seq: int, effect: Effect) -> None:
        assert seq > 0, "a change without a journal sequence number"
        assert not self.pending or self.pending[-1][0] < seq, "journal sequence numbers must grow"
        effect(self.live)
        self.pending.append((seq, effect))

    def durable_up_to(self, last_seq: int) -> None:
        done = 0
        for seq, effect in self.pending:
            if seq > last_seq:
                break
            effect(self.durable)
            done += 1
        del self.pending[:done]

    def crash(self) -> None:
        self.live = self.durable.copy()
        self.pending.clear()

    # --- predictions, in the order the book checks

    def predict_reserve(self, transfer_id, debit_id, amount, check) -> tuple[Outcome, TransferState | None]:
        m = self.live
        if not 0 < amount <= MAX_AMOUNT_MINOR:
            return Outcome.INVALID_AMOUNT, None
        if transfer_id in m.reservations:
            return Outcome.DUPLICATE, TransferState.RESERVED
        if transfer_id in m.finished:
            return Outcome.DUPLICATE, m.finished[transfer_id]
        if debit_id not in m.values:
            return Outcome.UNKNOWN_ACCOUNT, None
        participant, currency, _ = self.sim.info[debit_id]
        if not m.participant_active[participant]:
            return Outcome.PARTICIPANT_INACTIVE, None
        if not m.account_active[debit_id]:
            return Outcome.ACCOUNT_INACTIVE, None
        position = m.values[debit_id]
        if check == Check.LIQUIDITY_AND_LIMIT:
            cover = -m.values[self.sim.account[(participant, currency, AccountType.SETTLEMENT)]]
            if cover - position < amount:
                return Outcome.INSUFFICIENT_LIQUIDITY, None
            cap = m.caps[debit_id]
            if cap is None or cap - position < amount:
                return Outcome.LIMIT_EXCEEDED, None
        elif check == Check.FUNDS_AVAILABLE and position + amount > 0:
            return Outcome.INSUFFICIENT_FUNDS, None
        return Outcome.OK, TransferState.RESERVED


def effect_reserve(transfer_id, debit_id, credit_id, amount, expires) -> Effect:
    def apply(m: ModelState) -> None:
        m.values[debit_id] += amount
        m.reservations[transfer_id] = (debit_id, credit_id, amount, expires)

    return apply


def effect_reverse(transfer_id) -> Effect:
    def apply(m: ModelState) -> None:
        debit_id, _, amount, _ = m.reservations.pop(transfer_id)
        m.values[debit_id] -= amount
        m.finished[transfer_id] = TransferState.ABORTED

    return apply


def effect_commit(transfer_id, currency) -> Effect:
    def apply(m: ModelState) -> None:
        _, credit_id, amount, _ = m.reservations.pop(transfer_id)
        m.finished[transfer_id] = TransferState.COMMITTED
        if credit_id in m.values:
            m.values[credit_id] -= amount
            m.credited.add(transfer_id)
        else:
            m.outbox[transfer_id] = (credit_id, amount, currency)

    return apply


def effect_credit(transfer_id, credit_id, amount) -> Effect:
    def apply(m: ModelState) -> None:
        m.values[credit_id] -= amount
        m.credited.add(transfer_id)

    return apply


def effect_ack(transfer_id) -> Effect:
    def apply(m: ModelState) -> None:
        del m.outbox[transfer_id]

    return apply


def effect_set(attribute: str, key, value) -> Effect:
    def apply(m: ModelState) -> None:
        getattr(m, attribute)[key] = value

    return apply


# ------------------------------------------------------------------ shards, transport, the simulation


@dataclass
class Waiter:
    seq: int
    facts: list[tuple[str, frozenset[JournalKind]]]
    then: Callable[[], None] | None


class SimShard:
    def __init__(self, sim: Simulation, store: FakeDurableStore, model: ModelState):
        self.sim = sim
        self.shard_id = store.shard_id
        self.store = store
        self.book = store.load()
        self.model = ShardModel(sim, store.shard_id, model)
        self.inflight: FlushBatch | None = None
        self.waiters: list[Waiter] = []
        # (transfer_id, kinds): answers given as durable; one of the kinds must be in the journal.
        self.acknowledged: list[tuple[str, frozenset[JournalKind]]] = []

    def reply_when_durable(self, seq: int, facts, then=None) -> None:
        """The actor answers a wait_durable call once ``seq`` is durable (at once when seq is 0)."""
        waiter = Waiter(seq, [(t, frozenset(k)) for t, k in facts], then)
        if seq <= self.store.last_seq:
            self._answer(waiter)
        else:
            self.waiters.append(waiter)

    def _answer(self, waiter: Waiter) -> None:
        for transfer_id, kinds in waiter.facts:
            found = self.store.kinds.get(transfer_id, set())
            assert found & kinds, (
                f"shard {self.shard_id} answered {transfer_id} as durable ({sorted(k.name for k in kinds)}) "
                f"at durable seq {self.store.last_seq} but its journal has {sorted(k.name for k in found)}"
            )
            self.acknowledged.append((transfer_id, kinds))
        if waiter.then is not None:
            waiter.then()

    def flush(self) -> None:
        if self.inflight is None:
            batch = self.book.drain()
            if not batch.entries:
                assert not (
                    batch.accounts
                    or batch.participants
                    or batch.reservations_added
                    or batch.reservations_removed
                    or batch.credits_added
                    or batch.credits_removed
                ), f"a change without a journal entry: {batch}"
                return
            self.inflight = batch
        roll = self.sim.rng.random() if self.sim.faults else 1.0
        if roll < P_WRITE_FAILS:
            return  # nothing written; the same batch is retried on the next flush
        batch, self.inflight = self.inflight, None
        self.store.write(batch)
        self.model.durable_up_to(batch.last_seq)
        if roll < P_WRITE_FAILS + P_REPLY_LOST:
            self.crash()  # committed, but the retry would be fenced out
            return
        ready = [w for w in self.waiters if w.seq <= batch.last_seq]
        self.waiters = [w for w in self.waiters if w.seq > batch.last_seq]
        for waiter in ready:
            self._answer(waiter)

    def crash(self) -> None:
        self.book = self.store.load()
        self.inflight = None
        self.waiters.clear()  # callers waiting on this incarnation get an error: unknown outcome
        self.model.crash()
        self.sim.crashes += 1
        self.sim.check_shard(self, full=True)
        # Nothing answered as durable is lost.
        for transfer_id, kinds in self.acknowledged:
            if kinds & {JournalKind.RESERVE}:
                assert self.book.transfer_state(transfer_id) is not None, f"lost reservation {transfer_id}"
            if kinds & {JournalKind.COMMIT}:
                assert self.book.transfer_state(transfer_id) is TransferState.COMMITTED, transfer_id
            if kinds & {JournalKind.ABORT, JournalKind.EXPIRE}:
                assert self.book.transfer_state(transfer_id) is TransferState.ABORTED, transfer_id
            if kinds == {JournalKind.CREDIT}:
                assert transfer_id in self.book._credited, f"lost applied credit {transfer_id}"


class Simulation:
    def __init__(self, seed: int):
        self.seed = seed
        self.rng = rng = random.Random(seed)
        self.now = 1_000_000
        self.faults = True
        self.crashes = 0
        self.counts: dict[str, int] = defaultdict(int)
        shard_count = rng.choice((2, 3))
        self.dfsps = [f"fsp{i}" for i in range(1, rng.randint(3, 5) + 1)]
        names = [HUB, *self.dfsps]
        self.shard_of: dict[str, int] = {name: rng.randrange(shard_count) for name in names}
        stores = [FakeDurableStore(i) for i in range(shard_count)]
        models = [ModelState({}, {}, {}, {}) for _ in range(shard_count)]
        self.info: dict[int, tuple[str, str, AccountType]] = {}
        self.account: dict[tuple[str, str, AccountType], int] = {}
        self.owner: dict[int, int] = {}
        account_id = 0
        for name in names:
            shard = self.shard_of[name]
            stores[shard].participants[name] = True
            models[shard].participant_active[name] = True
            for currency in CURRENCIES:
                for account_type in HUB_ACCOUNT_TYPES if name == HUB else DFSP_ACCOUNT_TYPES:
                    account_id += 1
                    # Rows the admin layer created before the shard started.
                    stores[shard].accounts[account_id] = Account(account_id, name, currency, account_type)
                    self.info[account_id] = (name, currency, account_type)
                    self.account[(name, currency, account_type)] = account_id
                    self.owner[account_id] = shard
                    models[shard].values[account_id] = 0
                    models[shard].caps[account_id] = None
                    models[shard].account_active[account_id] = True
        self.shards = [SimShard(self, store, model) for store, model in zip(stores, models, strict=True)]
        self.messages: list[tuple[int, int, str, int, int, object]] = []
        self.message_no = 0
        self.step_no = 0
        self.transfer_no = 0
        self.issued: dict[str, tuple[int, int, int, int, Check, int | None]] = {}

    # --- helpers

    def new_transfer_id(self) -> str:
        self.transfer_no += 1
        return f"t{self.transfer_no}"

    def random_amount(self, max_major: int) -> int:
        if self.rng.random() < 0.02:
            return self.rng.choice((0, -1, MAX_AMOUNT_MINOR + 1))
        return self.rng.randint(1, major(max_major))

    def home(self, account_id: int) -> SimShard:
        return self.shards[self.owner[account_id]]

    # --- operations

    def reserve(self, shard: SimShard, transfer_id, debit_id, credit_id, amount, check, expires):
        self.issued.setdefault(transfer_id, (shard.shard_id, debit_id, credit_id, amount, check, expires))
        expected = shard.model.predict_reserve(transfer_id, debit_id, amount, check)
        result = shard.book.reserve(
            transfer_id, debit_id, credit_id, amount, self.now, check=check, expires_at_ms=expires
        )
        assert (result.outcome, result.state) == expected, f"reserve {transfer_id}: {result} != {expected}"
        self.counts[f"reserve {result.outcome}"] += 1
        if result.outcome is Outcome.OK:
            shard.model.record(result.seq, effect_reserve(transfer_id, debit_id, credit_id, amount, expires))
        if result.outcome in (Outcome.OK, Outcome.DUPLICATE):
            shard.reply_when_durable(result.seq, [(transfer_id, {JournalKind.RESERVE})])
        return result

    def commit(self, shard: SimShard, transfer_id: str):
        m = shard.model.live
        result = shard.book.commit(transfer_id, self.now)
        self.counts[f"commit {result.outcome}"] += 1
        if transfer_id in m.reservations:
            debit_id, credit_id, amount, expires = m.reservations[transfer_id]
            currency = self.info[debit_id][1]
            if expires is not None and self.now >= expires:
                assert (result.outcome, result.state) == (Outcome.EXPIRED, TransferState.ABORTED), result
                shard.model.record(result.seq, effect_reverse(transfer_id))
                shard.reply_when_durable(result.seq, [(transfer_id, {JournalKind.EXPIRE})])
                return result
            assert (result.outcome, result.state) == (Outcome.OK, TransferState.COMMITTED), result
            local = credit_id in m.values
            expected_credit = None if local else Credit(transfer_id, credit_id, amount, currency)
            assert result.credit == expected_credit, result
            shard.model.record(result.seq, effect_commit(transfer_id, currency))
            facts = [(transfer_id, {JournalKind.COMMIT})] + (
                [(transfer_id, {JournalKind.CREDIT})] if local else []
            )
            shard.reply_when_durable(result.seq, facts)
            return result
        self.expect_finished(shard, transfer_id, result)
        return result

    def abort(self, shard: SimShard, transfer_id: str):
        m = shard.model.live
        result = shard.book.abort(transfer_id, self.now, "simulated")
        self.counts[f"abort {result.outcome}"] += 1
        if transfer_id in m.reservations:
            assert (result.outcome, result.state) == (Outcome.OK, TransferState.ABORTED), result
            shard.model.record(result.seq, effect_reverse(transfer_id))
            shard.reply_when_durable(result.seq, [(transfer_id, {JournalKind.ABORT})])
            return result
        self.expect_finished(shard, transfer_id, result)
        return result

    def expect_finished(self, shard: SimShard, transfer_id: str, result) -> None:
        state = shard.model.live.finished.get(transfer_id)
        if state is None:
            assert result.outcome is Outcome.UNKNOWN_TRANSFER, result
            return
        if state is TransferState.COMMITTED:
            assert (result.outcome, result.state) == (Outcome.ALREADY_COMMITTED, state), result
            shard.reply_when_durable(result.seq, [(transfer_id, {JournalKind.COMMIT})])
        else:
            assert (result.outcome, result.state) == (Outcome.ALREADY_ABORTED, state), result
            shard.reply_when_durable(result.seq, [(transfer_id, {JournalKind.ABORT, JournalKind.EXPIRE})])

    def expire(self, shard: SimShard) -> None:
        due = {
            t
            for t, (_, _, _, exp) in shard.model.live.reservations.items()
            if exp is not None and exp <= self.now
        }
        expired = shard.book.expire(self.now)
        assert {t for t, _ in expired} == due, f"expired {[t for t, _ in expired]}, expected {sorted(due)}"
        for transfer_id, result in expired:
            assert (result.outcome, result.state) == (Outcome.EXPIRED, TransferState.ABORTED), result
            shard.model.record(result.seq, effect_reverse(transfer_id))
        self.counts["expired"] += len(expired)

    def deliver_credit(self, source: int, credit: Credit) -> None:
        shard = self.home(credit.credit_account_id)
        m = shard.model.live
        result = shard.book.apply_credit(
            Credit(credit.transfer_id, credit.credit_account_id, credit.amount_minor, credit.currency),
            self.now,
        )
        self.counts[f"credit {result.outcome}"] += 1
        if credit.transfer_id in m.credited:
            assert result.outcome is Outcome.DUPLICATE, result
        else:
            assert result.outcome is Outcome.OK, result
            shard.model.record(
                result.seq, effect_credit(credit.transfer_id, credit.credit_account_id, credit.amount_minor)
            )
        transfer_id = credit.transfer_id
        shard.reply_when_durable(
            result.seq,
            [(transfer_id, {JournalKind.CREDIT})],
            then=lambda: self.send("ack", shard.shard_id, source, transfer_id),
        )

    def deliver_ack(self, shard_id: int, transfer_id: str) -> None:
        shard = self.shards[shard_id]
        expected = transfer_id in shard.model.live.outbox
        seq = shard.book.ack_credits([transfer_id], self.now)
        assert (seq > 0) == expected, f"ack of {transfer_id}: seq {seq}, in outbox {expected}"
        if seq:
            shard.model.record(seq, effect_ack(transfer_id))

    def send_outbox(self, shard: SimShard) -> None:
        # Only credits whose commit is durable may leave the shard.
        for transfer_id, credit in list(shard.book.outbox.items()):
            if transfer_id in shard.store.outbox:
                self.send("credit", shard.shard_id, self.owner[credit.credit_account_id], credit)

    def send(self, kind: str, source: int, target: int, payload) -> None:
        copies = 1
        if self.faults:
            if self.rng.random() < P_DROP:
                return
            if self.rng.random() < P_DUPLICATE:
                copies = 2
        for _ in range(copies):
            self.message_no += 1
            delay = self.rng.randint(0, MAX_DELAY_STEPS) if self.faults else 0
            self.messages.append((self.step_no + delay, self.message_no, kind, source, target, payload))

    def deliver_due(self) -> None:
        due = sorted(m for m in self.messages if m[0] <= self.step_no)
        self.messages = [m for m in self.messages if m[0] > self.step_no]
        for _, _, kind, source, target, payload in due:
            if kind == "credit":
                self.deliver_credit(source, payload)
            else:
                self.deliver_ack(target, payload)

    # --- random client actions

    def op_transfer(self) -> None:
        rng = self.rng
        payer, payee = rng.sample(self.dfsps, 2)
        currency = rng.choice(CURRENCIES)
        debit_id = self.account[(payer, currency, AccountType.POSITION)]
        credit_id = self.account[(payee, currency, AccountType.POSITION)]
        expires = None if rng.random() < 0.2 else self.now + rng.randint(5, 400)
        shard = self.home(debit_id)
        if rng.random() < 0.03 and len(self.shards) > 1:  # sent to a shard that does not own the payer
            shard = rng.choice([s for s in self.shards if s is not shard])
        self.reserve(
            shard,
            self.new_transfer_id(),
            debit_id,
            credit_id,
            self.random_amount(600),
            Check.LIQUIDITY_AND_LIMIT,
            expires,
        )

    def op_funds_in(self, dfsp: str | None = None, amount: int | None = None) -> None:
        rng = self.rng
        currency = rng.choice(CURRENCIES)
        dfsp = dfsp or rng.choice(self.dfsps)
        debit_id = self.account[(HUB, currency, AccountType.HUB_RECONCILIATION)]
        credit_id = self.account[(dfsp, currency, AccountType.SETTLEMENT)]
        transfer_id = self.new_transfer_id()
        shard = self.home(debit_id)
        result = self.reserve(
            shard, transfer_id, debit_id, credit_id, amount or self.random_amount(3000), Check.NONE, None
        )
        if result.outcome is Outcome.OK:
            self.commit(shard, transfer_id)

    def op_funds_out(self) -> None:
        dfsp = self.rng.choice(self.dfsps)
        currency = self.rng.choice(CURRENCIES)
        debit_id = self.account[(dfsp, currency, AccountType.SETTLEMENT)]
        credit_id = self.account[(HUB, currency, AccountType.HUB_RECONCILIATION)]
        self.reserve(
            self.home(debit_id),
            self.new_transfer_id(),
            debit_id,
            credit_id,
            self.random_amount(2000),
            Check.FUNDS_AVAILABLE,
            None,
        )

    def pick_transfer(self) -> tuple[SimShard, str]:
        rng = self.rng
        open_ids = [(s, t) for s in self.shards for t in s.model.live.reservations]
        if open_ids and rng.random() < 0.75:
            return rng.choice(open_ids)
        if self.issued and rng.random() < 0.95:
            transfer_id = rng.choice(list(self.issued))
            return self.shards[self.issued[transfer_id][0]], transfer_id
        return rng.choice(self.shards), "never-issued"

    def op_retry_reserve(self) -> None:
        if not self.issued:
            return
        transfer_id = self.rng.choice(list(self.issued))
        shard_id, debit_id, credit_id, amount, check, expires = self.issued[transfer_id]
        shard = self.shards[shard_id]
        acknowledged = (transfer_id, frozenset({JournalKind.RESERVE})) in shard.acknowledged
        result = self.reserve(shard, transfer_id, debit_id, credit_id, amount, check, expires)
        if acknowledged:
            assert result.outcome is Outcome.DUPLICATE, f"{transfer_id} answered durable, then {result}"

    def op_limit(self) -> None:
        rng = self.rng
        dfsp = rng.choice(self.dfsps)
        currency = rng.choice(CURRENCIES)
        account_type = AccountType.SETTLEMENT if rng.random() < 0.05 else AccountType.POSITION
        account_id = self.account[(dfsp, currency, account_type)]
        cap = -1 if rng.random() < 0.05 else rng.randint(0, major(4000))
        shard = self.home(account_id)
        result = shard.book.set_net_debit_cap(account_id, cap, self.now)
        if account_type is AccountType.SETTLEMENT:
            assert result.outcome is Outcome.UNKNOWN_ACCOUNT, result
        elif cap < 0:
            assert result.outcome is Outcome.INVALID_AMOUNT, result
        else:
            assert result.outcome is Outcome.OK, result
            shard.model.record(result.seq, effect_set("caps", account_id, cap))

    def op_toggle_active(self) -> None:
        """Deactivate a participant or an account, or (more often) reactivate one."""
        rng = self.rng
        inactive = [
            (s, "participant_active", n)
            for s in self.shards
            for n, active in s.model.live.participant_active.items()
            if not active
        ]
        inactive += [
            (s, "account_active", a)
            for s in self.shards
            for a, active in s.model.live.account_active.items()
            if not active
        ]
        if inactive and rng.random() < 0.7:
            shard, attribute, key = rng.choice(inactive)
            is_active = True
        else:
            name = rng.choice([HUB, *self.dfsps])
            shard = self.shards[self.shard_of[name]]
            is_active = False
            attribute, key = "participant_active", name
            if rng.random() < 0.6:
                types = HUB_ACCOUNT_TYPES if name == HUB else DFSP_ACCOUNT_TYPES
                attribute, key = (
                    "account_active",
                    self.account[(name, rng.choice(CURRENCIES), rng.choice(types))],
                )
        if attribute == "participant_active":
            result = shard.book.set_participant_active(key, is_active, self.now)
        else:
            result = shard.book.set_account_active(key, is_active, self.now)
        assert result.outcome is Outcome.OK, result
        shard.model.record(result.seq, effect_set(attribute, key, is_active))

    def step(self) -> None:
        rng = self.rng
        self.step_no += 1
        self.now += rng.randint(0, 40)
        roll = rng.random()
        if roll < 0.30:
            self.op_transfer()
        elif roll < 0.48:
            shard, transfer_id = self.pick_transfer()
            self.commit(shard, transfer_id)
        elif roll < 0.56:
            shard, transfer_id = self.pick_transfer()
            self.abort(shard, transfer_id)
        elif roll < 0.63:
            self.op_funds_in()
        elif roll < 0.69:
            self.op_funds_out()
        elif roll < 0.77:
            self.op_retry_reserve()
        elif roll < 0.82:
            self.op_limit()
        elif roll < 0.85:
            self.op_toggle_active()
        elif roll < 0.88:
            self.now += rng.randint(100, 500)
        for shard in self.shards:
            if rng.random() < 0.3:
                self.expire(shard)
            if rng.random() < 0.4:
                self.send_outbox(shard)
            if rng.random() < 0.5:
                shard.flush()
        self.deliver_due()
        if rng.random() < P_CRASH:
            rng.choice(self.shards).crash()
        self.check_all(full=self.step_no % 50 == 0)

    def setup(self) -> None:
        """Caps and deposits for every DFSP, then a quiet period so the deposits land."""
        for dfsp in self.dfsps:
            for currency in CURRENCIES:
                account_id = self.account[(dfsp, currency, AccountType.POSITION)]
                shard = self.home(account_id)
                cap = major(self.rng.randint(500, 3000))
                result = shard.book.set_net_debit_cap(account_id, cap, self.now)
                assert result.outcome is Outcome.OK, result
                shard.model.record(result.seq, effect_set("caps", account_id, cap))
        for dfsp in self.dfsps:
            for _ in range(2):
                self.op_funds_in(dfsp, major(self.rng.randint(500, 4000)))
        self.check_all(full=True)

    def settle(self) -> None:
        """No more faults: deliver, flush and acknowledge until everything is durable and delivered."""
        self.faults = False
        for _ in range(10):
            for shard in self.shards:
                shard.flush()
                shard.flush()
                self.send_outbox(shard)
            self.step_no += MAX_DELAY_STEPS + 1
            self.deliver_due()
            for shard in self.shards:
                shard.flush()
                shard.flush()
            self.check_all(full=False)
        for shard in self.shards:
            assert not shard.book.outbox, f"shard {shard.shard_id} still owes {list(shard.book.outbox)}"
            assert not shard.waiters and shard.inflight is None
            assert shard.model.live == shard.model.durable, "everything is durable once settled"
            shard.crash()  # a reload of a quiet shard gives the same book
        self.check_all(full=True)

    # --- checks

    def check_all(self, *, full: bool) -> None:
        for shard in self.shards:
            self.check_shard(shard, full=full)
        self.check_conservation()

    def check_shard(self, shard: SimShard, *, full: bool) -> None:
        book = shard.book
        m = shard.model.live
        book.check_invariants()
        where = f"shard {shard.shard_id}"
        reserved: dict[int, int] = defaultdict(int)
        for debit_id, _, amount, _ in m.reservations.values():
            reserved[debit_id] += amount
        assert set(book.accounts) == set(m.values), where
        for account_id, account in book.accounts.items():
            got = (
                account.value_minor,
                account.reserved_minor,
                account.is_active,
                account.net_debit_cap_minor,
            )
            want = (
                m.values[account_id],
                reserved[account_id],
                m.account_active[account_id],
                m.caps[account_id],
            )
            assert got == want, f"{where} account {account_id} {self.info[account_id]}: {got} != model {want}"
        assert {t: r.amount_minor for t, r in book.reservations.items()} == {
            t: r[2] for t, r in m.reservations.items()
        }, where
        assert {
            t: (c.credit_account_id, c.amount_minor, c.currency) for t, c in book.outbox.items()
        } == m.outbox, where
        if full:
            assert {n: p.is_active for n, p in book.participants.items()} == m.participant_active, where
            for transfer_id, state in m.finished.items():
                assert book.transfer_state(transfer_id) is state, f"{where} {transfer_id}"
            assert set(book._credited) == m.credited, where  # the credit dedupe window (no public view)

    def check_conservation(self) -> None:
        """Per currency, across shards: values - open reservations - credits in flight == 0."""
        live_credited = {s.shard_id: s.model.live.credited for s in self.shards}
        durable_credited = {s.shard_id: s.store.credited() for s in self.shards}
        for view, credited in (("live", live_credited), ("durable", durable_credited)):
            totals: dict[str, int] = defaultdict(int)
            for shard in self.shards:
                if view == "live":
                    accounts = shard.book.accounts
                    reservations = shard.book.reservations.values()
                    outbox = shard.book.outbox.values()
                else:
                    accounts = shard.store.accounts
                    reservations = shard.store.reservations.values()
                    outbox = shard.store.outbox.values()
                for account in accounts.values():
                    totals[account.currency] += account.value_minor
                for r in reservations:
                    totals[accounts[r.debit_account_id].currency] -= r.amount_minor
                for c in outbox:
                    if c.transfer_id not in credited[self.owner[c.credit_account_id]]:
                        totals[c.currency] -= c.amount_minor
            assert all(v == 0 for v in totals.values()), f"{view} money not conserved: {dict(totals)}"


@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed={s}" for s in SEEDS])
def test_simulation(seed):
    print(f"RAYLOOP_SIM_SEED={seed}")
    sim = Simulation(seed)
    try:
        sim.setup()
        for _ in range(STEPS):
            sim.step()
        sim.settle()
    except (AssertionError, InvariantViolation) as error:
        raise AssertionError(
            f"simulation failed at step {sim.step_no} (replay: RAYLOOP_SIM_SEED={seed}): {error}"
        ) from error
    # The run exercised what it is meant to exercise.
    assert sim.counts["commit OK"] > 0 and sim.counts["reserve OK"] > 0, (seed, dict(sim.counts))
