"""PositionShard: the actor that owns the positions of one shard of participants.

Contract
--------
* **Owns**: for every participant assigned to this shard (``participant.shard_id``), its accounts'
  values, reservations and net debit caps, its active flags, the open reservations that debit them,
  and the credit legs it owes other shards (the outbox). Nothing else writes those columns.
* **Ordering**: commands are applied one at a time, in the order the calls arrive, by the
  synchronous ``PositionBook``; there is no ``await`` between a check and the change it guards.
* **Durability**: every change gets the next journal sequence number. A flush loop writes whatever
  accumulated while the previous flush ran (group commit) in one transaction, fenced on the shard's
  last durable sequence number. A ``CommandBatch`` with ``wait_durable`` is answered only after
  every change it made is durable, and after the credit legs its commits owe other shards are
  durable there (or, past ``credit_wait_timeout_ms``, still durable in our outbox and being delivered).
* **Rebuilt state**: on (re)start the book is loaded from Postgres: accounts, open reservations,
  outbox, and the newest ``dedupe_window`` finished transfers and applied credits, then the
  invariants are checked before the first command is served.
* **Failure**: an invariant violation, a fenced-out flush or a flush that keeps failing ends the
  process; Ray restarts it (``max_restarts=-1``) and it rebuilds from Postgres. Changes not yet
  durable are lost, but no caller was told they were: callers treat an actor error as an unknown
  outcome and retry with the same transfer ids, which the book deduplicates.
* **Bounds**: at most ``max_unflushed_changes`` changes wait for a flush; beyond that calls wait up
  to ``backpressure_timeout_ms`` and then fail with ``Overloaded``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
import warnings
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg

from actors.store import FencedOut, ShardStore
from cluster import metrics
from cluster.db import skip_session_reset
from core.ledger import (
    Account,
    Check,
    Credit,
    InvariantViolation,
    Outcome,
    PositionBook,
    Result,
    TransferState,
)
from core.money import format_amount
from core.transfers import Decision, TransferDesk, TransferRecord, Verdict
from protos import ledger_pb2 as pb

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ShardSettings:
    """Every bound and timeout of a shard, in one place (set from RAYLOOP_* variables)."""

    dsn: str
    dedupe_window: int = 200_000
    max_unflushed_changes: int = 50_000
    backpressure_timeout_ms: int = 5_000
    expiry_tick_ms: int = 50
    flush_retry_max: int = 20
    flush_retry_backoff_ms: int = 50
    credit_retry_ms: int = 250
    credit_batch_max: int = 2_000
    # How long a batch's reply waits for the credit legs its commits owe other shards (0: not at all; the
    # delivery goes on in the background and the outbox retries it), and how long one delivery may take.
    credit_wait_timeout_ms: int = 2_000
    credit_delivery_timeout_ms: int = 5_000
    events_max: int = 100_000
    pool_size: int = 2
    flush_latency_samples: int = 256
    checkpoint_interval_ms: int = 1_000  # how often open reservations and owed credits reach their tables
    checkpoint_max_entries: int = 100_000  # journal rows after a checkpoint: bounds the replay at recovery
    hub_name: str = "Hub"  # FSPIOP-Source of the expiry callbacks this shard sends
    metrics_participants_max: int = 500  # participant label values per process (docs/METRICS.md)


class Overloaded(RuntimeError):
    """Too many changes wait for Postgres; the caller answers 2005 (server busy)."""


PeerCall = Callable[[int, bytes], Awaitable[bytes]]


class PositionShard:
    def __init__(
        self,
        shard_id: int,
        settings: ShardSettings,
        *,
        call_peer: PeerCall | None = None,
        local_peer: Callable[[int], PositionShard | None] | None = None,
        clock_ms: Callable[[], int] | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ):
        self.shard_id = shard_id
        self.settings = settings
        self._call_peer = call_peer
        # A peer shard in this same process (hosted by the same ingress worker), or None: its credit legs
        # are handed over as messages, not serialized and parsed on both sides.
        self._local_peer = local_peer
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._on_fatal = on_fatal or _exit_process
        self._started: asyncio.Task | None = None
        self.book: PositionBook | None = None
        self.desk: TransferDesk | None = None
        self.notifier = None  # api.fspiop.transfers.TransferNotifier, for expiry callbacks
        self._expired_decisions: deque[Decision] = deque()
        self._pool: asyncpg.Pool | None = None
        self._store: ShardStore | None = None
        self._durable_seq = 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()
        self._changed: asyncio.Event | None = None
        self._flushed: asyncio.Event | None = None
        self._account_shard: dict[int, int] = {}
        self._delivering: set[str] = set()
        self._deliveries: set[asyncio.Task] = set()  # credit deliveries a reply stopped waiting for
        self._expired_pending: deque[tuple[int, str]] = deque()
        self.events: deque[tuple[int, str, str]] = deque(maxlen=settings.events_max)
        self._flush_ms: deque[float] = deque(maxlen=settings.flush_latency_samples)
        self._flushes = 0
        self._waiting_calls = 0
        self._checkpoint_seq = 0
        self._last_checkpoint = time.monotonic()
        self._checkpoint_due = False
        self._stopping = False  # set by stop(): background tasks ending then is expected
        self._tasks: list[asyncio.Task] = []
        # Metric children looked up once: the hot path only observes (cluster/metrics.py, docs/METRICS.md).
        shard_label = str(shard_id)
        self._batch_commands = metrics.SHARD_BATCH_COMMANDS.labels(shard_label)
        self._flush_seconds = metrics.SHARD_FLUSH_SECONDS.labels(shard_label)
        self._flush_changes = metrics.SHARD_FLUSH_CHANGES.labels(shard_label)
        self._durable_lag = metrics.SHARD_DURABLE_LAG_SECONDS.labels(shard_label)
        self._gauge_keys: list[str] = []

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        started = self._started
        if started is None or (started.done() and (started.cancelled() or started.exception() is not None)):
            # A failed rebuild (Postgres away, say) is tried again by the next call, not remembered forever:
            # a hosted shard's process is its ingress worker's, which lives on meanwhile.
            self._started = asyncio.ensure_future(self._start())
        await asyncio.shield(self._started)

    async def _start(self) -> None:
        try:
            await self._rebuild()
        except BaseException:
            if self._pool is not None:
                self._pool.terminate()
                self._pool = None
            raise

    async def _rebuild(self) -> None:
        self._changed = asyncio.Event()
        self._flushed = asyncio.Event()
        self._pool = await asyncpg.create_pool(
            self.settings.dsn, min_size=1, max_size=self.settings.pool_size, command_timeout=60,
            # asyncpg prepares every statement; after five runs Postgres may switch to a generic plan
            # chosen when the tables were small (a hash join over all of `transfer`), whose cost then
            # grows with the table. Custom plans see the real sizes: index lookups, flat flush times.
            server_settings={"plan_cache_mode": "force_custom_plan"},
            # Neither the shard nor its notifier's endpoint directory (which shares this pool) sets
            # session state, so a release need not cost a reset round trip. Keep it that way.
            reset=skip_session_reset,
        )
        self._store = ShardStore(self._pool, self.shard_id)
        self.book = await self._store.load(dedupe_window=self.settings.dedupe_window)
        self.desk = TransferDesk(self.book, window=self.settings.dedupe_window)
        await self._store.load_transfers(self.desk, window=self.settings.dedupe_window)
        self.notifier = await self._make_notifier()
        self._register_metrics()
        self._durable_seq = self.book.seq
        self._checkpoint_seq = self._store.checkpoint_seq
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._flush_loop(), name=f"shard{self.shard_id}-flush"),
            loop.create_task(_resilient(self._expiry_tick, self.settings.expiry_tick_ms), name="expiry"),
            loop.create_task(_resilient(self._outbox_round, self.settings.credit_retry_ms), name="outbox"),
            loop.create_task(_resilient(self._checkpoint_tick, self.settings.checkpoint_interval_ms),
                             name="checkpoint"),
        ]
        for task in self._tasks:
            # A loop that ends while the shard runs would leave it half alive: stop the process instead.
            task.add_done_callback(self._loop_ended)
        log.info(
            "shard %s ready: %d participants, %d accounts, %d open reservations, %d credits owed, seq %d",
            self.shard_id, len(self.book.participants), len(self.book.accounts), len(self.book.reservations),
            len(self.book.outbox), self.book.seq,
        )

    async def stop(self) -> None:
        """Flush what is pending, then stop the loops and close the pool."""
        if self._started is None:
            return
        await self._started
        self._stopping = True
        # A final checkpoint: the next start replays no journal tail.
        self._checkpoint_due = True
        self._changed.set()
        await self._wait_checkpointed()
        for task in (*self._tasks, *self._deliveries):
            task.cancel()  # a credit still being delivered stays owed (checkpointed) and is re-sent after a start
        await asyncio.gather(*self._tasks, *self._deliveries, return_exceptions=True)
        if self.notifier is not None:
            await self.notifier.close()
        for key in self._gauge_keys:
            metrics.LIVE.unregister(key)  # a stopped shard's queues are not the process's any more
        await self._pool.close()

    def _register_metrics(self) -> None:
        """Gauges read at scrape time: the shard's queues cost nothing until someone looks."""
        metrics.configure(participants_max=self.settings.metrics_participants_max)
        label = str(self.shard_id)
        gauges = (
            ("rayloop_shard_unflushed_changes", "Changes applied in memory and not yet durable (write-behind queue)",
             lambda: self.book.seq - self._durable_seq),
            ("rayloop_shard_waiting_calls", "Calls waiting for their changes to become durable",
             lambda: self._waiting_calls),
            ("rayloop_shard_open_reservations", "Reservations open on the shard (transfers in flight)",
             lambda: len(self.book.reservations)),
            ("rayloop_shard_credits_pending", "Credit legs owed to other shards, not yet acknowledged",
             lambda: len(self.book.outbox)),
        )
        self._gauge_keys = [f"{name}:{label}" for name, _, _ in gauges]
        for key, (name, documentation, read) in zip(self._gauge_keys, gauges, strict=True):
            metrics.LIVE.register(key, name, documentation, ["shard"], lambda read=read: [((label,), read())])

    async def _make_notifier(self):
        """Expiry callbacks leave from the shard that decides them (imported late: api depends on us)."""
        from api.fspiop.transfers import TransferNotifier

        return await TransferNotifier.create(self._pool, hub_name=self.settings.hub_name)

    # ------------------------------------------------------------------ commands

    async def execute(self, payload: bytes) -> bytes:
        """Apply a serialized ``CommandBatch``; return a serialized ``BatchResult`` (calls from other processes)."""
        batch = pb.CommandBatch.FromString(payload)
        reply = await self.execute_commands(batch.commands, wait_durable=batch.wait_durable)
        return reply.SerializeToString()

    async def execute_commands(self, commands: Sequence[pb.Command], *, wait_durable: bool) -> pb.BatchResult:
        """Apply commands as one batch: the in-process path (an ingress worker calling a shard it hosts),
        with nothing serialized and the commands not copied into a ``CommandBatch``."""
        await self.start()
        await self._admit()
        self._batch_commands.observe(len(commands))
        ops = [command.WhichOneof("op") for command in commands]  # one pass, reused below
        # Prefetch phase: I/O happens before the apply loop, never between a check and its update.
        loads = [c.load_account.account_id for c, op in zip(commands, ops, strict=True) if op == "load_account"]
        loaded = await self._fetch_accounts(loads) if loads else {}
        foreign = await self._prefetch_transfers(commands, ops)
        book = self.book
        now_ms = self._clock_ms()
        reply = pb.BatchResult()
        results = reply.results
        credits: list[Credit] = []
        max_seq = 0
        for command, op in zip(commands, ops, strict=True):
            try:
                if op == "prepare_transfer" and command.prepare_transfer.transfer_id in foreign:
                    # The id belongs to another payer's transfer: ids are unique across the hub.
                    result = Decision(Verdict.MODIFIED, None, 0, 3106, "Modified request - transfer ID already used")
                else:
                    result = self._apply(book, command, op, now_ms, loaded)
            except InvariantViolation as error:
                # Earlier commands of this batch are applied and would be flushed without anyone
                # knowing their outcome: stop here, restart, rebuild from what is durable.
                self._fatal(f"invariant violated applying {op}: {error}")
            if result.credit is not None:
                credits.append(result.credit)
            if result.seq > max_seq:
                max_seq = result.seq
            if isinstance(result, Decision):
                _add_decision(reply, result)
            elif result.state is None:
                results.add(outcome=result.outcome, seq=result.seq)
            else:
                results.add(outcome=result.outcome, seq=result.seq, state=result.state)
        if max_seq:
            self._changed.set()
        if wait_durable:
            if max_seq:
                await self._wait_durable(max_seq)
            if credits:
                reply.credits_pending = await self._credits_within_wait(credits)
        reply.durable_seq = self._durable_seq
        return reply

    def _apply(self, book: PositionBook, command: pb.Command, op: str, now_ms: int, loaded: dict) -> Result:
        if op == "reserve":
            r = command.reserve
            result = book.reserve(
                r.transfer_id, r.debit_account_id, r.credit_account_id, int(r.amount_minor), now_ms,
                check=Check(r.check), expires_at_ms=r.expires_at_ms or None,
            )
            if r.commit_now and result.outcome is Outcome.OK:
                result = book.commit(r.transfer_id, now_ms)
            return result
        if op == "commit":
            return book.commit(command.commit.transfer_id, now_ms)
        if op == "abort":
            return book.abort(command.abort.transfer_id, now_ms, command.abort.reason)
        if op == "credit":
            c = command.credit
            return book.apply_credit(
                Credit(c.transfer_id, c.credit_account_id, int(c.amount_minor), c.currency), now_ms
            )
        if op == "set_net_debit_cap":
            return book.set_net_debit_cap(command.set_net_debit_cap.account_id,
                                          int(command.set_net_debit_cap.cap_minor), now_ms)
        if op == "set_account_active":
            return book.set_account_active(command.set_account_active.account_id,
                                           command.set_account_active.is_active, now_ms)
        if op == "set_participant_active":
            return book.set_participant_active(command.set_participant_active.participant,
                                               command.set_participant_active.is_active, now_ms)
        if op == "prepare_transfer":
            p = command.prepare_transfer
            return self.desk.prepare(TransferRecord(
                transfer_id=p.transfer_id, payer=p.payer, payee=p.payee, currency=p.currency,
                amount_minor=int(p.amount_minor), condition=p.condition, expires_at_ms=p.expires_at_ms,
                prepare_hash=p.prepare_hash, payer_account_id=p.payer_account_id, payee_account_id=p.payee_account_id,
                created_ms=now_ms, version=p.version or "1.1", prepare_request_id=p.request_id,
            ), now_ms)
        if op == "fulfil_transfer":
            f = command.fulfil_transfer
            return self.desk.fulfil(
                f.transfer_id, fulfilment=f.fulfilment, fulfil_hash=f.fulfil_hash, completed_ms=f.completed_ms or None,
                reserved_mode=f.reserved_mode, source=f.source, destination=f.destination, now_ms=now_ms,
                request_id=f.request_id,
            )
        if op == "reject_transfer":
            r = command.reject_transfer
            return self.desk.reject(r.transfer_id, source=r.source, error_code=r.error_code,
                                    description=r.description, now_ms=now_ms)
        if op == "get_transfer":
            found = self.desk.get(command.get_transfer.transfer_id)
            if found is None:
                return Decision(Verdict.UNKNOWN, None, 0, 3208, "Transfer ID not found")
            return Decision(Verdict.RESEND, found[0], found[1])
        if op == "load_account":
            found = loaded.get(command.load_account.account_id)
            if found is None:
                return Result(Outcome.UNKNOWN_ACCOUNT)
            name, participant_active, account = found
            book.add_participant(name, participant_active)
            book.add_account(account)
            return Result(Outcome.OK)
        raise InvariantViolation(f"unknown command {op!r}")

    async def _prefetch_transfers(self, commands, ops: list[str]) -> set[str]:
        """Before the apply loop, ask Postgres about transfer ids the desk does not know.

        New prepares always: an id another shard's payer already used must be refused (3106), not
        reserved a second time. Other commands only once the desk has forgotten transfers (its
        window overflowed, or it restarted with more than the window). Returns the foreign ids.
        """
        wanted = []
        asked = 0
        for command, op in zip(commands, ops, strict=True):
            asked += op in _TRANSFER_OPS
            if op == "prepare_transfer" or (
                not self.desk.complete and op in ("fulfil_transfer", "reject_transfer", "get_transfer")
            ):
                transfer_id = getattr(command, op).transfer_id
                if not self.desk.knows(transfer_id):
                    wanted.append(transfer_id)
        foreign: set[str] = set()
        # Hits: transfer commands the desk answered from memory; misses: ids looked up in Postgres.
        if asked:
            metrics.TRANSFER_PREFETCH_HIT.inc(asked - len(wanted))
            metrics.TRANSFER_PREFETCH_MISS.inc(len(wanted))
        if not wanted:
            return foreign
        for record in await self._store.fetch_transfers(wanted):
            if record.payer not in self.book.participants:
                foreign.add(record.transfer_id)
            elif not self.desk.knows(record.transfer_id) and record.state is not TransferState.RESERVED:
                self.desk.load(record)
        return foreign

    async def _fetch_accounts(self, account_ids: list[int]) -> dict[int, tuple[str, bool, Account]]:
        found = {}
        for account_id in account_ids:
            if account_id in self.book.accounts:
                account = self.book.accounts[account_id]
                found[account_id] = (account.participant, self.book.participants[account.participant].is_active,
                                     account)
                continue
            row = await self._store.load_account(account_id)
            if row is not None:
                found[account_id] = row
        return found

    async def _admit(self) -> None:
        """Backpressure: wait while too many changes are not yet durable."""
        limit = self.settings.max_unflushed_changes
        if self.book.seq - self._durable_seq <= limit:
            return
        deadline = time.monotonic() + self.settings.backpressure_timeout_ms / 1000
        while self.book.seq - self._durable_seq > limit:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Overloaded(f"shard {self.shard_id}: {self.book.seq - self._durable_seq} changes unflushed")
            self._flushed.clear()
            try:
                await asyncio.wait_for(self._flushed.wait(), remaining)
            except TimeoutError:
                pass

    # ------------------------------------------------------------------ durability

    async def _wait_durable(self, seq: int) -> None:
        if seq <= self._durable_seq:
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((seq, future))
        self._waiting_calls += 1
        try:
            await future
        finally:
            self._waiting_calls -= 1

    async def _wait_checkpointed(self) -> None:
        while self._checkpoint_due or self._durable_seq < self.book.seq:
            self._flushed.clear()
            self._changed.set()
            await self._flushed.wait()

    def _loop_ended(self, task: asyncio.Task) -> None:
        if task.cancelled() or self._stopping:
            return
        self._on_fatal(f"background task {task.get_name()} ended: {task.exception()!r}")

    async def _checkpoint_tick(self) -> None:
        if self.book.checkpoint_pending():
            self._checkpoint_due = True
            self._changed.set()

    async def _flush_loop(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            checkpoint = self._checkpoint_due or (
                self.book.seq - self._checkpoint_seq >= self.settings.checkpoint_max_entries
            )
            self._checkpoint_due = False
            batch = self.book.drain(checkpoint=checkpoint)
            batch.transfer_inserts, batch.transfer_updates = self.desk.drain()
            if batch.is_empty():
                self._flushed.set()
                continue
            started = time.perf_counter()
            await self._write(batch)
            flush_s = time.perf_counter() - started
            self._flush_ms.append(flush_s * 1000)
            self._flush_seconds.observe(flush_s)
            if batch.entries:
                self._flush_changes.observe(len(batch.entries))
                # Entries are in journal order: the first waited longest for this flush (same clock as at_ms).
                self._durable_lag.observe(max(0, self._clock_ms() - batch.entries[0].at_ms) / 1000)
            self._flushes += 1
            self._durable_seq = batch.last_seq
            if checkpoint:
                self._checkpoint_seq = batch.last_seq
                self._last_checkpoint = time.monotonic()
            waiters = self._waiters
            while waiters and waiters[0][0] <= self._durable_seq:
                _, future = waiters.popleft()
                if not future.done():
                    future.set_result(None)
            expired = self._expired_pending
            while expired and expired[0][0] <= self._durable_seq:
                seq, transfer_id = expired.popleft()
                self.events.append((seq, transfer_id, Outcome.EXPIRED.value))
            decisions = self._expired_decisions
            while decisions and decisions[0].seq <= self._durable_seq:
                # Only now, with the abort durable, may the DFSPs hear of it.
                record = decisions.popleft().record
                asyncio.get_running_loop().create_task(self.notifier.expired(record))
            self._flushed.set()

    async def _write(self, batch) -> None:
        backoff_ms = self.settings.flush_retry_backoff_ms
        for attempt in range(1, self.settings.flush_retry_max + 1):
            try:
                await self._store.flush(batch)
                return
            except FencedOut as error:
                self._fatal(str(error))
            except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, TimeoutError) as error:
                # Transient (Postgres restarting, connection dropped): the batch is self-contained,
                # so writing it again is safe; the fence rejects it if the first try did commit.
                log.warning("shard %s flush attempt %d failed: %r", self.shard_id, attempt, error)
                await asyncio.sleep(min(backoff_ms, 2_000) / 1000)
                backoff_ms *= 2
            except asyncpg.PostgresError as error:
                self._fatal(f"flush rejected by Postgres: {error!r}")
        self._fatal(f"flush failed {self.settings.flush_retry_max} times")

    def _fatal(self, reason: str) -> None:
        log.critical("shard %s stopping: %s", self.shard_id, reason)
        self._on_fatal(reason)
        raise InvariantViolation(reason)

    # ------------------------------------------------------------------ expiry

    async def _expiry_tick(self) -> None:
        now_ms = self._clock_ms()
        # Transfers get callbacks once the abort is durable; other reservations only an event.
        decisions, expired = self.desk.expire(now_ms)
        for decision in decisions:
            self._expired_pending.append((decision.seq, decision.record.transfer_id))
            self._expired_decisions.append(decision)
        for transfer_id, result in expired:
            self._expired_pending.append((result.seq, transfer_id))
        if decisions or expired:
            self._changed.set()

    async def wait_events(self, after_seq: int, timeout_ms: int = 1_000, max_events: int = 1_000) -> list:
        """Durable expiry events with journal seq above ``after_seq`` (for the notification layer)."""
        await self.start()
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            found = [e for e in self.events if e[0] > after_seq][:max_events]
            if found or time.monotonic() >= deadline:
                return found
            self._flushed.clear()
            try:
                await asyncio.wait_for(self._flushed.wait(), deadline - time.monotonic())
            except TimeoutError:
                pass

    # ------------------------------------------------------------------ credits owed to other shards

    async def _credits_within_wait(self, credits: list[Credit]) -> int:
        """Deliver credit legs, waiting up to ``credit_wait_timeout_ms``; returns how many are not yet acked.

        A delivery the wait gives up on is not cancelled: it finishes in the background (its credits stay
        in ``_delivering`` meanwhile, so the outbox round does not send them twice)."""
        credits = self._claim(credits)
        delivery = asyncio.ensure_future(
            self._deliver_claimed(credits, timeout_ms=self.settings.credit_delivery_timeout_ms)
        )
        wait_ms = self.settings.credit_wait_timeout_ms
        if wait_ms > 0:
            await asyncio.wait((delivery,), timeout=wait_ms / 1000)
        if delivery.done():
            return delivery.result()
        self._deliveries.add(delivery)
        delivery.add_done_callback(self._delivery_done)
        return len(credits)

    def _delivery_done(self, delivery: asyncio.Task) -> None:
        self._deliveries.discard(delivery)
        if not delivery.cancelled() and delivery.exception() is not None:
            # The credits stay in the outbox: the next round re-sends them.
            log.warning("shard %s: background credit delivery failed: %r", self.shard_id, delivery.exception())

    async def _outbox_round(self) -> None:
        """Re-send owed credit legs. Errors (a peer or Postgres away) leave them owed for the next round."""
        if not self.book.outbox:
            return
        # Only credits whose commit is durable may leave: take the list now, then wait until
        # everything in memory now is durable. Commits made during the wait go in the next round.
        due = [c for t, c in self.book.outbox.items() if t not in self._delivering]
        await self._wait_durable(self.book.seq)
        due = [c for c in due if c.transfer_id in self.book.outbox]
        if due:
            await self._deliver_credits(due[: self.settings.credit_batch_max],
                                        timeout_ms=self.settings.credit_delivery_timeout_ms)

    async def _deliver_credits(self, credits: list[Credit], *, timeout_ms: int) -> int:
        """Send credit legs to their shards; returns how many are still unacknowledged."""
        return await self._deliver_claimed(self._claim(credits), timeout_ms=timeout_ms)

    def _claim(self, credits: list[Credit]) -> list[Credit]:
        """The credits no other delivery is sending now, marked as being sent (synchronously, so two
        deliveries never send the same credit at once)."""
        credits = [c for c in credits if c.transfer_id not in self._delivering]
        self._delivering.update(c.transfer_id for c in credits)
        return credits

    async def _deliver_claimed(self, credits: list[Credit], *, timeout_ms: int) -> int:
        try:
            by_shard: dict[int, list[Credit]] = {}
            try:
                targets = await self._shards_of([c.credit_account_id for c in credits])
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
                log.warning("shard %s: cannot route credits now: %r", self.shard_id, error)
                return len(credits)  # still owed; retried by the outbox round
            for credit in credits:
                shard = targets.get(credit.credit_account_id)
                if shard is not None:
                    by_shard.setdefault(shard, []).append(credit)
            results = await asyncio.gather(
                *(self._send_credits(shard, group, timeout_ms) for shard, group in by_shard.items()),
                return_exceptions=True,
            )
            acked: list[str] = []
            for outcome in results:
                if isinstance(outcome, BaseException):
                    log.warning("shard %s: credit delivery failed: %r", self.shard_id, outcome)
                else:
                    acked.extend(outcome)
            if acked:
                self.book.ack_credits(acked)
            return len(credits) - len(acked)
        finally:
            self._delivering.difference_update(c.transfer_id for c in credits)

    async def _send_credits(self, shard: int, credits: list[Credit], timeout_ms: int) -> list[str]:
        batch = pb.CommandBatch(wait_durable=True)
        for c in credits:
            batch.commands.add().credit.CopyFrom(
                pb.CreditLeg(transfer_id=c.transfer_id, credit_account_id=c.credit_account_id,
                             amount_minor=str(c.amount_minor), currency=c.currency)
            )
        peer = self._local_peer(shard) if self._local_peer is not None and shard != self.shard_id else None
        if shard == self.shard_id:
            # An account created on this shard after the commit: load it, then apply here.
            for c in credits:
                batch.commands.add().load_account.account_id = c.credit_account_id
            reply = pb.BatchResult.FromString(await self.execute(_loads_first(batch)))
        elif peer is not None:
            reply = await asyncio.wait_for(peer.execute_commands(batch.commands, wait_durable=True),
                                           timeout_ms / 1000)
        else:
            if self._call_peer is None:
                raise RuntimeError("no peer transport configured")
            reply = pb.BatchResult.FromString(
                await asyncio.wait_for(self._call_peer(shard, batch.SerializeToString()), timeout_ms / 1000))
        ok = (Outcome.OK.value, Outcome.DUPLICATE.value)
        results = reply.results[-len(credits):] if shard == self.shard_id else reply.results
        acked = [c.transfer_id for c, r in zip(credits, results, strict=True) if r.outcome in ok]
        for c, r in zip(credits, results, strict=True):
            if r.outcome not in ok:
                log.error("shard %s: credit %s refused by shard %s: %s", self.shard_id, c.transfer_id, shard,
                          r.outcome)
        return acked

    async def _shards_of(self, account_ids: list[int]) -> dict[int, int]:
        missing = [a for a in set(account_ids) if a not in self._account_shard]
        if missing:
            rows = await self._pool.fetch(
                "SELECT a.account_id, p.shard_id FROM account a JOIN participant p USING (participant_id)"
                " WHERE a.account_id = ANY($1::integer[])",
                missing,
            )
            for row in rows:
                self._account_shard[row["account_id"]] = row["shard_id"]
        return {a: self._account_shard[a] for a in account_ids if a in self._account_shard}

    # ------------------------------------------------------------------ ops

    async def describe(self, participant: str | None = None) -> dict:
        """The live state ops ask for: the shard, and one participant or all of them."""
        await self.start()
        book = self.book
        in_flight: dict[int, int] = {}
        for reservation in book.reservations.values():
            in_flight[reservation.debit_account_id] = in_flight.get(reservation.debit_account_id, 0) + 1
        names = [participant] if participant is not None else sorted(book.participants)
        participants = []
        for name in names:
            if name not in book.participants:
                continue
            accounts = [
                {
                    "account_id": a.account_id,
                    "currency": a.currency,
                    "ledger_account_type": str(a.account_type),
                    "value": format_amount(a.value_minor),
                    "reserved_value": format_amount(a.reserved_minor),
                    "net_debit_cap": "" if a.net_debit_cap_minor is None else format_amount(a.net_debit_cap_minor),
                    "is_active": a.is_active,
                    "in_flight": in_flight.get(a.account_id, 0),
                }
                for a in sorted(book.accounts.values(), key=lambda a: a.account_id)
                if a.participant == name
            ]
            participants.append(
                {"name": name, "is_active": book.participants[name].is_active, "shard_id": self.shard_id,
                 "accounts": accounts}
            )
        return {"shard": self._shard_state(), "participants": participants}

    def _shard_state(self) -> dict:
        samples = sorted(self._flush_ms)
        runtime = _ray_runtime()
        return {
            "shard_id": self.shard_id,
            **runtime,
            "pid": os.getpid(),
            "participants": len(self.book.participants),
            "in_flight": len(self.book.reservations),
            "queue_depth": self.book.seq - self._durable_seq,
            "waiting_calls": self._waiting_calls,
            "last_seq": self.book.seq,
            "last_durable_seq": self._durable_seq,
            "checkpoint_seq": self._checkpoint_seq,
            "last_flush_ms": self._flush_ms[-1] if self._flush_ms else 0.0,
            "flush_p50_ms": samples[len(samples) // 2] if samples else 0.0,
            "flush_p99_ms": samples[min(len(samples) - 1, int(len(samples) * 0.99))] if samples else 0.0,
            "credits_pending": len(self.book.outbox),
            "flushes": self._flushes,
        }

    async def totals(self) -> dict[str, tuple[int, int, int]]:
        """Per currency (values, open reservations, credits owed), for conservation checks."""
        await self.start()
        return self.book.currency_totals()

    async def check_invariants(self) -> bool:
        await self.start()
        self.book.check_invariants()
        return True

    async def ping(self) -> dict:
        await self.start()
        return {"shard_id": self.shard_id, "pid": os.getpid(), "last_durable_seq": self._durable_seq}


_TRANSFER_OPS = frozenset({"prepare_transfer", "fulfil_transfer", "reject_transfer", "get_transfer"})


def _loads_first(batch: pb.CommandBatch) -> bytes:
    """Reorder so that account loads run before the credits that need them."""
    ordered = pb.CommandBatch(wait_durable=batch.wait_durable)
    ordered.commands.extend([c for c in batch.commands if c.HasField("load_account")])
    ordered.commands.extend([c for c in batch.commands if not c.HasField("load_account")])
    return ordered.SerializeToString()


@functools.cache
def _ray_runtime() -> dict:
    """Where this actor runs; fixed for the life of the process, so read once."""
    try:
        import ray

        if ray.is_initialized():
            context = ray.get_runtime_context()
            actor_id = context.get_actor_id() or ""
            with warnings.catch_warnings():
                # Ray's own property trips its own deprecation warning internally.
                warnings.simplefilter("ignore", DeprecationWarning)
                restarted = bool(actor_id and context.was_current_actor_reconstructed)
            return {
                "actor_id": actor_id,
                "node_id": context.get_node_id(),
                "node_ip": ray.util.get_node_ip_address(),
                "was_restarted": restarted,
            }
    except Exception as error:  # ops must still see the shard if Ray's context is unavailable
        log.debug("no Ray runtime context: %r", error)
    return {"actor_id": "", "node_id": "", "node_ip": "127.0.0.1", "was_restarted": False}


def _exit_process(reason: str) -> None:
    # Ray restarts the actor process; it rebuilds from Postgres, which holds only durable changes.
    logging.shutdown()
    os._exit(70)


def _add_decision(reply: pb.BatchResult, decision: Decision) -> None:
    result = reply.results.add(
        outcome=decision.verdict.value, seq=decision.seq, error_code=decision.error_code or 0,
        error_description=decision.error_description or "",
    )
    record = decision.record
    if record is not None:
        result.state = record.state.value
        view = result.transfer
        view.transfer_id = record.transfer_id
        view.payer = record.payer
        view.payee = record.payee
        view.state = record.state.value
        view.fulfilment = record.fulfilment or ""
        view.completed_ms = record.completed_ms or 0
        view.reserved_mode = record.reserved_mode
        view.error_code = record.error_code or 0
        view.error_description = record.error_description or ""
        view.currency = record.currency
        view.amount_minor = str(record.amount_minor)
        view.version = record.version
        view.created_ms = record.created_ms or 0


async def _resilient(tick, interval_ms: int) -> None:
    """Run ``tick`` every ``interval_ms``; an error is logged and the next tick runs regardless."""
    while True:
        await asyncio.sleep(interval_ms / 1000)
        try:
            await tick()
        except InvariantViolation:
            raise  # an impossible state: the task ends, which stops the process (see _loop_ended)
        except Exception:  # any other failure (Postgres away, a peer restarting) is retried next tick
            log.exception("shard background tick %s failed", getattr(tick, "__name__", tick))
