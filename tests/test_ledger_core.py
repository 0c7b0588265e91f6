"""The pure ledger core (core/ledger.py, core/recovery.py): reserve / commit / abort / expire / credits /
drain and checkpoints / reload.

Every test ends (and most steps are followed) by ``assert_conserved``: per currency, across the
books of the test, account values minus open reservations minus credits still in flight are zero.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from core.ledger import (
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

CURRENCY = "XTS"
HUB = "Hub"
HUB_RECONCILIATION, HUB_SETTLEMENT = 1, 2
PAYER_POSITION, PAYER_SETTLEMENT = 11, 12
PAYEE_POSITION, PAYEE_SETTLEMENT = 21, 22
UNKNOWN_ACCOUNT = 999
T0 = 1_700_000_000_000


def major(units: int) -> int:
    return units * MINOR_PER_MAJOR


DEPOSIT = major(1000)
NDC = major(800)
_funds_in_ids = itertools.count(1)


# ------------------------------------------------------------------ helpers


def assert_conserved(*books: PositionBook) -> None:
    """Invariants of each book, then money conservation across all of them, per currency."""
    totals: dict[str, int] = defaultdict(int)
    for book in books:
        book.check_invariants()
        for currency, (values, reserved, outbound) in book.currency_totals().items():
            totals[currency] += values - reserved - outbound
    # An outbound credit another book already applied is in that book's values, not in flight.
    for book in books:
        for credit in book.outbox.values():
            for other in books:
                # _credited is the credit dedupe window; the book has no public view of it.
                if other is not book and credit.transfer_id in other._credited:
                    totals[credit.currency] += credit.amount_minor
    assert all(total == 0 for total in totals.values()), f"money not conserved: {dict(totals)}"


def add_hub(book: PositionBook) -> None:
    book.add_participant(HUB)
    book.add_account(Account(HUB_RECONCILIATION, HUB, CURRENCY, AccountType.HUB_RECONCILIATION))
    book.add_account(Account(HUB_SETTLEMENT, HUB, CURRENCY, AccountType.HUB_MULTILATERAL_SETTLEMENT))


def add_dfsp(book: PositionBook, name: str, position_id: int, settlement_id: int, ndc: int | None) -> None:
    book.add_participant(name)
    book.add_account(Account(position_id, name, CURRENCY, AccountType.POSITION))
    book.add_account(Account(settlement_id, name, CURRENCY, AccountType.SETTLEMENT))
    if ndc is not None:
        assert book.set_net_debit_cap(position_id, ndc, T0).outcome is Outcome.OK


def funds_in(book: PositionBook, settlement_id: int, amount: int, now: int = T0) -> str:
    """Hub reconciliation (debit, unchecked) -> DFSP settlement (credit): reserve and commit at once."""
    transfer_id = f"funds-in-{next(_funds_in_ids)}"
    reserved = book.reserve(transfer_id, HUB_RECONCILIATION, settlement_id, amount, now, check=Check.NONE)
    assert reserved.outcome is Outcome.OK, reserved
    committed = book.commit(transfer_id, now)
    assert committed.outcome is Outcome.OK, committed
    return transfer_id


def new_book(
    *,
    payer_deposit: int = DEPOSIT,
    payer_ndc: int | None = NDC,
    payee_deposit: int = DEPOSIT,
    payee_ndc: int | None = NDC,
    dedupe_window: int = 200_000,
) -> PositionBook:
    """Hub, payer and payee in one book, NDCs set, deposits made; the setup is drained (durable)."""
    book = PositionBook(0, dedupe_window=dedupe_window)
    add_hub(book)
    add_dfsp(book, "payer", PAYER_POSITION, PAYER_SETTLEMENT, payer_ndc)
    add_dfsp(book, "payee", PAYEE_POSITION, PAYEE_SETTLEMENT, payee_ndc)
    for settlement_id, deposit in ((PAYER_SETTLEMENT, payer_deposit), (PAYEE_SETTLEMENT, payee_deposit)):
        if deposit:
            funds_in(book, settlement_id, deposit)
    assert_conserved(book)
    book.drain()
    return book


def deliver(source: PositionBook, target: PositionBook, now: int = T0) -> list[str]:
    """Apply every outbound credit of ``source`` on ``target`` and acknowledge them."""
    delivered = []
    for credit in list(source.outbox.values()):
        result = target.apply_credit(credit, now)
        assert result.outcome in (Outcome.OK, Outcome.DUPLICATE), result
        assert_conserved(source, target)  # applied there, still in the outbox here: counted once
        delivered.append(credit.transfer_id)
    assert source.ack_credits(delivered) == len(delivered)
    assert_conserved(source, target)
    return delivered


def two_shards() -> tuple[PositionBook, PositionBook]:
    """Shard A: the hub and the payer; shard B: the payee. Both funded, setup drained."""
    a, b = PositionBook(0), PositionBook(1)
    add_hub(a)
    add_dfsp(a, "payer", PAYER_POSITION, PAYER_SETTLEMENT, NDC)
    add_dfsp(b, "payee", PAYEE_POSITION, PAYEE_SETTLEMENT, NDC)
    funds_in(a, PAYER_SETTLEMENT, DEPOSIT)
    funds_in(a, PAYEE_SETTLEMENT, DEPOSIT)  # the payee's settlement account is on B: an outbound credit
    assert len(a.outbox) == 1
    assert_conserved(a, b)
    deliver(a, b)
    a.drain()
    b.drain()
    return a, b


def reserve(book: PositionBook, transfer_id: str = "t1", amount: int = major(100), **kwargs):
    debit = kwargs.pop("debit", PAYER_POSITION)
    credit = kwargs.pop("credit", PAYEE_POSITION)
    now = kwargs.pop("now", T0)
    return book.reserve(transfer_id, debit, credit, amount, now, **kwargs)


def state_of(book: PositionBook) -> tuple:
    """Everything observable about a book, for 'nothing changed' assertions."""
    return (
        book.seq,
        {
            a: (x.value_minor, x.reserved_minor, x.is_active, x.net_debit_cap_minor)
            for a, x in book.accounts.items()
        },
        {n: p.is_active for n, p in book.participants.items()},
        {t: (r.debit_account_id, r.amount_minor) for t, r in book.reservations.items()},
        dict(book.outbox),
    )


def value(book: PositionBook, account_id: int) -> int:
    return book.accounts[account_id].value_minor


# ------------------------------------------------------------------ the setup itself


def test_funds_in_moves_hub_reconciliation_against_settlement():
    book = new_book()
    assert value(book, PAYER_SETTLEMENT) == -DEPOSIT  # negative: the DFSP deposited (hub liability)
    assert value(book, PAYEE_SETTLEMENT) == -DEPOSIT
    assert value(book, HUB_RECONCILIATION) == 2 * DEPOSIT
    assert value(book, PAYER_POSITION) == value(book, PAYEE_POSITION) == 0
    assert not book.reservations and not book.outbox
    assert_conserved(book)


def test_funds_in_to_a_settlement_account_on_another_shard():
    a, b = two_shards()
    assert value(b, PAYEE_SETTLEMENT) == -DEPOSIT
    assert value(a, HUB_RECONCILIATION) == 2 * DEPOSIT
    assert not a.outbox
    assert_conserved(a, b)


# ------------------------------------------------------------------ reserve: outcomes in precedence order


def open_t1(book):
    assert reserve(book, "t1").outcome is Outcome.OK


def committed_t1(book):
    open_t1(book)
    assert book.commit("t1", T0).outcome is Outcome.OK


def aborted_t1(book):
    open_t1(book)
    assert book.abort("t1", T0).outcome is Outcome.OK


def expired_t1(book):
    assert reserve(book, "t1", expires_at_ms=T0 + 10).outcome is Outcome.OK
    assert [t for t, _ in book.expire(T0 + 10)] == ["t1"]


def payer_inactive(book):
    assert book.set_participant_active("payer", False, T0).outcome is Outcome.OK


def payer_position_inactive(book):
    assert book.set_account_active(PAYER_POSITION, False, T0).outcome is Outcome.OK


@dataclass
class ReserveCase:
    name: str
    expected: Outcome
    state: TransferState | None = None
    amount: int = major(100)
    debit: int = PAYER_POSITION
    book: dict = field(default_factory=dict)
    setup: tuple[Callable[[PositionBook], None], ...] = ()


# Ordered by the precedence of the checks; rows where several checks fail show that the earlier wins.
RESERVE_CASES = [
    ReserveCase("zero amount", Outcome.INVALID_AMOUNT, amount=0),
    ReserveCase("negative amount", Outcome.INVALID_AMOUNT, amount=-1),
    ReserveCase("amount above the maximum", Outcome.INVALID_AMOUNT, amount=MAX_AMOUNT_MINOR + 1),
    ReserveCase("invalid amount and duplicate", Outcome.INVALID_AMOUNT, amount=0, setup=(open_t1,)),
    ReserveCase(
        "invalid amount and unknown account", Outcome.INVALID_AMOUNT, amount=0, debit=UNKNOWN_ACCOUNT
    ),
    ReserveCase(
        "duplicate of an open reservation", Outcome.DUPLICATE, TransferState.RESERVED, setup=(open_t1,)
    ),
    ReserveCase(
        "duplicate of a committed transfer", Outcome.DUPLICATE, TransferState.COMMITTED, setup=(committed_t1,)
    ),
    ReserveCase(
        "duplicate of an aborted transfer", Outcome.DUPLICATE, TransferState.ABORTED, setup=(aborted_t1,)
    ),
    ReserveCase(
        "duplicate of an expired transfer", Outcome.DUPLICATE, TransferState.ABORTED, setup=(expired_t1,)
    ),
    ReserveCase(
        "duplicate and unknown account",
        Outcome.DUPLICATE,
        TransferState.RESERVED,
        debit=UNKNOWN_ACCOUNT,
        setup=(open_t1,),
    ),
    ReserveCase(
        "duplicate, participant inactive and over the liquidity cover",
        Outcome.DUPLICATE,
        TransferState.COMMITTED,
        amount=major(5000),
        setup=(committed_t1, payer_inactive),
    ),
    ReserveCase("unknown account", Outcome.UNKNOWN_ACCOUNT, debit=UNKNOWN_ACCOUNT),
    ReserveCase("participant inactive", Outcome.PARTICIPANT_INACTIVE, setup=(payer_inactive,)),
    ReserveCase(
        "participant inactive and account inactive",
        Outcome.PARTICIPANT_INACTIVE,
        setup=(payer_inactive, payer_position_inactive),
    ),
    ReserveCase(
        "participant inactive and over the net debit cap",
        Outcome.PARTICIPANT_INACTIVE,
        amount=major(900),
        setup=(payer_inactive,),
    ),
    ReserveCase(
        "participant inactive and no liquidity",
        Outcome.PARTICIPANT_INACTIVE,
        book={"payer_deposit": 0},
        setup=(payer_inactive,),
    ),
    ReserveCase("account inactive", Outcome.ACCOUNT_INACTIVE, setup=(payer_position_inactive,)),
    ReserveCase(
        "account inactive and over the net debit cap",
        Outcome.ACCOUNT_INACTIVE,
        amount=major(900),
        setup=(payer_position_inactive,),
    ),
    ReserveCase(
        "account inactive and no liquidity",
        Outcome.ACCOUNT_INACTIVE,
        book={"payer_deposit": 0},
        setup=(payer_position_inactive,),
    ),
    ReserveCase(
        "over the liquidity cover",
        Outcome.INSUFFICIENT_LIQUIDITY,
        amount=major(1001),
        book={"payer_ndc": major(2000)},
    ),
    ReserveCase(
        "over the liquidity cover and over the net debit cap",
        Outcome.INSUFFICIENT_LIQUIDITY,
        amount=major(1001),
    ),
    ReserveCase("no deposit", Outcome.INSUFFICIENT_LIQUIDITY, amount=1, book={"payer_deposit": 0}),
    ReserveCase(
        "no deposit and no net debit cap",
        Outcome.INSUFFICIENT_LIQUIDITY,
        amount=1,
        book={"payer_deposit": 0, "payer_ndc": None},
    ),
    ReserveCase("over the net debit cap", Outcome.LIMIT_EXCEEDED, amount=major(801)),
    ReserveCase("net debit cap never set", Outcome.LIMIT_EXCEEDED, amount=1, book={"payer_ndc": None}),
    ReserveCase("net debit cap zero", Outcome.LIMIT_EXCEEDED, amount=1, book={"payer_ndc": 0}),
    ReserveCase("ok", Outcome.OK, TransferState.RESERVED),
    ReserveCase("ok, smallest amount", Outcome.OK, TransferState.RESERVED, amount=1),
    ReserveCase("ok, the whole net debit cap", Outcome.OK, TransferState.RESERVED, amount=NDC),
]


def test_reserve_table_is_in_precedence_order():
    # Outcome lists the refusals in the order reserve checks them; OK comes after every check.
    order = [o for o in Outcome if o is not Outcome.OK] + [Outcome.OK]
    ranks = [order.index(case.expected) for case in RESERVE_CASES]
    assert ranks == sorted(ranks)


@pytest.mark.parametrize("case", RESERVE_CASES, ids=[case.name for case in RESERVE_CASES])
def test_reserve_outcomes(case: ReserveCase):
    book = new_book(**case.book)
    for step in case.setup:
        step(book)
    book.drain()
    before = state_of(book)
    debit_before = book.accounts.get(case.debit)
    debit_value = debit_before.value_minor if debit_before else None

    result = reserve(book, "t1", case.amount, debit=case.debit)

    assert (result.outcome, result.state) == (case.expected, case.state)
    if result.outcome is Outcome.OK:
        assert result.seq == book.seq == before[0] + 1
        assert value(book, case.debit) == debit_value + case.amount
        assert book.accounts[case.debit].reserved_minor == case.amount
        assert book.transfer_state("t1") is TransferState.RESERVED
        assert [e.kind for e in book.drain().entries] == [JournalKind.RESERVE]
    else:
        assert state_of(book) == before, "a refused reserve changes nothing"
        assert len(book.drain()) == 0
    assert_conserved(book)


def test_hub_reserve_without_checks_ignores_liquidity_and_limits():
    book = new_book(payer_deposit=0, payer_ndc=None)
    result = book.reserve("big", HUB_RECONCILIATION, PAYER_SETTLEMENT, MAX_AMOUNT_MINOR, T0, check=Check.NONE)
    assert result.outcome is Outcome.OK
    assert_conserved(book)


def test_inactive_hub_refuses_funds_in():
    book = new_book()
    book.set_participant_active(HUB, False, T0)
    result = book.reserve("f", HUB_RECONCILIATION, PAYER_SETTLEMENT, 1, T0, check=Check.NONE)
    assert result.outcome is Outcome.PARTICIPANT_INACTIVE
    assert_conserved(book)


# ------------------------------------------------------------------ reserve: boundaries


@pytest.mark.parametrize(
    ("ndc", "headroom", "refusal"),
    [
        (major(2000), DEPOSIT, Outcome.INSUFFICIENT_LIQUIDITY),  # the liquidity cover binds
        (NDC, NDC, Outcome.LIMIT_EXCEEDED),  # the net debit cap binds
        (DEPOSIT, DEPOSIT, Outcome.INSUFFICIENT_LIQUIDITY),  # both equal: liquidity is checked first
    ],
)
def test_exact_headroom_passes_one_minor_unit_more_fails(ndc, headroom, refusal):
    exact = new_book(payer_ndc=ndc)
    assert reserve(exact, amount=headroom).outcome is Outcome.OK
    assert_conserved(exact)
    over = new_book(payer_ndc=ndc)
    assert reserve(over, amount=headroom + 1).outcome is refusal
    assert_conserved(over)


@pytest.mark.parametrize(
    ("ndc", "refusal"),
    [(major(2000), Outcome.INSUFFICIENT_LIQUIDITY), (NDC, Outcome.LIMIT_EXCEEDED)],
)
def test_headroom_counts_open_reservations(ndc, refusal):
    headroom = min(ndc, DEPOSIT)
    book = new_book(payer_ndc=ndc)
    assert reserve(book, "first", major(600)).outcome is Outcome.OK
    assert reserve(book, "second", headroom - major(600) + 1).outcome is refusal  # sees the first
    assert reserve(book, "second", headroom - major(600)).outcome is Outcome.OK
    assert reserve(book, "third", 1).outcome is refusal
    assert_conserved(book)
    assert book.abort("first", T0).outcome is Outcome.OK  # the headroom comes back
    assert reserve(book, "third", major(600)).outcome is Outcome.OK
    assert_conserved(book)


def test_received_funds_count_as_liquidity():
    book = new_book(payee_deposit=0, payee_ndc=0)
    assert reserve(book, "in", major(300)).outcome is Outcome.OK
    assert book.commit("in", T0).outcome is Outcome.OK
    assert value(book, PAYEE_POSITION) == -major(300)  # a net creditor
    back = {"debit": PAYEE_POSITION, "credit": PAYER_POSITION}
    assert reserve(book, "back", major(300) + 1, **back).outcome is Outcome.INSUFFICIENT_LIQUIDITY
    assert reserve(book, "back", major(300), **back).outcome is Outcome.OK
    assert_conserved(book)


def test_funds_out_reservation_lowers_the_liquidity_cover_at_once():
    book = new_book(payer_ndc=major(2000))
    out = book.reserve(
        "out", PAYER_SETTLEMENT, HUB_RECONCILIATION, major(300), T0, check=Check.FUNDS_AVAILABLE
    )
    assert out.outcome is Outcome.OK
    assert reserve(book, "t1", major(700) + 1).outcome is Outcome.INSUFFICIENT_LIQUIDITY
    assert reserve(book, "t1", major(700)).outcome is Outcome.OK
    assert_conserved(book)


# ------------------------------------------------------------------ commit, abort, expire


def test_commit_applies_a_local_credit():
    book = new_book()
    reserved = reserve(book, "t1", major(250))
    assert value(book, PAYER_POSITION) == major(250)
    assert_conserved(book)
    result = book.commit("t1", T0 + 1)
    assert (result.outcome, result.state, result.credit) == (Outcome.OK, TransferState.COMMITTED, None)
    assert result.seq == book.seq > reserved.seq
    assert value(book, PAYER_POSITION) == major(250)  # the payer moved at reserve
    assert book.accounts[PAYER_POSITION].reserved_minor == 0
    assert value(book, PAYEE_POSITION) == -major(250)  # the payee's position decreases
    assert not book.outbox
    assert book.transfer_state("t1") is TransferState.COMMITTED
    entries = book.drain().entries
    assert [(e.kind, e.account_id) for e in entries] == [
        (JournalKind.RESERVE, PAYER_POSITION),
        (JournalKind.COMMIT, PAYER_POSITION),
        (JournalKind.CREDIT, PAYEE_POSITION),
    ]
    assert_conserved(book)


def test_commit_queues_the_credit_for_another_shard():
    a, b = two_shards()
    assert reserve(a, "t1", major(250)).outcome is Outcome.OK
    result = a.commit("t1", T0)
    assert result.outcome is Outcome.OK
    assert result.credit == Credit("t1", PAYEE_POSITION, major(250), CURRENCY)
    assert a.outbox == {"t1": result.credit}
    assert value(b, PAYEE_POSITION) == 0  # not applied yet: in flight
    assert_conserved(a, b)
    assert b.apply_credit(result.credit, T0).outcome is Outcome.OK
    assert value(b, PAYEE_POSITION) == -major(250)
    assert_conserved(a, b)  # applied on B, still in A's outbox: counted once
    assert b.apply_credit(result.credit, T0).outcome is Outcome.DUPLICATE  # a redelivery
    assert value(b, PAYEE_POSITION) == -major(250)
    assert a.ack_credits(["t1"]) == 1
    assert not a.outbox
    assert_conserved(a, b)


FINISHED_CASES = [
    # (name, setup, action, expected outcome, expected state)
    ("commit unknown", (), "commit", Outcome.UNKNOWN_TRANSFER, None),
    ("commit committed", (committed_t1,), "commit", Outcome.ALREADY_COMMITTED, TransferState.COMMITTED),
    ("commit aborted", (aborted_t1,), "commit", Outcome.ALREADY_ABORTED, TransferState.ABORTED),
    ("commit expired", (expired_t1,), "commit", Outcome.ALREADY_ABORTED, TransferState.ABORTED),
    ("abort unknown", (), "abort", Outcome.UNKNOWN_TRANSFER, None),
    ("abort committed", (committed_t1,), "abort", Outcome.ALREADY_COMMITTED, TransferState.COMMITTED),
    ("abort aborted", (aborted_t1,), "abort", Outcome.ALREADY_ABORTED, TransferState.ABORTED),
    ("abort expired", (expired_t1,), "abort", Outcome.ALREADY_ABORTED, TransferState.ABORTED),
]


@pytest.mark.parametrize(
    ("name", "setup", "action", "expected", "state"), FINISHED_CASES, ids=[c[0] for c in FINISHED_CASES]
)
def test_commit_and_abort_of_finished_or_unknown_transfers(name, setup, action, expected, state):
    book = new_book()
    for step in setup:
        step(book)
    book.drain()
    before = state_of(book)
    result = book.commit("t1", T0 + 1) if action == "commit" else book.abort("t1", T0 + 1)
    assert (result.outcome, result.state) == (expected, state)
    assert state_of(book) == before
    assert len(book.drain()) == 0
    assert_conserved(book)


def test_commit_at_the_expiry_expires_and_releases():
    book = new_book()
    assert reserve(book, "t1", major(100), expires_at_ms=T0 + 100).outcome is Outcome.OK
    result = book.commit("t1", T0 + 100)
    assert (result.outcome, result.state, result.credit) == (Outcome.EXPIRED, TransferState.ABORTED, None)
    assert value(book, PAYER_POSITION) == 0
    assert book.accounts[PAYER_POSITION].reserved_minor == 0
    assert value(book, PAYEE_POSITION) == 0
    assert book.transfer_state("t1") is TransferState.ABORTED
    assert [e.kind for e in book.drain().entries] == [JournalKind.RESERVE, JournalKind.EXPIRE]
    assert book.commit("t1", T0 + 100).outcome is Outcome.ALREADY_ABORTED
    assert reserve(book, "t1").state is TransferState.ABORTED
    assert book.expire(T0 + 1000) == []  # its heap entry is stale now
    assert_conserved(book)


def test_commit_just_before_the_expiry_commits():
    book = new_book()
    reserve(book, "t1", expires_at_ms=T0 + 100)
    assert book.commit("t1", T0 + 99).outcome is Outcome.OK
    assert book.expire(T0 + 100) == []
    assert_conserved(book)


def test_abort_releases_the_reservation():
    book = new_book()
    reserve(book, "t1", major(300))
    result = book.abort("t1", T0, "payee rejected")
    assert (result.outcome, result.state) == (Outcome.OK, TransferState.ABORTED)
    assert value(book, PAYER_POSITION) == 0
    assert book.accounts[PAYER_POSITION].reserved_minor == 0
    assert value(book, PAYEE_POSITION) == 0
    entries = book.drain().entries
    assert entries[-1].kind is JournalKind.ABORT and entries[-1].reason == "payee rejected"
    assert reserve(book, "t2", NDC).outcome is Outcome.OK  # the whole headroom is back
    assert_conserved(book)


def test_expire_aborts_only_due_reservations_and_skips_stale_heap_entries():
    book = new_book(payer_ndc=DEPOSIT)
    for transfer_id, expires in (("a", 100), ("b", 200), ("c", 300), ("e", 150), ("f", 120)):
        assert reserve(book, transfer_id, major(10), expires_at_ms=T0 + expires).outcome is Outcome.OK
    assert reserve(book, "d", major(10)).outcome is Outcome.OK  # no expiry
    assert book.commit("e", T0).outcome is Outcome.OK  # stale heap entries: e and f
    assert book.abort("f", T0).outcome is Outcome.OK
    assert_conserved(book)

    expired = book.expire(T0 + 200)
    assert [t for t, _ in expired] == ["a", "b"]
    assert all((r.outcome, r.state) == (Outcome.EXPIRED, TransferState.ABORTED) for _, r in expired)
    assert [r.seq for _, r in expired] == [book.seq - 1, book.seq]
    assert set(book.reservations) == {"c", "d"}
    assert book.transfer_state("e") is TransferState.COMMITTED
    assert value(book, PAYER_POSITION) == major(30)  # c, d and the committed e
    assert_conserved(book)

    assert book.expire(T0 + 200) == []
    assert book.next_expiry_ms() == T0 + 300
    assert [t for t, _ in book.expire(T0 + 10**9)] == ["c"]
    assert book.next_expiry_ms() is None
    assert set(book.reservations) == {"d"}
    assert_conserved(book)


def test_next_expiry_skips_closed_reservations():
    book = new_book()
    reserve(book, "early", expires_at_ms=T0 + 10)
    reserve(book, "late", expires_at_ms=T0 + 20)
    assert book.next_expiry_ms() == T0 + 10
    book.commit("early", T0)
    assert book.next_expiry_ms() == T0 + 20
    assert_conserved(book)


def test_apply_credit_is_idempotent():
    a, b = two_shards()
    reserve(a, "t1", major(5))
    credit = a.commit("t1", T0).credit
    first = b.apply_credit(credit, T0)
    assert first.outcome is Outcome.OK
    before = state_of(b)
    again = b.apply_credit(credit, T0)
    assert again.outcome is Outcome.DUPLICATE
    assert again.seq == first.seq  # the caller can wait until the first application is durable
    assert state_of(b) == before
    assert [e.kind for e in b.drain().entries] == [JournalKind.CREDIT]
    assert_conserved(a, b)


def test_apply_credit_to_an_unknown_account_is_not_remembered():
    book = PositionBook(3)
    book.add_participant("late")
    credit = Credit("x1", 77, major(5), CURRENCY)
    assert book.apply_credit(credit, T0).outcome is Outcome.UNKNOWN_ACCOUNT
    book.add_account(Account(77, "late", CURRENCY, AccountType.POSITION))  # created after the commit
    assert book.apply_credit(credit, T0).outcome is Outcome.OK
    assert value(book, 77) == -major(5)
    book.check_invariants()  # the debit leg is on a shard this test does not build


def test_apply_credit_in_the_wrong_currency_is_impossible():
    book = new_book()
    with pytest.raises(InvariantViolation):
        book.apply_credit(Credit("x1", PAYEE_POSITION, 1, "XXX"), T0)


def test_ack_credits_drops_outbox_entries_without_journaling():
    a, b = two_shards()
    for transfer_id in ("t1", "t2"):
        reserve(a, transfer_id, major(10))
        a.commit(transfer_id, T0)
    a.drain()
    assert set(a.outbox) == {"t1", "t2"}
    b.apply_credit(a.outbox["t1"], T0)
    seq_before = a.seq
    assert a.ack_credits(["t1", "never-sent"]) == 1  # the number dropped: t1 only
    assert set(a.outbox) == {"t2"}
    assert_conserved(a, b)
    assert a.ack_credits(["t1"]) == 0  # already dropped
    assert a.ack_credits([]) == 0
    # Not money, not journaled: the receiving shard's CREDIT row is the durable proof of delivery.
    assert a.seq == seq_before
    batch = a.drain()
    assert batch.is_empty() and batch.accounts == [] and batch.last_seq == seq_before
    assert 6 not in {kind.value for kind in JournalKind}  # CREDIT_ACKED is retired, never reused
    deliver(a, b)
    assert_conserved(a, b)


def test_a_transfer_between_shards_is_conserved_at_every_step():
    a, b = two_shards()
    assert reserve(a, "t1", major(400)).outcome is Outcome.OK
    assert_conserved(a, b)
    a.commit("t1", T0)
    assert_conserved(a, b)
    deliver(a, b)
    assert value(a, PAYER_POSITION) == major(400) and value(b, PAYEE_POSITION) == -major(400)
    # ... and back, from the payee's shard to the payer's.
    back = b.reserve("t2", PAYEE_POSITION, PAYER_POSITION, major(400) + NDC, T0)
    assert back.outcome is Outcome.OK  # received funds count: headroom is NDC + 400
    assert_conserved(a, b)
    b.commit("t2", T0)
    assert_conserved(a, b)
    deliver(b, a)
    assert value(a, PAYER_POSITION) == -NDC
    assert_conserved(a, b)


# ------------------------------------------------------------------ duplicates report the seq to wait for


def test_duplicates_report_the_seq_of_the_change_they_report():
    book = new_book()
    reserved = reserve(book, "t1")
    assert reserve(book, "t1").seq == reserved.seq
    committed = book.commit("t1", T0)
    assert (reserve(book, "t1").outcome, reserve(book, "t1").seq) == (Outcome.DUPLICATE, committed.seq - 1)
    assert book.commit("t1", T0).seq == committed.seq - 1  # the COMMIT entry; the CREDIT follows it
    assert book.abort("t1", T0).seq == committed.seq - 1
    reserve(book, "t2")
    aborted = book.abort("t2", T0)
    assert book.commit("t2", T0).seq == aborted.seq
    assert reserve(book, "t2").seq == aborted.seq
    assert_conserved(book)


# ------------------------------------------------------------------ funds out


def test_funds_out_is_refused_beyond_the_deposited_balance():
    book = new_book()
    out = {"debit": PAYER_SETTLEMENT, "credit": HUB_RECONCILIATION, "check": Check.FUNDS_AVAILABLE}
    assert reserve(book, "o1", DEPOSIT + 1, **out).outcome is Outcome.INSUFFICIENT_FUNDS
    assert reserve(book, "o1", major(600), **out).outcome is Outcome.OK
    assert value(book, PAYER_SETTLEMENT) == -major(400)
    assert reserve(book, "o2", major(400) + 1, **out).outcome is Outcome.INSUFFICIENT_FUNDS  # sees o1
    assert reserve(book, "o2", major(400), **out).outcome is Outcome.OK
    assert value(book, PAYER_SETTLEMENT) == 0
    assert_conserved(book)
    hub_before = value(book, HUB_RECONCILIATION)
    assert book.commit("o1", T0).outcome is Outcome.OK
    assert value(book, HUB_RECONCILIATION) == hub_before - major(600)
    assert book.abort("o2", T0).outcome is Outcome.OK
    assert value(book, PAYER_SETTLEMENT) == -major(400)
    assert_conserved(book)


@pytest.mark.parametrize("check", [Check.NONE, Check.LIQUIDITY_AND_LIMIT])
def test_a_settlement_debit_without_the_funds_check_is_impossible(check):
    book = new_book()
    before = state_of(book)
    with pytest.raises(InvariantViolation):
        reserve(book, "o1", 1, debit=PAYER_SETTLEMENT, credit=HUB_RECONCILIATION, check=check)
    assert state_of(book) == before  # raised before any change


def test_a_liquidity_check_on_a_hub_account_is_impossible():
    book = new_book()
    with pytest.raises(InvariantViolation):
        book.reserve("h", HUB_RECONCILIATION, PAYER_SETTLEMENT, 1, T0, check=Check.LIQUIDITY_AND_LIMIT)


# ------------------------------------------------------------------ configuration


def test_net_debit_cap_changes():
    book = new_book()
    assert book.set_net_debit_cap(PAYER_POSITION, major(50), T0).outcome is Outcome.OK
    assert reserve(book, "t1", major(51)).outcome is Outcome.LIMIT_EXCEEDED
    assert book.set_net_debit_cap(PAYER_POSITION, -1, T0).outcome is Outcome.INVALID_AMOUNT
    assert book.set_net_debit_cap(PAYER_POSITION, MAX_AMOUNT_MINOR + 1, T0).outcome is Outcome.INVALID_AMOUNT
    assert book.set_net_debit_cap(PAYER_SETTLEMENT, 1, T0).outcome is Outcome.UNKNOWN_ACCOUNT
    assert book.set_net_debit_cap(UNKNOWN_ACCOUNT, 1, T0).outcome is Outcome.UNKNOWN_ACCOUNT
    assert book.accounts[PAYER_POSITION].net_debit_cap_minor == major(50)
    batch = book.drain()
    assert [e.kind for e in batch.entries] == [JournalKind.LIMIT]
    assert [a.net_debit_cap_minor for a in batch.accounts] == [major(50)]
    assert_conserved(book)


def test_activation_changes_are_journaled():
    book = new_book()
    assert book.set_participant_active("nobody", False, T0).outcome is Outcome.UNKNOWN_ACCOUNT
    assert book.set_account_active(UNKNOWN_ACCOUNT, False, T0).outcome is Outcome.UNKNOWN_ACCOUNT
    book.set_participant_active("payer", False, T0)
    book.set_account_active(PAYEE_POSITION, False, T0)
    batch = book.drain()
    assert [e.kind for e in batch.entries] == [JournalKind.PARTICIPANT_ACTIVE, JournalKind.ACCOUNT_ACTIVE]
    assert [(p.name, p.is_active) for p in batch.participants] == [("payer", False)]
    assert [(a.account_id, a.is_active) for a in batch.accounts] == [(PAYEE_POSITION, False)]
    assert_conserved(book)


def test_new_accounts_start_at_zero():
    book = new_book()
    with pytest.raises(InvariantViolation):
        book.add_account(Account(50, "payer", "XXX", AccountType.POSITION, value_minor=1))
    book.add_account(Account(PAYER_POSITION, "payer", CURRENCY, AccountType.POSITION))  # known: ignored
    assert value(book, PAYER_POSITION) == 0
    assert_conserved(book)


# ------------------------------------------------------------------ drain and checkpoints


def checkpoint_rows(batch: FlushBatch) -> tuple[list, list, list, list]:
    """A batch's checkpoint as sorted transfer ids: (reservations in, out, credits in, out)."""
    checkpoint = batch.checkpoint
    assert checkpoint is not None
    return (
        sorted(r.transfer_id for r in checkpoint.reservations_insert),
        sorted(checkpoint.reservations_delete),
        sorted(c.transfer_id for c in checkpoint.credits_insert),
        sorted(checkpoint.credits_delete),
    )


def test_drain_without_checkpoint_writes_no_tables():
    book = new_book()
    reserve(book, "t1")
    batch = book.drain()
    assert batch.checkpoint is None
    assert [e.transfer_id for e in batch.entries] == ["t1"]
    assert book.checkpoint_pending()  # t1 is open and in no table
    assert_conserved(book)


def test_a_reservation_opened_and_closed_between_checkpoints_never_reaches_the_table():
    book = new_book()
    assert checkpoint_rows(book.drain(checkpoint=True)) == ([], [], [], [])
    reserve(book, "old")
    assert book.checkpoint_pending()
    assert checkpoint_rows(book.drain(checkpoint=True)) == (["old"], [], [], [])
    assert not book.checkpoint_pending()
    reserve(book, "brief")
    assert book.checkpoint_pending()
    book.commit("brief", T0)  # opened and closed between two checkpoints
    assert not book.checkpoint_pending()  # nothing for the tables to learn
    book.abort("old", T0)  # written at the last checkpoint, closed since
    assert book.checkpoint_pending()
    batch = book.drain()  # an ordinary flush in between: journal only
    assert batch.checkpoint is None
    assert [e.transfer_id for e in batch.entries] == ["brief", "brief", "brief", "old"]
    assert book.checkpoint_pending()
    batch = book.drain(checkpoint=True)
    assert batch.entries == []
    assert checkpoint_rows(batch) == ([], ["old"], [], [])
    assert not book.checkpoint_pending()
    assert checkpoint_rows(book.drain(checkpoint=True)) == ([], [], [], [])  # deleted once only
    assert_conserved(book)


def test_a_checkpoint_inserts_the_reservations_open_at_the_drain():
    book = new_book()
    reserve(book, "a", major(10), expires_at_ms=T0 + 100)
    reserve(book, "b", major(20))
    reserve(book, "c", major(30))
    book.abort("b", T0)
    batch = book.drain(checkpoint=True)  # the entries and the checkpoint in one transaction
    assert [e.transfer_id for e in batch.entries] == ["a", "b", "c", "b"]
    assert batch.checkpoint.reservations_insert == [
        Reservation("a", PAYER_POSITION, PAYEE_POSITION, major(10), T0 + 100, batch.entries[0].seq),
        Reservation("c", PAYER_POSITION, PAYEE_POSITION, major(30), None, batch.entries[2].seq),
    ]
    assert checkpoint_rows(batch) == (["a", "c"], [], [], [])
    assert_conserved(book)


def test_an_owed_credit_acknowledged_between_checkpoints_never_reaches_the_table():
    a, b = two_shards()
    assert checkpoint_rows(a.drain(checkpoint=True)) == ([], [], [], [])
    reserve(a, "old", major(10))
    a.commit("old", T0)
    assert a.checkpoint_pending()
    assert checkpoint_rows(a.drain(checkpoint=True)) == ([], [], ["old"], [])
    assert not a.checkpoint_pending()
    reserve(a, "brief", major(10))
    a.commit("brief", T0)
    assert a.checkpoint_pending()
    delivered = deliver(a, b)  # queued and acknowledged between two checkpoints, and one from before
    assert sorted(delivered) == ["brief", "old"]
    assert a.checkpoint_pending()  # "old" is still in the table
    assert a.drain().checkpoint is None
    assert checkpoint_rows(a.drain(checkpoint=True)) == ([], [], [], ["old"])
    assert not a.checkpoint_pending()
    assert_conserved(a, b)


def test_a_checkpoint_covers_the_reservation_committed_and_its_credit_owed():
    a, b = two_shards()
    reserve(a, "t1", major(10))
    assert checkpoint_rows(a.drain(checkpoint=True)) == (["t1"], [], [], [])
    a.commit("t1", T0)
    batch = a.drain(checkpoint=True)
    assert checkpoint_rows(batch) == ([], ["t1"], ["t1"], [])
    assert batch.checkpoint.credits_insert == [Credit("t1", PAYEE_POSITION, major(10), CURRENCY)]
    assert_conserved(a, b)


def test_drain_entries_have_consecutive_seqs_and_batches_chain():
    book = new_book()
    seqs = []
    start = previous = book.seq  # new_book drained its setup
    for transfer_id in ("t1", "t2", "t3"):
        reserve(book, transfer_id, major(10))
        batch = book.drain(checkpoint=transfer_id == "t2")
        seqs += [e.seq for e in batch.entries]
        assert batch.last_seq == book.seq == seqs[-1]
        assert batch.previous_seq == previous  # the fence: what the store must still hold
        previous = batch.last_seq
        book.commit(transfer_id, T0)
    batch = book.drain()
    assert batch.previous_seq == previous
    seqs += [e.seq for e in batch.entries]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert seqs[0] == start + 1  # t1's RESERVE follows the setup
    empty = book.drain()
    assert len(empty) == 0 and empty.is_empty()
    assert empty.last_seq == empty.previous_seq == book.seq
    assert empty.checkpoint is None and empty.accounts == [] and empty.participants == []
    # A checkpoint with nothing new to journal is still a batch to write (it moves the checkpoint).
    only_checkpoint = book.drain(checkpoint=True)
    assert not only_checkpoint.is_empty() and len(only_checkpoint) == 0
    assert only_checkpoint.last_seq == only_checkpoint.previous_seq == book.seq
    assert checkpoint_rows(only_checkpoint) == ([], ["t2"], [], [])
    assert_conserved(book)


def test_journal_entries_carry_what_recovery_needs():
    a, b = two_shards()
    reserve(a, "t1", major(10), expires_at_ms=T0 + 500)
    a.commit("t1", T0)
    reserve(a, "t2", major(20), credit=HUB_SETTLEMENT, check=Check.LIQUIDITY_AND_LIMIT)
    a.abort("t2", T0, "no")
    entries = a.drain().entries
    assert [(e.kind, e.transfer_id, e.account_id, e.counter_account_id, e.expires_at_ms) for e in entries] == [
        (JournalKind.RESERVE, "t1", PAYER_POSITION, PAYEE_POSITION, T0 + 500),
        (JournalKind.COMMIT, "t1", PAYER_POSITION, PAYEE_POSITION, None),
        (JournalKind.RESERVE, "t2", PAYER_POSITION, HUB_SETTLEMENT, None),
        (JournalKind.ABORT, "t2", PAYER_POSITION, 0, None),
    ]
    assert_conserved(a, b)


def test_drain_snapshots_only_touched_accounts_as_copies():
    book = new_book()
    reserve(book, "t1", major(10))
    batch = book.drain()
    assert [a.account_id for a in batch.accounts] == [PAYER_POSITION]
    snapshot = batch.accounts[0]
    assert snapshot is not book.accounts[PAYER_POSITION]
    snapshot.value_minor = 12345  # the writer mangling its copy does not reach the book
    assert value(book, PAYER_POSITION) == major(10)
    book.commit("t1", T0)  # and later changes do not reach the snapshot
    assert book.accounts[PAYER_POSITION].reserved_minor == 0
    assert snapshot.reserved_minor == major(10)
    assert_conserved(book)


# ------------------------------------------------------------------ recovery


class Durable:
    """What Postgres holds for one shard: written only through FlushBatch, read back as actors/store.py
    ``load`` does (account rows, the tables as of the last checkpoint, the journal tail after it)."""

    def __init__(self, book: PositionBook):
        # The rows the admin layer created before the shard started: participants and accounts at zero.
        assert all(a.value_minor == a.reserved_minor == 0 for a in book.accounts.values())
        self.shard_id = book.shard_id
        self.participants = {name: p.is_active for name, p in book.participants.items()}
        self.accounts = {a: _copy(x) for a, x in book.accounts.items()}
        self.journal: list[JournalEntry] = []
        self.reservations: dict[str, Reservation] = {}  # open_reservation
        self.credits: dict[str, Credit] = {}  # pending_credit
        self.last_seq = 0
        self.checkpoint_seq = 0

    def write(self, batch: FlushBatch) -> None:
        assert not batch.is_empty()
        assert batch.previous_seq == self.last_seq, "fenced out"
        assert [e.seq for e in batch.entries] == list(range(self.last_seq + 1, batch.last_seq + 1))
        self.journal += batch.entries
        for account in batch.accounts:
            self.accounts[account.account_id] = _copy(account)
        for participant in batch.participants:
            self.participants[participant.name] = participant.is_active
        checkpoint = batch.checkpoint
        if checkpoint is not None:
            for transfer_id in checkpoint.reservations_delete:
                del self.reservations[transfer_id]
            for r in checkpoint.reservations_insert:
                assert r.transfer_id not in self.reservations, f"{r.transfer_id} inserted twice"
                self.reservations[r.transfer_id] = r
            for transfer_id in checkpoint.credits_delete:
                del self.credits[transfer_id]
            for c in checkpoint.credits_insert:
                assert c.transfer_id not in self.credits, f"credit {c.transfer_id} inserted twice"
                self.credits[c.transfer_id] = c
            self.checkpoint_seq = batch.last_seq
        self.last_seq = batch.last_seq

    def tail(self) -> list[JournalEntry]:
        kinds = (JournalKind.RESERVE, *TERMINAL_KINDS)
        return [e for e in self.journal if e.seq > self.checkpoint_seq and e.kind in kinds]

    def load(self, *others: Durable) -> PositionBook:
        """A new book after a crash; ``others``: the other shards' stores (their CREDIT rows)."""
        window = 200_000
        book = PositionBook(self.shard_id, last_seq=self.last_seq, dedupe_window=window)
        for name, is_active in self.participants.items():
            book.load_participant(name, is_active)
        for account_id in sorted(self.accounts):
            book.load_account(_copy(self.accounts[account_id]))
        replay = Replay.from_tables(
            sorted(self.reservations.values(), key=lambda r: r.reserved_seq), list(self.credits.values())
        )
        replay.fold(self.tail(), book)
        owed = set(replay.owed_credit_ids())
        delivered = {
            e.transfer_id
            for store in (self, *others)
            for e in store.journal
            if e.kind is JournalKind.CREDIT and e.transfer_id in owed
        }
        replay.apply(book, delivered)
        for e in [e for e in self.journal if e.kind in TERMINAL_KINDS][-window:]:
            book.load_finished(
                e.transfer_id, TransferState.COMMITTED if e.kind is JournalKind.COMMIT else TransferState.ABORTED
            )
        for e in [e for e in self.journal if e.kind is JournalKind.CREDIT][-window:]:
            book.load_credited(e.transfer_id)
        book.check_invariants()
        return book


def _copy(a: Account) -> Account:
    return Account(
        a.account_id, a.participant, a.currency, a.account_type, a.value_minor, a.reserved_minor, a.is_active,
        a.net_debit_cap_minor,
    )


def flush(book: PositionBook, store: Durable, *, checkpoint: bool = False) -> FlushBatch:
    batch = book.drain(checkpoint=checkpoint)
    if not batch.is_empty():
        store.write(batch)
    return batch


OTHER_POSITION, OTHER_SETTLEMENT = 31, 32
# The default: the first flush is a checkpoint, the second is not, and the crash comes after it.
BETWEEN_CHECKPOINTS = (True, False, False)


def busy_book(checkpoints: tuple[bool, bool, bool] = BETWEEN_CHECKPOINTS):
    """A book after a mix of everything, with its durable store, and the other shard it trades with
    (DFSP "other") with its store. Everything is flushed: the book's two flushes are checkpoints or not
    as ``checkpoints`` says, and its third is a checkpoint with no entries (or none)."""
    book, other = PositionBook(0), PositionBook(1)
    add_hub(book)
    add_dfsp(book, "payer", PAYER_POSITION, PAYER_SETTLEMENT, major(2000))
    add_dfsp(book, "payee", PAYEE_POSITION, PAYEE_SETTLEMENT, NDC)
    add_dfsp(other, "other", OTHER_POSITION, OTHER_SETTLEMENT, NDC)
    store, other_store = Durable(book), Durable(other)
    funds_in(book, PAYER_SETTLEMENT, DEPOSIT)
    funds_in(book, OTHER_SETTLEMENT, DEPOSIT)
    deliver(book, other)
    other.reserve("from-elsewhere", OTHER_POSITION, PAYEE_POSITION, major(70), T0)
    other.commit("from-elsewhere", T0)
    flush(other, other_store, checkpoint=True)  # "from-elsewhere" owed, in the other shard's table
    reserve(book, "committed", major(10))
    book.commit("committed", T0)
    reserve(book, "aborted", major(20))
    book.abort("aborted", T0)
    reserve(book, "expired", major(30), expires_at_ms=T0 + 5)
    book.expire(T0 + 5)
    reserve(book, "open-old", major(15), expires_at_ms=T0 + 2000)
    reserve(book, "closed-later", major(25))
    for transfer_id, amount in (("remote-old", 35), ("remote-old-delivered", 45)):
        reserve(book, transfer_id, major(amount), credit=OTHER_POSITION)
        book.commit(transfer_id, T0)
    flush(book, store, checkpoint=checkpoints[0])
    book.commit("closed-later", T0)
    reserve(book, "open", major(40))
    reserve(book, "open-expiring", major(50), expires_at_ms=T0 + 1000)
    for transfer_id, amount in (("remote", 60), ("remote-delivered", 55)):
        reserve(book, transfer_id, major(amount), credit=OTHER_POSITION)  # the credit account is on the other shard
        book.commit(transfer_id, T0)
    assert_conserved(book, other)
    deliver(other, book)  # "from-elsewhere"
    book.set_account_active(PAYEE_SETTLEMENT, False, T0)
    out = book.reserve(
        "funds-out", PAYER_SETTLEMENT, HUB_RECONCILIATION, major(100), T0, check=Check.FUNDS_AVAILABLE
    )
    assert out.outcome is Outcome.OK
    flush(book, store, checkpoint=checkpoints[1])
    # Two credits reach the other shard durably; their acknowledgements (not journaled) arrive too.
    for transfer_id in ("remote-old-delivered", "remote-delivered"):
        assert other.apply_credit(book.outbox[transfer_id], T0).outcome is Outcome.OK
    flush(other, other_store, checkpoint=True)
    assert book.ack_credits(["remote-old-delivered", "remote-delivered"]) == 2
    if checkpoints[2]:
        assert len(flush(book, store, checkpoint=True)) == 0
    assert book.seq == store.last_seq and other.seq == other_store.last_seq
    assert_conserved(book, other)
    return book, store, other, other_store


PLACEMENTS = list(itertools.product((False, True), repeat=3))


@pytest.mark.parametrize("checkpoints", PLACEMENTS, ids=["".join("C" if c else "-" for c in p) for p in PLACEMENTS])
def test_reload_rebuilds_the_same_book(checkpoints):
    old, store, other, other_store = busy_book(checkpoints)
    new = store.load(other_store)
    assert state_of(new) == state_of(old)
    assert new.currency_totals() == old.currency_totals()
    assert {t: new.transfer_state(t) for t in ("committed", "aborted", "expired", "open", "remote")} == {
        "committed": TransferState.COMMITTED,
        "aborted": TransferState.ABORTED,
        "expired": TransferState.ABORTED,
        "open": TransferState.RESERVED,
        "remote": TransferState.COMMITTED,
    }
    assert_conserved(new, other)
    # The rebuilt book knows which rows are in the tables: its next checkpoint is the crashed one's.
    assert new.checkpoint_pending() == old.checkpoint_pending() == (not checkpoints[2])
    assert new.next_expiry_ms() == old.next_expiry_ms() == T0 + 1000
    new_batch, old_batch = new.drain(checkpoint=True), old.drain(checkpoint=True)
    assert checkpoint_rows(new_batch) == checkpoint_rows(old_batch)
    assert (new_batch.previous_seq, new_batch.last_seq) == (old_batch.previous_seq, old_batch.last_seq)
    store.write(new_batch)
    assert sorted(store.reservations) == sorted(new.reservations)
    assert sorted(store.credits) == sorted(new.outbox)
    assert store.load(other_store).reservations == new.reservations  # and once more, from the tables alone
    assert_conserved(new, other)


def test_reload_between_checkpoints_folds_the_journal_tail_over_the_tables():
    old, store, other, other_store = busy_book(BETWEEN_CHECKPOINTS)
    assert sorted(store.reservations) == ["closed-later", "open-old"]  # as at the checkpoint
    assert sorted(store.credits) == ["remote-old", "remote-old-delivered"]
    new = store.load(other_store)
    assert sorted(new.reservations) == ["funds-out", "open", "open-expiring", "open-old"]
    assert new.outbox == {
        "remote-old": Credit("remote-old", OTHER_POSITION, major(35), CURRENCY),  # from the table
        "remote": Credit("remote", OTHER_POSITION, major(60), CURRENCY),  # from the tail
    }
    # The next checkpoint inserts what the tail opened and deletes what it closed or delivered.
    assert checkpoint_rows(new.drain(checkpoint=True)) == (
        ["funds-out", "open", "open-expiring"],
        ["closed-later"],
        ["remote"],
        ["remote-old-delivered"],
    )
    assert_conserved(new, other)


def test_reload_right_after_a_checkpoint_needs_no_tail():
    old, store, other, other_store = busy_book((False, True, False))
    assert store.tail() == []
    assert sorted(store.reservations) == sorted(old.reservations)
    new = store.load(other_store)
    assert state_of(new) == state_of(old)
    # The acknowledged credit still in the table is dropped at load (its CREDIT row exists) and deleted next.
    assert checkpoint_rows(new.drain(checkpoint=True)) == ([], [], [], ["remote-delivered", "remote-old-delivered"])
    assert_conserved(new, other)


def test_reload_before_any_checkpoint_replays_the_whole_journal():
    old, store, other, other_store = busy_book((False, False, False))
    assert store.checkpoint_seq == 0 and not store.reservations and not store.credits
    new = store.load(other_store)
    assert state_of(new) == state_of(old)
    assert checkpoint_rows(new.drain(checkpoint=True)) == (
        ["funds-out", "open", "open-expiring", "open-old"], [], ["remote", "remote-old"], []
    )
    assert_conserved(new, other)


def test_reload_loses_only_what_was_not_durable():
    old, store, other, other_store = busy_book()
    durable_state = state_of(old)
    reserve(old, "lost", major(5))
    old.commit("open", T0)
    reserve(old, "lost-remote", major(5), credit=OTHER_POSITION)
    old.commit("lost-remote", T0)
    old.drain(checkpoint=True)  # handed over, never written: the shard crashes
    new = store.load(other_store)
    assert state_of(new) == durable_state
    assert new.transfer_state("lost") is None and new.transfer_state("lost-remote") is None
    assert new.transfer_state("open") is TransferState.RESERVED
    assert "lost-remote" not in new.outbox
    # The lost checkpoint did not reach the tables; the rebuilt book writes its own.
    assert checkpoint_rows(new.drain(checkpoint=True)) == (
        ["funds-out", "open", "open-expiring"], ["closed-later"], ["remote"], ["remote-old-delivered"]
    )
    assert_conserved(new, other)


def test_reload_after_a_credit_delivered_but_not_acknowledged():
    old, store, other, other_store = busy_book()
    assert other.apply_credit(old.outbox["remote"], T0).outcome is Outcome.OK
    flush(other, other_store)  # durable there; the acknowledgement is lost with the crash
    new = store.load(other_store)
    assert new.outbox == {"remote-old": Credit("remote-old", OTHER_POSITION, major(35), CURRENCY)}
    assert_conserved(new, other)
    # A redelivery from the crashed shard's outbox would have been recognised there.
    assert other.apply_credit(old.outbox["remote"], T0).outcome is Outcome.DUPLICATE


def test_reload_still_recognises_duplicates():
    old, store, other, other_store = busy_book()
    new = store.load(other_store)
    before = state_of(new)
    for transfer_id, state in (
        ("committed", TransferState.COMMITTED),
        ("aborted", TransferState.ABORTED),
        ("expired", TransferState.ABORTED),
        ("open", TransferState.RESERVED),
        ("open-old", TransferState.RESERVED),
        ("closed-later", TransferState.COMMITTED),
        ("remote", TransferState.COMMITTED),
        ("remote-delivered", TransferState.COMMITTED),
        ("funds-out", TransferState.RESERVED),
    ):
        result = reserve(new, transfer_id, major(40))
        assert (result.outcome, result.state) == (Outcome.DUPLICATE, state), transfer_id
    assert new.commit("committed", T0).outcome is Outcome.ALREADY_COMMITTED
    assert new.commit("closed-later", T0).outcome is Outcome.ALREADY_COMMITTED
    assert new.abort("aborted", T0).outcome is Outcome.ALREADY_ABORTED
    # Credits applied before the restart, from another shard or locally at commit:
    for transfer_id, account_id, amount in (
        ("from-elsewhere", PAYEE_POSITION, 70),
        ("committed", PAYEE_POSITION, 10),
    ):
        result = new.apply_credit(Credit(transfer_id, account_id, major(amount), CURRENCY), T0)
        assert (result.outcome, result.seq) == (Outcome.DUPLICATE, 0)  # 0: known durable
    assert state_of(new) == before
    assert new.drain().is_empty()
    # And the other shard, rebuilt too, still recognises the credits it applied.
    other_new = other_store.load(store)
    for transfer_id in ("remote-old-delivered", "remote-delivered"):
        result = other_new.apply_credit(Credit(transfer_id, OTHER_POSITION, 1, CURRENCY), T0)
        assert (result.outcome, result.seq) == (Outcome.DUPLICATE, 0)
    assert_conserved(new, other_new)


def test_reload_keeps_serving_loaded_reservations_and_the_outbox():
    old, store, other, other_store = busy_book()
    new = store.load(other_store)
    result = new.commit("open", T0)
    assert result.outcome is Outcome.OK
    assert result.seq == old.seq + 2  # the journal goes on from the loaded last_seq (COMMIT, CREDIT)
    assert new.next_expiry_ms() == T0 + 1000  # the expiry heap is rebuilt, from the tail and the table
    assert [t for t, _ in new.expire(T0 + 1000)] == ["open-expiring"]
    assert new.next_expiry_ms() == T0 + 2000
    assert [t for t, _ in new.expire(T0 + 2000)] == ["open-old"]
    assert new.outbox == {
        "remote-old": Credit("remote-old", OTHER_POSITION, major(35), CURRENCY),
        "remote": Credit("remote", OTHER_POSITION, major(60), CURRENCY),
    }
    assert sorted(deliver(new, other)) == ["remote", "remote-old"]
    assert new.commit("funds-out", T0).outcome is Outcome.OK
    batch = flush(new, store, checkpoint=True)
    assert batch.previous_seq == old.seq  # the fence holds: the new book follows the durable journal
    assert checkpoint_rows(batch) == ([], ["closed-later", "open-old"], [], ["remote-old", "remote-old-delivered"])
    assert not store.reservations and not store.credits
    assert_conserved(new, other)


def test_reload_detects_a_reserved_value_that_does_not_match_the_reservations():
    _, store, _, other_store = busy_book()
    store.accounts[PAYER_POSITION].reserved_minor += 1  # as if the row and the reservations disagreed
    with pytest.raises(InvariantViolation):
        store.load(other_store)


def test_reload_detects_a_tail_reservation_missing_from_the_account_row():
    _, store, _, other_store = busy_book()
    store.journal.append(
        JournalEntry(store.last_seq + 1, JournalKind.RESERVE, "ghost", PAYER_POSITION, 1, T0, "", PAYEE_POSITION)
    )
    store.last_seq += 1
    with pytest.raises(InvariantViolation):
        store.load(other_store)


def test_reload_detects_a_settlement_balance_above_zero():
    _, store, _, other_store = busy_book()
    store.accounts[PAYEE_SETTLEMENT].value_minor = 1
    with pytest.raises(InvariantViolation):
        store.load(other_store)


# ------------------------------------------------------------------ core/recovery.py


def tail_entry(seq: int, kind: JournalKind, transfer_id: str, amount: int, counter: int = 0, expires=None):
    return JournalEntry(seq, kind, transfer_id, PAYER_POSITION, amount, T0, "", counter, expires)


def payer_only_book(*, value_minor: int, reserved_minor: int, payee_here: bool = True) -> PositionBook:
    """A book being loaded: the payer's accounts as their rows say, the payee here or on another shard."""
    book = PositionBook(0, last_seq=100)
    book.load_participant("payer", True)
    book.load_account(Account(PAYER_POSITION, "payer", CURRENCY, AccountType.POSITION, value_minor, reserved_minor,
                              net_debit_cap_minor=NDC))
    book.load_account(Account(PAYER_SETTLEMENT, "payer", CURRENCY, AccountType.SETTLEMENT, -DEPOSIT))
    if payee_here:
        book.load_participant("payee", True)
        credited = value_minor - reserved_minor  # the committed part, credited here
        book.load_account(Account(PAYEE_POSITION, "payee", CURRENCY, AccountType.POSITION, -credited))
    book.load_participant(HUB, True)
    book.load_account(Account(HUB_RECONCILIATION, HUB, CURRENCY, AccountType.HUB_RECONCILIATION, DEPOSIT))
    return book


def test_replay_closes_a_persisted_reservation_closed_in_the_tail():
    # Tables: p-open and p-closed. Tail: RESERVE n, COMMIT p-closed (+ its local CREDIT), brief opened and aborted.
    table = [
        Reservation("p-open", PAYER_POSITION, PAYEE_POSITION, 10, None, 1),
        Reservation("p-closed", PAYER_POSITION, PAYEE_POSITION, 20, T0 + 9, 2),
    ]
    replay = Replay.from_tables(table, [])
    book = payer_only_book(value_minor=10 + 20 + 30, reserved_minor=10 + 30)
    replay.fold(
        [
            tail_entry(101, JournalKind.RESERVE, "n", 30, PAYEE_POSITION, T0 + 50),
            tail_entry(102, JournalKind.COMMIT, "p-closed", 20, PAYEE_POSITION),
            JournalEntry(103, JournalKind.CREDIT, "p-closed", PAYEE_POSITION, 20, T0),  # ignored by the fold
            tail_entry(104, JournalKind.RESERVE, "brief", 40, PAYEE_POSITION),
            tail_entry(105, JournalKind.ABORT, "brief", 40),
        ],
        book,
    )
    assert replay.closed_persisted == ["p-closed"]
    assert {t: persisted for t, (_, persisted) in replay.reservations.items()} == {"p-open": True, "n": False}
    assert replay.reservations["n"][0] == Reservation("n", PAYER_POSITION, PAYEE_POSITION, 30, T0 + 50, 101)
    # A candidate, but the payee is on this shard: its CREDIT row came with the COMMIT, so delivered.
    assert replay.owed_credit_ids() == ["p-closed"]
    replay.apply(book, {"p-closed"})
    book.check_invariants()
    assert sorted(book.reservations) == ["n", "p-open"] and not book.outbox
    assert book.next_expiry_ms() == T0 + 50
    assert book.checkpoint_pending()
    assert checkpoint_rows(book.drain(checkpoint=True)) == (["n"], ["p-closed"], [], [])
    assert not book.checkpoint_pending()


def test_replay_of_a_persisted_reservation_committed_to_another_shard():
    replay = Replay.from_tables([Reservation("p", PAYER_POSITION, PAYEE_POSITION, 20, None, 7)], [])
    book = payer_only_book(value_minor=20, reserved_minor=0, payee_here=False)
    replay.fold([tail_entry(101, JournalKind.COMMIT, "p", 20, PAYEE_POSITION)], book)
    assert replay.closed_persisted == ["p"]
    assert replay.owed_credit_ids() == ["p"]
    replay.apply(book, set())
    book.check_invariants()
    assert book.outbox == {"p": Credit("p", PAYEE_POSITION, 20, CURRENCY)}
    assert checkpoint_rows(book.drain(checkpoint=True)) == ([], ["p"], ["p"], [])


def test_replay_drops_owed_credits_already_delivered():
    credits = [
        Credit("c-table", PAYEE_POSITION, 5, CURRENCY),
        Credit("c-table-delivered", PAYEE_POSITION, 6, CURRENCY),
    ]
    replay = Replay.from_tables([], credits)
    book = payer_only_book(value_minor=5 + 6 + 7 + 8, reserved_minor=0, payee_here=False)
    replay.fold(
        [
            tail_entry(101, JournalKind.RESERVE, "c-tail", 7, PAYEE_POSITION),
            tail_entry(102, JournalKind.COMMIT, "c-tail", 7, PAYEE_POSITION),
            tail_entry(103, JournalKind.RESERVE, "c-tail-delivered", 8, PAYEE_POSITION),
            tail_entry(104, JournalKind.COMMIT, "c-tail-delivered", 8, PAYEE_POSITION),
        ],
        book,
    )
    assert replay.owed_credit_ids() == ["c-table", "c-table-delivered", "c-tail", "c-tail-delivered"]
    replay.apply(book, {"c-table-delivered", "c-tail-delivered", "not-owed"})
    book.check_invariants()
    assert book.outbox == {
        "c-table": Credit("c-table", PAYEE_POSITION, 5, CURRENCY),
        "c-tail": Credit("c-tail", PAYEE_POSITION, 7, CURRENCY),
    }
    # The delivered one still in its table goes at the next checkpoint; the tail's one never got there.
    assert checkpoint_rows(book.drain(checkpoint=True)) == ([], [], ["c-tail"], ["c-table-delivered"])
    # An acknowledgement of a credit in the table deletes it at the next checkpoint too.
    assert book.ack_credits(["c-table"]) == 1
    assert checkpoint_rows(book.drain(checkpoint=True)) == ([], [], [], ["c-table"])


def test_replay_owes_nothing_for_a_commit_to_a_local_account():
    """Every commit is a candidate; the local credit's CREDIT row (same flush) proves it delivered."""
    replay = Replay.from_tables([], [])
    book = payer_only_book(value_minor=9, reserved_minor=0)
    replay.fold(
        [
            tail_entry(101, JournalKind.RESERVE, "local", 9, PAYEE_POSITION),
            tail_entry(102, JournalKind.COMMIT, "local", 9, PAYEE_POSITION),
        ],
        book,
    )
    assert replay.owed_credit_ids() == ["local"]
    assert replay.reservations == {} and replay.closed_persisted == []
    replay.apply(book, {"local"})
    book.check_invariants()
    assert not book.outbox and not book.reservations
    assert not book.checkpoint_pending()


def test_replay_of_expired_and_aborted_reservations_owes_nothing():
    replay = Replay.from_tables([Reservation("p", PAYER_POSITION, PAYEE_POSITION, 3, T0, 1)], [])
    book = payer_only_book(value_minor=0, reserved_minor=0, payee_here=False)
    replay.fold(
        [
            tail_entry(101, JournalKind.EXPIRE, "p", 3),
            tail_entry(102, JournalKind.RESERVE, "a", 4, PAYEE_POSITION),
            tail_entry(103, JournalKind.ABORT, "a", 4),
        ],
        book,
    )
    assert replay.owed_credit_ids() == [] and replay.reservations == {}
    assert replay.closed_persisted == ["p"]
    replay.apply(book, set())
    book.check_invariants()
    assert checkpoint_rows(book.drain(checkpoint=True)) == ([], ["p"], [], [])


def test_the_dedupe_window_is_bounded():
    book = new_book(dedupe_window=2)
    for transfer_id in ("t1", "t2", "t3"):
        reserve(book, transfer_id, major(10))
        book.abort(transfer_id, T0)
    assert reserve(book, "t3").outcome is Outcome.DUPLICATE
    assert reserve(book, "t1", major(10)).outcome is Outcome.OK  # forgotten: the window holds two
    assert_conserved(book)


def test_expiry_heap_is_rebuilt_when_closed_entries_dominate():
    """Far-future expirations of committed transfers must not keep heap entries forever."""
    book = new_book()
    far = T0 + 10**12
    for n in range(3_000):
        assert reserve(book, f"t{n}", 1, expires_at_ms=far).outcome is Outcome.OK
        assert book.commit(f"t{n}", T0).outcome is Outcome.OK
    assert len(book._expiry_heap) == 3_000
    assert book.expire(T0 + 1) == []
    assert len(book._expiry_heap) <= 1024
    book.check_invariants()
