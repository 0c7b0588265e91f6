"""The simulator beyond transfers: fee equations, quote answers, parties, behaviours, CLI, and flows
through a real hub (HTTP, Ray, Postgres; one hub for the module, conservation asserted after each test).

The fee equations are RULES.md 8 (API Definition Listings 7-11); expected values are worked out by
hand here, in Decimal, so a float anywhere in the arithmetic would show.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import urllib.error
import urllib.request
from datetime import UTC, datetime
from decimal import Decimal

import orjson
import pytest
import uvloop

from cluster.testing import HubThread, assert_conserved, module_hub
from sim.fees import QuoteRefused, format_amount, quote_amounts
from sim.flows import FlowError, FlowTimeout, transaction_type
from sim.ilp import decode_ilp_packet, decode_transaction, make_condition, new_secret
from sim.onboarding import onboard_simulated
from sim.parties import PartyRegistry, SimParty, party_key_of_path
from sim.quotes import QuoteSettings, answer_quote, check_quote_answer
from sim.requests import wrong_otp
from sim.simulator import Behaviour, Simulator, _coerce, _parser

CURRENCY = "XTS"
_numbers = itertools.count()

# --------------------------------------------------------------------------------------------------
# Fee equations (pure)

D = Decimal


@pytest.mark.parametrize(
    ("amount_type", "amount", "fee", "commission", "payer_fee", "transfer", "receive"),
    [
        # non-disclosing RECEIVE: transfer = amount + fee - commission; receive = transfer - fee + commission
        ("RECEIVE", "100", "1.5", "0.25", None, "101.25", "100"),
        # non-disclosing SEND: transfer = amount - commission
        ("SEND", "100", "1.5", "0.25", None, "99.75", "98.5"),
        # disclosing RECEIVE: as non-disclosing (the payer's fee is on top, not in the transfer)
        ("RECEIVE", "100", "1.5", "0.25", "2", "101.25", "100"),
        # disclosing SEND, payer fee above the commission: amount - (payerFee - commission)
        ("SEND", "100", "1.5", "0.25", "2", "98.25", "97"),
        # disclosing SEND, commission covers the payer fee: the whole amount
        ("SEND", "100", "1.5", "3", "2", "100", "101.5"),
        ("SEND", "100", "0", "2", "2", "100", "102"),
        # exact where binary floats are not (0.1 + 0.2)
        ("RECEIVE", "0.1", "0.2", "0", None, "0.3", "0.1"),
        ("SEND", "0.3", "0.1", "0.0001", "0.2", "0.1001", "0.0002"),
    ],
)
def test_fee_equations_exact(amount_type, amount, fee, commission, payer_fee, transfer, receive):
    result = quote_amounts(amount_type, amount, payee_fsp_fee=fee, payee_fsp_commission=commission,
                           payer_fee=payer_fee)
    assert result.transfer_amount == D(transfer)
    assert result.payee_receive_amount == D(receive)
    assert (result.payee_fsp_fee, result.payee_fsp_commission) == (D(fee), D(commission))
    assert result.payee_receive_amount == result.transfer_amount - result.payee_fsp_fee + result.payee_fsp_commission


def test_fee_refusals_and_bad_input():
    with pytest.raises(QuoteRefused):
        quote_amounts("SEND", "1", payee_fsp_commission="1")  # nothing left to transfer
    with pytest.raises(QuoteRefused):
        quote_amounts("SEND", "1", payee_fsp_fee="2")  # the payee would receive -1
    with pytest.raises(TypeError):
        quote_amounts("SEND", "1", payee_fsp_fee=0.5)  # floats are refused: money is exact
    with pytest.raises(ValueError):
        quote_amounts("SEND", "-1")
    with pytest.raises(ValueError):
        quote_amounts("BOTH", "1")
    assert [format_amount(D(x)) for x in ("100", "1.50", "0", "0.0001")] == ["100", "1.5", "0", "0.0001"]


# --------------------------------------------------------------------------------------------------
# Quote answers (pure)


def quote_request(**changes) -> dict:
    body = {
        "quoteId": "7c23e80c-d078-4077-8263-2c047876fcf6",
        "transactionId": "85feac2f-39b2-491b-817e-4a03203d4f14",
        "payee": {"partyIdInfo": {"partyIdType": "MSISDN", "partyIdentifier": "123", "fspId": "payeefsp"}},
        "payer": {"partyIdInfo": {"partyIdType": "MSISDN", "partyIdentifier": "456", "fspId": "payerfsp"}},
        "amountType": "SEND",
        "amount": {"amount": "100", "currency": "USD"},
        "transactionType": {"scenario": "TRANSFER", "initiator": "PAYER", "initiatorType": "CONSUMER"},
    }
    body.update(changes)
    return body


def test_quote_answer_carries_exact_amounts_packet_and_condition():
    secret = new_secret()
    request = quote_request(fees={"amount": "2", "currency": "USD"}, note="rent")
    answer = answer_quote("payeefsp", secret, QuoteSettings(fee=D("1.5"), commission=D("0.25")), request,
                          expiration="2030-01-01T00:00:00.000Z")
    assert answer.ok
    body = answer.body
    assert body["transferAmount"] == {"amount": "98.25", "currency": "USD"}
    assert body["payeeReceiveAmount"] == {"amount": "97", "currency": "USD"}
    assert body["payeeFspFee"] == {"amount": "1.5", "currency": "USD"}
    assert body["payeeFspCommission"] == {"amount": "0.25", "currency": "USD"}
    assert body["expiration"] == "2030-01-01T00:00:00.000Z"
    # The condition is the one the payee will regenerate from the packet at transfer time.
    assert make_condition(secret, body["ilpPacket"])[1] == body["condition"]
    packet = decode_ilp_packet(body["ilpPacket"])
    assert packet.amount == 9825  # USD minor units
    assert packet.account == "g.payeefsp.msisdn.123"
    transaction = decode_transaction(body["ilpPacket"])
    assert transaction["amount"] == {"amount": "98.25", "currency": "USD"}
    assert (transaction["quoteId"], transaction["transactionId"], transaction["note"]) == (
        request["quoteId"], request["transactionId"], "rent")
    assert check_quote_answer(body) is None
    assert "not transferAmount" in check_quote_answer({**body, "transferAmount": {"amount": "98", "currency": "USD"}})
    assert "expired" in check_quote_answer(body, now=datetime(2030, 1, 1, tzinfo=UTC))
    assert "unusable" in check_quote_answer({**body, "ilpPacket": "AQ"})


def test_quote_refusals():
    secret = new_secret()
    expiration = "2030-01-01T00:00:00.000Z"

    def code(settings=None, parties=None, **changes):
        answer = answer_quote("payeefsp", secret, settings or QuoteSettings(), quote_request(**changes),
                              expiration=expiration, parties=parties)
        assert not answer.ok
        return answer.body["errorInformation"]["errorCode"]

    assert code(QuoteSettings(reject=True)) == "5101"
    assert code(QuoteSettings(reject=True, error_code="5103")) == "5103"
    assert code(fees={"amount": "1", "currency": "EUR"}) == "3100"
    assert code(QuoteSettings(commission=D("100"))) == "5101"  # nothing left to transfer
    assert code(amount={"amount": "0.001", "currency": "USD"}) == "5101"  # finer than a cent: no ILP amount
    registry = PartyRegistry()
    registry.add(SimParty("MSISDN", "999"))
    assert code(parties=registry) == "3204"  # this FSP does not hold MSISDN 123


# --------------------------------------------------------------------------------------------------
# Parties, behaviours, CLI (pure)


def test_party_object_keeps_accents_and_burmese():
    burmese = SimParty.named("MSISDN", "959123", "အောင် ကျော် မင်း", date_of_birth="1990-04-17")
    assert (burmese.first_name, burmese.middle_name, burmese.last_name) == ("အောင်", "ကျော်", "မင်း")
    accented = SimParty.named("BUSINESS", "CAFE", "Zoë Ñúñez", merchant_classification_code="5812")
    for party in (burmese, accented):
        wire = orjson.loads(orjson.dumps(party.to_fspiop("fspa")))
        assert wire == party.to_fspiop("fspa")
        assert wire["name"] == party.name
        assert wire["partyIdInfo"] == {"partyIdType": party.party_id_type,
                                       "partyIdentifier": party.party_identifier, "fspId": "fspa"}
    assert burmese.to_fspiop("fspa")["personalInfo"] == {
        "complexName": {"firstName": "အောင်", "middleName": "ကျော်", "lastName": "မင်း"}, "dateOfBirth": "1990-04-17"}
    assert accented.to_fspiop("fspa")["merchantClassificationCode"] == "5812"
    assert party_key_of_path("parties/MSISDN/959123") == ("MSISDN", "959123", None)
    assert party_key_of_path("parties/MSISDN/959123/wallet/error") == ("MSISDN", "959123", "wallet")
    assert party_key_of_path("parties/MSISDN") is None
    with pytest.raises(ValueError):
        SimParty("PHONE", "1")


def test_behaviour_validation():
    assert Behaviour(fee="1.5").fee == D("1.5")
    with pytest.raises(TypeError):
        Behaviour(fee=1.5)
    for bad in ({"quote_mode": "maybe"}, {"request_mode": "later"}, {"otp": "12"}, {"otp_retries": 0},
                {"fee_mode": "secret"}, {"quote_error_code": "51"}, {"flow_timeout_ms": 0}):
        with pytest.raises(ValueError):
            Behaviour(**bad)
    assert wrong_otp("123456") == "123457" and wrong_otp("129") == "120"


def test_cli_parses_parties_and_settings():
    args = _parser().parse_args([
        "--hub", "http://127.0.0.1:3000", "--dfsp", "payerfsp", "--dfsp", "payeefsp:reserve",
        "--party", "payeefsp:MSISDN:27713803912:Zoë Ñúñez Gonçalves", "--party", "payerfsp:EMAIL:a@b.c",
        "--set", "payeefsp.fee=1.5", "--set", "payerfsp.otp_retries=2", "--set", "payerfsp.flow_timeout_ms=500",
    ])
    (fsp, party), (fsp2, plain) = args.party
    assert (fsp, party.name, party.first_name, party.last_name) == ("payeefsp", "Zoë Ñúñez Gonçalves", "Zoë",
                                                                    "Gonçalves")
    assert (fsp2, plain.party_id_type, plain.name) == ("payerfsp", "EMAIL", None)
    assert args.set == [("payeefsp", "fee", "1.5"), ("payerfsp", "otp_retries", "2"),
                        ("payerfsp", "flow_timeout_ms", "500")]
    assert _coerce("fee", "1.5") == "1.5" and Behaviour(fee=_coerce("fee", "1.5")).fee == D("1.5")
    assert _coerce("otp_retries", "2") == 2 and _coerce("flow_timeout_ms", "500") == 500.0
    with pytest.raises(SystemExit):
        _parser().parse_args(["--hub", "h", "--dfsp", "a", "--set", "a.no_such_field=1"])


# --------------------------------------------------------------------------------------------------
# Through a real hub


@pytest.fixture(scope="module")
def hub(module_database_url):
    with module_hub(module_database_url, hub_accounts=(), shards=2, ingress_workers=1,
                    transfer_quote_check="valid") as thread:
        yield thread


@pytest.fixture
def conserved(hub):
    yield
    hub.call(assert_conserved(hub.hub))


def run(coroutine):
    return uvloop.run(coroutine)


def position(hub: HubThread, name: str) -> Decimal:
    status, body = hub.admin("GET", f"/participants/{name}/positions?currency={CURRENCY}")
    assert status == 200, body
    return Decimal(str(body["value"]))


async def pair(hub: HubThread, sim: Simulator, payer_behaviour: Behaviour | None = None,
               payee_behaviour: Behaviour | None = None) -> tuple[str, str, SimParty, SimParty]:
    n = next(_numbers)
    payer, payee = f"sf{n}payer", f"sf{n}payee"
    payer_party = SimParty.named("MSISDN", f"2557{n:06d}", "José Ñúñez", otp="4321")
    payee_party = SimParty.named("MSISDN", f"2558{n:06d}", "မောင် သန့်")
    await onboard_simulated(hub.hub, sim, [payer], CURRENCY, deposit="1000", behaviour=payer_behaviour,
                            parties={payer: [payer_party]})
    await onboard_simulated(hub.hub, sim, [payee], CURRENCY, deposit="1000", behaviour=payee_behaviour,
                            parties={payee: [payee_party]})
    await sim.flows.register_parties(payer, currency=CURRENCY)
    await sim.flows.register_parties(payee, currency=CURRENCY)
    return payer, payee, payer_party, payee_party


def test_lookup_round_trips_names_and_unknown_party_is_3204(hub, conserved):
    async def scenario():
        async with Simulator(hub.fspiop_url, auto_answer=True) as sim:
            payer, payee, _, payee_party = await pair(hub, sim)
            party = await sim.flows.lookup(payer, "MSISDN", payee_party.party_identifier)
            assert party == payee_party.to_fspiop(payee)  # Burmese complexName unchanged
            # An identifier in Burmese script travels percent-encoded in the path and comes back unchanged.
            alias = sim.add_party(payee, SimParty.named("ALIAS", f"မောင်{payee}", "မောင် မောင်"))
            await sim.flows.register_parties(payee, currency=CURRENCY)
            assert await sim.flows.lookup(payer, "ALIAS", alias.party_identifier) == alias.to_fspiop(payee)
            # A party with a sub-id (one wallet of an MSISDN): /parties/{Type}/{ID}/{SubId} both ways.
            wallet = sim.add_party(payee, SimParty("MSISDN", payee_party.party_identifier, "savings", name="Ahorro"))
            await sim.flows.register_parties(payee, currency=CURRENCY)
            found = await sim.flows.lookup(payer, "MSISDN", payee_party.party_identifier, "savings")
            assert found == wallet.to_fspiop(payee) and found["partyIdInfo"]["partySubIdOrType"] == "savings"
            # Registered with the hub but no longer held by the payee FSP: its own 3204.
            sim.dfsp(payee).parties.remove("MSISDN", payee_party.party_identifier)
            with pytest.raises(FlowError) as failure:
                await sim.flows.lookup(payer, "MSISDN", payee_party.party_identifier)
            assert (failure.value.step, failure.value.code) == ("lookup", "3204")
            # Nobody registered it: the hub's 3204.
            with pytest.raises(FlowError) as failure:
                await sim.flows.lookup(payer, "MSISDN", "0000000000")
            assert failure.value.code == "3204"
            # Another FSP cannot register a party the payer FSP holds.
            sim.add_party(payee, SimParty("MSISDN", sim.flows.payer_party(payer).party_identifier))
            with pytest.raises(FlowError) as failure:
                await sim.flows.register_parties(payee, currency=CURRENCY)
            assert (failure.value.step, failure.value.code) == ("register", "3003")

    run(scenario())


def test_pay_with_disclosed_fees_moves_the_exact_transfer_amount(hub, conserved):
    # SEND 10; the payer discloses its fee 2, the payee pays 0.5 commission and charges 0.25:
    # transfer = 10 - (2 - 0.5) = 8.5, payee receives 8.5 - 0.25 + 0.5 = 8.75.
    async def scenario():
        async with Simulator(hub.fspiop_url, auto_answer=True) as sim:
            payer, payee, _, payee_party = await pair(
                hub, sim, Behaviour(fee_mode="disclosing", payer_fee="2"), Behaviour(fee="0.25", commission="0.5"))
            payment = await sim.flows.pay(payer, "MSISDN", payee_party.party_identifier, "10", CURRENCY,
                                          amount_type="SEND", note="ဈေးဝယ်")
            assert payment.quote_request["fees"] == {"amount": "2", "currency": CURRENCY}
            assert payment.quote["transferAmount"] == {"amount": "8.5", "currency": CURRENCY}
            assert payment.quote["payeeReceiveAmount"] == {"amount": "8.75", "currency": CURRENCY}
            assert payment.transfer["transferState"] == "COMMITTED"
            return payer, payee

    payer, payee = run(scenario())
    assert (position(hub, payer), position(hub, payee)) == (D("8.5"), D("-8.5"))


def test_quote_ignored_times_out_and_nothing_moves(hub, conserved):
    async def scenario():
        async with Simulator(hub.fspiop_url, auto_answer=True) as sim:
            payer, payee, _, payee_party = await pair(hub, sim, payee_behaviour=Behaviour(quote_mode="ignore"))
            with pytest.raises(FlowTimeout) as failure:
                await sim.flows.pay(payer, "MSISDN", payee_party.party_identifier, "5", CURRENCY, timeout_s=0.5)
            assert failure.value.step == "quote"
            # With auto_answer off nobody answers the lookup either: the side is left to the caller.
            sim.auto_answer = False
            with pytest.raises(FlowTimeout) as failure:
                await sim.flows.pay(payer, "MSISDN", payee_party.party_identifier, "5", CURRENCY, timeout_s=0.5)
            assert failure.value.step == "lookup"
            forwarded = sim.received(payee, method="GET", path_contains="/parties/")
            assert len(forwarded) == 2  # both lookups reached the payee FSP; only the first was answered
            return payer, payee

    payer, payee = run(scenario())
    assert (position(hub, payer), position(hub, payee)) == (0, 0)


def test_otp_checked_by_payer_with_decreasing_retries(hub, conserved):
    async def scenario():
        async with Simulator(hub.fspiop_url, auto_answer=True) as sim:
            payer, payee, payer_party, _ = await pair(hub, sim, payee_behaviour=Behaviour(otp_wrong_entries=2))
            kind = transaction_type("WITHDRAWAL", "PAYEE", "DEVICE")
            result = await sim.flows.request_to_pay(payee, "MSISDN", payer_party.party_identifier, "7", CURRENCY,
                                                    transaction=kind, authentication_type="OTP", otp="4321")
            assert result.payee.state == result.payer.state == "COMMITTED"
            assert result.payer.authorization_attempts == 3
            asked = [r for r in sim.received(payee, method="GET") if r.path.startswith("/authorizations/")]
            assert [r.headers["fspiop-source"] for r in asked] == [payer] * 3
            answers = [r for r in sim.received(payer, method="PUT") if r.path.startswith("/authorizations/")]
            assert [a.body["authenticationInfo"]["authenticationValue"] for a in answers] == ["4322", "4322", "4321"]
            # The device declines outright: one round, then REJECTED to the payee.
            sim.set_behaviour(payee, authorization_mode="reject")
            declined = await sim.flows.request_to_pay(payee, "MSISDN", payer_party.party_identifier, "7", CURRENCY,
                                                      transaction=kind, authentication_type="OTP", otp="4321")
            assert (declined.payee.state, declined.payer.authorization_attempts) == ("REJECTED", 1)
            return payer, payee

    payer, payee = run(scenario())
    assert (position(hub, payer), position(hub, payee)) == (D("7"), D("-7"))


def test_control_routes_for_curl(hub, conserved):
    async def scenario():
        async with Simulator(hub.fspiop_url, auto_answer=True) as sim:
            payer, payee, payer_party, payee_party = await pair(hub, sim, payee_behaviour=Behaviour(fee="1"))
            base = f"http://127.0.0.1:{sim.port}"

            def get(path: str) -> tuple[int, dict]:
                try:
                    with urllib.request.urlopen(base + path, timeout=30) as response:
                        return response.status, json.loads(response.read())
                except urllib.error.HTTPError as error:
                    return error.code, json.loads(error.read())

            status, endpoints = await asyncio.to_thread(get, f"/{payee}/_endpoints")
            assert status == 200 and endpoints == sim.all_endpoints(payee)
            status, paid = await asyncio.to_thread(
                get, f"/{payer}/_pay?type=MSISDN&id={payee_party.party_identifier}&amount=20&currency={CURRENCY}"
                     "&amountType=RECEIVE&scenario=PAYMENT")
            assert status == 200, paid
            assert paid["quote"]["transferAmount"] == {"amount": "21", "currency": CURRENCY}
            assert paid["transfer"]["transferState"] == "COMMITTED"
            status, requested = await asyncio.to_thread(
                get, f"/{payee}/_request_to_pay?type=MSISDN&id={payer_party.party_identifier}&amount=3"
                     f"&currency={CURRENCY}")
            assert status == 200, requested
            assert requested["payee"]["state"] == "COMMITTED"
            status, failed = await asyncio.to_thread(
                get, f"/{payer}/_pay?type=MSISDN&id=0000000001&amount=1&currency={CURRENCY}")
            assert (status, failed["step"], failed["errorCode"]) == (502, "lookup", "3204")
            status, bad = await asyncio.to_thread(get, f"/{payer}/_pay?type=MSISDN")
            assert status == 400
            return payer, payee

    payer, payee = run(scenario())
    assert (position(hub, payer), position(hub, payee)) == (D("25"), D("-25"))  # 20 + 1, then 3 + 1 (fee 1)
