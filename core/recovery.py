"""Rebuilding a shard's open reservations and owed credits after a restart (pure, no I/O).

The tables ``open_reservation`` and ``pending_credit`` hold the state as of the shard's last
checkpoint; the journal rows after it (the tail) say what changed since. ``Replay`` folds the
tail over the tables; the caller then asks Postgres which owed credits already have a CREDIT row
(delivered before the crash) and hands the answer to ``apply``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.ledger import TERMINAL_KINDS, Credit, JournalEntry, JournalKind, PositionBook, Reservation


@dataclass
class Replay:
    reservations: dict[str, tuple[Reservation, bool]] = field(default_factory=dict)  # id -> (r, persisted)
    credits: dict[str, tuple[Credit, bool]] = field(default_factory=dict)
    closed_persisted: list[str] = field(default_factory=list)

    @classmethod
    def from_tables(cls, reservations: list[Reservation], credits: list[Credit]) -> Replay:
        replay = cls()
        replay.reservations = {r.transfer_id: (r, True) for r in reservations}
        replay.credits = {c.transfer_id: (c, True) for c in credits}
        return replay

    def fold(self, tail: list[JournalEntry], book: PositionBook) -> None:
        """Apply the journal rows written after the checkpoint, in sequence order."""
        for entry in tail:
            if entry.kind is JournalKind.RESERVE:
                self.reservations[entry.transfer_id] = (
                    Reservation(entry.transfer_id, entry.account_id, entry.counter_account_id, entry.amount_minor,
                                entry.expires_at_ms, entry.seq),
                    False,
                )
            elif entry.kind in TERMINAL_KINDS:
                found = self.reservations.pop(entry.transfer_id, None)
                if found is not None and found[1]:
                    self.closed_persisted.append(entry.transfer_id)
                if entry.kind is JournalKind.COMMIT:
                    # Every credit leg is owed until a CREDIT row exists for it, wherever: a local
                    # one has that row in the same flush, and an account that joined this shard
                    # after the commit is covered too (its credit went out as if remote).
                    currency = book.accounts[entry.account_id].currency
                    self.credits[entry.transfer_id] = (
                        Credit(entry.transfer_id, entry.counter_account_id, entry.amount_minor, currency), False
                    )

    def owed_credit_ids(self) -> list[str]:
        return list(self.credits)

    def apply(self, book: PositionBook, delivered: set[str]) -> None:
        """Load what is still open into the book; ``delivered``: owed credits already applied."""
        for reservation, persisted in self.reservations.values():
            book.load_reservation(reservation, persisted=persisted)
        acked_persisted = []
        for transfer_id, (credit, persisted) in self.credits.items():
            if transfer_id in delivered:
                if persisted:
                    acked_persisted.append(transfer_id)
                continue
            book.load_outbox_credit(credit, persisted=persisted)
        book.load_closed_since_checkpoint(self.closed_persisted, acked_persisted)
