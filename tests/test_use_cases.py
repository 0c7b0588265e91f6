"""Every seed use case end to end: simulated DFSPs, a real hub (HTTP, Ray, Postgres), exact positions.

The use cases are those of the Mojaloop v1.0 use-case slide of the seed deck (docs/USE_CASES.md):
payer-initiated (lookup, quote, transfer), payee-initiated (transaction request, then the payer
FSP's quote and transfer) and payee-initiated with an OTP entered on the payee's POS or ATM. Each
runs three times on fresh DFSPs: to completion, rejected, and timed out. One hub serves the module
(``RAYLOOP_TRANSFER_QUOTE_CHECK=valid``: every transfer must pay a quote the hub relayed, with its
amount); after every test per-currency conservation is asserted, and each test checks both
positions exactly (Decimal, from the admin API).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

import pytest
import uvloop

from cluster.testing import HubThread, assert_conserved, module_hub
from sim.flows import FlowError, transaction_type
from sim.onboarding import onboard_simulated
from sim.parties import SimParty
from sim.simulator import Behaviour, Simulator

CURRENCY = "XTS"
_numbers = itertools.count()

# Accented and Burmese names must reach the other DFSP unchanged (UTF-8 all the way through the hub).
CUSTOMER = SimParty.named("MSISDN", "95912345678", "အောင် ကျော် မင်း", date_of_birth="1990-04-17", otp="246810")
MERCHANT = SimParty.named("BUSINESS", "CAFE-CA-VA", "Zoë Ñúñez Gonçalves", merchant_classification_code="5812")
AGENT = SimParty.named("MSISDN", "26377123456", "Thabo Dlamini-Müller")
ATM = SimParty("DEVICE", "ATM-0042", name="Ngwe Bank ATM 42")


@dataclass(frozen=True)
class UseCase:
    name: str
    pattern: str  # "payer", "payee" or "payee_otp"
    scenario: str
    initiator_type: str
    amount: str
    amount_type: str  # the quote's (payee-initiated: always RECEIVE)
    payer: SimParty
    payee: SimParty
    transfer_amount: str  # what the fees make of the amount (RULES.md 8), computed by hand
    payee_behaviour: dict[str, Any] = field(default_factory=dict)
    payer_behaviour: dict[str, Any] = field(default_factory=dict)
    rejection: str = "transfer"  # payer-initiated: the payee rejects the "transfer" or the "quote"


USE_CASES = [
    UseCase("p2p", "payer", "TRANSFER", "CONSUMER", "100", "SEND", CUSTOMER, AGENT, "100"),
    UseCase("customer_initiated_merchant_payment", "payer", "PAYMENT", "CONSUMER", "25.5", "RECEIVE", CUSTOMER,
            MERCHANT, "25.5"),
    # The agent FSP charges 1.5 and pays 0.25 commission. RECEIVE: 50 + 1.5 - 0.25.
    UseCase("customer_initiated_cash_out_receive_amount", "payer", "WITHDRAWAL", "CONSUMER", "50", "RECEIVE",
            CUSTOMER, AGENT, "51.25", {"fee": "1.5", "commission": "0.25"}, rejection="quote"),
    # SEND, non-disclosing: 50 - 0.25 (the agent then receives 49.75 - 1.5 + 0.25 = 48.5).
    UseCase("customer_initiated_cash_out_send_amount", "payer", "WITHDRAWAL", "CONSUMER", "50", "SEND",
            CUSTOMER, AGENT, "49.75", {"fee": "1.5", "commission": "0.25"}, rejection="quote"),
    # The agent (payer) discloses its fee 2; the customer's FSP pays 0.5 commission: 40 - (2 - 0.5).
    UseCase("agent_initiated_cash_in_send_amount", "payer", "DEPOSIT", "AGENT", "40", "SEND", AGENT, CUSTOMER,
            "38.5", {"commission": "0.5"}, {"fee_mode": "disclosing", "payer_fee": "2"}),
    UseCase("agent_initiated_cash_in_receive_amount", "payer", "DEPOSIT", "AGENT", "40", "RECEIVE", AGENT,
            CUSTOMER, "40.75", {"fee": "0.75"}),
    UseCase("merchant_initiated_merchant_payment", "payee", "PAYMENT", "BUSINESS", "12.34", "RECEIVE", CUSTOMER,
            MERCHANT, "12.34"),
    UseCase("agent_initiated_cash_out", "payee", "WITHDRAWAL", "AGENT", "60", "RECEIVE", CUSTOMER, AGENT, "61",
            {"fee": "1"}),
    UseCase("atm_initiated_cash_out", "payee_otp", "WITHDRAWAL", "DEVICE", "80", "RECEIVE", CUSTOMER, ATM, "82",
            {"fee": "2"}),
    UseCase("merchant_payment_authorized_on_pos", "payee_otp", "PAYMENT", "DEVICE", "15", "RECEIVE", CUSTOMER,
            MERCHANT, "15"),
    UseCase("agent_cash_out_authorized_on_pos", "payee_otp", "WITHDRAWAL", "AGENT", "20", "RECEIVE", CUSTOMER,
            AGENT, "20.5", {"fee": "0.5"}),
]
BY_NAME = {case.name: case for case in USE_CASES}

# Short, so that the timeout variants end quickly: the hub expires an ignored prepare after 1 s.
FAST = {"transfer_expiration_ms": 1000, "flow_timeout_ms": 3000}


@pytest.fixture(scope="module")
def hub(module_database_url):
    with module_hub(module_database_url, hub_accounts=(), shards=2, ingress_workers=1,
                    transfer_quote_check="valid") as thread:
        yield thread


@pytest.fixture(autouse=True)
def conserved(hub):
    yield
    hub.call(assert_conserved(hub.hub))


def run(coroutine):
    return uvloop.run(coroutine)


def position(hub: HubThread, name: str) -> Decimal:
    status, body = hub.admin("GET", f"/participants/{name}/positions?currency={CURRENCY}")
    assert status == 200, body
    return Decimal(str(body["value"]))


async def dfsps(hub: HubThread, sim: Simulator, case: UseCase, *, payer: dict | None = None,
                payee: dict | None = None) -> tuple[str, str]:
    """A fresh payer FSP and payee FSP for ``case``, holding its payer and payee parties, registered in the ALS."""
    n = next(_numbers)
    payer_fsp, payee_fsp = f"uc{n}payer", f"uc{n}payee"
    await onboard_simulated(hub.hub, sim, [payer_fsp], CURRENCY, deposit="1000",
                            behaviour=Behaviour(**{**FAST, **case.payer_behaviour, **(payer or {})}),
                            parties={payer_fsp: [case.payer]})
    await onboard_simulated(hub.hub, sim, [payee_fsp], CURRENCY, deposit="1000",
                            behaviour=Behaviour(**{**FAST, **case.payee_behaviour, **(payee or {})}),
                            parties={payee_fsp: [case.payee]})
    await sim.flows.register_parties(payer_fsp, currency=CURRENCY)
    await sim.flows.register_parties(payee_fsp, currency=CURRENCY)
    return payer_fsp, payee_fsp


def fresh(case: UseCase) -> UseCase:
    """``case`` with party identifiers no other test uses (one ALS serves the module)."""
    n = next(_numbers)
    return replace(case, payer=replace(case.payer, party_identifier=f"{case.payer.party_identifier}{n}"),
                   payee=replace(case.payee, party_identifier=f"{case.payee.party_identifier}{n}"))


def kind_of(case: UseCase) -> dict[str, Any]:
    initiator = "PAYER" if case.pattern == "payer" else "PAYEE"
    return transaction_type(case.scenario, initiator, case.initiator_type)


async def payer_initiated(sim: Simulator, case: UseCase, payer_fsp: str, **options: Any):
    party = case.payee
    return await sim.flows.pay(payer_fsp, party.party_id_type, party.party_identifier, case.amount, CURRENCY,
                               amount_type=case.amount_type, transaction=kind_of(case), **options)


async def payee_initiated(sim: Simulator, case: UseCase, payee_fsp: str, **options: Any):
    party = case.payer
    otp = case.pattern == "payee_otp"  # the customer types the OTP its FSP issued on the payee's device
    return await sim.flows.request_to_pay(
        payee_fsp, party.party_id_type, party.party_identifier, case.amount, CURRENCY, transaction=kind_of(case),
        authentication_type="OTP" if otp else None, otp=case.payer.otp if otp else None, **options)


def assert_party(party: dict[str, Any], expected: SimParty, fsp: str) -> None:
    """The lookup's answer is the holder's Party, names unchanged (accents, Burmese script)."""
    assert party == expected.to_fspiop(fsp)


# --------------------------------------------------------------------------------------------------
# Completion


@pytest.mark.parametrize("name", list(BY_NAME))
def test_use_case_completes(hub, name):
    case = fresh(BY_NAME[name])

    async def scenario():
        async with Simulator(hub.fspiop_url, auto_answer=True) as sim:
            payer_fsp, payee_fsp = await dfsps(hub, sim, case, payee={"otp_wrong_entries": 1}
                                               if case.pattern == "payee_otp" else None)
            if case.pattern == "payer":
                payment = await payer_initiated(sim, case, payer_fsp)
                assert payment.payee_fsp == payee_fsp
                assert_party(payment.party, case.payee, payee_fsp)
                assert payment.transfer["transferState"] == "COMMITTED"
                assert payment.quote["transferAmount"] == {"amount": case.transfer_amount, "currency": CURRENCY}
                assert payment.quote_request["transactionType"] == kind_of(case)
                if case.payer_behaviour.get("fee_mode") == "disclosing":
                    assert payment.quote_request["fees"] == {"amount": "2", "currency": CURRENCY}
            else:
                result = await payee_initiated(sim, case, payee_fsp)
                assert result.payer_fsp == payer_fsp
                assert_party(result.payer_party, case.payer, payer_fsp)
                assert result.first_answer["transactionRequestState"] == "RECEIVED"
                assert result.payee.state == "COMMITTED"
                assert result.payer is not None and result.payer.state == "COMMITTED"
                assert result.payer.transfer_id == result.payee.transfer_id
                assert result.payer.quote["transferAmount"]["amount"] == case.transfer_amount
                # One wrong OTP on the device, then the right one: two authorization rounds.
                assert result.payer.authorization_attempts == (2 if case.pattern == "payee_otp" else 0)
            return payer_fsp, payee_fsp

    payer_fsp, payee_fsp = run(scenario())
    assert position(hub, payer_fsp) == Decimal(case.transfer_amount)
    assert position(hub, payee_fsp) == -Decimal(case.transfer_amount)


def test_refund(hub):
    """A merchant refunds a customer's payment: REFUND with refundInfo naming the original transaction."""
    purchase = fresh(BY_NAME["customer_initiated_merchant_payment"])
    customer = purchase.payer

    async def scenario():
        async with Simulator(hub.fspiop_url, auto_answer=True) as sim:
            customer_fsp, merchant_fsp = await dfsps(hub, sim, purchase)
            paid = await payer_initiated(sim, purchase, customer_fsp)
            kind = transaction_type("REFUND", "PAYER", "BUSINESS", refund_of=paid.quote_request["transactionId"],
                                    refund_reason="Goods returned, ça va")
            back = await sim.flows.pay(merchant_fsp, customer.party_id_type, customer.party_identifier,
                                       "25.5", CURRENCY, amount_type="SEND", transaction=kind)
            assert back.transfer["transferState"] == "COMMITTED"
            assert back.quote_request["transactionType"]["refundInfo"] == {
                "originalTransactionId": paid.transfer_id, "refundReason": "Goods returned, ça va"}
            assert back.quote["transferAmount"] == {"amount": "25.5", "currency": CURRENCY}
            assert_party(back.party, customer, customer_fsp)
            return customer_fsp, merchant_fsp

    customer_fsp, merchant_fsp = run(scenario())
    assert position(hub, customer_fsp) == 0  # 25.5 paid, 25.5 refunded
    assert position(hub, merchant_fsp) == 0


# --------------------------------------------------------------------------------------------------
# Rejection


@pytest.mark.parametrize("name", list(BY_NAME))
def test_use_case_rejected(hub, name):
    case = fresh(BY_NAME[name])
    if case.pattern == "payer" and case.rejection == "quote":
        payee = {"quote_mode": "reject"}  # the agent does not accept the fees: 5101
    elif case.pattern == "payer":
        payee = {"mode": "reject"}  # the payee FSP rejects the transfer: 5104
    elif case.pattern == "payee_otp":
        payee = {"otp_wrong_entries": 99}  # the customer never types the right OTP
    else:
        payee = None
    payer = {"request_mode": "reject"} if case.pattern == "payee" else None

    async def scenario():
        async with Simulator(hub.fspiop_url, auto_answer=True) as sim:
            payer_fsp, payee_fsp = await dfsps(hub, sim, case, payer=payer, payee=payee)
            if case.pattern == "payer":
                with pytest.raises(FlowError) as failure:
                    await payer_initiated(sim, case, payer_fsp)
                expected = ("quote", "5101") if case.rejection == "quote" else ("transfer", "5104")
                assert (failure.value.step, failure.value.code) == expected
            else:
                result = await payee_initiated(sim, case, payee_fsp)
                assert result.payee.state == "REJECTED"
                assert result.payer is not None and result.payer.state == "REJECTED"
                if case.pattern == "payee_otp":
                    # RECEIVED, and REJECTED after the last OTP; the hub relays the two answers
                    # concurrently, so under load REJECTED may reach the payee first.
                    received = await sim.wait_for(payee_fsp, lambda r: r.method == "PUT" and r.body.get(
                        "transactionRequestState") == "RECEIVED", 5)
                    assert received.path == f"/transactionRequests/{result.transaction_request_id}"
                    assert result.payer.authorization_attempts == 3  # retriesLeft 3, 2, 1
                    assert result.payer.detail == "OTP retries exhausted"
                else:
                    assert result.first_answer["transactionRequestState"] == "REJECTED"
            return payer_fsp, payee_fsp

    payer_fsp, payee_fsp = run(scenario())
    assert position(hub, payer_fsp) == 0
    assert position(hub, payee_fsp) == 0


# --------------------------------------------------------------------------------------------------
# Timeout


@pytest.mark.parametrize("name", list(BY_NAME))
def test_use_case_times_out(hub, name):
    """Payer- and payee-initiated: the payee FSP never fulfils, the hub expires the transfer (3303 to
    both). OTP: nobody enters anything on the device, the payer FSP gives up and rejects the request."""
    case = fresh(BY_NAME[name])
    payee = {"authorization_mode": "ignore"} if case.pattern == "payee_otp" else {"mode": "ignore"}
    payer = {"flow_timeout_ms": 1000} if case.pattern == "payee_otp" else None

    async def scenario():
        async with Simulator(hub.fspiop_url, auto_answer=True) as sim:
            payer_fsp, payee_fsp = await dfsps(hub, sim, case, payer=payer, payee=payee)
            if case.pattern == "payer":
                with pytest.raises(FlowError) as failure:
                    await payer_initiated(sim, case, payer_fsp)
                assert (failure.value.step, failure.value.code) == ("transfer", "3303")
                expired = await sim.wait_for(payee_fsp, lambda r: r.path.endswith("/error"), 5)
                assert expired.body["errorInformation"]["errorCode"] == "3303"
            else:
                result = await payee_initiated(sim, case, payee_fsp)
                if case.pattern == "payee_otp":
                    assert result.payee.state == "REJECTED"
                    assert result.payer.state == "REJECTED"
                    assert result.payer.detail.startswith("authorization failed: authorization: - no answer")
                else:
                    assert (result.payee.state, result.payee.error_code) == ("ABORTED", "3303")
                    assert (result.payer.state, result.payer.error_code) == ("ABORTED", "3303")
            return payer_fsp, payee_fsp

    payer_fsp, payee_fsp = run(scenario())
    assert position(hub, payer_fsp) == 0
    assert position(hub, payee_fsp) == 0
