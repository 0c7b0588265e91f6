"""Quotes, transaction requests, authorizations and transactions end to end: real HTTP, Ray, Postgres.

One hub serves the module, with ``RAYLOOP_TRANSFER_QUOTE_CHECK=valid`` so that transfers must pay a
quote the hub relayed. Every test onboards its own DFSPs on a ``Simulator`` and drives the answering
side explicitly with ``Simulator.send``; after every test the money is conserved.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import uuid

import pytest
import uvloop

from api.http import HttpServer, Response
from cluster.testing import HubThread, assert_conserved, module_hub
from sim.simulator import Behaviour, Simulator, iso_now

CURRENCY = "XTS"
_names = itertools.count()


@pytest.fixture(scope="module")
def hub(module_database_url):
    with module_hub(module_database_url, hub_accounts=(CURRENCY,), shards=2, ingress_workers=1,
                    transfer_quote_check="valid") as thread:
        yield thread


@pytest.fixture(autouse=True)
def conserved(hub):
    yield
    hub.call(assert_conserved(hub.hub))


def run(coroutine):
    return uvloop.run(coroutine)


@contextlib.asynccontextmanager
async def simulator(hub: HubThread):
    sim = Simulator(hub.fspiop_url)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


AGREEMENT_ENDPOINTS = (
    "FSPIOP_CALLBACK_URL_QUOTES", "FSPIOP_CALLBACK_URL_TRX_REQ_SERVICE", "FSPIOP_CALLBACK_URL_AUTHORIZATIONS",
)


def passive() -> Behaviour:
    """A simulated DFSP that fulfils transfers but answers no quote, transaction request or authorization
    by itself (simulators that can, have these modes): the tests send every answer explicitly."""
    known = {item.name for item in dataclasses.fields(Behaviour)}
    modes = {"quote_mode": "ignore", "request_mode": "ignore", "authorization_mode": "ignore"}
    return Behaviour(**{name: value for name, value in modes.items() if name in known})


def onboard(hub: HubThread, sim: Simulator, name: str, *, agreement_endpoints: bool = True,
            deposit: str = "1000", endpoints_instead: dict[str, str] | None = None) -> None:
    """A DFSP with a position, funds, transfer endpoints and (unless told not to) the agreement endpoints;
    ``endpoints_instead`` registers other URLs for some types from the start. (Changing an endpoint later
    reaches the ingress workers only with their next periodic refresh, so a test that changed one right
    after onboarding would race that refresh.)"""
    sim.add_dfsp(name, passive())
    status, body = hub.admin("POST", "/participants", {"name": name, "currency": CURRENCY})
    assert status == 201, body
    status, body = hub.admin("POST", f"/participants/{name}/initialPositionAndLimits", {
        "currency": CURRENCY, "limit": {"type": "NET_DEBIT_CAP", "value": 1000}, "initialPosition": 0})
    assert status == 201, body
    endpoints = dict(sim.endpoints(name))
    if agreement_endpoints:
        endpoints.update({endpoint_type: sim.base_url(name) for endpoint_type in AGREEMENT_ENDPOINTS})
    endpoints.update(endpoints_instead or {})
    for endpoint_type, value in endpoints.items():
        status, body = hub.admin("POST", f"/participants/{name}/endpoints", {"type": endpoint_type, "value": value})
        assert status == 201, body
    status, accounts = hub.admin("GET", f"/participants/{name}/accounts")
    settlement = next(a for a in accounts if a["ledgerAccountType"] == "SETTLEMENT")
    status, body = hub.admin("POST", f"/participants/{name}/accounts/{settlement['id']}", {
        "transferId": str(uuid.uuid4()), "externalReference": "test", "action": "recordFundsIn",
        "reason": "test deposit", "amount": {"amount": deposit, "currency": CURRENCY}})
    assert status == 202, body


def pair(hub: HubThread, sim: Simulator, **options) -> tuple[str, str]:
    n = next(_names)
    payer, payee = f"ag{n}payer", f"ag{n}payee"
    onboard(hub, sim, payer)
    onboard(hub, sim, payee, **options)
    return payer, payee


def party(fsp: str, identifier: str) -> dict:
    return {"partyIdInfo": {"partyIdType": "MSISDN", "partyIdentifier": identifier, "fspId": fsp}}


def quote_request(payer: str, payee: str, amount: str = "10", *, expiration_ms: float | None = None) -> dict:
    body = {
        "quoteId": str(uuid.uuid4()),
        "transactionId": str(uuid.uuid4()),
        "payee": party(payee, "2547001"),
        "payer": party(payer, "2547002"),
        "amountType": "RECEIVE",
        "amount": {"amount": amount, "currency": CURRENCY},
        "transactionType": {"scenario": "TRANSFER", "initiator": "PAYER", "initiatorType": "CONSUMER"},
    }
    if expiration_ms is not None:
        body["expiration"] = iso_now(expiration_ms)
    return body


def quote_answer(prepare: dict, *, expiration_ms: float = 60_000) -> dict:
    """The payee's PUT /quotes/{ID}: the ILP packet and condition a later prepare will carry."""
    return {"transferAmount": prepare["amount"], "expiration": iso_now(expiration_ms),
            "ilpPacket": prepare["ilpPacket"], "condition": prepare["condition"]}


def to(dfsp_path: str, *, method: str = "PUT", source: str | None = None):
    """A predicate for Simulator.wait_for: this method on this path (and from this FSPIOP-Source)."""
    def matches(received) -> bool:
        return (received.method == method and received.path == dfsp_path
                and (source is None or received.headers.get("fspiop-source") == source))
    return matches


def error_code(received) -> str:
    return received.body["errorInformation"]["errorCode"]


async def agreed_quote(sim: Simulator, payer: str, payee: str, amount: str = "10", **answer_options):
    """POST /quotes and the payee's answer, relayed: (request, prepare body paying it, answer as received)."""
    request = quote_request(payer, payee, amount)
    status, _ = await sim.send("POST", "/quotes", request, source=payer, destination=payee)
    assert status == 202
    quote_id = request["quoteId"]
    await sim.wait_for(payee, lambda r: r.path == "/quotes" and r.body.get("quoteId") == quote_id, 10)
    prepare = sim.prepare_body(payer, payee, amount, CURRENCY)
    status, _ = await sim.send("PUT", f"/quotes/{quote_id}", quote_answer(prepare, **answer_options),
                               source=payee, destination=payer)
    assert status == 200
    answered = await sim.wait_for(payer, to(f"/quotes/{quote_id}"), 10)
    return request, prepare, answered


# ---------------------------------------------------------------------------------------------- quotes


def test_quote_is_relayed_stored_and_the_transfer_paying_it_commits(hub):
    async def scenario():
        async with simulator(hub) as sim:
            payer, payee = pair(hub, sim)
            request = quote_request(payer, payee, "10")
            status, _ = await sim.send("POST", "/quotes", request, source=payer, destination=payee)
            assert status == 202
            forwarded = await sim.wait_for(payee, to("/quotes", method="POST"), 10)
            assert forwarded.body == request
            assert forwarded.headers["fspiop-source"] == payer and forwarded.headers["fspiop-destination"] == payee
            assert forwarded.headers["content-type"] == "application/vnd.interoperability.quotes+json;version=1.1"
            assert "accept" in forwarded.headers  # a request keeps its Accept; callbacks never carry one

            prepare = sim.prepare_body(payer, payee, "10", CURRENCY)
            answer = quote_answer(prepare)
            quote_id = request["quoteId"]
            status, _ = await sim.send("PUT", f"/quotes/{quote_id}", answer, source=payee, destination=payer)
            assert status == 200
            answered = await sim.wait_for(payer, to(f"/quotes/{quote_id}"), 10)
            assert answered.body == answer
            assert answered.headers["fspiop-source"] == payee and answered.headers["fspiop-destination"] == payer
            assert "accept" not in answered.headers

            # The payer GETs the quote: forwarded to the payee, who answers again through the hub.
            status, _ = await sim.send("GET", f"/quotes/{quote_id}", source=payer, destination=payee)
            assert status == 202
            asked = await sim.wait_for(payee, to(f"/quotes/{quote_id}", method="GET"), 10)
            assert asked.headers["fspiop-source"] == payer

            # The transfer pays the quote (the check is "valid"): prepared, fulfilled, committed.
            status, _ = await sim.send("POST", "/transfers", prepare, source=payer, destination=payee)
            assert status == 202
            committed = await sim.wait_for(payer, to(f"/transfers/{prepare['transferId']}"), 10)
            assert committed.body["transferState"] == "COMMITTED"

    run(scenario())


def test_quote_duplicates_pending_ignored_modified_3106_finished_resent(hub):
    async def scenario():
        async with simulator(hub) as sim:
            payer, payee = pair(hub, sim)
            request = quote_request(payer, payee, "3")
            quote_id = request["quoteId"]
            await sim.send("POST", "/quotes", request, source=payer, destination=payee)
            await sim.wait_for(payee, to("/quotes", method="POST"), 10)
            # The same request while it is pending: ignored (the payee's answer will come).
            status, _ = await sim.send("POST", "/quotes", request, source=payer, destination=payee)
            assert status == 202
            # The same id with other content: 3106 from the hub to the payer.
            status, _ = await sim.send("POST", "/quotes", {**request, "amount": {"amount": "4", "currency": CURRENCY}},
                                       source=payer, destination=payee)
            assert status == 202
            modified = await sim.wait_for(payer, to(f"/quotes/{quote_id}/error"), 10)
            assert error_code(modified) == "3106" and modified.headers["fspiop-source"] == "Hub"
            assert len(sim.received(payee, method="POST", path_contains="/quotes")) == 1

            # Answered, then the payer sends the original again: the stored answer comes again, unchanged.
            prepare = sim.prepare_body(payer, payee, "3", CURRENCY)
            answer = quote_answer(prepare)
            await sim.send("PUT", f"/quotes/{quote_id}", answer, source=payee, destination=payer)
            first = await sim.wait_for(payer, to(f"/quotes/{quote_id}"), 10)
            sim.clear()
            await sim.send("POST", "/quotes", request, source=payer, destination=payee)
            again = await sim.wait_for(payer, to(f"/quotes/{quote_id}"), 10)
            assert again.body == first.body and again.headers["fspiop-source"] == payee
            assert again.headers.get("date") == first.headers.get("date")  # the stored message, not a new one
            assert not sim.received(payee, method="POST")

            # The payee answering again: the same answer is ignored; another answer is 3106 (a quote is
            # irrevocable).
            sim.clear()
            await sim.send("PUT", f"/quotes/{quote_id}", answer, source=payee, destination=payer)
            await sim.send("PUT", f"/quotes/{quote_id}", {**answer, "expiration": iso_now(30_000)},
                           source=payee, destination=payer)
            refused = await sim.wait_for(payee, to(f"/quotes/{quote_id}/error"), 10)
            assert error_code(refused) == "3106"
            await asyncio.sleep(0.3)
            assert not sim.received(payer)

    run(scenario())


def test_quote_to_payee_without_endpoint_or_unknown_gets_3201(hub):
    async def scenario():
        async with simulator(hub) as sim:
            payer, payee = pair(hub, sim, agreement_endpoints=False)
            request = quote_request(payer, payee)
            await sim.send("POST", "/quotes", request, source=payer, destination=payee)
            refused = await sim.wait_for(payer, to(f"/quotes/{request['quoteId']}/error"), 10)
            assert error_code(refused) == "3201"
            assert refused.headers["fspiop-source"] == "Hub" and refused.headers["fspiop-destination"] == payer
            assert refused.headers["fspiop-uri"] == f"/quotes/{request['quoteId']}/error"
            assert not sim.received(payee)

            request = quote_request(payer, "nosuchfsp")
            await sim.send("POST", "/quotes", request, source=payer, destination="nosuchfsp")
            unknown = await sim.wait_for(payer, to(f"/quotes/{request['quoteId']}/error"), 10)
            assert error_code(unknown) == "3201"

    run(scenario())


def test_quote_without_destination_is_routed_by_payee_fsp(hub):
    async def scenario():
        async with simulator(hub) as sim:
            payer, payee = pair(hub, sim)
            request = quote_request(payer, payee)
            status, _ = await sim.send("POST", "/quotes", request, source=payer)
            assert status == 202
            forwarded = await sim.wait_for(payee, to("/quotes", method="POST"), 10)
            assert forwarded.headers["fspiop-destination"] == payee  # filled by the hub
            # A GET of it without FSPIOP-Destination goes where the quote went.
            await sim.send("GET", f"/quotes/{request['quoteId']}", source=payer)
            asked = await sim.wait_for(payee, to(f"/quotes/{request['quoteId']}", method="GET"), 10)
            assert asked.headers["fspiop-destination"] == payee
            # Nowhere to send it: refused at once.
            anonymous = quote_request(payer, payee)
            del anonymous["payee"]["partyIdInfo"]["fspId"]
            status, body = await sim.send("POST", "/quotes", anonymous, source=payer)
            assert status == 400 and body["errorInformation"]["errorCode"] == "3102"

    run(scenario())


def test_inactive_participants_are_refused(hub):
    async def scenario():
        async with simulator(hub) as sim:
            payer, payee = pair(hub, sim)
            status, body = hub.admin("PUT", f"/participants/{payee}", {"isActive": False})
            assert status == 200, body
            await asyncio.sleep(2.5)  # the ingress's participant cache refreshes every 2 s
            request = quote_request(payer, payee)
            await sim.send("POST", "/quotes", request, source=payer, destination=payee)
            refused = await sim.wait_for(payer, to(f"/quotes/{request['quoteId']}/error"), 10)
            assert error_code(refused) == "3201"
            # The inactive DFSP itself may not send either (its error callback still reaches it).
            request = quote_request(payee, payer)
            await sim.send("POST", "/quotes", request, source=payee, destination=payer)
            refused = await sim.wait_for(payee, to(f"/quotes/{request['quoteId']}/error"), 10)
            assert error_code(refused) == "3200"
            assert not sim.received(payer, method="POST")

    run(scenario())


def test_quote_answer_after_the_request_expired_is_refused_3300_to_both(hub):
    async def scenario():
        async with simulator(hub) as sim:
            payer, payee = pair(hub, sim)
            request = quote_request(payer, payee, expiration_ms=300)
            quote_id = request["quoteId"]
            await sim.send("POST", "/quotes", request, source=payer, destination=payee)
            await sim.wait_for(payee, to("/quotes", method="POST"), 10)
            await asyncio.sleep(0.5)
            prepare = sim.prepare_body(payer, payee, "10", CURRENCY)
            await sim.send("PUT", f"/quotes/{quote_id}", quote_answer(prepare), source=payee, destination=payer)
            late = await sim.wait_for(payee, to(f"/quotes/{quote_id}/error"), 10)
            told = await sim.wait_for(payer, to(f"/quotes/{quote_id}/error"), 10)
            assert error_code(late) == error_code(told) == "3300"
            assert not [r for r in sim.received(payer, method="PUT") if r.path == f"/quotes/{quote_id}"]
            # The payer's transfer has no quote behind it: 3205, nothing reserved.
            await sim.send("POST", "/transfers", prepare, source=payer, destination=payee)
            refused = await sim.wait_for(payer, to(f"/transfers/{prepare['transferId']}/error"), 10)
            assert error_code(refused) == "3205"

            # A request whose expiration has passed already is not forwarded.
            request = quote_request(payer, payee, expiration_ms=-1_000)
            await sim.send("POST", "/quotes", request, source=payer, destination=payee)
            stale = await sim.wait_for(payer, to(f"/quotes/{request['quoteId']}/error"), 10)
            assert error_code(stale) == "3100"

    run(scenario())


def test_quote_error_from_payee_is_relayed_and_unknown_quotes_get_3205(hub):
    async def scenario():
        async with simulator(hub) as sim:
            payer, payee = pair(hub, sim)
            request = quote_request(payer, payee)
            quote_id = request["quoteId"]
            await sim.send("POST", "/quotes", request, source=payer, destination=payee)
            await sim.wait_for(payee, to("/quotes", method="POST"), 10)
            rejection = {"errorInformation": {"errorCode": "5101", "errorDescription": "Payee rejected quote"}}
            status, _ = await sim.send("PUT", f"/quotes/{quote_id}/error", rejection, source=payee, destination=payer)
            assert status == 200
            relayed = await sim.wait_for(payer, to(f"/quotes/{quote_id}/error"), 10)
            assert relayed.body == rejection and relayed.headers["fspiop-source"] == payee

            # The payer asks again with the same request: the rejection again.
            sim.clear()
            await sim.send("POST", "/quotes", request, source=payer, destination=payee)
            again = await sim.wait_for(payer, to(f"/quotes/{quote_id}/error"), 10)
            assert again.body == rejection

            # Answers to quotes the hub never relayed, and answers from the wrong DFSP.
            stray = str(uuid.uuid4())
            prepare = sim.prepare_body(payer, payee, "1", CURRENCY)
            await sim.send("PUT", f"/quotes/{stray}", quote_answer(prepare), source=payee, destination=payer)
            unknown = await sim.wait_for(payee, to(f"/quotes/{stray}/error"), 10)
            assert error_code(unknown) == "3205"
            other = quote_request(payer, payee)
            await sim.send("POST", "/quotes", other, source=payer, destination=payee)
            await sim.wait_for(payee, lambda r: r.method == "POST" and r.body.get("quoteId") == other["quoteId"], 10)
            await sim.send("PUT", f"/quotes/{other['quoteId']}", quote_answer(prepare), source=payer,
                           destination=payee)
            wrong = await sim.wait_for(payer, to(f"/quotes/{other['quoteId']}/error"), 10)
            assert error_code(wrong) == "3100"

    run(scenario())


def test_transfers_must_pay_a_valid_quote(hub):
    async def scenario():
        async with simulator(hub) as sim:
            payer, payee = pair(hub, sim)
            # No quote at all: 3205.
            _, _, prepare = await sim.send_prepare(payer, payee, "2", CURRENCY)
            refused = await sim.wait_for(payer, to(f"/transfers/{prepare['transferId']}/error"), 10)
            assert error_code(refused) == "3205" and refused.headers["fspiop-source"] == "Hub"
            # A quote for 2, a transfer of 3 with its packet and condition: 3100.
            _, quoted, _ = await agreed_quote(sim, payer, payee, "2")
            bigger = {**quoted, "amount": {"amount": "3", "currency": CURRENCY}}
            await sim.send("POST", "/transfers", bigger, source=payer, destination=payee)
            refused = await sim.wait_for(payer, to(f"/transfers/{bigger['transferId']}/error"), 10)
            assert error_code(refused) == "3100"
            # A quote that expired before the transfer: 3302.
            _, short, _ = await agreed_quote(sim, payer, payee, "2", expiration_ms=200)
            await asyncio.sleep(0.4)
            await sim.send("POST", "/transfers", short, source=payer, destination=payee)
            refused = await sim.wait_for(payer, to(f"/transfers/{short['transferId']}/error"), 10)
            assert error_code(refused) == "3302"
            assert not sim.received(payee, method="POST", path_contains="/transfers")
            status, body = hub.admin("GET", f"/participants/{payer}/positions?currency={CURRENCY}")
            assert str(body["value"]) == "0"  # nothing was reserved

    run(scenario())


def test_version_1_0_is_negotiated_and_hub_errors_answer_in_it(hub):
    async def scenario():
        async with simulator(hub) as sim:
            payer, payee = pair(hub, sim, agreement_endpoints=False)
            request = quote_request(payer, payee)
            status, _ = await sim.send("POST", "/quotes", request, source=payer, destination=payee, version="1.0")
            assert status == 202
            refused = await sim.wait_for(payer, to(f"/quotes/{request['quoteId']}/error"), 10)
            assert refused.headers["content-type"] == "application/vnd.interoperability.quotes+json;version=1.0"
            # transactions and authorizations exist only in 1.0: a 1.1 is refused at once with the supported list.
            status, body = await sim.send("GET", f"/transactions/{uuid.uuid4()}", source=payer, destination=payee,
                                          version="1.1")
            assert status == 406 and body["errorInformation"]["errorCode"] == "3001"
            assert body["errorInformation"]["extensionList"]["extension"] == [{"key": "1", "value": "0"}]

    run(scenario())


# ---------------------------------------------------------------------------------------------- transaction requests


def transaction_request(payee: str, payer: str) -> dict:
    return {
        "transactionRequestId": str(uuid.uuid4()),
        "payee": party(payee, "2547010"),
        "payer": {"partyIdType": "MSISDN", "partyIdentifier": "2547011", "fspId": payer},
        "amount": {"amount": "15", "currency": CURRENCY},
        "transactionType": {"scenario": "PAYMENT", "initiator": "PAYEE", "initiatorType": "BUSINESS"},
        "authenticationType": "OTP",
    }


def test_transaction_request_relayed_answered_then_rejected_and_duplicates(hub):
    async def scenario():
        async with simulator(hub) as sim:
            payer, payee = pair(hub, sim)
            request = transaction_request(payee, payer)
            request_id = request["transactionRequestId"]
            # The payee (merchant) FSP asks the payer FSP.
            status, _ = await sim.send("POST", "/transactionRequests", request, source=payee, destination=payer)
            assert status == 202
            forwarded = await sim.wait_for(payer, to("/transactionRequests", method="POST"), 10)
            assert forwarded.body == request and forwarded.headers["fspiop-source"] == payee

            received = {"transactionRequestState": "RECEIVED", "transactionId": str(uuid.uuid4())}
            await sim.send("PUT", f"/transactionRequests/{request_id}", received, source=payer, destination=payee)
            answer = await sim.wait_for(payee, to(f"/transactionRequests/{request_id}"), 10)
            assert answer.body == received and answer.headers["fspiop-source"] == payer

            # Other content under the same id: 3106 to the payee FSP. A GET goes to the payer FSP.
            await sim.send("POST", "/transactionRequests", {**request, "note": "changed"}, source=payee,
                           destination=payer)
            modified = await sim.wait_for(payee, to(f"/transactionRequests/{request_id}/error"), 10)
            assert error_code(modified) == "3106"
            await sim.send("GET", f"/transactionRequests/{request_id}", source=payee, destination=payer)
            await sim.wait_for(payer, to(f"/transactionRequests/{request_id}", method="GET"), 10)

            # The payer later rejects it (a new state, not a conflict), and a resend of the request gets that.
            sim.clear()
            rejected = {"transactionRequestState": "REJECTED"}
            await sim.send("PUT", f"/transactionRequests/{request_id}", rejected, source=payer, destination=payee)
            later = await sim.wait_for(payee, to(f"/transactionRequests/{request_id}"), 10)
            assert later.body == rejected
            sim.clear()
            await sim.send("POST", "/transactionRequests", request, source=payee, destination=payer)
            resent = await sim.wait_for(payee, to(f"/transactionRequests/{request_id}"), 10)
            assert resent.body == rejected
            assert not sim.received(payer)

    run(scenario())


def test_transaction_request_rejected_with_error_and_unknown_id(hub):
    async def scenario():
        async with simulator(hub) as sim:
            payer, payee = pair(hub, sim)
            request = transaction_request(payee, payer)
            request_id = request["transactionRequestId"]
            await sim.send("POST", "/transactionRequests", request, source=payee, destination=payer)
            await sim.wait_for(payer, to("/transactionRequests", method="POST"), 10)
            error = {"errorInformation": {"errorCode": "4101", "errorDescription": "Payer rejected the request"}}
            await sim.send("PUT", f"/transactionRequests/{request_id}/error", error, source=payer, destination=payee)
            relayed = await sim.wait_for(payee, to(f"/transactionRequests/{request_id}/error"), 10)
            assert relayed.body == error
            stray = str(uuid.uuid4())
            await sim.send("PUT", f"/transactionRequests/{stray}", {"transactionRequestState": "RECEIVED"},
                           source=payer, destination=payee)
            unknown = await sim.wait_for(payer, to(f"/transactionRequests/{stray}/error"), 10)
            assert error_code(unknown) == "3206"

    run(scenario())


# ---------------------------------------------------------------------------------------------- authorizations


AUTH_QUERY = "authenticationType=OTP&retriesLeft=2&amount=15&currency=XTS"


def test_authorization_query_parameters_are_required_and_checked(hub):
    async def scenario():
        async with simulator(hub) as sim:
            payer, payee = pair(hub, sim)
            request_id = str(uuid.uuid4())
            cases = [
                ("retriesLeft=2&amount=15&currency=XTS", "3102", "authenticationType"),
                ("authenticationType=OTP&amount=15&currency=XTS", "3102", "retriesLeft"),
                ("authenticationType=OTP&retriesLeft=2&currency=XTS", "3102", "amount"),
                ("authenticationType=OTP&retriesLeft=2&amount=15", "3102", "currency"),
                ("authenticationType=PIN&retriesLeft=2&amount=15&currency=XTS", "3101", "authenticationType"),
                ("authenticationType=OTP&retriesLeft=two&amount=15&currency=XTS", "3101", "retriesLeft"),
                ("authenticationType=OTP&retriesLeft=2&amount=1.50&currency=XTS", "3101", "amount"),
                ("authenticationType=OTP&retriesLeft=2&amount=15&currency=ABC", "3101", "currency"),
            ]
            for query, code, name in cases:
                status, body = await sim.send("GET", f"/authorizations/{request_id}?{query}", source=payer,
                                              destination=payee, version="1.0")
                assert status == 400, (query, body)
                assert body["errorInformation"]["errorCode"] == code, query
                assert name in body["errorInformation"]["errorDescription"]
            await asyncio.sleep(0.2)
            assert not sim.received(payee)

    run(scenario())


def test_authorization_is_forwarded_with_its_query_and_answers_come_back(hub):
    async def scenario():
        seen: list = []

        async def payee_device(request):
            seen.append(request)
            return Response(202)

        device = HttpServer(payee_device, "127.0.0.1", 0)
        port = await device.start()
        try:
            async with simulator(hub) as sim:
                payer, payee = pair(hub, sim, endpoints_instead={
                    "FSPIOP_CALLBACK_URL_AUTHORIZATIONS": f"http://127.0.0.1:{port}/device"})
                request_id = str(uuid.uuid4())
                status, _ = await sim.send("GET", f"/authorizations/{request_id}?{AUTH_QUERY}", source=payer,
                                           destination=payee, version="1.0")
                assert status == 202
                for _ in range(100):
                    if seen:
                        break
                    await asyncio.sleep(0.05)
                (forwarded,) = seen
                assert forwarded.method == "GET" and forwarded.path == f"/device/authorizations/{request_id}"
                assert forwarded.query == {"authenticationType": "OTP", "retriesLeft": "2", "amount": "15",
                                           "currency": "XTS"}
                assert forwarded.headers["fspiop-source"] == payer

                entered = {"authenticationInfo": {"authentication": "OTP", "authenticationValue": "1234"},
                           "responseType": "ENTERED"}
                status, _ = await sim.send("PUT", f"/authorizations/{request_id}", entered, source=payee,
                                           destination=payer, version="1.0")
                assert status == 200
                answer = await sim.wait_for(payer, to(f"/authorizations/{request_id}"), 10)
                assert answer.body == entered and answer.headers["fspiop-source"] == payee
                assert answer.headers["content-type"] == \
                    "application/vnd.interoperability.authorizations+json;version=1.0"
                failure = {"errorInformation": {"errorCode": "5100", "errorDescription": "Generic Payee rejection"}}
                await sim.send("PUT", f"/authorizations/{request_id}/error", failure, source=payee,
                               destination=payer, version="1.0")
                relayed = await sim.wait_for(payer, to(f"/authorizations/{request_id}/error"), 10)
                assert relayed.body == failure
                # An answer without FSPIOP-Destination cannot be routed: refused at once.
                status, body = await sim.send("PUT", f"/authorizations/{request_id}", entered, source=payee,
                                              version="1.0")
                assert status == 400 and body["errorInformation"]["errorCode"] == "3102"
        finally:
            await device.stop()

    run(scenario())


# ---------------------------------------------------------------------------------------------- transactions


def test_transactions_get_and_answers_are_relayed(hub):
    async def scenario():
        async with simulator(hub) as sim:
            payer, payee = pair(hub, sim)
            transaction_id = str(uuid.uuid4())
            status, _ = await sim.send("GET", f"/transactions/{transaction_id}", source=payer, destination=payee,
                                       version="1.0")
            assert status == 202
            asked = await sim.wait_for(payee, to(f"/transactions/{transaction_id}", method="GET"), 10)
            assert asked.headers["fspiop-source"] == payer and asked.headers["fspiop-destination"] == payee
            state = {"transactionState": "COMPLETED", "completedTimestamp": iso_now(), "code": "A1234"}
            status, _ = await sim.send("PUT", f"/transactions/{transaction_id}", state, source=payee,
                                       destination=payer, version="1.0")
            assert status == 200
            answer = await sim.wait_for(payer, to(f"/transactions/{transaction_id}"), 10)
            assert answer.body == state
            failure = {"errorInformation": {"errorCode": "3207", "errorDescription": "Transaction ID not found"}}
            await sim.send("PUT", f"/transactions/{transaction_id}/error", failure, source=payee, destination=payer,
                           version="1.0")
            relayed = await sim.wait_for(payer, to(f"/transactions/{transaction_id}/error"), 10)
            assert relayed.body == failure
            # To a DFSP the hub does not know: 3201 to the asker. Without a destination: 3102 at once.
            await sim.send("GET", f"/transactions/{transaction_id}", source=payer, destination="nosuchfsp",
                           version="1.0")
            unknown = await sim.wait_for(payer, to(f"/transactions/{transaction_id}/error", source="Hub"), 10)
            assert error_code(unknown) == "3201"
            status, body = await sim.send("GET", f"/transactions/{transaction_id}", source=payer, version="1.0")
            assert status == 400 and body["errorInformation"]["errorCode"] == "3102"
            status, body = await sim.send("GET", "/transactions/a%00b", source=payer, destination=payee,
                                          version="1.0")
            assert status == 400 and body["errorInformation"]["errorCode"] == "3101"  # no NUL reaches Postgres
            # An errorCode outside the spec's table is not relayed: 3100 back to its sender.
            bogus = {"errorInformation": {"errorCode": "3999", "errorDescription": "made up"}}
            await sim.send("PUT", f"/transactions/{transaction_id}/error", bogus, source=payee, destination=payer,
                           version="1.0")
            refused = await sim.wait_for(payee, to(f"/transactions/{transaction_id}/error", source="Hub"), 10)
            assert error_code(refused) == "3100"

    run(scenario())
