"""The pure ledger core (core/ledger.py): reserve / commit / abort / expire / credits / drain / reload.

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
    InvariantViolation,
    JournalEntry,
    JournalKind,
    Outcome,
    PositionBook,
    Reservation,
    TransferState,
)
from core.money import MAX_AMOUNT_MINOR, MINOR_PER_MAJOR

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
    source.ack_credits(delivered, now)
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
    assert a.ack_credits(["t1"], T0) > 0
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


def test_ack_credits_drops_outbox_entries():
    a, b = two_shards()
    for transfer_id in ("t1", "t2"):
        reserve(a, transfer_id, major(10))
        a.commit(transfer_id, T0)
    assert set(a.outbox) == {"t1", "t2"}
    b.apply_credit(a.outbox["t1"], T0)
    seq_before = a.seq
    assert a.ack_credits(["t1", "never-sent"], T0) == seq_before + 1  # one entry, for t1 only
    assert set(a.outbox) == {"t2"}
    assert_conserved(a, b)
    assert a.ack_credits(["t1"], T0) == 0  # already dropped: nothing journaled
    assert a.seq == seq_before + 1
    acked = [e for e in a.drain().entries if e.kind is JournalKind.CREDIT_ACKED]
    assert [(e.transfer_id, e.account_id, e.amount_minor) for e in acked] == [
        ("t1", PAYEE_POSITION, major(10))
    ]
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


# ------------------------------------------------------------------ drain


def test_drain_nets_reservations_within_one_batch():
    book = new_book()
    reserve(book, "old")
    assert [r.transfer_id for r in book.drain().reservations_added] == ["old"]
    reserve(book, "brief")
    book.commit("brief", T0)  # opened and closed in this batch
    book.abort("old", T0)  # opened in the previous batch, closed in this one
    batch = book.drain()
    assert batch.reservations_added == []
    assert batch.reservations_removed == ["old"]
    assert [e.transfer_id for e in batch.entries] == ["brief", "brief", "brief", "old"]
    assert_conserved(book)


def test_drain_nets_outbound_credits_within_one_batch():
    a, b = two_shards()
    reserve(a, "old", major(10))
    a.commit("old", T0)
    assert [c.transfer_id for c in a.drain().credits_added] == ["old"]
    reserve(a, "brief", major(10))
    a.commit("brief", T0)
    delivered = deliver(a, b)  # queued and acknowledged in the same batch, and one from before
    assert sorted(delivered) == ["brief", "old"]
    batch = a.drain()
    assert batch.credits_added == []
    assert batch.credits_removed == ["old"]
    assert_conserved(a, b)


def test_drain_entries_have_consecutive_seqs_across_batches():
    book = new_book()
    seqs = []
    for transfer_id in ("t1", "t2", "t3"):
        reserve(book, transfer_id, major(10))
        batch = book.drain()
        seqs += [e.seq for e in batch.entries]
        assert batch.last_seq == book.seq == seqs[-1]
        book.commit(transfer_id, T0)
    batch = book.drain()
    seqs += [e.seq for e in batch.entries]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    empty = book.drain()
    assert len(empty) == 0 and empty.last_seq == book.seq
    assert_conserved(book)


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


def reload(old: PositionBook, journal: list[JournalEntry], dedupe_window: int | None = None) -> PositionBook:
    """A new book from the old one's state, loaded the way actors/store.py ``load`` does."""
    window = dedupe_window or old.dedupe_window
    book = PositionBook(old.shard_id, last_seq=old.seq, dedupe_window=window)
    for participant in old.participants.values():
        book.load_participant(participant.name, participant.is_active)
    for account_id in sorted(old.accounts):
        a = old.accounts[account_id]
        book.load_account(
            Account(
                a.account_id,
                a.participant,
                a.currency,
                a.account_type,
                a.value_minor,
                a.reserved_minor,
                a.is_active,
                a.net_debit_cap_minor,
            )
        )
    for r in sorted(old.reservations.values(), key=lambda r: r.reserved_seq):
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
    for c in old.outbox.values():
        book.load_outbox_credit(Credit(c.transfer_id, c.credit_account_id, c.amount_minor, c.currency))
    for e in [e for e in journal if e.kind in TERMINAL_KINDS][-window:]:
        book.load_finished(
            e.transfer_id, TransferState.COMMITTED if e.kind is JournalKind.COMMIT else TransferState.ABORTED
        )
    for e in [e for e in journal if e.kind is JournalKind.CREDIT][-window:]:
        book.load_credited(e.transfer_id)
    book.check_invariants()
    return book


OTHER_POSITION, OTHER_SETTLEMENT = 31, 32


def busy_book() -> tuple[PositionBook, list[JournalEntry], PositionBook]:
    """A book after a mix of everything, with its whole journal (every batch drained), and the other
    shard it trades with (DFSP "other")."""
    journal: list[JournalEntry] = []
    book, other = PositionBook(0), PositionBook(1)
    add_hub(book)
    add_dfsp(book, "payer", PAYER_POSITION, PAYER_SETTLEMENT, major(2000))
    add_dfsp(book, "payee", PAYEE_POSITION, PAYEE_SETTLEMENT, NDC)
    add_dfsp(other, "other", OTHER_POSITION, OTHER_SETTLEMENT, NDC)
    funds_in(book, PAYER_SETTLEMENT, DEPOSIT)
    funds_in(book, OTHER_SETTLEMENT, DEPOSIT)
    deliver(book, other)
    other.reserve("from-elsewhere", OTHER_POSITION, PAYEE_POSITION, major(70), T0)
    other.commit("from-elsewhere", T0)
    journal += book.drain().entries
    reserve(book, "committed", major(10))
    book.commit("committed", T0)
    reserve(book, "aborted", major(20))
    book.abort("aborted", T0)
    reserve(book, "expired", major(30), expires_at_ms=T0 + 5)
    book.expire(T0 + 5)
    journal += book.drain().entries
    reserve(book, "open", major(40))
    reserve(book, "open-expiring", major(50), expires_at_ms=T0 + 1000)
    reserve(book, "remote", major(60), credit=OTHER_POSITION)  # the credit account is on the other shard
    book.commit("remote", T0)
    assert_conserved(book, other)
    deliver(other, book)  # "from-elsewhere"; "remote" stays in flight
    book.set_account_active(PAYEE_SETTLEMENT, False, T0)
    out = book.reserve(
        "funds-out", PAYER_SETTLEMENT, HUB_RECONCILIATION, major(100), T0, check=Check.FUNDS_AVAILABLE
    )
    assert out.outcome is Outcome.OK
    journal += book.drain().entries
    assert_conserved(book, other)
    return book, journal, other


def test_reload_rebuilds_the_same_book():
    old, journal, other = busy_book()
    new = reload(old, journal)
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


def test_reload_still_recognises_duplicates():
    old, journal, other = busy_book()
    new = reload(old, journal)
    before = state_of(new)
    for transfer_id, state in (
        ("committed", TransferState.COMMITTED),
        ("aborted", TransferState.ABORTED),
        ("expired", TransferState.ABORTED),
        ("open", TransferState.RESERVED),
        ("remote", TransferState.COMMITTED),
        ("funds-out", TransferState.RESERVED),
    ):
        result = reserve(new, transfer_id, major(40))
        assert (result.outcome, result.state) == (Outcome.DUPLICATE, state), transfer_id
    assert new.commit("committed", T0).outcome is Outcome.ALREADY_COMMITTED
    assert new.abort("aborted", T0).outcome is Outcome.ALREADY_ABORTED
    # Credits applied before the restart, from another shard or locally at commit:
    for transfer_id, account_id, amount in (
        ("from-elsewhere", PAYEE_POSITION, 70),
        ("committed", PAYEE_POSITION, 10),
    ):
        result = new.apply_credit(Credit(transfer_id, account_id, major(amount), CURRENCY), T0)
        assert (result.outcome, result.seq) == (Outcome.DUPLICATE, 0)  # 0: known durable
    assert state_of(new) == before
    assert_conserved(new, other)


def test_reload_keeps_serving_loaded_reservations_and_the_outbox():
    old, journal, other = busy_book()
    new = reload(old, journal)
    result = new.commit("open", T0)
    assert result.outcome is Outcome.OK
    assert result.seq == old.seq + 2  # the journal goes on from the loaded last_seq (COMMIT, CREDIT)
    assert new.next_expiry_ms() == T0 + 1000  # the expiry heap is rebuilt
    assert [t for t, _ in new.expire(T0 + 1000)] == ["open-expiring"]
    assert new.outbox == {"remote": Credit("remote", OTHER_POSITION, major(60), CURRENCY)}
    assert deliver(new, other) == ["remote"]
    assert new.commit("funds-out", T0).outcome is Outcome.OK
    batch = new.drain()
    assert sorted(batch.reservations_removed) == ["funds-out", "open", "open-expiring"]
    assert batch.credits_removed == ["remote"]
    assert_conserved(new, other)


def test_reload_detects_a_reserved_value_that_does_not_match_the_reservations():
    old, journal, _ = busy_book()
    old.accounts[PAYER_POSITION].reserved_minor += 1  # as if the row and the reservations disagreed
    with pytest.raises(InvariantViolation):
        reload(old, journal)


def test_reload_detects_a_settlement_balance_above_zero():
    old, journal, _ = busy_book()
    old.accounts[PAYEE_SETTLEMENT].value_minor = 1
    with pytest.raises(InvariantViolation):
        reload(old, journal)


def test_the_dedupe_window_is_bounded():
    book = new_book(dedupe_window=2)
    for transfer_id in ("t1", "t2", "t3"):
        reserve(book, transfer_id, major(10))
        book.abort(transfer_id, T0)
    assert reserve(book, "t3").outcome is Outcome.DUPLICATE
    assert reserve(book, "t1", major(10)).outcome is Outcome.OK  # forgotten: the window holds two
    assert_conserved(book)
