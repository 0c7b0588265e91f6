"""Settlement rules (pure, synchronous, no I/O): window and settlement state machines, netting, fees,
and the ledger moves a settlement makes (RULES.md section 15, central-settlement v2).

The shells (``cluster/settlement.py``, ``api/settlement.py``) read rows, call these functions and
write what they return; every decision about states and amounts is made here, so it is unit tested
without Postgres or Ray (``tests/test_settlement_core.py``).

Window states follow their content (one row per currency and ledger account type)::

    OPEN -> PROCESSING -> CLOSED -> PENDING_SETTLEMENT -> SETTLED
                       \\-> FAILED          \\-> ABORTED -> PENDING_SETTLEMENT (settled again)

A window's state is the *lowest* state of its content (a window with one currency settled and one
pending is PENDING_SETTLEMENT).

Settlement accounts advance one step at a time (``ACCOUNT_NEXT``); a settlement is in the lowest
state of its accounts, except that some accounts SETTLED and the rest PS_TRANSFERS_COMMITTED is
SETTLING. It can be ABORTED only while no account has reached PS_TRANSFERS_COMMITTED.

Amounts are ``int`` ledger minor units. Sign convention as in the ledger: a net amount above zero
means the participant owes (net sender), below zero that it is owed (net recipient).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from core.ledger import invariant


class WindowState(StrEnum):
    OPEN = "OPEN"
    PROCESSING = "PROCESSING"
    CLOSED = "CLOSED"
    PENDING_SETTLEMENT = "PENDING_SETTLEMENT"
    SETTLED = "SETTLED"
    ABORTED = "ABORTED"
    FAILED = "FAILED"


# The order used for "a window is in the lowest state of its content". FAILED is lowest: an operator
# must look at it. ABORTED content is settleable again like CLOSED, and ranks below it so that a window
# with any aborted content says so.
_WINDOW_RANK = {
    WindowState.FAILED: 0,
    WindowState.OPEN: 1,
    WindowState.PROCESSING: 2,
    WindowState.ABORTED: 3,
    WindowState.CLOSED: 4,
    WindowState.PENDING_SETTLEMENT: 5,
    WindowState.SETTLED: 6,
}


class SettlementState(StrEnum):
    PENDING_SETTLEMENT = "PENDING_SETTLEMENT"
    PS_TRANSFERS_RECORDED = "PS_TRANSFERS_RECORDED"
    PS_TRANSFERS_RESERVED = "PS_TRANSFERS_RESERVED"
    PS_TRANSFERS_COMMITTED = "PS_TRANSFERS_COMMITTED"
    SETTLING = "SETTLING"
    SETTLED = "SETTLED"
    ABORTED = "ABORTED"


ACCOUNT_STATES = (
    SettlementState.PENDING_SETTLEMENT,
    SettlementState.PS_TRANSFERS_RECORDED,
    SettlementState.PS_TRANSFERS_RESERVED,
    SettlementState.PS_TRANSFERS_COMMITTED,
    SettlementState.SETTLED,
)
# Each account may only move to the next state (central-settlement's settlementStateChange rules).
ACCOUNT_NEXT = {current: following for current, following in zip(ACCOUNT_STATES, ACCOUNT_STATES[1:], strict=False)}
_ACCOUNT_RANK = {state: rank for rank, state in enumerate(ACCOUNT_STATES)}


class Transition(StrEnum):
    """What asking an account to move to a state means."""

    NEXT = "NEXT"  # the allowed next step
    SAME = "SAME"  # already there: a retried acknowledgement, accepted without effect
    NOT_ALLOWED = "NOT_ALLOWED"  # skipping, going back, or the settlement is finished/aborted


def account_transition(current: SettlementState, target: SettlementState) -> Transition:
    if current == target:
        return Transition.SAME
    if ACCOUNT_NEXT.get(current) == target:
        return Transition.NEXT
    return Transition.NOT_ALLOWED


def settlement_state_of(accounts: Iterable[SettlementState]) -> SettlementState:
    """The settlement's state from its accounts' states (all must be account states)."""
    states = list(accounts)
    invariant(bool(states), "a settlement has at least one account")
    for state in states:
        invariant(state in _ACCOUNT_RANK, f"{state} is not an account state")
    lowest = min(states, key=_ACCOUNT_RANK.__getitem__)
    if lowest is SettlementState.PS_TRANSFERS_COMMITTED and SettlementState.SETTLED in states:
        return SettlementState.SETTLING
    return lowest


def can_abort(settlement_state: SettlementState, accounts: Iterable[SettlementState]) -> bool:
    """Aborting is allowed until any account has reached PS_TRANSFERS_COMMITTED (money moved for good)."""
    if settlement_state in (SettlementState.ABORTED, SettlementState.SETTLED, SettlementState.SETTLING):
        return False
    committed = _ACCOUNT_RANK[SettlementState.PS_TRANSFERS_COMMITTED]
    return all(_ACCOUNT_RANK[s] < committed for s in accounts)


def window_state_of(content: Iterable[WindowState]) -> WindowState:
    """A window is in the lowest state of its content; a closed window without content is CLOSED."""
    states = list(content)
    if not states:
        return WindowState.CLOSED
    return min(states, key=_WINDOW_RANK.__getitem__)


def content_state_for_settlement(state: SettlementState) -> WindowState | None:
    """What the settled windows' content becomes when a settlement reaches ``state`` (None: unchanged)."""
    if state is SettlementState.SETTLED:
        return WindowState.SETTLED
    if state is SettlementState.ABORTED:
        return WindowState.ABORTED
    return None


SETTLEABLE_CONTENT = (WindowState.CLOSED, WindowState.ABORTED)


# ------------------------------------------------------------------ models


class Delay(StrEnum):
    IMMEDIATE = "IMMEDIATE"
    DEFERRED = "DEFERRED"


class Granularity(StrEnum):
    GROSS = "GROSS"
    NET = "NET"


class Interchange(StrEnum):
    BILATERAL = "BILATERAL"
    MULTILATERAL = "MULTILATERAL"


@dataclass(frozen=True, slots=True)
class Model:
    model_id: int
    name: str
    delay: Delay
    granularity: Granularity
    interchange: Interchange
    currency: str | None  # None: the default model for currencies without one of their own
    ledger_account_type: str
    settlement_account_type: str
    require_liquidity_check: bool
    auto_position_reset: bool
    is_active: bool = True

    @property
    def settles_by_window(self) -> bool:
        """Only DEFERRED NET models settle through settlements (GROSS or IMMEDIATE: 3100)."""
        return self.delay is Delay.DEFERRED and self.granularity is Granularity.NET

    @property
    def continuous_gross(self) -> bool:
        return self.delay is Delay.IMMEDIATE and self.granularity is Granularity.GROSS


def resolve_model(models: Iterable[Model], currency: str, ledger_account_type: str) -> Model | None:
    """The active model for a currency and ledger account type: its own, else the default (NULL currency)."""
    default = None
    for model in models:
        if not model.is_active or model.ledger_account_type != ledger_account_type:
            continue
        if model.currency == currency:
            return model
        if model.currency is None:
            default = model
    return default


def model_covers(model: Model, currency: str, ledger_account_type: str, models: Iterable[Model]) -> bool:
    """Whether ``model`` is the one that settles (currency, ledger account type) content."""
    resolved = resolve_model(models, currency, ledger_account_type)
    return resolved is not None and resolved.model_id == model.model_id


# ------------------------------------------------------------------ netting


@dataclass(frozen=True, slots=True)
class Movement:
    """One committed transfer (or fee) as netting sees it: who paid whom how much."""

    payer: str
    payee: str
    amount_minor: int
    count: int = 1  # transfers this movement stands for (SQL aggregates one per payer, payee pair)


@dataclass(slots=True)
class ParticipantTotals:
    sent_minor: int = 0
    received_minor: int = 0
    sent_count: int = 0
    received_count: int = 0

    @property
    def net_minor(self) -> int:
        """Above zero: owes (net sender); below zero: is owed (net recipient)."""
        return self.sent_minor - self.received_minor


def multilateral(movements: Iterable[Movement]) -> dict[str, ParticipantTotals]:
    """Per participant: sent, received and the multilateral net. The nets always sum to zero."""
    totals: dict[str, ParticipantTotals] = defaultdict(ParticipantTotals)
    for m in movements:
        invariant(m.amount_minor > 0, "movements are positive")
        payer, payee = totals[m.payer], totals[m.payee]
        payer.sent_minor += m.amount_minor
        payer.sent_count += m.count
        payee.received_minor += m.amount_minor
        payee.received_count += m.count
    invariant(sum(t.net_minor for t in totals.values()) == 0, "multilateral nets do not sum to zero")
    return dict(totals)


def bilateral(movements: Iterable[Movement]) -> dict[tuple[str, str], int]:
    """Per pair (a, b) with a < b: what a owes b net (below zero: b owes a). Zero nets are kept."""
    nets: dict[tuple[str, str], int] = defaultdict(int)
    for m in movements:
        invariant(m.amount_minor > 0, "movements are positive")
        if m.payer < m.payee:
            nets[(m.payer, m.payee)] += m.amount_minor
        else:
            nets[(m.payee, m.payer)] -= m.amount_minor
    return dict(nets)


def bilateral_net_of(nets: dict[tuple[str, str], int], participant: str) -> dict[str, int]:
    """One participant's bilateral nets against each counterparty (above zero: it owes them)."""
    out: dict[str, int] = {}
    for (a, b), net in nets.items():
        if a == participant:
            out[b] = net
        elif b == participant:
            out[a] = -net
    return out


# ------------------------------------------------------------------ interchange fees


class FeePayer(StrEnum):
    PAYER = "PAYER"  # the payer DFSP pays the fee to the payee DFSP
    PAYEE = "PAYEE"  # the payee DFSP pays the fee to the payer DFSP


MAX_BASIS_POINTS = 10_000


def fee_minor(amount_minor: int, basis_points: int) -> int:
    """The interchange fee of one transfer: ``amount * bp / 10,000`` rounded down to a minor unit.

    Rounded down (never up) so a fee can never exceed the stated rate; integer arithmetic, exact.
    """
    invariant(0 <= basis_points <= MAX_BASIS_POINTS, "basis points out of range")
    invariant(amount_minor > 0, "fees are charged on positive amounts")
    return amount_minor * basis_points // MAX_BASIS_POINTS


def fee_movement(payer: str, payee: str, amount_minor: int, basis_points: int, paid_by: FeePayer) -> Movement | None:
    """The fee as a movement between the two DFSPs' INTERCHANGE_FEE accounts (None when it rounds to 0)."""
    fee = fee_minor(amount_minor, basis_points)
    if fee == 0:
        return None
    if paid_by is FeePayer.PAYER:
        return Movement(payer, payee, fee)
    return Movement(payee, payer, fee)


# ------------------------------------------------------------------ ledger moves of a settlement


class Phase(StrEnum):
    RESERVE = "RESERVE"  # at PS_TRANSFERS_RESERVED
    COMMIT = "COMMIT"  # at PS_TRANSFERS_COMMITTED


@dataclass(frozen=True, slots=True)
class SettlementMove:
    """One settlement transfer between a participant's account and the hub's multilateral account.

    Net recipients (net < 0): the participant's account is *debited* (its value rises toward zero),
    reserved at PS_TRANSFERS_RESERVED and committed at PS_TRANSFERS_COMMITTED (the credit leg then
    reaches the hub's account). Net senders (net > 0): the hub's account is debited and the
    participant's account credited (its value falls toward zero), in one step at
    PS_TRANSFERS_COMMITTED. Net zero: no move (entry type SETTLEMENT_NET_ZERO).
    """

    transfer_id: str
    account_id: int
    debit_account_id: int
    credit_account_id: int
    amount_minor: int
    recipient: bool  # True: net recipient (reserved first, then committed)


def settlement_transfer_id(settlement_id: int, account_id: int) -> str:
    """Stable per settlement and account, so a retried step is a duplicate, never a second move."""
    return f"settlement:{settlement_id}:{account_id}"


def settlement_moves(settlement_id: int, nets: dict[int, int], hub_account_id: int) -> list[SettlementMove]:
    """The moves that bring each account back by its net (``nets``: account id -> net minor units)."""
    invariant(sum(nets.values()) == 0, "settlement nets of one currency must sum to zero")
    moves = []
    for account_id, net in sorted(nets.items()):
        if net == 0:
            continue
        transfer_id = settlement_transfer_id(settlement_id, account_id)
        if net < 0:
            moves.append(SettlementMove(transfer_id, account_id, account_id, hub_account_id, -net, True))
        else:
            moves.append(SettlementMove(transfer_id, account_id, hub_account_id, account_id, net, False))
    return moves


def raised_net_debit_cap(cap_minor: int | None, position_minor: int, amount_minor: int) -> int | None:
    """requireLiquidityCheck at PS_TRANSFERS_RESERVED: the cap a net recipient needs, or None if it fits.

    ``position_minor`` already includes open reservations (the ledger's effective position). When the
    recipient's position after the reservation would exceed its cap, the cap is raised by the
    reservation's amount (central-settlement raises it rather than refusing a settlement).
    """
    if cap_minor is None:
        return None
    if cap_minor - position_minor - amount_minor < 0:
        return cap_minor + amount_minor
    return None
