"""The pure settlement rules (core/settlement.py): state machines, netting, fees, ledger moves. No I/O."""

from __future__ import annotations

import random

import pytest

from core.ledger import InvariantViolation
from core.settlement import (
    ACCOUNT_STATES,
    Delay,
    FeePayer,
    Granularity,
    Interchange,
    Model,
    Movement,
    SettlementState,
    Transition,
    WindowState,
    account_transition,
    bilateral,
    bilateral_net_of,
    can_abort,
    fee_minor,
    fee_movement,
    multilateral,
    raised_net_debit_cap,
    resolve_model,
    settlement_moves,
    settlement_state_of,
    window_state_of,
)

S = SettlementState
W = WindowState


# ---------------------------------------------------------------------------------------------- accounts


@pytest.mark.parametrize(("current", "target", "expected"), [
    (S.PENDING_SETTLEMENT, S.PS_TRANSFERS_RECORDED, Transition.NEXT),
    (S.PS_TRANSFERS_RECORDED, S.PS_TRANSFERS_RESERVED, Transition.NEXT),
    (S.PS_TRANSFERS_RESERVED, S.PS_TRANSFERS_COMMITTED, Transition.NEXT),
    (S.PS_TRANSFERS_COMMITTED, S.SETTLED, Transition.NEXT),
    (S.PS_TRANSFERS_RESERVED, S.PS_TRANSFERS_RESERVED, Transition.SAME),
    (S.PENDING_SETTLEMENT, S.PS_TRANSFERS_RESERVED, Transition.NOT_ALLOWED),  # skipping a step
    (S.PENDING_SETTLEMENT, S.SETTLED, Transition.NOT_ALLOWED),
    (S.PS_TRANSFERS_COMMITTED, S.PS_TRANSFERS_RESERVED, Transition.NOT_ALLOWED),  # going back
    (S.SETTLED, S.PENDING_SETTLEMENT, Transition.NOT_ALLOWED),
    (S.PS_TRANSFERS_RECORDED, S.ABORTED, Transition.NOT_ALLOWED),  # abort is the settlement's, not an account's
])
def test_account_transitions(current, target, expected):
    assert account_transition(current, target) is expected


def test_settlement_is_in_its_lowest_account_state():
    assert settlement_state_of([S.PS_TRANSFERS_RESERVED, S.PS_TRANSFERS_RECORDED]) is S.PS_TRANSFERS_RECORDED
    assert settlement_state_of([S.PS_TRANSFERS_RESERVED] * 3) is S.PS_TRANSFERS_RESERVED
    assert settlement_state_of([S.SETTLED, S.SETTLED]) is S.SETTLED


def test_some_accounts_settled_is_settling():
    assert settlement_state_of([S.SETTLED, S.PS_TRANSFERS_COMMITTED]) is S.SETTLING
    # Settled accounts while others have not even committed: still the lowest state.
    assert settlement_state_of([S.SETTLED, S.PS_TRANSFERS_RESERVED]) is S.PS_TRANSFERS_RESERVED


def test_settlement_state_needs_account_states():
    with pytest.raises(InvariantViolation):
        settlement_state_of([])
    with pytest.raises(InvariantViolation):
        settlement_state_of([S.SETTLING])


@pytest.mark.parametrize(("state", "accounts", "allowed"), [
    (S.PENDING_SETTLEMENT, [S.PENDING_SETTLEMENT], True),
    (S.PS_TRANSFERS_RECORDED, [S.PS_TRANSFERS_RESERVED, S.PS_TRANSFERS_RECORDED], True),
    (S.PS_TRANSFERS_RESERVED, [S.PS_TRANSFERS_RESERVED], True),
    (S.PS_TRANSFERS_RESERVED, [S.PS_TRANSFERS_COMMITTED, S.PS_TRANSFERS_RESERVED], False),
    (S.PS_TRANSFERS_COMMITTED, [S.PS_TRANSFERS_COMMITTED], False),
    (S.SETTLED, [S.SETTLED], False),
    (S.ABORTED, [S.PS_TRANSFERS_RECORDED], False),
])
def test_abort_only_before_any_account_committed(state, accounts, allowed):
    assert can_abort(state, accounts) is allowed


# ---------------------------------------------------------------------------------------------- windows


def test_window_is_in_its_lowest_content_state():
    assert window_state_of([W.SETTLED, W.PENDING_SETTLEMENT]) is W.PENDING_SETTLEMENT
    assert window_state_of([W.SETTLED, W.CLOSED]) is W.CLOSED
    assert window_state_of([W.SETTLED, W.SETTLED]) is W.SETTLED
    assert window_state_of([W.ABORTED, W.SETTLED]) is W.ABORTED
    assert window_state_of([W.CLOSED, W.ABORTED]) is W.ABORTED  # any aborted content shows
    assert window_state_of([W.FAILED, W.SETTLED]) is W.FAILED
    assert window_state_of([]) is W.CLOSED


# ---------------------------------------------------------------------------------------------- models


def _model(model_id, currency, account_type="POSITION", delay=Delay.DEFERRED, granularity=Granularity.NET,
           interchange=Interchange.MULTILATERAL, active=True):
    return Model(model_id, f"m{model_id}", delay, granularity, interchange, currency, account_type, "SETTLEMENT",
                 False, True, active)


def test_a_currency_uses_its_own_model_else_the_default():
    models = [_model(1, None), _model(2, "USD", delay=Delay.IMMEDIATE, granularity=Granularity.GROSS,
                                      interchange=Interchange.BILATERAL), _model(3, "USD", "INTERCHANGE_FEE")]
    assert resolve_model(models, "USD", "POSITION").model_id == 2
    assert resolve_model(models, "EUR", "POSITION").model_id == 1
    assert resolve_model(models, "USD", "INTERCHANGE_FEE").model_id == 3
    assert resolve_model(models, "EUR", "INTERCHANGE_FEE") is None
    assert resolve_model(models, "USD", "POSITION").continuous_gross
    assert not resolve_model(models, "USD", "POSITION").settles_by_window
    assert resolve_model(models, "EUR", "POSITION").settles_by_window


def test_inactive_models_do_not_settle():
    assert resolve_model([_model(1, "USD", active=False), _model(2, None)], "USD", "POSITION").model_id == 2


# ---------------------------------------------------------------------------------------------- netting


def test_multilateral_nets_of_the_seed_walkthrough_shape():
    totals = multilateral([Movement("a", "b", 100_0000), Movement("b", "c", 30_0000), Movement("c", "a", 50_0000),
                           Movement("a", "b", 20_0000, count=2)])
    assert totals["a"].sent_minor == 120_0000 and totals["a"].received_minor == 50_0000
    assert totals["a"].sent_count == 3 and totals["b"].received_count == 3
    assert {p: t.net_minor for p, t in totals.items()} == {"a": 70_0000, "b": -90_0000, "c": 20_0000}


def test_bilateral_nets_per_pair_and_per_participant():
    nets = bilateral([Movement("a", "b", 100), Movement("b", "a", 30), Movement("c", "a", 5)])
    assert nets == {("a", "b"): 70, ("a", "c"): -5}
    assert bilateral_net_of(nets, "a") == {"b": 70, "c": -5}
    assert bilateral_net_of(nets, "c") == {"a": 5}


def test_netting_conserves_on_random_traffic():
    rng = random.Random(20261124)
    names = [f"dfsp{i}" for i in range(7)]
    for _ in range(200):
        movements = []
        for _ in range(rng.randint(1, 40)):
            payer, payee = rng.sample(names, 2)
            movements.append(Movement(payer, payee, rng.randint(1, 10**12)))
        totals = multilateral(movements)
        assert sum(t.net_minor for t in totals.values()) == 0
        nets = bilateral(movements)
        # A participant's multilateral net is the sum of its bilateral nets.
        for name, total in totals.items():
            assert sum(bilateral_net_of(nets, name).values()) == total.net_minor


def test_movements_must_be_positive():
    with pytest.raises(InvariantViolation):
        multilateral([Movement("a", "b", 0)])


# ---------------------------------------------------------------------------------------------- fees


@pytest.mark.parametrize(("amount_minor", "basis_points", "expected"), [
    (100_0000, 50, 5000),  # 0.5% of 100 = 0.5
    (1, 50, 0),  # rounds down to nothing
    (3, 3333, 0),
    (10_000_0000, 10_000, 10_000_0000),  # 100%
    (12_3457, 25, 308),  # 12.3457 * 0.25% = 0.030864... -> 0.0308
    (10**22 - 1, 1, (10**22 - 1) // 10_000),  # the largest FSPIOP amount, exact
])
def test_fee_is_rounded_down_exactly(amount_minor, basis_points, expected):
    assert fee_minor(amount_minor, basis_points) == expected


def test_fee_direction():
    assert fee_movement("a", "b", 100_0000, 100, FeePayer.PAYER) == Movement("a", "b", 1_0000)
    assert fee_movement("a", "b", 100_0000, 100, FeePayer.PAYEE) == Movement("b", "a", 1_0000)
    assert fee_movement("a", "b", 1, 100, FeePayer.PAYER) is None


def test_fee_basis_points_bounded():
    with pytest.raises(InvariantViolation):
        fee_minor(100, 10_001)


# ---------------------------------------------------------------------------------------------- ledger moves


def test_settlement_moves_recipients_reserve_senders_commit():
    moves = settlement_moves(7, {11: 70, 12: -90, 13: 20, 14: 0}, hub_account_id=1)
    by_account = {m.account_id: m for m in moves}
    assert 14 not in by_account  # net zero: nothing to move
    recipient = by_account[12]
    assert recipient.recipient and recipient.debit_account_id == 12 and recipient.credit_account_id == 1
    assert recipient.amount_minor == 90 and recipient.transfer_id == "settlement:7:12"
    sender = by_account[11]
    assert not sender.recipient and sender.debit_account_id == 1 and sender.credit_account_id == 11
    assert sender.amount_minor == 70
    # After every move each account is back at zero relative to its net, and the hub account nets to zero.
    effect = {11: 70, 12: -90, 13: 20, 1: 0}
    for m in moves:
        effect[m.debit_account_id] += m.amount_minor
        effect[m.credit_account_id] -= m.amount_minor
    assert effect == {11: 0, 12: 0, 13: 0, 1: 0}


def test_settlement_moves_refuse_unbalanced_nets():
    with pytest.raises(InvariantViolation):
        settlement_moves(1, {11: 5, 12: -4}, hub_account_id=1)


def test_net_debit_cap_raised_only_when_the_reservation_does_not_fit():
    assert raised_net_debit_cap(1000, -500, 500) is None  # fits exactly
    assert raised_net_debit_cap(1000, 800, 500) == 1500
    assert raised_net_debit_cap(None, 0, 5) is None


def test_account_states_are_ordered():
    assert ACCOUNT_STATES[0] is S.PENDING_SETTLEMENT and ACCOUNT_STATES[-1] is S.SETTLED
