"""Write-behind and recovery for one shard: the only code that turns a ``FlushBatch`` into rows."""

from __future__ import annotations

import asyncpg

from core.ledger import (
    TERMINAL_KINDS,
    Account,
    AccountType,
    Credit,
    FlushBatch,
    JournalKind,
    PositionBook,
    Reservation,
    TransferState,
    invariant,
)
from core.money import from_decimal, to_decimal

_JOURNAL_COLUMNS = ("shard_id", "seq", "kind", "transfer_id", "account_id", "amount", "reason", "at_ms")
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

    async def load(self, *, dedupe_window: int) -> PositionBook:
        """Rebuild the shard's book from Postgres and check its invariants before it serves."""
        shard = self.shard_id
        async with self.pool.acquire() as connection:
            await connection.execute(
                "INSERT INTO shard (shard_id) VALUES ($1) ON CONFLICT DO NOTHING", shard
            )
            async with connection.transaction(isolation="repeatable_read", readonly=True):
                last_seq = await connection.fetchval("SELECT last_durable_seq FROM shard WHERE shard_id = $1", shard)
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
                for row in await connection.fetch(
                    "SELECT transfer_id, debit_account_id, credit_account_id, amount, expires_at_ms, reserved_seq"
                    " FROM open_reservation WHERE shard_id = $1 ORDER BY reserved_seq",
                    shard,
                ):
                    book.load_reservation(
                        Reservation(
                            row["transfer_id"], row["debit_account_id"], row["credit_account_id"],
                            from_decimal(row["amount"]), row["expires_at_ms"], row["reserved_seq"],
                        )
                    )
                for row in await connection.fetch(
                    "SELECT transfer_id, credit_account_id, amount, currency FROM pending_credit WHERE shard_id = $1",
                    shard,
                ):
                    book.load_outbox_credit(
                        Credit(row["transfer_id"], row["credit_account_id"], from_decimal(row["amount"]),
                               row["currency"].strip())
                    )
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
        shard = self.shard_id
        first_seq = batch.entries[0].seq
        async with self.pool.acquire() as connection, connection.transaction():
            # The fence: the row must still say what we last wrote, or someone else owns the shard.
            fenced = await connection.fetchval(
                "UPDATE shard SET last_durable_seq = $2, updated_at = now()"
                " WHERE shard_id = $1 AND last_durable_seq = $3 RETURNING shard_id",
                shard, batch.last_seq, first_seq - 1,
            )
            if fenced is None:
                raise FencedOut(f"shard {shard}: durable sequence moved under us (expected {first_seq - 1})")
            await connection.copy_records_to_table(
                "journal",
                records=[
                    (shard, e.seq, int(e.kind), e.transfer_id, e.account_id or None, to_decimal(e.amount_minor),
                     e.reason, e.at_ms)
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
            if batch.reservations_removed:
                await connection.execute(
                    "DELETE FROM open_reservation WHERE transfer_id = ANY($1::text[])", batch.reservations_removed
                )
            if batch.reservations_added:
                await connection.copy_records_to_table(
                    "open_reservation",
                    records=[
                        (r.transfer_id, shard, r.debit_account_id, r.credit_account_id, to_decimal(r.amount_minor),
                         r.expires_at_ms, r.reserved_seq)
                        for r in batch.reservations_added
                    ],
                    columns=_RESERVATION_COLUMNS,
                )
            if batch.credits_removed:
                await connection.execute(
                    "DELETE FROM pending_credit WHERE transfer_id = ANY($1::text[])", batch.credits_removed
                )
            if batch.credits_added:
                await connection.copy_records_to_table(
                    "pending_credit",
                    records=[
                        (c.transfer_id, shard, c.credit_account_id, to_decimal(c.amount_minor), c.currency)
                        for c in batch.credits_added
                    ],
                    columns=_CREDIT_COLUMNS,
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
