"""Write-behind and recovery for one shard: the only code that turns a ``FlushBatch`` into rows."""

from __future__ import annotations

import asyncpg

from core.ledger import (
    TERMINAL_KINDS,
    Account,
    AccountType,
    Checkpoint,
    Credit,
    FlushBatch,
    JournalEntry,
    JournalKind,
    PositionBook,
    Reservation,
    TransferState,
    invariant,
)
from core.money import from_decimal, to_decimal
from core.recovery import Replay
from core.transfers import TransferDesk, TransferRecord

_JOURNAL_COLUMNS = (
    "shard_id", "seq", "kind", "transfer_id", "account_id", "amount", "reason", "at_ms", "counter_account_id",
    "expires_at_ms",
)
_RESERVATION_COLUMNS = (
    "transfer_id", "shard_id", "debit_account_id", "credit_account_id", "amount", "expires_at_ms", "reserved_seq",
)
_CREDIT_COLUMNS = ("transfer_id", "shard_id", "credit_account_id", "amount", "currency")


class FencedOut(RuntimeError):
    """Another incarnation of this shard wrote since we loaded: stop, never write over it."""


class ShardStore:
    def __init__(self, pool: asyncpg.Pool, shard_id: int):
        self.pool = pool
        self.shard_id = shard_id
        self.checkpoint_seq = 0  # as found by the last load

    async def load(self, *, dedupe_window: int) -> PositionBook:
        """Rebuild the shard's book from Postgres and check its invariants before it serves."""
        shard = self.shard_id
        async with self.pool.acquire() as connection:
            await connection.execute(
                "INSERT INTO shard (shard_id) VALUES ($1) ON CONFLICT DO NOTHING", shard
            )
            async with connection.transaction(isolation="repeatable_read", readonly=True):
                shard_row = await connection.fetchrow(
                    "SELECT last_durable_seq, checkpoint_seq FROM shard WHERE shard_id = $1", shard
                )
                last_seq, checkpoint_seq = shard_row["last_durable_seq"], shard_row["checkpoint_seq"]
                self.checkpoint_seq = checkpoint_seq
                journal_seq = await connection.fetchval(
                    "SELECT coalesce(max(seq), 0) FROM journal WHERE shard_id = $1", shard
                )
                invariant(journal_seq == last_seq, f"shard {shard}: journal at {journal_seq}, shard row at {last_seq}")
                book = PositionBook(shard, last_seq=last_seq, dedupe_window=dedupe_window)
                for row in await connection.fetch(
                    "SELECT name, is_active FROM participant WHERE shard_id = $1 ORDER BY participant_id", shard
                ):
                    book.load_participant(row["name"], row["is_active"])
                for row in await connection.fetch(
                    "SELECT a.account_id, p.name, a.currency, a.ledger_account_type, a.value, a.reserved_value,"
                    " a.is_active, a.net_debit_cap FROM account a JOIN participant p USING (participant_id)"
                    " WHERE p.shard_id = $1 ORDER BY a.account_id",
                    shard,
                ):
                    book.load_account(_account_from_row(row))
                table_reservations = [
                    Reservation(row["transfer_id"], row["debit_account_id"], row["credit_account_id"],
                                from_decimal(row["amount"]), row["expires_at_ms"], row["reserved_seq"])
                    for row in await connection.fetch(
                        "SELECT transfer_id, debit_account_id, credit_account_id, amount, expires_at_ms, reserved_seq"
                        " FROM open_reservation WHERE shard_id = $1 ORDER BY reserved_seq",
                        shard,
                    )
                ]
                table_credits = [
                    Credit(row["transfer_id"], row["credit_account_id"], from_decimal(row["amount"]),
                           row["currency"].strip())
                    for row in await connection.fetch(
                        "SELECT transfer_id, credit_account_id, amount, currency FROM pending_credit"
                        " WHERE shard_id = $1",
                        shard,
                    )
                ]
                replay = Replay.from_tables(table_reservations, table_credits)
                tail = [
                    JournalEntry(row["seq"], JournalKind(row["kind"]), row["transfer_id"], row["account_id"] or 0,
                                 from_decimal(row["amount"]), row["at_ms"], row["reason"],
                                 row["counter_account_id"] or 0, row["expires_at_ms"])
                    for row in await connection.fetch(
                        "SELECT seq, kind, transfer_id, account_id, amount, at_ms, reason, counter_account_id,"
                        " expires_at_ms FROM journal WHERE shard_id = $1 AND seq > $2 AND kind = ANY($3::smallint[])"
                        " ORDER BY seq",
                        shard, checkpoint_seq, [int(JournalKind.RESERVE), *(int(k) for k in TERMINAL_KINDS)],
                    )
                ]
                replay.fold(tail, book)
                owed = replay.owed_credit_ids()
                delivered = {
                    row["transfer_id"]
                    for row in await connection.fetch(
                        "SELECT transfer_id FROM journal WHERE kind = $1 AND transfer_id = ANY($2::text[])",
                        int(JournalKind.CREDIT), owed,
                    )
                } if owed else set()
                replay.apply(book, delivered)
                # The newest finished transfers and applied credits, oldest first, so retries that
                # arrive after a restart are still recognised as duplicates.
                finished = await connection.fetch(
                    "SELECT transfer_id, kind FROM journal WHERE shard_id = $1 AND kind = ANY($2::smallint[])"
                    " ORDER BY seq DESC LIMIT $3",
                    shard, [int(k) for k in TERMINAL_KINDS], dedupe_window,
                )
                for row in reversed(finished):
                    state = TransferState.COMMITTED if row["kind"] == JournalKind.COMMIT else TransferState.ABORTED
                    book.load_finished(row["transfer_id"], state)
                credited = await connection.fetch(
                    "SELECT transfer_id FROM journal WHERE shard_id = $1 AND kind = $2 ORDER BY seq DESC LIMIT $3",
                    shard, int(JournalKind.CREDIT), dedupe_window,
                )
                for row in reversed(credited):
                    book.load_credited(row["transfer_id"])
        book.check_invariants()
        return book

    async def load_account(self, account_id: int) -> tuple[str, bool, Account] | None:
        """One account with its participant (for accounts created after the shard started)."""
        row = await self.pool.fetchrow(
            "SELECT a.account_id, p.name, p.is_active AS participant_active, p.shard_id, a.currency,"
            " a.ledger_account_type, a.value, a.reserved_value, a.is_active, a.net_debit_cap"
            " FROM account a JOIN participant p USING (participant_id) WHERE a.account_id = $1",
            account_id,
        )
        if row is None or row["shard_id"] != self.shard_id:
            return None
        return row["name"], row["participant_active"], _account_from_row(row)

    async def flush(self, batch: FlushBatch) -> None:
        """Write one batch atomically; refuses if another incarnation of the shard wrote first."""
        if batch.checkpoint is None and not batch.participants:
            await self._flush_in_one_call(batch)
        else:
            await self._flush_by_statements(batch)

    async def _flush_in_one_call(self, batch: FlushBatch) -> None:
        """The ordinary flush: one statement (``rayloop_flush``, migration 0009), so one round trip."""
        entries, accounts = batch.entries, batch.accounts
        inserts, updates = batch.transfer_inserts, batch.transfer_updates
        try:
            await self.pool.execute(
                _FLUSH_CALL,
                self.shard_id, batch.last_seq, batch.previous_seq,
                [e.seq for e in entries], [int(e.kind) for e in entries], [e.transfer_id for e in entries],
                [e.account_id or None for e in entries], [to_decimal(e.amount_minor) for e in entries],
                [e.reason for e in entries], [e.at_ms for e in entries],
                [e.counter_account_id or None for e in entries], [e.expires_at_ms for e in entries],
                [a.account_id for a in accounts], [to_decimal(a.value_minor) for a in accounts],
                [to_decimal(a.reserved_minor) for a in accounts],
                [None if a.net_debit_cap_minor is None else to_decimal(a.net_debit_cap_minor) for a in accounts],
                [a.is_active for a in accounts],
                [r.transfer_id for r in inserts], [r.payer for r in inserts], [r.payee for r in inserts],
                [r.currency for r in inserts], [to_decimal(r.amount_minor) for r in inserts],
                [r.condition for r in inserts], [r.expires_at_ms for r in inserts],
                [r.prepare_hash for r in inserts], [r.payer_account_id for r in inserts],
                [r.payee_account_id for r in inserts], [str(r.state) for r in inserts],
                [r.fulfilment for r in inserts], [r.fulfil_hash for r in inserts], [r.completed_ms for r in inserts],
                [r.reserved_mode for r in inserts], [r.error_code for r in inserts],
                [r.error_description for r in inserts], [r.version for r in inserts], [r.created_ms for r in inserts],
                [r.prepare_request_id for r in inserts], [r.fulfil_request_id for r in inserts],
                [r.transfer_id for r in updates], [str(r.state) for r in updates], [r.fulfilment for r in updates],
                [r.fulfil_hash for r in updates], [r.completed_ms for r in updates],
                [r.reserved_mode for r in updates], [r.error_code for r in updates],
                [r.error_description for r in updates], [r.fulfil_request_id for r in updates],
            )
        except asyncpg.PostgresError as error:
            if error.sqlstate == _FENCED_SQLSTATE:
                raise FencedOut(error.message) from None
            raise

    async def _flush_by_statements(self, batch: FlushBatch) -> None:
        """A flush with a checkpoint or participant changes: statement by statement, one transaction."""
        shard = self.shard_id
        checkpoint = batch.checkpoint
        async with self.pool.acquire() as connection, connection.transaction():
            # The fence: the row must still say what we last wrote, or someone else owns the shard.
            fenced = await connection.fetchval(
                "UPDATE shard SET last_durable_seq = $2, updated_at = now(),"
                " checkpoint_seq = CASE WHEN $4 THEN $2 ELSE checkpoint_seq END"
                " WHERE shard_id = $1 AND last_durable_seq = $3 RETURNING shard_id",
                shard, batch.last_seq, batch.previous_seq, checkpoint is not None,
            )
            if fenced is None:
                raise FencedOut(f"shard {shard}: durable sequence moved under us (expected {batch.previous_seq})")
            if batch.entries:
                await connection.copy_records_to_table(
                    "journal",
                    records=[
                        (shard, e.seq, int(e.kind), e.transfer_id, e.account_id or None, to_decimal(e.amount_minor),
                         e.reason, e.at_ms, e.counter_account_id or None, e.expires_at_ms)
                        for e in batch.entries
                    ],
                    columns=_JOURNAL_COLUMNS,
                )
            if batch.accounts:
                await connection.execute(
                    "UPDATE account AS a SET value = u.value, reserved_value = u.reserved,"
                    " net_debit_cap = u.cap, is_active = u.active, last_seq = $6, changed_at = now()"
                    " FROM unnest($1::integer[], $2::numeric[], $3::numeric[], $4::numeric[], $5::boolean[])"
                    " AS u(account_id, value, reserved, cap, active) WHERE a.account_id = u.account_id",
                    [a.account_id for a in batch.accounts],
                    [to_decimal(a.value_minor) for a in batch.accounts],
                    [to_decimal(a.reserved_minor) for a in batch.accounts],
                    [None if a.net_debit_cap_minor is None else to_decimal(a.net_debit_cap_minor)
                     for a in batch.accounts],
                    [a.is_active for a in batch.accounts],
                    batch.last_seq,
                )
            if batch.participants:
                await connection.execute(
                    "UPDATE participant AS p SET is_active = u.active"
                    " FROM unnest($1::text[], $2::boolean[]) AS u(name, active) WHERE p.name = u.name",
                    [p.name for p in batch.participants],
                    [p.is_active for p in batch.participants],
                )
            if checkpoint is not None:
                await self._write_checkpoint(connection, checkpoint)
            if batch.transfer_inserts:
                await connection.copy_records_to_table(
                    "transfer",
                    records=[_transfer_row(shard, r) for r in batch.transfer_inserts],
                    columns=_TRANSFER_COLUMNS,
                )
            if batch.transfer_updates:
                rows = batch.transfer_updates
                await connection.execute(
                    "UPDATE transfer AS t SET state = u.state, fulfilment = u.fulfilment, fulfil_hash = u.fulfil_hash,"
                    " completed_at_ms = u.completed, reserved_mode = u.reserved_mode, error_code = u.error_code,"
                    " error_description = u.error_description, fulfil_request_id = u.fulfil_request_id"
                    " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::boolean[],"
                    " $7::integer[], $8::text[], $9::text[])"
                    " AS u(transfer_id, state, fulfilment, fulfil_hash, completed, reserved_mode, error_code,"
                    " error_description, fulfil_request_id) WHERE t.transfer_id = u.transfer_id",
                    [r.transfer_id for r in rows], [str(r.state) for r in rows], [r.fulfilment for r in rows],
                    [r.fulfil_hash for r in rows], [r.completed_ms for r in rows], [r.reserved_mode for r in rows],
                    [r.error_code for r in rows], [r.error_description for r in rows],
                    [r.fulfil_request_id for r in rows],
                )

    async def load_transfers(self, desk: TransferDesk, *, window: int) -> None:
        """Open transfers of this shard, and the newest finished ones (for duplicates)."""
        async with self.pool.acquire() as connection:
            for row in await connection.fetch(
                f"SELECT {_TRANSFER_SELECT} FROM transfer WHERE shard_id = $1 AND state = 'RESERVED'", self.shard_id
            ):
                desk.load(_transfer_from_row(row))
            finished = await connection.fetch(
                f"SELECT {_TRANSFER_SELECT} FROM transfer WHERE shard_id = $1 AND state <> 'RESERVED'"
                " ORDER BY created_at_ms DESC LIMIT $2",
                self.shard_id, window,
            )
            for row in reversed(finished):
                desk.load(_transfer_from_row(row))
            # All of this shard's transfers are known only if fewer than the window were finished.
            desk.complete = len(finished) < window

    async def fetch_transfers(self, transfer_ids: list[str]) -> list[TransferRecord]:
        """Transfers the desk has forgotten (older than its window): duplicates must still be recognised."""
        rows = await self.pool.fetch(
            f"SELECT {_TRANSFER_SELECT} FROM transfer WHERE transfer_id = ANY($1::text[])", transfer_ids
        )
        return [_transfer_from_row(row) for row in rows]

    async def _write_checkpoint(self, connection: asyncpg.Connection, checkpoint: Checkpoint) -> None:
        shard = self.shard_id
        if checkpoint.reservations_delete:
            await connection.execute(
                "DELETE FROM open_reservation WHERE transfer_id = ANY($1::text[])", checkpoint.reservations_delete
            )
        if checkpoint.reservations_insert:
            await connection.copy_records_to_table(
                "open_reservation",
                records=[
                    (r.transfer_id, shard, r.debit_account_id, r.credit_account_id, to_decimal(r.amount_minor),
                     r.expires_at_ms, r.reserved_seq)
                    for r in checkpoint.reservations_insert
                ],
                columns=_RESERVATION_COLUMNS,
            )
        if checkpoint.credits_delete:
            await connection.execute(
                "DELETE FROM pending_credit WHERE transfer_id = ANY($1::text[])", checkpoint.credits_delete
            )
        if checkpoint.credits_insert:
            await connection.copy_records_to_table(
                "pending_credit",
                records=[
                    (c.transfer_id, shard, c.credit_account_id, to_decimal(c.amount_minor), c.currency)
                    for c in checkpoint.credits_insert
                ],
                columns=_CREDIT_COLUMNS,
            )


_TRANSFER_COLUMNS = (
    "transfer_id", "shard_id", "payer", "payee", "currency", "amount", "condition", "expires_at_ms", "prepare_hash",
    "payer_account_id", "payee_account_id", "state", "fulfilment", "fulfil_hash", "completed_at_ms", "reserved_mode",
    "error_code", "error_description", "version", "created_at_ms", "prepare_request_id", "fulfil_request_id",
)
_TRANSFER_SELECT = ", ".join(c for c in _TRANSFER_COLUMNS if c != "shard_id")
_FLUSH_CALL = "SELECT rayloop_flush(" + ", ".join(f"${i}" for i in range(1, 48)) + ")"
_FENCED_SQLSTATE = "RLF01"  # raised by rayloop_flush when the fence does not hold


def _transfer_row(shard: int, r: TransferRecord) -> tuple:
    return (
        r.transfer_id, shard, r.payer, r.payee, r.currency, to_decimal(r.amount_minor), r.condition, r.expires_at_ms,
        r.prepare_hash, r.payer_account_id, r.payee_account_id, str(r.state), r.fulfilment, r.fulfil_hash,
        r.completed_ms, r.reserved_mode, r.error_code, r.error_description, r.version, r.created_ms,
        r.prepare_request_id, r.fulfil_request_id,
    )


def _transfer_from_row(row: asyncpg.Record) -> TransferRecord:
    return TransferRecord(
        transfer_id=row["transfer_id"], payer=row["payer"], payee=row["payee"], currency=row["currency"].strip(),
        amount_minor=from_decimal(row["amount"]), condition=row["condition"], expires_at_ms=row["expires_at_ms"],
        prepare_hash=row["prepare_hash"], payer_account_id=row["payer_account_id"] or 0,
        payee_account_id=row["payee_account_id"] or 0, created_ms=row["created_at_ms"],
        state=TransferState(row["state"]), fulfilment=row["fulfilment"], fulfil_hash=row["fulfil_hash"],
        completed_ms=row["completed_at_ms"], reserved_mode=row["reserved_mode"], error_code=row["error_code"],
        error_description=row["error_description"], version=row["version"],
        prepare_request_id=row["prepare_request_id"], fulfil_request_id=row["fulfil_request_id"],
    )


def _account_from_row(row: asyncpg.Record) -> Account:
    cap = row["net_debit_cap"]
    return Account(
        account_id=row["account_id"],
        participant=row["name"],
        currency=row["currency"].strip(),
        account_type=AccountType(row["ledger_account_type"]),
        value_minor=from_decimal(row["value"]),
        reserved_minor=from_decimal(row["reserved_value"]),
        is_active=row["is_active"],
        net_debit_cap_minor=None if cap is None else from_decimal(cap),
    )
