"""Seeded simulation of the ledger core across shards, checked against a reference model.

Two or three ``PositionBook`` shards own the participants between them. Random transfers, funds in
and out, net debit cap changes, activations, commits, aborts and expiries run against them with an
injected clock. Credit legs travel between shards over a fake transport that delays, drops and
duplicates messages (the sender retries from its outbox; acknowledgements are not journaled). Every
``drain()`` goes to a fake durable store (the journal, account rows, and the open_reservation and
pending_credit tables as of the last checkpoint) that sometimes fails the write (the same batch is
retried), sometimes commits it but loses the reply (the retry would be fenced out: the shard crashes).
Drains ask for a checkpoint now and then, as the actor's checkpoint loop does, and shards crash at
random, sometimes right after a checkpoint: the book is then rebuilt the way ``actors/store.py`` does,
from the tables plus the journal tail after the checkpoint (``core.recovery.Replay``).

The reference model is plain dicts per shard, kept twice: *live* (every operation the book accepted)
and *durable* (the operations whose journal sequence number reached the store). A crash resets live
to durable, less the owed credits that have a durable CREDIT row somewhere. After every step: the
invariants hold, each book equals its model, the tables plus the journal tail say what the durable
model says is open and owed (and what a replay of the whole journal says), money is conserved across
the shards (live and durable, counting credits in flight), and every answer given to a caller as
durable (the actor answers once ``result.seq`` is durable) is in the durable journal. After every
checkpoint the tables equal memory at its drain.

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
from core.recovery import Replay

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
P_CHECKPOINT = 0.08  # a drain asks for a checkpoint (when the tables lag memory; sometimes regardless)
P_CRASH_AFTER_CHECKPOINT = 0.15  # a shard crashes right after a checkpoint reached the store
CHECKPOINT_MAX_ENTRIES = 150  # a checkpoint is forced once the journal tail is this long
P_DROP = 0.15
P_DUPLICATE = 0.15
MAX_DELAY_STEPS = 6


def major(units: int) -> int:
    return units * MINOR_PER_MAJOR


# ------------------------------------------------------------------ the fake durable store


class FakeDurableStore:
    """What Postgres holds for one shard: the journal, the account and participant rows, and the
    open_reservation and pending_credit tables as of the shard's last checkpoint."""

    def __init__(self, shard_id: int):
        self.shard_id = shard_id
        self.peers: list[FakeDurableStore] = [self]  # every shard's store (CREDIT rows are looked up in all)
        self.last_seq = 0  # shard.last_durable_seq
        self.checkpoint_seq = 0  # shard.checkpoint_seq
        self.participants: dict[str, bool] = {}
        self.accounts: dict[int, Account] = {}
        self.reservations: dict[str, Reservation] = {}  # open_reservation, as of the last checkpoint
        self.credits: dict[str, Credit] = {}  # pending_credit, as of the last checkpoint
        self.journal: list[JournalEntry] = []
        self.kinds: dict[str, set[JournalKind]] = defaultdict(set)

    def write(self, batch: FlushBatch) -> None:
        """One atomic transaction, with the checks the schema and the fence would make."""
        assert not batch.is_empty(), "an empty batch reached the store"
        assert batch.previous_seq == self.last_seq, (
            f"shard {self.shard_id}: fenced out, batch follows {batch.previous_seq}, store at {self.last_seq}"
        )
        entries = batch.entries
        seqs = [e.seq for e in entries]
        assert seqs == list(range(self.last_seq + 1, batch.last_seq + 1)), (
            f"shard {self.shard_id}: journal sequence must grow by one from {self.last_seq} to {batch.last_seq}: {seqs}"
        )
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
        checkpoint = batch.checkpoint
        if checkpoint is not None:
            # A DELETE of a missing row or an INSERT of a present one means the book lost track of its tables.
            for transfer_id in checkpoint.reservations_delete:
                assert self.reservations.pop(transfer_id, None) is not None, f"deleted unknown {transfer_id}"
            for r in checkpoint.reservations_insert:
                assert r.transfer_id not in self.reservations, f"reservation {r.transfer_id} inserted twice"
                self.reservations[r.transfer_id] = Reservation(
                    r.transfer_id, r.debit_account_id, r.credit_account_id, r.amount_minor, r.expires_at_ms,
                    r.reserved_seq,
                )
            for transfer_id in checkpoint.credits_delete:
                assert self.credits.pop(transfer_id, None) is not None, f"deleted unknown credit {transfer_id}"
            for c in checkpoint.credits_insert:
                assert c.transfer_id not in self.credits, f"credit {c.transfer_id} inserted twice"
                self.credits[c.transfer_id] = Credit(c.transfer_id, c.credit_account_id, c.amount_minor, c.currency)
            self.checkpoint_seq = batch.last_seq
        self.last_seq = batch.last_seq

    def tail(self) -> list[JournalEntry]:
        """The journal rows after the checkpoint that recovery folds over the tables."""
        kinds = (JournalKind.RESERVE, *TERMINAL_KINDS)
        return [e for e in self.journal[self.checkpoint_seq:] if e.kind in kinds]  # journal[i].seq == i + 1

    def load(self) -> PositionBook:
        """Rebuild a book as ``actors/store.py`` ``load`` does."""
        book = PositionBook(self.shard_id, last_seq=self.last_seq, dedupe_window=WINDOW)
        for name, is_active in self.participants.items():
            book.load_participant(name, is_active)
        for account_id in sorted(self.accounts):
            book.load_account(_copy_account(self.accounts[account_id]))
        replay = Replay.from_tables(
            [
                Reservation(r.transfer_id, r.debit_account_id, r.credit_account_id, r.amount_minor, r.expires_at_ms,
                            r.reserved_seq)
                for r in sorted(self.reservations.values(), key=lambda r: r.reserved_seq)
            ],
            [Credit(c.transfer_id, c.credit_account_id, c.amount_minor, c.currency) for c in self.credits.values()],
        )
        replay.fold(self.tail(), book)
        owed = replay.owed_credit_ids()
        # SELECT transfer_id FROM journal WHERE kind = CREDIT AND transfer_id = ANY(owed): every shard's journal.
        delivered = {t for t in owed if any(JournalKind.CREDIT in s.kinds.get(t, ()) for s in self.peers)}
        replay.apply(book, delivered)
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

    # --- what the durable state says is in flight, read as the currency_conservation view does

    def open_reservations(self) -> dict[str, tuple[int, int]]:
        """transfer id -> (debit account, amount): the tables, plus the tail's RESERVE rows, minus closed ones."""
        found = {t: (r.debit_account_id, r.amount_minor) for t, r in self.reservations.items()}
        for e in self.tail():
            if e.kind is JournalKind.RESERVE:
                assert e.transfer_id not in found, f"{e.transfer_id}: in the table and reserved in the tail"
                found[e.transfer_id] = (e.account_id, e.amount_minor)
            else:
                found.pop(e.transfer_id, None)
        return found

    def owed_credits(self, credited: set[str]) -> dict[str, tuple[int, int, str]]:
        """transfer id -> (credit account, amount, currency): owed to other shards, without a CREDIT row."""
        owed = {t: (c.credit_account_id, c.amount_minor, c.currency) for t, c in self.credits.items()}
        for e in self.tail():
            if e.kind is JournalKind.COMMIT and e.counter_account_id not in self.accounts:
                owed[e.transfer_id] = (e.counter_account_id, e.amount_minor, self.accounts[e.account_id].currency)
        return {t: c for t, c in owed.items() if t not in credited}

    def from_the_whole_journal(self, credited: set[str]) -> tuple[dict, dict]:
        """The same two, ignoring the tables: what a replay of the whole journal says."""
        reservations: dict[str, tuple[int, int]] = {}
        owed: dict[str, tuple[int, int, str]] = {}
        for e in self.journal:
            if e.kind is JournalKind.RESERVE:
                reservations[e.transfer_id] = (e.account_id, e.amount_minor)
            elif e.kind in TERMINAL_KINDS:
                del reservations[e.transfer_id]
                if e.kind is JournalKind.COMMIT and e.counter_account_id not in self.accounts:
                    owed[e.transfer_id] = (e.counter_account_id, e.amount_minor, self.accounts[e.account_id].currency)
        return reservations, {t: c for t, c in owed.items() if t not in credited}


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

    def acknowledged(self, transfer_id: str) -> None:
        """The owning shard made the credit durable: owed no more, live or durable (acks are not journaled)."""
        effect_ack(transfer_id)(self.live)
        assert transfer_id in self.durable.outbox, f"{transfer_id} acknowledged before its commit was durable"
        effect_ack(transfer_id)(self.durable)

    def crash(self, delivered: set[str]) -> None:
        """Back to what is durable; owed credits with a durable CREDIT row anywhere are delivered."""
        for transfer_id in [t for t in self.durable.outbox if t in delivered]:
            effect_ack(transfer_id)(self.durable)
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
        # The batch handed over and not yet written, with the tables it must leave (checkpoints only).
        self.inflight: tuple[FlushBatch, tuple[set[str], set[str]] | None] | None = None
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

    def wants_checkpoint(self) -> bool:
        """As the actor's checkpoint loop: now and then when the tables lag memory, or when the tail is long."""
        rng = self.sim.rng
        if self.book.seq - self.store.checkpoint_seq >= CHECKPOINT_MAX_ENTRIES:
            return True
        return rng.random() < P_CHECKPOINT and (self.book.checkpoint_pending() or rng.random() < 0.3)

    def flush(self, *, checkpoint: bool | None = None) -> None:
        if self.inflight is None:
            if checkpoint is None:
                checkpoint = self.wants_checkpoint()
            batch = self.book.drain(checkpoint=checkpoint)
            if batch.is_empty():
                assert not (batch.accounts or batch.participants), f"a change without a journal entry: {batch}"
                return
            # What the tables must hold once this checkpoint is written: memory as it is now.
            tables = (set(self.book.reservations), set(self.book.outbox)) if checkpoint else None
            self.inflight = (batch, tables)
        roll = self.sim.rng.random() if self.sim.faults else 1.0
        if roll < P_WRITE_FAILS:
            return  # nothing written; the same batch is retried on the next flush
        (batch, tables), self.inflight = self.inflight, None
        self.store.write(batch)
        self.model.durable_up_to(batch.last_seq)
        if batch.checkpoint is not None:
            self.sim.counts["checkpoint"] += 1
            assert (set(self.store.reservations), set(self.store.credits)) == tables, (
                f"shard {self.shard_id}: the tables after a checkpoint differ from memory at its drain"
            )
        if roll < P_WRITE_FAILS + P_REPLY_LOST:
            self.crash()  # committed, but the retry would be fenced out
            return
        if batch.checkpoint is not None and self.sim.faults and self.sim.rng.random() < P_CRASH_AFTER_CHECKPOINT:
            self.sim.counts["crash right after a checkpoint"] += 1
            self.crash()
            return
        ready = [w for w in self.waiters if w.seq <= batch.last_seq]
        self.waiters = [w for w in self.waiters if w.seq > batch.last_seq]
        for waiter in ready:
            self._answer(waiter)

    def crash(self) -> None:
        """Discard the book and rebuild it from the store, as a restarted actor does."""
        store = self.store
        tail = store.tail()
        self.sim.counts["crash with a journal tail" if tail else "crash with no tail"] += 1
        if store.reservations or store.credits:
            self.sim.counts["crash with table rows"] += 1
        if any(e.kind is JournalKind.COMMIT for e in tail) and (store.reservations or store.credits):
            self.sim.counts["crash with table rows and commits after them"] += 1
        self.book = store.load()
        self.inflight = None
        self.waiters.clear()  # callers waiting on this incarnation get an error: unknown outcome
        self.model.crash(self.sim.durably_credited())
        self.sim.crashes += 1
        self.sim.check_shard(self, full=True)
        self.sim.check_durable(self)
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
        for store in stores:
            store.peers = stores
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
        seq = shard.book.seq
        dropped = shard.book.ack_credits([transfer_id])
        assert dropped == int(expected), f"ack of {transfer_id}: dropped {dropped}, in outbox {expected}"
        assert shard.book.seq == seq, "an acknowledgement was journaled"
        if dropped:
            shard.model.acknowledged(transfer_id)
        self.counts[f"ack {'dropped' if dropped else 'ignored'}"] += 1

    def send_outbox(self, shard: SimShard) -> None:
        # Only credits whose commit is durable may leave the shard.
        for transfer_id, credit in list(shard.book.outbox.items()):
            if JournalKind.COMMIT in shard.store.kinds.get(transfer_id, ()):
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
            shard.flush(checkpoint=True)  # the final checkpoint of a clean stop
            store = shard.store
            assert shard.inflight is None and store.checkpoint_seq == store.last_seq == shard.book.seq
            assert not shard.book.checkpoint_pending()
            assert set(store.reservations) == set(shard.book.reservations) and not store.credits
            assert store.tail() == []
            shard.crash()  # a reload of a quiet shard, from the tables alone, gives the same book
            assert not shard.book.checkpoint_pending()
        self.check_all(full=True)

    # --- checks

    def check_all(self, *, full: bool) -> None:
        for shard in self.shards:
            self.check_shard(shard, full=full)
            self.check_durable(shard, full=full)
        self.check_conservation()

    def durably_credited(self) -> set[str]:
        """Transfer ids with a CREDIT row in some shard's durable journal."""
        return set().union(*(s.store.credited() for s in self.shards))

    def check_durable(self, shard: SimShard, *, full: bool = True) -> None:
        """The tables plus the journal tail say what the durable model says is open and owed."""
        store, m = shard.store, shard.model.durable
        where = f"shard {shard.shard_id} durable"
        credited = self.durably_credited()
        reservations = {t: (r[0], r[2]) for t, r in m.reservations.items()}
        owed = {t: c for t, c in m.outbox.items() if t not in credited}
        assert store.open_reservations() == reservations, where
        assert store.owed_credits(credited) == owed, where
        if full:
            assert store.from_the_whole_journal(credited) == (reservations, owed), f"{where}: tables and journal"

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
        durable_credited = self.durably_credited()
        for view in ("live", "durable"):
            totals: dict[str, int] = defaultdict(int)
            for shard in self.shards:
                if view == "live":
                    accounts = shard.book.accounts
                    reservations = [(r.debit_account_id, r.amount_minor) for r in shard.book.reservations.values()]
                    outbox = [
                        (c.currency, c.amount_minor)
                        for c in shard.book.outbox.values()
                        # applied there already: in its values, not in flight
                        if c.transfer_id not in self.shards[self.owner[c.credit_account_id]].model.live.credited
                    ]
                else:  # what the currency_conservation view reads: rows, tables and journal tail
                    accounts = shard.store.accounts
                    reservations = list(shard.store.open_reservations().values())
                    outbox = [(c, a) for _, a, c in shard.store.owed_credits(durable_credited).values()]
                for account in accounts.values():
                    totals[account.currency] += account.value_minor
                for debit_id, amount in reservations:
                    totals[accounts[debit_id].currency] -= amount
                for currency, amount in outbox:
                    totals[currency] -= amount
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
    assert sim.counts["checkpoint"] > 0 and sim.crashes > 0, (seed, dict(sim.counts))
