"""Account lookup end to end: /parties and /participants through a real hub (HTTP, Ray, Postgres), the
DFSP simulator on both sides, the /oracles admin API, and an external oracle served by a tiny in-test
server speaking the oracle API.

One hub serves the module. Every test onboards its own DFSPs and party identifiers, so tests do not see
each other's registrations. The simulator only records what the hub sends (its own answering of lookups
is switched off); the payee side is driven explicitly with ``Simulator.send``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid

import orjson
import pytest
import uvloop

from api.http import HttpServer, Request, Response
from cluster.testing import HubThread, assert_conserved, module_hub
from sim.simulator import Behaviour, Simulator

CURRENCY = "XTS"
HUB = "Hub"
_names = itertools.count()

_P = "{{partyIdType}}/{{partyIdentifier}}"
_S = _P + "/{{partySubIdOrType}}"


@pytest.fixture(scope="module")
def hub(module_database_url):
    # A short oracle registry refresh, so /oracles changes reach the ingress within the tests' waits.
    with module_hub(module_database_url, hub_accounts=(CURRENCY,), shards=2, ingress_workers=1, oracle_refresh_ms=100,
                    oracle_timeout_ms=1_000) as thread:
        yield thread


@pytest.fixture(autouse=True)
def conserved(hub):
    yield
    hub.call(assert_conserved(hub.hub))


def run(coroutine):
    return uvloop.run(coroutine)


def lookup_endpoints(base: str) -> dict[str, str]:
    return {
        "FSPIOP_CALLBACK_URL_PARTIES_GET": f"{base}/parties/{_P}",
        "FSPIOP_CALLBACK_URL_PARTIES_SUB_ID_GET": f"{base}/parties/{_S}",
        "FSPIOP_CALLBACK_URL_PARTIES_PUT": f"{base}/parties/{_P}",
        "FSPIOP_CALLBACK_URL_PARTIES_SUB_ID_PUT": f"{base}/parties/{_S}",
        "FSPIOP_CALLBACK_URL_PARTIES_PUT_ERROR": f"{base}/parties/{_P}/error",
        "FSPIOP_CALLBACK_URL_PARTIES_SUB_ID_PUT_ERROR": f"{base}/parties/{_S}/error",
        "FSPIOP_CALLBACK_URL_PARTICIPANT_PUT": f"{base}/participants/{_P}",
        "FSPIOP_CALLBACK_URL_PARTICIPANT_SUB_ID_PUT": f"{base}/participants/{_S}",
        "FSPIOP_CALLBACK_URL_PARTICIPANT_PUT_ERROR": f"{base}/participants/{_P}/error",
        "FSPIOP_CALLBACK_URL_PARTICIPANT_SUB_ID_PUT_ERROR": f"{base}/participants/{_S}/error",
        "FSPIOP_CALLBACK_URL_PARTICIPANT_BATCH_PUT": f"{base}/participants/{{{{requestId}}}}",
        "FSPIOP_CALLBACK_URL_PARTICIPANT_BATCH_PUT_ERROR": f"{base}/participants/{{{{requestId}}}}/error",
    }


def onboard(hub: HubThread, sim: Simulator | None, name: str, endpoints: dict[str, str] | None = None) -> None:
    """A DFSP known to the hub (lookups need no accounts) with its lookup callback endpoints."""
    if sim is not None:
        # The payee side is driven by the tests themselves: the simulator must not answer lookups on its own.
        sim.add_dfsp(name, Behaviour(lookup_mode="ignore"))
    status, body = hub.admin("POST", "/participants", {"name": name, "currency": CURRENCY})
    assert status == 201, body
    if endpoints is None:
        endpoints = lookup_endpoints(sim.base_url(name)) if sim is not None else {}
    for endpoint_type, value in endpoints.items():
        status, body = hub.admin("POST", f"/participants/{name}/endpoints", {"type": endpoint_type, "value": value})
        assert status == 201, body


def names(count: int) -> list[str]:
    n = next(_names)
    return [f"lk{n}fsp{chr(97 + i)}" for i in range(count)]


def party_id() -> str:
    return str(2_557_000_000 + next(_names) * 1_000 + uuid.uuid4().int % 1_000)


@contextlib.asynccontextmanager
async def simulator(hub: HubThread):
    sim = Simulator(hub.fspiop_url)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


def error_code(received) -> str:
    return received.body["errorInformation"]["errorCode"]


async def callback(sim: Simulator, dfsp: str, path: str, *, method: str = "PUT", body: dict | None = None,
                   timeout_s: float = 10.0):
    """The first request to ``dfsp`` with exactly this path and method (and body, when given: a simulator
    that answers lookups by itself may send its own PUT for the same party)."""
    return await sim.wait_for(
        dfsp, lambda r: r.method == method and r.path == path and (body is None or r.body == body), timeout_s
    )


async def register(sim: Simulator, fsp: str, path: str, *, body: dict | None = None, version: str = "1.1"):
    """POST /participants/{path} as ``fsp`` and return the hub's answer (PUT or PUT .../error)."""
    sim.clear()
    status, _ = await sim.send("POST", f"/participants/{path}", body or {"fspId": fsp}, source=fsp, version=version)
    assert status == 202
    return await sim.wait_for(fsp, lambda r: r.method == "PUT" and r.path.startswith(f"/participants/{path}"), 10)


def party_body(id_type: str, identifier: str, fsp: str, name: str = "Test Party", **extra) -> dict:
    return {"party": {"partyIdInfo": {"partyIdType": id_type, "partyIdentifier": identifier, "fspId": fsp},
                      "name": name, **extra}}


# ---------------------------------------------------------------------------------------------- /participants


def test_register_lookup_delete_and_reregister_with_owner_checks(hub):
    async def scenario():
        a, b = names(2)
        msisdn = party_id()
        path = f"MSISDN/{msisdn}"
        async with simulator(hub) as sim:
            onboard(hub, sim, a)
            onboard(hub, sim, b)
            answer = await register(sim, a, path)
            assert answer.path == f"/participants/{path}"
            assert answer.body == {"fspId": a}
            assert answer.headers["fspiop-source"] == HUB and answer.headers["fspiop-destination"] == a
            assert answer.headers["content-type"] == "application/vnd.interoperability.participants+json;version=1.1"
            assert answer.headers["fspiop-uri"] == f"/participants/{path}"
            assert "accept" not in answer.headers
            # The owner may register again (idempotent): the same answer.
            assert (await register(sim, a, path)).body == {"fspId": a}

            # Anyone may ask who holds it.
            sim.clear()
            assert (await sim.send("GET", f"/participants/{path}", source=b))[0] == 202
            assert (await callback(sim, b, f"/participants/{path}")).body == {"fspId": a}

            # b may neither take it over, nor register for someone else, nor delete it.
            taken = await register(sim, b, path)
            assert taken.path == f"/participants/{path}/error" and error_code(taken) == "3003"
            for_other = await register(sim, b, f"MSISDN/{party_id()}", body={"fspId": a})
            assert error_code(for_other) == "3003"
            sim.clear()
            await sim.send("DELETE", f"/participants/{path}", source=b)
            refused = await callback(sim, b, f"/participants/{path}/error")
            assert error_code(refused) == "3040"

            # The owner deletes: the answer has no fspId (the spec's "empty"), and nobody holds it any more.
            sim.clear()
            await sim.send("DELETE", f"/participants/{path}", source=a)
            assert (await callback(sim, a, f"/participants/{path}")).body == {}
            sim.clear()
            await sim.send("GET", f"/participants/{path}", source=b)
            assert error_code(await callback(sim, b, f"/participants/{path}/error")) == "3204"
            sim.clear()
            await sim.send("DELETE", f"/participants/{path}", source=a)
            assert error_code(await callback(sim, a, f"/participants/{path}/error")) == "3204"

            # Now b may register it.
            assert (await register(sim, b, path)).body == {"fspId": b}
            sim.clear()
            await sim.send("GET", f"/participants/{path}", source=a)
            assert (await callback(sim, a, f"/participants/{path}")).body == {"fspId": b}

    run(scenario())


def test_registrations_per_currency_and_currency_filter(hub):
    async def scenario():
        a, b = names(2)
        path = f"MSISDN/{party_id()}"
        async with simulator(hub) as sim:
            onboard(hub, sim, a)
            onboard(hub, sim, b)
            assert (await register(sim, a, path, body={"fspId": a, "currency": "USD"})).body == {"fspId": a}
            assert (await register(sim, b, path, body={"fspId": b, "currency": "EUR"})).body == {"fspId": b}
            for currency, holder in (("USD", a), ("EUR", b)):
                sim.clear()
                await sim.send("GET", f"/participants/{path}?currency={currency}", source=a)
                assert (await callback(sim, a, f"/participants/{path}")).body == {"fspId": holder}
            sim.clear()
            await sim.send("GET", f"/participants/{path}?currency=GBP", source=a)
            assert error_code(await callback(sim, a, f"/participants/{path}/error")) == "3204"
            # Deleting b's EUR registration leaves a's USD one.
            sim.clear()
            await sim.send("DELETE", f"/participants/{path}?currency=EUR", source=b)
            assert (await callback(sim, b, f"/participants/{path}")).body == {}
            sim.clear()
            await sim.send("GET", f"/participants/{path}", source=b)
            assert (await callback(sim, b, f"/participants/{path}")).body == {"fspId": a}
            # A bad currency is refused before the 202.
            status, answer = await sim.send("GET", f"/participants/{path}?currency=usd", source=a)
            assert status == 400 and answer["errorInformation"]["errorCode"] == "3101"

    run(scenario())


def test_bulk_registration_reports_each_party(hub):
    async def scenario():
        a, b, c = names(3)
        free, owned_by_c, claimed_for_b = party_id(), party_id(), party_id()
        async with simulator(hub) as sim:
            for fsp in (a, b, c):
                onboard(hub, sim, fsp)
            assert (await register(sim, c, f"MSISDN/{owned_by_c}")).body == {"fspId": c}
            request_id = str(uuid.uuid4())
            party_list = [
                {"partyIdType": "MSISDN", "partyIdentifier": free, "fspId": a},
                {"partyIdType": "MSISDN", "partyIdentifier": owned_by_c, "fspId": a},
                {"partyIdType": "MSISDN", "partyIdentifier": claimed_for_b, "fspId": b},
                {"partyIdType": "BUSINESS", "partyIdentifier": f"shop{free}", "partySubIdOrType": "till1"},
            ]
            sim.clear()
            status, _ = await sim.send("POST", "/participants",
                                       {"requestId": request_id, "partyList": party_list, "currency": CURRENCY},
                                       source=a)
            assert status == 202
            answer = await callback(sim, a, f"/participants/{request_id}")
            assert answer.headers["fspiop-source"] == HUB
            assert answer.body["currency"] == CURRENCY
            results = answer.body["partyList"]
            assert [r["partyId"] for r in results] == party_list
            codes = [r.get("errorInformation", {}).get("errorCode") for r in results]
            assert codes == [None, "3003", "3204", None]
            # What succeeded is registered, what failed is not.
            for path, holder in ((f"MSISDN/{free}", a), (f"MSISDN/{owned_by_c}", c),
                                 (f"BUSINESS/shop{free}/till1", a)):
                sim.clear()
                await sim.send("GET", f"/participants/{path}", source=b)
                assert (await callback(sim, b, f"/participants/{path}")).body == {"fspId": holder}
            sim.clear()
            await sim.send("GET", f"/participants/MSISDN/{claimed_for_b}", source=b)
            assert error_code(await callback(sim, b, f"/participants/MSISDN/{claimed_for_b}/error")) == "3204"

    run(scenario())


# ---------------------------------------------------------------------------------------------- /parties


def test_lookup_without_destination_goes_to_the_holder_and_back(hub):
    async def scenario():
        payer, payee = names(2)
        msisdn = party_id()
        path = f"/parties/MSISDN/{msisdn}"
        async with simulator(hub) as sim:
            onboard(hub, sim, payer)
            onboard(hub, sim, payee)
            assert (await register(sim, payee, f"MSISDN/{msisdn}")).body == {"fspId": payee}
            sim.clear()
            status, _ = await sim.send("GET", path, source=payer, headers={"traceparent": "00-" + "a" * 32 + "-"
                                                                         + "b" * 16 + "-01"})
            assert status == 202
            asked = await callback(sim, payee, path, method="GET")
            assert asked.headers["fspiop-source"] == payer
            assert asked.headers["fspiop-destination"] == payee
            assert asked.headers["accept"] == "application/vnd.interoperability.parties+json;version=1.1"
            assert asked.headers["traceparent"].startswith("00-aaaa")
            # The payee answers; the payer gets it unchanged.
            body = party_body("MSISDN", msisdn, payee)
            status, _ = await sim.send("PUT", path, body, source=payee, destination=payer)
            assert status == 200
            answer = await callback(sim, payer, path, body=body)
            assert answer.headers["fspiop-source"] == payee and answer.headers["fspiop-destination"] == payer
            # A payee error is relayed the same way.
            error = {"errorInformation": {"errorCode": "3204", "errorDescription": "Party not found"}}
            await sim.send("PUT", path + "/error", error, source=payee, destination=payer)
            relayed = await callback(sim, payer, path + "/error", body=error)
            assert relayed.headers["fspiop-source"] == payee
            # FSPIOP-Destination set to the hub's own name counts as absent: the hub fills in the payee.
            sim.clear()
            await sim.send("GET", path, source=payer, destination=HUB)
            asked = await callback(sim, payee, path, method="GET")
            assert asked.headers["fspiop-destination"] == payee

    run(scenario())


def test_lookup_with_destination_is_forwarded_without_the_oracle(hub):
    async def scenario():
        payer, payee, stranger = names(3)
        path = f"/parties/ACCOUNT_ID/{party_id()}"
        async with simulator(hub) as sim:
            onboard(hub, sim, payer)
            onboard(hub, sim, payee)
            # Nobody registered the party: with a Destination the hub does not ask the oracle.
            await sim.send("GET", path, source=payer, destination=payee)
            asked = await callback(sim, payee, path, method="GET")
            assert asked.headers["fspiop-destination"] == payee and asked.headers["fspiop-source"] == payer
            # An unknown destination: 3201 to the requester.
            await sim.send("GET", path, source=payer, destination=stranger)
            refused = await callback(sim, payer, path + "/error")
            assert error_code(refused) == "3201" and refused.headers["fspiop-source"] == HUB
            # A PUT to a destination without endpoints: 3201 to the sender.
            onboard(hub, None, stranger)
            sim.clear()
            await sim.send("PUT", path, party_body("ACCOUNT_ID", path.rsplit("/", 1)[1], payee), source=payee,
                           destination=stranger)
            refused = await callback(sim, payee, path + "/error")
            assert error_code(refused) == "3201"

    run(scenario())


def test_lookup_reaches_every_fsp_the_oracle_names(hub):
    async def scenario():
        payer, first, second, silent = names(4)
        msisdn = party_id()
        path = f"/parties/MSISDN/{msisdn}"
        async with simulator(hub) as sim:
            onboard(hub, sim, payer)
            onboard(hub, sim, first)
            onboard(hub, sim, second)
            onboard(hub, sim, silent, endpoints={
                k: v for k, v in lookup_endpoints(sim.base_url(silent)).items() if "PARTIES_GET" not in k})
            for fsp, currency in ((first, "USD"), (second, "EUR"), (silent, "GBP")):
                answer = await register(sim, fsp, f"MSISDN/{msisdn}", body={"fspId": fsp, "currency": currency})
                assert answer.body == {"fspId": fsp}
            sim.clear()
            await sim.send("GET", path, source=payer)
            for fsp in (first, second):
                asked = await callback(sim, fsp, path, method="GET")
                assert asked.headers["fspiop-destination"] == fsp and asked.headers["fspiop-source"] == payer
            await asyncio.sleep(0.3)
            assert sim.received(silent) == []  # no FSPIOP_CALLBACK_URL_PARTIES_GET: skipped
            assert [r for r in sim.received(payer) if r.path.endswith("/error")] == []  # two FSPs were asked

    run(scenario())


def test_nobody_holds_the_party_gives_3204_and_unknown_or_inactive_requester_3200(hub):
    async def scenario():
        payer, inactive = names(2)
        path = f"/parties/EMAIL/{party_id()}@example.com"
        async with simulator(hub) as sim:
            onboard(hub, sim, payer)
            onboard(hub, sim, inactive)
            await sim.send("GET", path, source=payer)
            missing = await callback(sim, payer, path + "/error")
            assert error_code(missing) == "3204"
            assert missing.headers["fspiop-source"] == HUB and missing.headers["fspiop-destination"] == payer
            assert missing.headers["fspiop-http-method"] == "PUT"
            assert missing.headers["content-type"] == "application/vnd.interoperability.parties+json;version=1.1"
            status, body = hub.admin("PUT", f"/participants/{inactive}", {"isActive": False})
            assert status == 200, body
            await asyncio.sleep(2.5)  # the ingress' participant cache refreshes every 2 s
            await sim.send("GET", path, source=inactive)
            refused = await callback(sim, inactive, path + "/error")
            assert error_code(refused) == "3200"
            await sim.send("POST", f"/participants/EMAIL/{party_id()}", {"fspId": inactive}, source=inactive)
            refused = await sim.wait_for(inactive, lambda r: r.path.startswith("/participants/"), 10)
            assert refused.path.endswith("/error") and error_code(refused) == "3200"

    run(scenario())


def test_sub_ids_use_their_own_endpoints(hub):
    async def scenario():
        payer, payee = names(2)
        shop = f"shop{party_id()}"
        async with simulator(hub) as sim:
            onboard(hub, sim, payer)
            onboard(hub, sim, payee)
            answer = await register(sim, payee, f"BUSINESS/{shop}/till1")
            assert answer.path == f"/participants/BUSINESS/{shop}/till1" and answer.body == {"fspId": payee}
            sim.clear()
            await sim.send("GET", f"/parties/BUSINESS/{shop}/till1", source=payer)
            asked = await callback(sim, payee, f"/parties/BUSINESS/{shop}/till1", method="GET")
            assert asked.headers["fspiop-destination"] == payee
            body = party_body("BUSINESS", shop, payee)
            body["party"]["partyIdInfo"]["partySubIdOrType"] = "till1"
            await sim.send("PUT", f"/parties/BUSINESS/{shop}/till1", body, source=payee, destination=payer)
            await callback(sim, payer, f"/parties/BUSINESS/{shop}/till1", body=body)
            # The shop without the till is another party: nobody holds it.
            await sim.send("GET", f"/parties/BUSINESS/{shop}", source=payer)
            assert error_code(await callback(sim, payer, f"/parties/BUSINESS/{shop}/error")) == "3204"
            # Sub-id errors come back on the sub-id error endpoint.
            await sim.send("GET", f"/parties/BUSINESS/{shop}/till2", source=payer)
            assert error_code(await callback(sim, payer, f"/parties/BUSINESS/{shop}/till2/error")) == "3204"

    run(scenario())


class _Capture:
    """A DFSP endpoint that keeps the raw bytes it receives (the simulator keeps parsed JSON)."""

    def __init__(self):
        self.requests: list[Request] = []
        self.arrived = asyncio.Event()
        self.server = HttpServer(self.handle, "127.0.0.1", 0)

    async def handle(self, request: Request) -> Response:
        self.requests.append(request)
        self.arrived.set()
        return Response(200)


def test_names_in_any_script_round_trip_byte_exact(hub):
    async def scenario():
        payer, payee = names(2)
        alias = "မောင်မောင်+ñú"  # Burmese and accents in the party identifier, in the URL path
        path = f"/parties/ALIAS/{alias}"
        capture = _Capture()
        port = await capture.server.start()
        try:
            async with simulator(hub) as sim:
                onboard(hub, None, payer, {
                    "FSPIOP_CALLBACK_URL_PARTIES_PUT": f"http://127.0.0.1:{port}/{payer}/parties/{_P}",
                    "FSPIOP_CALLBACK_URL_PARTIES_PUT_ERROR": f"http://127.0.0.1:{port}/{payer}/parties/{_P}/error",
                })
                onboard(hub, sim, payee)
                assert (await register(sim, payee, f"ALIAS/{alias}")).body == {"fspId": payee}
                status, _ = await sim.send("GET", path, source=payer)
                assert status == 202
                asked = await callback(sim, payee, path, method="GET")
                assert asked.headers["fspiop-source"] == payer
                body = party_body("ALIAS", alias, payee, name="José Ñúñez မောင်မောင်",
                                  personalInfo={"complexName": {"firstName": "မောင်", "lastName": "Ñúñez-Müller"}})
                # Unusual but valid JSON spelling: the hub must pass the bytes on, not re-serialise them.
                raw = orjson.dumps(body).replace(b'"party":', b'"party" :  ') + b"\n"
                status, _ = await sim.send("PUT", path, raw, source=payee, destination=payer)
                assert status == 200
                async with asyncio.timeout(10):
                    while not any(r.body == raw for r in capture.requests):
                        capture.arrived.clear()
                        await capture.arrived.wait()
            got = next(r for r in capture.requests if r.body == raw)
            assert got.path == f"/{payer}{path}"
            assert got.body == raw
            assert orjson.loads(got.body) == body
        finally:
            await capture.server.stop()

    run(scenario())


# ---------------------------------------------------------------------------------------------- headers, versions


def test_version_negotiation_and_header_errors(hub):
    async def scenario():
        payer, payee = names(2)
        msisdn = party_id()
        path = f"/parties/MSISDN/{msisdn}"
        async with simulator(hub) as sim:
            onboard(hub, sim, payer)
            onboard(hub, sim, payee)
            # v1.0 in, v1.0 out: the hub's error callback speaks the requester's version.
            status, _ = await sim.send("GET", path, source=payer, version="1.0")
            assert status == 202
            missing = await callback(sim, payer, path + "/error")
            assert missing.headers["content-type"] == "application/vnd.interoperability.parties+json;version=1.0"
            # "version=1" means any 1.x: the hub answers in 1.1.
            sim.clear()
            await sim.send("GET", path, source=payer,
                           headers={"Accept": "application/vnd.interoperability.parties+json;version=1"})
            missing = await callback(sim, payer, path + "/error")
            assert missing.headers["content-type"] == "application/vnd.interoperability.parties+json;version=1.1"
            # A v1.0 registration is answered in v1.0.
            answer = await register(sim, payee, f"MSISDN/{msisdn}", version="1.0")
            assert answer.headers["content-type"] == (
                "application/vnd.interoperability.participants+json;version=1.0")
            # Synchronous refusals.
            cases = [
                ("GET", path, None, {"FSPIOP-Source": None}, 400, "3102"),
                ("GET", path, None, {"Date": "yesterday"}, 400, "3101"),
                ("GET", path, None, {"Accept": "application/vnd.interoperability.parties+json;version=2"}, 406,
                 "3001"),
                ("GET", path, None, {"Accept": "application/vnd.interoperability.quotes+json;version=1"}, 400, "3101"),
                ("GET", f"/parties/PHONE/{msisdn}", None, {}, 400, "3101"),
                ("GET", f"/parties/MSISDN/{'9' * 129}", None, {}, 400, "3101"),
                ("PUT", path, party_body("MSISDN", msisdn, payee), {}, 400, "3102"),  # no FSPIOP-Destination
                ("PUT", path, {"party": {}}, {"FSPIOP-Destination": payer}, 400, "3102"),
                ("POST", f"/participants/MSISDN/{msisdn}", {"currency": CURRENCY}, {}, 400, "3102"),
                ("POST", "/participants", {"requestId": "nope", "partyList": []}, {}, 400, "3101"),
                ("PATCH", path, {}, {}, 405, "3000"),
            ]
            for method, target, body, headers, http_status, code in cases:
                status, answer = await sim.send(method, target, body, source=payee, headers=headers)
                assert (status, answer["errorInformation"]["errorCode"]) == (http_status, code), (method, target,
                                                                                                  headers, answer)
            version = {"Content-Type": "application/vnd.interoperability.parties+json;version=3.0"}
            status, answer = await sim.send("PUT", path, party_body("MSISDN", msisdn, payee), source=payee,
                                            destination=payer, headers=version)
            assert status == 406 and answer["errorInformation"]["errorCode"] == "3001"
            assert {"key": "1", "value": "1"} in answer["errorInformation"]["extensionList"]["extension"]

    run(scenario())


# ---------------------------------------------------------------------------------------------- oracles


def test_oracle_admin_crud(hub):
    base = "http://127.0.0.1:9/oracle"
    status, body = hub.admin("POST", "/oracles", {"oracleIdType": "DEVICE", "endpoint": {"value": base,
                                                                                         "endpointType": "URL"},
                                                  "currency": "USD"})
    assert status == 201, body
    status, body = hub.admin("POST", "/oracles", {"oracleIdType": "DEVICE", "isDefault": True,
                                                  "endpoint": {"value": "builtin", "endpointType": "URL"}})
    assert status == 201, body
    status, listed = hub.admin("GET", "/oracles?type=DEVICE")
    assert status == 200
    assert [(o["endpoint"]["value"], o.get("currency"), o["isDefault"]) for o in listed] == [
        (base, "USD", False), ("builtin", None, True)]
    assert all(o["oracleIdType"] == "DEVICE" and o["endpoint"]["endpointType"] == "URL" for o in listed)
    usd_id, default_id = listed[0]["oracleId"], listed[1]["oracleId"]
    status, filtered = hub.admin("GET", "/oracles?type=DEVICE&currency=USD")
    assert [o["oracleId"] for o in filtered] == [usd_id]
    # A second USD oracle for DEVICE would make lookups ambiguous.
    status, body = hub.admin("POST", "/oracles", {"oracleIdType": "DEVICE", "currency": "USD",
                                                  "endpoint": {"value": base, "endpointType": "URL"}})
    assert status == 400 and body["errorInformation"]["errorCode"] == "3100"
    # A new default replaces the old one.
    status, body = hub.admin("PUT", f"/oracles/{usd_id}", {"oracleIdType": "DEVICE", "isDefault": True,
                                                           "endpoint": {"value": base + "2", "endpointType": "URL"}})
    assert status == 204, body
    status, listed = hub.admin("GET", "/oracles?type=DEVICE")
    assert {o["oracleId"]: (o["endpoint"]["value"], o.get("currency"), o["isDefault"]) for o in listed} == {
        usd_id: (base + "2", None, True), default_id: ("builtin", None, False)}
    for bad, code in (
        ({"endpoint": {"value": base, "endpointType": "URL"}}, "3102"),
        ({"oracleIdType": "PHONE", "endpoint": {"value": base, "endpointType": "URL"}}, "3101"),
        ({"oracleIdType": "DEVICE"}, "3102"),
        ({"oracleIdType": "DEVICE", "endpoint": {"value": "https://oracle.example", "endpointType": "URL"}}, "3101"),
        ({"oracleIdType": "DEVICE", "endpoint": {"value": base, "endpointType": "URL"}, "currency": "usd"}, "3101"),
        ({"oracleIdType": "DEVICE", "endpoint": {"value": base, "endpointType": "URL"}, "isDefault": "yes"}, "3101"),
    ):
        status, body = hub.admin("POST", "/oracles", bad)
        assert (status, body["errorInformation"]["errorCode"]) == (400, code), bad
    for oracle_id in (usd_id, default_id):
        assert hub.admin("DELETE", f"/oracles/{oracle_id}")[0] == 204
    status, body = hub.admin("DELETE", f"/oracles/{usd_id}")
    assert status == 404 and body["errorInformation"]["errorCode"] == "3200"
    assert hub.admin("PUT", "/oracles/999999", {"oracleIdType": "DEVICE", "endpoint": {
        "value": base, "endpointType": "URL"}})[0] == 404
    assert hub.admin("GET", "/oracles?type=DEVICE") == (200, [])


class _OracleService:
    """A tiny oracle speaking the oracle API (api/spec/als-oracle-api.yaml), recording every call."""

    def __init__(self):
        self.parties: dict[tuple[str, str, str], list[dict]] = {}
        self.calls: list[tuple[str, str, dict, dict | None]] = []
        self.server = HttpServer(self.handle, "127.0.0.1", 0)

    async def handle(self, request: Request) -> Response:
        body = orjson.loads(request.body) if request.body else None
        self.calls.append((request.method, request.path, dict(request.query), body))
        parts = request.path.strip("/").split("/")
        if parts == ["oracle", "participants"] and request.method == "POST":
            results = []
            for party in body["partyList"]:
                key = (party["partyIdType"], party["partyIdentifier"], party.get("partySubIdOrType", ""))
                result: dict = {"partyId": party}
                if party["partyIdentifier"].startswith("reject"):
                    result["errorInformation"] = {"errorCode": "3003", "errorDescription": "refused by the oracle"}
                else:
                    self.parties[key] = [{"fspId": party["fspId"], "currency": body.get("currency")}]
                results.append(result)
            return Response(201, orjson.dumps({"partyList": results}), content_type="application/json")
        if parts[:2] != ["oracle", "participants"] or len(parts) not in (4, 5):
            return Response(404)
        key = (parts[2], parts[3], parts[4] if len(parts) == 5 else "")
        if request.method == "GET":
            found = self.parties.get(key)
            if not found:
                return Response(404, b'{"errorInformation":{"errorCode":"3204","errorDescription":"not found"}}')
            return Response(200, orjson.dumps({"partyList": [{"fspId": e["fspId"]} for e in found]}),
                            content_type="application/json")
        if request.method in ("POST", "PUT"):
            self.parties[key] = [{"fspId": body["fspId"], "currency": body.get("currency")}]
            return Response(201 if request.method == "POST" else 200)
        if request.method == "DELETE":
            self.parties.pop(key, None)
            return Response(204)
        return Response(405)


def test_external_oracle_serves_its_type(hub):
    async def scenario():
        payer, payee = names(2)
        oracle = _OracleService()
        port = await oracle.server.start()
        email = f"{party_id()}@example.org"
        oracle_ids = []
        try:
            status, body = hub.admin("POST", "/oracles", {
                "oracleIdType": "EMAIL", "isDefault": True,
                "endpoint": {"value": f"http://127.0.0.1:{port}/oracle", "endpointType": "URL"}})
            assert status == 201, body
            # An oracle nobody listens on, for IBANs in XTS only.
            status, body = hub.admin("POST", "/oracles", {
                "oracleIdType": "IBAN", "currency": CURRENCY,
                "endpoint": {"value": "http://127.0.0.1:9", "endpointType": "URL"}})
            assert status == 201, body
            oracle_ids = [o["oracleId"] for o in hub.admin("GET", "/oracles")[1]
                          if o["oracleIdType"] in ("EMAIL", "IBAN")]
            await asyncio.sleep(0.5)  # the ingress reloads the registry every 100 ms here
            async with simulator(hub) as sim:
                onboard(hub, sim, payer)
                onboard(hub, sim, payee)
                assert (await register(sim, payee, f"EMAIL/{email}")).body == {"fspId": payee}
                assert oracle.parties[("EMAIL", email, "")] == [{"fspId": payee, "currency": None}]
                assert [c[:2] for c in oracle.calls] == [("GET", f"/oracle/participants/EMAIL/{email}"),
                                                         ("POST", f"/oracle/participants/EMAIL/{email}")]
                # The payer's lookup goes through the external oracle.
                sim.clear()
                await sim.send("GET", f"/parties/EMAIL/{email}", source=payer)
                asked = await callback(sim, payee, f"/parties/EMAIL/{email}", method="GET")
                assert asked.headers["fspiop-destination"] == payee
                # The owner check holds with an external oracle too.
                assert error_code(await register(sim, payer, f"EMAIL/{email}")) == "3003"
                # Bulk: the oracle's batch endpoint, its per-party refusals reported as 3003.
                request_id = str(uuid.uuid4())
                party_list = [{"partyIdType": "EMAIL", "partyIdentifier": f"ok{email}", "fspId": payer},
                              {"partyIdType": "EMAIL", "partyIdentifier": f"reject{email}", "fspId": payer}]
                sim.clear()
                await sim.send("POST", "/participants", {"requestId": request_id, "partyList": party_list},
                               source=payer)
                answer = await callback(sim, payer, f"/participants/{request_id}")
                assert [r.get("errorInformation", {}).get("errorCode") for r in answer.body["partyList"]] == [
                    None, "3003"]
                assert oracle.calls[-1][:2] == ("POST", "/oracle/participants")
                # Delete through the oracle.
                sim.clear()
                await sim.send("DELETE", f"/participants/EMAIL/{email}", source=payee)
                assert (await callback(sim, payee, f"/participants/EMAIL/{email}")).body == {}
                assert ("EMAIL", email, "") not in oracle.parties
                # An oracle that cannot be reached: 2003 for a lookup, 3003 for a registration.
                iban = f"GB{party_id()}"
                sim.clear()
                await sim.send("GET", f"/parties/IBAN/{iban}?currency={CURRENCY}", source=payer)
                assert error_code(await callback(sim, payer, f"/parties/IBAN/{iban}/error")) == "2003"
                answer = await register(sim, payer, f"IBAN/{iban}", body={"fspId": payer, "currency": CURRENCY})
                assert error_code(answer) == "3003"
                # Other currencies of that type still use the built-in oracle.
                assert (await register(sim, payer, f"IBAN/{iban}", body={"fspId": payer, "currency": "USD"})
                        ).body == {"fspId": payer}
        finally:
            for oracle_id in oracle_ids:
                hub.admin("DELETE", f"/oracles/{oracle_id}")
            await oracle.server.stop()

    run(scenario())


def test_builtin_oracle_over_the_oracle_api(hub):
    async def scenario():
        payer, payee = names(2)
        passport = f"P{party_id()}"
        base = f"/oracle/participants/PERSONAL_ID/{passport}"
        # The oracle API on the admin port, straight.
        assert hub.admin("GET", f"{base}/PASSPORT")[0] == 404
        assert hub.admin("POST", f"{base}/PASSPORT", {"fspId": payee, "currency": "USD"})[0] == 201
        assert hub.admin("GET", f"{base}/PASSPORT") == (
            200, {"partyList": [{"fspId": payee, "partySubIdOrType": "PASSPORT"}]})
        assert hub.admin("GET", f"{base}?partySubIdOrType=PASSPORT&currency=USD")[1]["partyList"][0]["fspId"] == payee
        status, body = hub.admin("POST", f"{base}/PASSPORT", {"fspId": payer})
        assert status == 400 and body["errorInformation"]["errorCode"] == "3003"
        status, body = hub.admin("POST", "/oracle/participants", {"requestId": str(uuid.uuid4()), "partyList": [
            {"partyIdType": "PERSONAL_ID", "partyIdentifier": passport, "partySubIdOrType": "PASSPORT",
             "fspId": payer},
            {"partyIdType": "PERSONAL_ID", "partyIdentifier": passport, "partySubIdOrType": "DRIVING_LICENSE",
             "fspId": payer}]})
        assert status == 201
        assert [r.get("errorInformation", {}).get("errorCode") for r in body["partyList"]] == ["3003", None]
        assert hub.admin("DELETE", f"{base}/PASSPORT")[0] == 204
        assert hub.admin("DELETE", f"{base}/PASSPORT")[0] == 404
        assert hub.admin("POST", f"{base}/PHONE", {})[1]["errorInformation"]["errorCode"] == "3102"

        # This hub, registered as an external oracle of itself: the HTTP oracle client against the built-in one.
        status, body = hub.admin("POST", "/oracles", {
            "oracleIdType": "PERSONAL_ID", "currency": CURRENCY,
            "endpoint": {"value": f"http://127.0.0.1:{hub.hub.admin_port}/oracle", "endpointType": "URL"}})
        assert status == 201, body
        oracle_id = next(o["oracleId"] for o in hub.admin("GET", "/oracles?type=PERSONAL_ID")[1])
        try:
            await asyncio.sleep(0.5)
            async with simulator(hub) as sim:
                onboard(hub, sim, payer)
                onboard(hub, sim, payee)
                path = f"PERSONAL_ID/{passport}/NATIONAL_ID_CARD"
                answer = await register(sim, payee, path, body={"fspId": payee, "currency": CURRENCY})
                assert answer.body == {"fspId": payee}
                assert hub.admin("GET", f"{base}/NATIONAL_ID_CARD?currency={CURRENCY}")[0] == 200
                assert error_code(await register(sim, payer, path, body={"fspId": payer, "currency": CURRENCY})
                                  ) == "3003"
                sim.clear()
                await sim.send("GET", f"/parties/{path}?currency={CURRENCY}", source=payer)
                asked = await callback(sim, payee, f"/parties/{path}", method="GET")
                assert asked.headers["fspiop-destination"] == payee
                sim.clear()
                await sim.send("DELETE", f"/participants/{path}?currency={CURRENCY}", source=payee)
                assert (await callback(sim, payee, f"/participants/{path}")).body == {}
                assert hub.admin("GET", f"{base}/NATIONAL_ID_CARD")[0] == 404
        finally:
            hub.admin("DELETE", f"/oracles/{oracle_id}")

    run(scenario())


def test_participants_callbacks_between_dfsps_are_relayed(hub):
    """The no-common-ALS model: DFSPs answer each other's /participants requests through the hub."""
    async def scenario():
        a, b = names(2)
        msisdn = party_id()
        request_id = str(uuid.uuid4())
        async with simulator(hub) as sim:
            onboard(hub, sim, a)
            onboard(hub, sim, b)
            for path, body in ((f"/participants/MSISDN/{msisdn}", {"fspId": b}),
                               (f"/participants/MSISDN/{msisdn}/error",
                                {"errorInformation": {"errorCode": "3204", "errorDescription": "Party not found"}}),
                               (f"/participants/{request_id}", {"partyList": [
                                   {"partyId": {"partyIdType": "MSISDN", "partyIdentifier": msisdn, "fspId": b}}]}),
                               (f"/participants/{request_id}/error",
                                {"errorInformation": {"errorCode": "3003", "errorDescription": "Add Party error"}})):
                status, _ = await sim.send("PUT", path, body, source=b, destination=a)
                assert status == 200
                relayed = await callback(sim, a, path)
                assert relayed.body == body and relayed.headers["fspiop-source"] == b
            # A bulk result for an unknown destination: 3201 to the sender.
            sim.clear()
            await sim.send("PUT", f"/participants/{request_id}", {"partyList": [
                {"partyId": {"partyIdType": "MSISDN", "partyIdentifier": msisdn}}]}, source=b, destination="nobody")
            assert error_code(await callback(sim, b, f"/participants/{request_id}/error")) == "3201"
            # An error that cannot be relayed is dropped, never answered with another error.
            sim.clear()
            status, _ = await sim.send("PUT", f"/participants/{request_id}/error", {"errorInformation": {
                "errorCode": "3003", "errorDescription": "x"}}, source=b, destination="nobody")
            assert status == 200
            await asyncio.sleep(0.3)
            assert sim.received(b) == []

    run(scenario())
