"""sim: ILPv1 packets and conditions, and the DFSP simulator against a tiny fake hub (no real hub)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
import uvloop

from api.http import HttpClient, HttpConnectionError, HttpServer, Request, Response
from sim import Behaviour, Received, Simulator
from sim.ilp import (
    b64url_decode,
    b64url_encode,
    build_ilp_packet,
    condition_of,
    decode_ilp_packet,
    decode_transaction,
    encode_ilp_payment,
    fulfilment_matches,
    hmac_fulfilment,
    ilp_address,
    ilp_amount,
    make_condition,
)
from sim.simulator import _parser

ROOT = Path(__file__).resolve().parents[1]

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
DATETIME_MS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
BINARY32 = re.compile(r"^[A-Za-z0-9_-]{43}$")
AMOUNT = re.compile(r"^([0]|([1-9][0-9]{0,17}))([.][0-9]{0,3}[1-9])?$")
HTTP_DATE = re.compile(r"^[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT$")
TRANSFERS_11 = "application/vnd.interoperability.transfers+json;version=1.1"

# The IMPL test pair used across central-ledger's tests (RULES §7).
IMPL_FULFILMENT = "UNlJ98hZTY_dsw0cAqw4i_UN3v4utt7CZFB4yfLbVFA"
IMPL_CONDITION = "GRzLaTP7DJ9t4P-a_BA0WA9wzzlsugf00-Tn6kESAfM"

# API Definition v1.1 Listings 42-45: the secret, fulfilment, condition, and Listing 45's ilpPacket
# (soft-hyphenated line breaks joined, \u003d replaced by '='). The spec HMACs the *binary* packet.
SPEC_SECRET = "JdtBrN2tskq9fuFr6Kg6kdy8RANoZv6BqR9nSk3rUbY"
SPEC_FULFILMENT = "mhPUT9ZAwd-BXLfeSd7-YPh46rBWRNBiTCSWjpku90s"
SPEC_CONDITION = "fH9pAYDQbmoZLPbvv3CSW2RfjU4jvM4ApG_fqGnR7Xs"
SPEC_PACKET = (
    "AQAAAAAAACasIWcuc2UubW9iaWxlbW9uZXkubXNpc2RuLjEyMzQ1Njc4OYIEIXsNCiAgICAidHJhbnNhY3Rpb25JZCI6ICI4NWZl"
    "YWMyZi0zOWIyLTQ5MWItODE3ZS00YTAzMjAzZDRmMTQiLA0KICAgICJxdW90ZUlkIjogIjdjMjNlODBjLWQwNzgtNDA3Ny04MjYz"
    "LTJjMDQ3ODc2ZmNmNiIsDQogICAgInBheWVlIjogew0KICAgICAgICAicGFydHlJZEluZm8iOiB7DQogICAgICAgICAgICAicGFy"
    "dHlJZFR5cGUiOiAiTVNJU0ROIiwNCiAgICAgICAgICAgICJwYXJ0eUlkZW50aWZpZXIiOiAiMTIzNDU2Nzg5IiwNCiAgICAgICAg"
    "ICAgICJmc3BJZCI6ICJNb2JpbGVNb25leSINCiAgICAgICAgfSwNCiAgICAgICAgInBlcnNvbmFsSW5mbyI6IHsNCiAgICAgICAg"
    "ICAgICJjb21wbGV4TmFtZSI6IHsNCiAgICAgICAgICAgICAgICAiZmlyc3ROYW1lIjogIkhlbnJpayIsDQogICAgICAgICAgICAg"
    "ICAgImxhc3ROYW1lIjogIkthcmxzc29uIg0KICAgICAgICAgICAgfQ0KICAgICAgICB9DQogICAgfSwNCiAgICAicGF5ZXIiOiB7"
    "DQogICAgICAgICJwZXJzb25hbEluZm8iOiB7DQogICAgICAgICAgICAiY29tcGxleE5hbWUiOiB7DQogICAgICAgICAgICAgICAg"
    "ImZpcnN0TmFtZSI6ICJNYXRzIiwNCiAgICAgICAgICAgICAgICAibGFzdE5hbWUiOiAiSGFnbWFuIg0KICAgICAgICAgICAgfQ0K"
    "ICAgICAgICB9LA0KICAgICAgICAicGFydHlJZEluZm8iOiB7DQogICAgICAgICAgICAicGFydHlJZFR5cGUiOiAiSUJBTiIsDQog"
    "ICAgICAgICAgICAicGFydHlJZGVudGlmaWVyIjogIlNFNDU1MDAwMDAwMDA1ODM5ODI1NzQ2NiIsDQogICAgICAgICAgICAiZnNw"
    "SWQiOiAiQmFua05yT25lIg0KICAgICAgICB9DQogICAgfSwNCiAgICAiYW1vdW50Ijogew0KICAgICAgICAiYW1vdW50IjogIjEw"
    "MCIsDQogICAgICAgICJjdXJyZW5jeSI6ICJVU0QiDQogICAgfSwNCiAgICAidHJhbnNhY3Rpb25UeXBlIjogew0KICAgICAgICAi"
    "c2NlbmFyaW8iOiAiVFJBTlNGRVIiLA0KICAgICAgICAiaW5pdGlhdG9yIjogIlBBWUVSIiwNCiAgICAgICAgImluaXRpYXRvclR5"
    "cGUiOiAiQ09OU1VNRVIiDQogICAgfSwNCiAgICAibm90ZSI6ICJGcm9tIE1hdHMiDQp9DQo=="
)

# The ilp-packet (v1, serializeIlpPayment) packet in central-ledger's and ml-api-adapter's test fixtures.
CENTRAL_LEDGER_PACKET = (
    "AYIBgQAAAAAAAASwNGxldmVsb25lLmRmc3AxLm1lci45T2RTOF81MDdqUUZERmZlakgyOVc4bXFmNEpLMHlGTFGCAUBQU0svMS4wCk"
    "5vbmNlOiB1SXlweUYzY3pYSXBFdzVVc05TYWh3CkVuY3J5cHRpb246IG5vbmUKUGF5bWVudC1JZDogMTMyMzZhM2ItOGZhOC00MTYz"
    "LTg0NDctNGMzZWQzZGE5OGE3CgpDb250ZW50LUxlbmd0aDogMTM1CkNvbnRlbnQtVHlwZTogYXBwbGljYXRpb24vanNvbgpTZW5kZX"
    "ItSWRlbnRpZmllcjogOTI4MDYzOTEKCiJ7XCJmZWVcIjowLFwidHJhbnNmZXJDb2RlXCI6XCJpbnZvaWNlXCIsXCJkZWJpdE5hbWVc"
    "IjpcImFsaWNlIGNvb3BlclwiLFwiY3JlZGl0TmFtZVwiOlwibWVyIGNoYW50XCIsXCJkZWJpdElkZW50aWZpZXJcIjpcIjkyODA2Mz"
    "kxXCJ9IgA"
)

BURMESE = "မောင်မောင်ကျော်"
ACCENTED = "José Müller-Ångström"


def run(main: Callable[[], Awaitable[None]]) -> None:
    """Each test gets a fresh uvloop event loop, like the hub runs on."""

    async def wrapper() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        await main()

    uvloop.run(wrapper())


# --------------------------------------------------------------------------------------------------
# ILP


def test_impl_fulfilment_condition_pair():
    assert condition_of(IMPL_FULFILMENT) == IMPL_CONDITION
    assert fulfilment_matches(IMPL_FULFILMENT, IMPL_CONDITION)
    assert not fulfilment_matches(IMPL_CONDITION, IMPL_CONDITION)
    assert not fulfilment_matches("not base64!", IMPL_CONDITION)
    assert not fulfilment_matches("AAAA", IMPL_CONDITION)  # 3 bytes, not 32


def test_spec_vector_hmac_over_the_binary_packet():
    assert len(SPEC_PACKET) == 1473
    binary = b64url_decode(SPEC_PACKET)
    assert hmac_fulfilment(b64url_decode(SPEC_SECRET), binary) == SPEC_FULFILMENT
    assert condition_of(SPEC_FULFILMENT) == SPEC_CONDITION


def test_decode_spec_example_layout():
    # No envelope length, no extensions byte, raw CRLF-formatted JSON in data.
    payment = decode_ilp_packet(SPEC_PACKET)
    assert payment.amount == 9900  # 99 USD
    assert payment.account == "g.se.mobilemoney.msisdn.123456789"
    assert len(payment.data) == 1057 and payment.data.startswith(b"{\r\n")
    transaction = decode_transaction(SPEC_PACKET)
    assert transaction["payee"]["partyIdInfo"]["fspId"] == "MobileMoney"
    assert transaction["payer"]["partyIdInfo"]["partyIdentifier"] == "SE4550000000058398257466"
    assert transaction["amount"] == {"amount": "100", "currency": "USD"}
    assert transaction["note"] == "From Mats"


def test_encoding_matches_ilp_packet_reference_bytes():
    # ilp-packet's README: {amount '123000000', account 'g.us.nexus.bob', data base64 'BBBB'}.
    packet = encode_ilp_payment(123000000, "g.us.nexus.bob", bytes([0x04, 0x10, 0x41]))
    assert packet.hex() == "011c000000000754d4c00e672e75732e6e657875732e626f620304104100"


def test_decode_and_reencode_central_ledger_fixture():
    # Two-byte OER lengths for both the envelope (0x82 0x0181) and data (0x82 0x0140).
    binary = b64url_decode(CENTRAL_LEDGER_PACKET)
    payment = decode_ilp_packet(CENTRAL_LEDGER_PACKET)
    assert payment.amount == 1200
    assert payment.account == "levelone.dfsp1.mer.9OdS8_507jQFDFfejH29W8mqf4JK0yFLQ"
    assert payment.data.startswith(b"PSK/1.0\nNonce:") and len(payment.data) == 320
    assert payment.transaction is None  # PSK text, not a Transaction object
    with pytest.raises(ValueError):
        decode_transaction(CENTRAL_LEDGER_PACKET)
    assert encode_ilp_payment(payment.amount, payment.account, payment.data) == binary
    assert decode_ilp_packet(binary) == payment  # bytes are accepted too
    assert condition_of(IMPL_FULFILMENT) == IMPL_CONDITION  # the fixture's condition pair


@pytest.mark.parametrize("size", [0, 127, 128, 255, 256, 65535, 65536])
def test_oer_length_prefixes_round_trip(size):
    data = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    packet = encode_ilp_payment(2**64 - 1, "g.x.y.z", data)
    payment = decode_ilp_packet(b64url_encode(packet))
    assert (payment.amount, payment.account, payment.data) == (2**64 - 1, "g.x.y.z", data)


def test_malformed_packets_are_refused():
    for bad in ("", "AA", b64url_encode(b"\x0c\x05abc"), b64url_encode(b"\x01\x20" + bytes(8)), "%%%"):
        with pytest.raises(ValueError):
            decode_ilp_packet(bad)
    with pytest.raises(ValueError):
        encode_ilp_payment(-1, "g.a.b.c")
    with pytest.raises(ValueError):
        condition_of(b64url_encode(bytes(31)))


def test_base64url_helpers():
    assert b64url_encode(b"\xfb\xff") == "-_8"
    assert b64url_decode("-_8") == b64url_decode("-_8=") == b64url_decode("+/8=") == b"\xfb\xff"
    with pytest.raises(ValueError):
        b64url_decode("abcde")  # impossible length
    with pytest.raises(ValueError):
        b64url_decode("ab cd")


def test_ilp_amounts_and_addresses():
    assert ilp_amount("99", "USD") == 9900
    assert ilp_amount("0.01", "USD") == 1
    assert ilp_amount("5", "JPY") == 5
    assert ilp_amount("1.234", "KWD") == 1234
    assert ilp_amount(Decimal("12.5"), "XTS") == 1250  # codes outside the SDK's table: 2 decimals
    for amount, currency in (("1.005", "USD"), ("0.5", "JPY"), ("-1", "USD"), ("abc", "USD")):
        with pytest.raises(ValueError):
            ilp_amount(amount, currency)
    assert ilp_address("MobileMoney", "MSISDN", "123456789") == "g.MobileMoney.msisdn.123456789"
    assert ilp_address("dfsp", "PERSONAL_ID", "AB12", "PASSPORT") == "g.dfsp.personal_id.ab12.passport"


def test_make_condition_is_hmac_over_the_packet_string():
    secret = os.urandom(32)
    transaction = {
        "transactionId": str(uuid.uuid4()),
        "quoteId": str(uuid.uuid4()),
        "payee": {"partyIdInfo": {"partyIdType": "MSISDN", "partyIdentifier": "123", "fspId": "payeefsp"}},
        "payer": {"partyIdInfo": {"partyIdType": "MSISDN", "partyIdentifier": "456", "fspId": "payerfsp"}},
        "amount": {"amount": "10.5", "currency": "USD"},
        "transactionType": {"scenario": "TRANSFER", "initiator": "PAYER", "initiatorType": "CONSUMER"},
    }
    packet = build_ilp_packet(transaction)
    assert "=" not in packet and re.match(r"^[A-Za-z0-9_-]+$", packet)
    fulfilment, condition = make_condition(secret, packet)
    assert BINARY32.match(fulfilment) and BINARY32.match(condition)
    assert fulfilment == hmac_fulfilment(secret, packet.encode("ascii"))
    assert condition == condition_of(fulfilment) and fulfilment_matches(fulfilment, condition)
    assert make_condition(secret, packet) == (fulfilment, condition)  # deterministic: regenerated, not stored
    assert make_condition(os.urandom(32), packet)[1] != condition
    # The SDK layout: envelope, amount in minor units, payee address, data = ASCII base64url(JSON).
    binary = b64url_decode(packet)
    assert binary[0] == 1 and binary[-1] == 0
    payment = decode_ilp_packet(packet)
    assert payment.amount == 1050 and payment.account == "g.payeefsp.msisdn.123"
    assert re.match(rb"^[A-Za-z0-9_-]+$", payment.data)
    assert orjson.loads(b64url_decode(payment.data.decode())) == transaction
    assert payment.transaction == transaction


# --------------------------------------------------------------------------------------------------
# A fake hub and a simulator


class FakeHub:
    """Records what the simulated DFSPs send it; answers 202 to POST/GET/DELETE, 200 otherwise."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.status: int | None = None  # force an answer status
        self._arrived = asyncio.Event()

    async def __call__(self, request: Request) -> Response:
        self.requests.append(request)
        self._arrived.set()
        status = self.status or (202 if request.method in ("GET", "POST", "DELETE") else 200)
        return Response(status)

    async def wait(self, predicate: Callable[[Request], bool], timeout_s: float = 5.0) -> Request:
        async with asyncio.timeout(timeout_s):
            while True:
                for request in self.requests:
                    if predicate(request):
                        return request
                self._arrived.clear()
                await self._arrived.wait()

    def put_for(self, transfer_id: str, timeout_s: float = 5.0) -> Awaitable[Request]:
        return self.wait(lambda r: r.method == "PUT" and r.path.startswith(f"/transfers/{transfer_id}"), timeout_s)


@asynccontextmanager
async def simulated(**options) -> AsyncIterator[tuple[Simulator, FakeHub, HttpClient]]:
    """A fake hub, a simulator with payerfsp and payeefsp, and a client to the simulator (as the hub)."""
    hub = FakeHub()
    hub_server = HttpServer(hub, "127.0.0.1", 0)
    hub_port = await hub_server.start()
    simulator = Simulator(f"http://127.0.0.1:{hub_port}", **options)
    simulator.add_dfsp("payerfsp")
    simulator.add_dfsp("payeefsp")
    client: HttpClient | None = None
    try:
        port = await simulator.start()
        assert port > 0 and simulator.base_url("payeefsp") == f"http://127.0.0.1:{port}/payeefsp"
        client = HttpClient("127.0.0.1", port, request_timeout_s=5.0)
        yield simulator, hub, client
    finally:
        if client is not None:
            await client.close()
        await simulator.stop()
        await hub_server.stop()


def hub_headers(source: str, destination: str, *, accept: bool = True) -> dict[str, str]:
    headers = {
        "Content-Type": TRANSFERS_11,
        "Date": "Tue, 15 Nov 2017 10:13:41 GMT",
        "FSPIOP-Source": source,
        "FSPIOP-Destination": destination,
    }
    if accept:
        headers["Accept"] = TRANSFERS_11
    return headers


async def forward_prepare(client: HttpClient, prepare: dict, payee: str = "payeefsp") -> int:
    """What the hub does: POST the prepare to the payee's {base}/transfers endpoint."""
    status, _, body = await client.request(
        "POST", f"/{payee}/transfers", hub_headers(prepare["payerFsp"], payee), orjson.dumps(prepare)
    )
    assert body == b""
    return status


# --------------------------------------------------------------------------------------------------
# The payee side


def test_commit_mode_answers_202_then_puts_a_valid_fulfilment():
    async def main():
        async with simulated() as (simulator, hub, client):
            prepare = simulator.prepare_body("payerfsp", "payeefsp", "100", "USD")
            assert await forward_prepare(client, prepare) == 202
            put = await hub.put_for(prepare["transferId"])
            assert put.path == f"/transfers/{prepare['transferId']}"
            headers = put.headers
            assert headers["content-type"] == TRANSFERS_11
            assert headers["fspiop-source"] == "payeefsp" and headers["fspiop-destination"] == "payerfsp"
            assert HTTP_DATE.match(headers["date"])
            assert "accept" not in headers
            body = orjson.loads(put.body)
            assert set(body) == {"transferState", "fulfilment", "completedTimestamp"}
            assert body["transferState"] == "COMMITTED"
            assert BINARY32.match(body["fulfilment"])
            assert condition_of(body["fulfilment"]) == prepare["condition"]
            assert DATETIME_MS_Z.match(body["completedTimestamp"])
            await asyncio.sleep(0.05)
            counters = simulator.counters("payeefsp")
            assert (counters.prepares, counters.prepares_answered, counters.callback_failures) == (1, 1, 0)
            assert counters.condition_mismatches == 0
            [received] = simulator.received("payeefsp", method="POST")
            assert received.path == "/transfers" and received.body == prepare
            assert received.headers["fspiop-source"] == "payerfsp"

    run(main)


def test_payee_regenerates_the_fulfilment_from_its_secret_not_the_condition():
    async def main():
        async with simulated() as (simulator, hub, client):
            # A prepare whose condition was made with another secret: the payee still answers with
            # HMAC(its secret, ilpPacket), which then does not meet the condition (and is counted).
            prepare = simulator.prepare_body("payerfsp", "payeefsp", "1", "USD", secret=os.urandom(32))
            await forward_prepare(client, prepare)
            body = orjson.loads((await hub.put_for(prepare["transferId"])).body)
            assert body["fulfilment"] == make_condition(simulator.dfsp("payeefsp").secret, prepare["ilpPacket"])[0]
            assert not fulfilment_matches(body["fulfilment"], prepare["condition"])
            assert simulator.counters("payeefsp").condition_mismatches == 1

    run(main)


def test_reserve_mode_puts_reserved_and_expects_a_patch():
    async def main():
        async with simulated() as (simulator, hub, client):
            simulator.set_behaviour("payeefsp", mode="reserve")
            prepare = simulator.prepare_body("payerfsp", "payeefsp", "7.25", "USD")
            await forward_prepare(client, prepare)
            body = orjson.loads((await hub.put_for(prepare["transferId"])).body)
            assert body["transferState"] == "RESERVED"
            assert fulfilment_matches(body["fulfilment"], prepare["condition"])
            assert simulator.awaiting_patch("payeefsp") == [prepare["transferId"]]
            # The hub's commit notification.
            patch = {"transferState": "COMMITTED", "completedTimestamp": "2024-01-01T00:00:00.000Z"}
            status, _, _ = await client.request(
                "PATCH",
                f"/payeefsp/transfers/{prepare['transferId']}",
                hub_headers("Hub", "payeefsp", accept=False),
                orjson.dumps(patch),
            )
            assert status == 200
            assert simulator.awaiting_patch("payeefsp") == []
            assert simulator.counters("payeefsp").patches == 1
            [received] = simulator.received("payeefsp", method="PATCH")
            assert received.body == patch and received.headers["fspiop-source"] == "Hub"

    run(main)


def test_reject_mode_puts_an_error_with_the_configured_code():
    async def main():
        async with simulated() as (simulator, hub, client):
            simulator.set_behaviour("payeefsp", Behaviour(mode="reject"))
            prepare = simulator.prepare_body("payerfsp", "payeefsp", "3", "USD")
            await forward_prepare(client, prepare)
            put = await hub.put_for(prepare["transferId"])
            assert put.path == f"/transfers/{prepare['transferId']}/error"
            assert put.headers["fspiop-destination"] == "payerfsp" and "accept" not in put.headers
            info = orjson.loads(put.body)["errorInformation"]
            assert info == {"errorCode": "5104", "errorDescription": "Payee rejected transaction"}

            simulator.set_behaviour("payeefsp", error_code="5105", error_description="no thanks")
            prepare = simulator.prepare_body("payerfsp", "payeefsp", "3", "USD")
            await forward_prepare(client, prepare)
            info = orjson.loads((await hub.put_for(prepare["transferId"])).body)["errorInformation"]
            assert info == {"errorCode": "5105", "errorDescription": "no thanks"}
            await asyncio.sleep(0.05)
            assert simulator.counters("payeefsp").prepares_answered == 2

    run(main)


def test_invalid_fulfilment_mode():
    async def main():
        async with simulated() as (simulator, hub, client):
            simulator.set_behaviour("payeefsp", mode="invalid_fulfilment")
            prepare = simulator.prepare_body("payerfsp", "payeefsp", "3", "USD")
            await forward_prepare(client, prepare)
            body = orjson.loads((await hub.put_for(prepare["transferId"])).body)
            assert body["transferState"] == "COMMITTED"
            assert BINARY32.match(body["fulfilment"])  # well-formed ...
            assert not fulfilment_matches(body["fulfilment"], prepare["condition"])  # ... but wrong

    run(main)


def test_ignore_mode_never_answers():
    async def main():
        async with simulated() as (simulator, hub, client):
            simulator.set_behaviour("payeefsp", mode="ignore")
            prepare = simulator.prepare_body("payerfsp", "payeefsp", "3", "USD")
            assert await forward_prepare(client, prepare) == 202
            with pytest.raises(TimeoutError):
                await hub.put_for(prepare["transferId"], timeout_s=0.3)
            counters = simulator.counters("payeefsp")
            assert (counters.prepares, counters.prepares_answered) == (1, 0)

    run(main)


def test_delay_answers_202_at_once_and_calls_back_later():
    async def main():
        async with simulated() as (simulator, hub, client):
            simulator.set_behaviour("payeefsp", delay_ms=300)
            prepare = simulator.prepare_body("payerfsp", "payeefsp", "3", "USD")
            started = time.monotonic()
            assert await forward_prepare(client, prepare) == 202
            assert time.monotonic() - started < 0.2
            await hub.put_for(prepare["transferId"])
            assert time.monotonic() - started >= 0.3

    run(main)


def test_callback_version_is_configurable():
    async def main():
        async with simulated() as (simulator, hub, client):
            simulator.set_behaviour("payeefsp", mode="reserve", version="1.0", headers={"X-Test": "yes"})
            prepare = simulator.prepare_body("payerfsp", "payeefsp", "3", "USD")
            await forward_prepare(client, prepare)
            put = await hub.put_for(prepare["transferId"])
            assert put.headers["content-type"] == "application/vnd.interoperability.transfers+json;version=1.0"
            assert put.headers["x-test"] == "yes"

    run(main)


def test_fail_http_500_503_and_dropped_connection():
    async def main():
        async with simulated() as (simulator, hub, client):
            simulator.set_behaviour("payeefsp", fail_http=True)
            prepare = simulator.prepare_body("payerfsp", "payeefsp", "3", "USD")
            assert await forward_prepare_status(client, prepare) == 500
            simulator.set_behaviour("payeefsp", fail_http=503)
            assert await forward_prepare_status(client, prepare) == 503
            simulator.set_behaviour("payeefsp", fail_http="close")
            with pytest.raises(HttpConnectionError):
                await forward_prepare_status(client, prepare)
            with pytest.raises(TimeoutError):
                await hub.put_for(prepare["transferId"], timeout_s=0.2)
            counters = simulator.counters("payeefsp")
            assert counters.prepares >= 3 and counters.http_failures == counters.prepares
            assert counters.prepares_answered == 0
            # Back to normal: the simulator is still serving.
            simulator.set_behaviour("payeefsp", fail_http=False)
            assert await forward_prepare_status(client, prepare) == 202
            await hub.put_for(prepare["transferId"])

    run(main)


async def forward_prepare_status(client: HttpClient, prepare: dict) -> int:
    status, _, _ = await client.request(
        "POST", "/payeefsp/transfers", hub_headers("payerfsp", "payeefsp"), orjson.dumps(prepare)
    )
    return status


def test_callbacks_from_the_hub_are_answered_200_and_counted():
    async def main():
        async with simulated() as (simulator, hub, client):
            transfer_id = str(uuid.uuid4())
            headers = hub_headers("Hub", "payerfsp", accept=False)
            put = orjson.dumps({"transferState": "COMMITTED", "completedTimestamp": "2024-01-01T00:00:00.000Z"})
            error = orjson.dumps({"errorInformation": {"errorCode": "3303", "errorDescription": "Transfer expired"}})
            assert (await client.request("PUT", f"/payerfsp/transfers/{transfer_id}", headers, put))[0] == 200
            assert (await client.request("PUT", f"/payerfsp/transfers/{transfer_id}/error", headers, error))[0] == 200
            # Anything else FSPIOP: GET/POST/DELETE 202, PUT 200, recorded but not acted on.
            assert (await client.request("GET", "/payerfsp/parties/MSISDN/1", headers))[0] == 202
            counters = simulator.counters("payerfsp")
            assert (counters.requests, counters.put_transfers, counters.put_errors, counters.prepares) == (3, 1, 1, 0)
            assert [r.path for r in simulator.received("payerfsp")] == [
                f"/transfers/{transfer_id}",
                f"/transfers/{transfer_id}/error",
                "/parties/MSISDN/1",
            ]
            # An unknown DFSP prefix is a 404 with FSPIOP error 3002.
            status, _, body = await client.request("POST", "/nobody/transfers", headers, b"{}")
            assert status == 404 and orjson.loads(body)["errorInformation"]["errorCode"] == "3002"

    run(main)


def test_callback_failures_are_counted():
    async def main():
        async with simulated() as (simulator, hub, client):
            hub.status = 500
            prepare = simulator.prepare_body("payerfsp", "payeefsp", "3", "USD")
            await forward_prepare(client, prepare)
            await hub.put_for(prepare["transferId"])
            await asyncio.sleep(0.05)
            counters = simulator.counters("payeefsp")
            assert (counters.prepares_answered, counters.callback_failures) == (0, 1)

    run(main)


# --------------------------------------------------------------------------------------------------
# Recording


def test_recording_wait_for_and_clear():
    async def main():
        async with simulated(max_recorded=3) as (simulator, hub, client):
            assert simulator.max_recorded == 3
            ids = [str(uuid.uuid4()) for _ in range(4)]
            headers = hub_headers("Hub", "payerfsp", accept=False)
            for transfer_id in ids:
                await client.request("PUT", f"/payerfsp/transfers/{transfer_id}", headers, b'{"transferState":"X"}')
            # Bounded: the oldest was dropped.
            assert [r.path for r in simulator.received("payerfsp")] == [f"/transfers/{i}" for i in ids[1:]]
            assert simulator.received("payerfsp", method="put", path_contains=ids[2])[0].body == {"transferState": "X"}
            assert simulator.received("payeefsp") == []
            # wait_for: an already recorded request ...
            found = await simulator.wait_for("payerfsp", lambda r: ids[3] in r.path, 1)
            assert isinstance(found, Received) and found.dfsp == "payerfsp" and found.method == "PUT"
            # ... or the next to arrive.
            later = str(uuid.uuid4())
            waiting = asyncio.ensure_future(simulator.wait_for("payeefsp", lambda r: later in r.path, 5))
            await asyncio.sleep(0.01)
            assert not waiting.done()
            before = time.monotonic()
            await client.request("PUT", f"/payeefsp/transfers/{later}", headers, b"{}")
            arrived = await waiting
            assert arrived.dfsp == "payeefsp" and arrived.at_monotonic >= before
            with pytest.raises(TimeoutError):
                await simulator.wait_for("payeefsp", lambda r: r.method == "DELETE", 0.1)
            simulator.clear()
            assert simulator.received(None) == []
            assert simulator.counters("payerfsp").put_transfers == 4  # counters survive clear()
            simulator.clear(counters=True)
            assert simulator.counters("payerfsp").put_transfers == 0

    run(main)


def test_recording_off_still_answers_counts_and_wakes_waiters():
    async def main():
        async with simulated(record=False) as (simulator, hub, client):
            prepare = simulator.prepare_body("payerfsp", "payeefsp", "3", "USD")
            waiting = asyncio.ensure_future(simulator.wait_for("payeefsp", None, 5))
            await asyncio.sleep(0)
            await forward_prepare(client, prepare)
            assert (await waiting).body["transferId"] == prepare["transferId"]
            await hub.put_for(prepare["transferId"])
            await asyncio.sleep(0.05)
            assert simulator.received(None) == []
            assert simulator.counters("payeefsp").prepares_answered == 1
            assert simulator.counters().prepares == 1  # the sum over DFSPs

    run(main)


# --------------------------------------------------------------------------------------------------
# The payer side


def test_prepare_body_is_valid():
    simulator = Simulator("http://127.0.0.1:9")
    simulator.add_dfsp("payerfsp")
    payee = simulator.add_dfsp("payeefsp")
    prepare = simulator.prepare_body("payerfsp", "payeefsp", Decimal("10.50"), "USD")
    assert list(prepare) == [
        "transferId",
        "payerFsp",
        "payeeFsp",
        "amount",
        "ilpPacket",
        "condition",
        "expiration",
    ]
    assert UUID4.match(prepare["transferId"])
    assert prepare["payerFsp"] == "payerfsp" and prepare["payeeFsp"] == "payeefsp"
    assert prepare["amount"] == {"amount": "10.5", "currency": "USD"}
    assert BINARY32.match(prepare["condition"])
    assert prepare["condition"] == make_condition(payee.secret, prepare["ilpPacket"])[1]
    assert DATETIME_MS_Z.match(prepare["expiration"])
    expires = datetime.strptime(prepare["expiration"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert 28 < (expires - datetime.now(UTC)).total_seconds() <= 30
    payment = decode_ilp_packet(prepare["ilpPacket"])
    assert payment.amount == 1050 and payment.account == "g.payeefsp.msisdn.123"
    transaction = payment.transaction
    assert transaction["transactionId"] == prepare["transferId"] and UUID4.match(transaction["quoteId"])
    assert transaction["payer"]["partyIdInfo"]["fspId"] == "payerfsp"
    assert transaction["amount"] == prepare["amount"]

    for amount, text in ((100, "100"), (Decimal("0.0100"), "0.01"), ("0", "0"), (Decimal("1E+2"), "100")):
        assert simulator.prepare_body("payerfsp", "payeefsp", amount, "USD")["amount"]["amount"] == text
        assert AMOUNT.match(text)
    for bad in ("10.50", "-1", "1e5", "01", "1.23456"):
        with pytest.raises(ValueError):
            simulator.prepare_body("payerfsp", "payeefsp", bad, "USD")
    with pytest.raises(TypeError):
        simulator.prepare_body("payerfsp", "payeefsp", 1.5, "USD")
    with pytest.raises(KeyError):
        simulator.prepare_body("payerfsp", "unknown", "1", "USD")  # whose secret?

    fixed = str(uuid.uuid4())
    expired = simulator.prepare_body(
        "payerfsp", "payeefsp", "1", "JPY", transfer_id=fixed, expiration_ms=-1000, payee_party=("IBAN", "SE45X")
    )
    assert expired["transferId"] == fixed
    assert decode_ilp_packet(expired["ilpPacket"]).account == "g.payeefsp.iban.se45x"
    assert datetime.strptime(expired["expiration"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC) < datetime.now(UTC)


def test_utf8_party_names_round_trip_through_the_ilp_packet():
    async def main():
        async with simulated() as (simulator, hub, client):
            prepare = simulator.prepare_body(
                "payerfsp", "payeefsp", "5", "USD", payee_name=BURMESE, payer_name=ACCENTED, note="Ça va? ✓"
            )
            transaction = decode_transaction(prepare["ilpPacket"])
            assert transaction["payee"]["name"] == BURMESE
            assert transaction["payer"]["name"] == ACCENTED
            assert transaction["note"] == "Ça va? ✓"
            # Over HTTP to the payee, and the payee's fulfilment still meets the condition.
            await forward_prepare(client, prepare)
            received = await simulator.wait_for("payeefsp", lambda r: r.method == "POST", 5)
            assert decode_transaction(received.body["ilpPacket"])["payee"]["name"] == BURMESE
            body = orjson.loads((await hub.put_for(prepare["transferId"])).body)
            assert fulfilment_matches(body["fulfilment"], prepare["condition"])

    run(main)


def test_send_uses_fspiop_headers():
    async def main():
        async with simulated() as (simulator, hub, client):
            status, body, prepare = await simulator.send_prepare("payerfsp", "payeefsp", "12.34", "USD")
            assert (status, body) == (202, None)
            post = await hub.wait(lambda r: r.method == "POST")
            assert post.path == "/transfers" and orjson.loads(post.body) == prepare
            headers = post.headers
            assert headers["content-type"] == TRANSFERS_11 and headers["accept"] == TRANSFERS_11
            assert headers["fspiop-source"] == "payerfsp" and headers["fspiop-destination"] == "payeefsp"
            assert HTTP_DATE.match(headers["date"])

            fulfil = {"transferState": "COMMITTED", "fulfilment": IMPL_FULFILMENT, "completedTimestamp": "x"}
            status, _ = await simulator.send(
                "PUT", f"/transfers/{prepare['transferId']}", fulfil, source="payeefsp", destination="payerfsp"
            )
            assert status == 200
            put = await hub.wait(lambda r: r.method == "PUT")
            assert "accept" not in put.headers and put.headers["fspiop-source"] == "payeefsp"

            status, _ = await simulator.send(
                "GET",
                f"/transfers/{prepare['transferId']}",
                None,
                source="payerfsp",
                destination="payeefsp",
                version="1.0",
                headers={"Date": None, "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
            )
            assert status == 202
            get = await hub.wait(lambda r: r.method == "GET")
            assert get.body == b"" and "date" not in get.headers
            assert get.headers["accept"] == "application/vnd.interoperability.transfers+json;version=1.0"
            assert get.headers["traceparent"].startswith("00-111")

            status, _ = await simulator.send("POST", "/quotes", b"{not json", source="payerfsp")
            quote = await hub.wait(lambda r: r.path == "/quotes")
            assert quote.body == b"{not json" and "fspiop-destination" not in quote.headers
            assert quote.headers["content-type"] == "application/vnd.interoperability.quotes+json;version=1.1"

            hub.status = 400
            status, _ = await simulator.send("DELETE", "/participants/MSISDN/1", None, source="payerfsp")
            assert status == 400

    run(main)


# --------------------------------------------------------------------------------------------------
# Behaviour and the CLI


def test_behaviour_validation():
    for bad in (
        {"mode": "explode"},
        {"delay_ms": -1},
        {"fail_http": 200},
        {"fail_http": "reset"},
        {"error_code": "51"},
        {"version": "1"},
    ):
        with pytest.raises(ValueError):
            Behaviour(**bad)
    assert Behaviour(error_code=5105).error_code == "5105"
    simulator = Simulator("http://127.0.0.1:9")
    simulator.add_dfsp("a", Behaviour(mode="reserve"))
    assert simulator.set_behaviour("a", delay_ms=5).mode == "reserve"
    with pytest.raises(ValueError):
        simulator.set_behaviour("a", mode="nope")
    with pytest.raises(ValueError):
        simulator.add_dfsp("a/b")
    assert simulator.endpoints("a")["FSPIOP_CALLBACK_URL_TRANSFER_ERROR"].endswith("/a/transfers/{{transferId}}/error")


def test_cli_arguments():
    args = _parser().parse_args(
        ["--hub", "http://127.0.0.1:3000", "--port", "4000", "--dfsp", "payerfsp", "--dfsp", "payeefsp:reserve:25"]
    )
    assert args.hub == "http://127.0.0.1:3000" and args.port == 4000
    [(payer, payer_behaviour), (payee, payee_behaviour)] = args.dfsp
    assert (payer, payer_behaviour.mode) == ("payerfsp", "commit")
    assert (payee, payee_behaviour.mode, payee_behaviour.delay_ms) == ("payeefsp", "reserve", 25.0)
    with pytest.raises(SystemExit):
        _parser().parse_args(["--hub", "x", "--dfsp", "a:bogus"])


def test_cli_runs_until_interrupted():
    command = [sys.executable, "-m", "sim.simulator", "--hub", "http://127.0.0.1:9", "--port", "0", "--dfsp", "a"]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        try:
            assert process.stdout is not None
            first = process.stdout.readline()
            assert first.startswith("simulator on http://127.0.0.1:"), first
            process.send_signal(signal.SIGINT)
            process.wait(timeout=10)
            output = first + process.stdout.read()
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, output
    assert "a/transfers/{{transferId}}/error" in output and "a: Counters(" in output
