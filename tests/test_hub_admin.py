"""The admin API over real HTTP, on real Ray actors and real Postgres."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

import pytest
import ray
import uvloop

from api.ops_grpc import query_state
from cluster.testing import admin, assert_conserved, onboard, running_hub, start_local_ray


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    start_local_ray()
    yield
    ray.shutdown()


def test_local_ray_and_every_server_of_the_hub_listen_on_loopback_only(database_url):
    """Ray 2.60 swaps a loopback node IP for the machine's routable one unless told not to. The private
    Ray (started by cluster/local_ray.py, the one helper both the hub and these tests use) must stay on
    127.0.0.1, and so must every server the hub then starts."""
    import ipaddress

    import psutil

    def on_loopback(host: str) -> bool:
        address = ipaddress.ip_address(host)
        return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # ::ffff:127.0.0.1 too

    async def scenario():
        async with running_hub(database_url):
            assert ray.util.get_node_ip_address() == "127.0.0.1"
            assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
            # The hub's own servers, Ray's GCS, raylet and workers (the ingress worker among them):
            # every listening socket of this process and of everything it started.
            processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
            listening = []
            for process in processes:
                try:
                    connections = process.net_connections(kind="inet")
                except psutil.NoSuchProcess:
                    continue
                listening += [(process.name(), c.laddr.ip, c.laddr.port)
                              for c in connections if c.status == psutil.CONN_LISTEN]
            assert any(name.startswith("raylet") for name, _, _ in listening), listening
            assert any(name.startswith("gcs_server") for name, _, _ in listening), listening
            beyond = [entry for entry in listening if not on_loopback(entry[1])]
            assert beyond == [], f"listening beyond loopback: {beyond}"

    uvloop.run(scenario())


def test_onboard_fund_limit_and_read_positions(database_url):
    async def scenario():
        async with running_hub(database_url) as hub:
            # A DFSP cannot be onboarded in a currency the hub has no accounts for.
            status, body = await admin(hub, "POST", "/participants", {"name": "early", "currency": "XTS"})
            assert status == 400 and body["errorInformation"]["errorCode"] == "3200"

            accounts = await onboard(hub, ["payerfsp", "payeefsp"], ndc="5000", deposit="10000")
            await assert_conserved(hub)

            status, body = await admin(hub, "GET", "/participants/payerfsp")
            assert status == 200 and body["name"] == "payerfsp" and body["isActive"] == 1
            assert {a["ledgerAccountType"] for a in body["accounts"]} == {"POSITION", "SETTLEMENT"}

            status, body = await admin(hub, "GET", "/participants/payerfsp/positions?currency=XTS")
            assert status == 200 and body["currency"] == "XTS" and body["value"] == 0
            status, listed = await admin(hub, "GET", "/participants/payerfsp/accounts")
            settlement = next(a for a in listed if a["ledgerAccountType"] == "SETTLEMENT")
            assert settlement["value"] == -10000 and settlement["isActive"] == 1

            status, limits = await admin(hub, "GET", "/participants/payerfsp/limits")
            assert status == 200
            assert limits == [{"currency": "XTS", "limit": {"type": "NET_DEBIT_CAP", "value": 5000,
                                                             "alarmPercentage": 10}}]
            status, body = await admin(hub, "PUT", "/participants/payerfsp/limits", {
                "currency": "XTS", "limit": {"type": "NET_DEBIT_CAP", "value": "7500.25", "alarmPercentage": 20}})
            assert status == 200 and body["limit"]["value"] == Decimal("7500.25")
            status, limits = await admin(hub, "GET", "/participants/limits")
            assert {(entry["name"], entry["limit"]["value"]) for entry in limits} == {
                ("payerfsp", Decimal("7500.25")), ("payeefsp", 5000)}

            # Setting the initial limits twice is refused.
            status, body = await admin(hub, "POST", "/participants/payerfsp/initialPositionAndLimits", {
                "currency": "XTS", "limit": {"type": "NET_DEBIT_CAP", "value": 1}, "initialPosition": 0})
            assert status == 400 and body["errorInformation"]["errorCode"] == "3003"

            # Funds out: reserve, then commit; beyond the balance is refused with 4001.
            settlement_id = accounts["payeefsp"]["SETTLEMENT"]["id"]
            funds_out = str(uuid.uuid4())
            status, body = await admin(hub, "POST", f"/participants/payeefsp/accounts/{settlement_id}", {
                "transferId": funds_out, "externalReference": "w1", "action": "recordFundsOutPrepareReserve",
                "reason": "withdrawal", "amount": {"amount": "2500.5", "currency": "XTS"}})
            assert status == 202, body
            await assert_conserved(hub)
            status, body = await admin(
                hub, "PUT", f"/participants/payeefsp/accounts/{settlement_id}/transfers/{funds_out}",
                {"action": "recordFundsOutCommit", "reason": "paid out"})
            assert status == 202, body
            status, listed = await admin(hub, "GET", "/participants/payeefsp/accounts")
            settlement = next(a for a in listed if a["ledgerAccountType"] == "SETTLEMENT")
            assert settlement["value"] == Decimal("-7499.5")
            status, body = await admin(hub, "POST", f"/participants/payeefsp/accounts/{settlement_id}", {
                "transferId": str(uuid.uuid4()), "externalReference": "w2", "action": "recordFundsOutPrepareReserve",
                "reason": "too much", "amount": {"amount": "7499.6", "currency": "XTS"}})
            assert status == 400 and body["errorInformation"]["errorCode"] == "4001"
            # The same funds-in transfer id with other parameters is a modified request.
            status, body = await admin(hub, "POST", f"/participants/payeefsp/accounts/{settlement_id}", {
                "transferId": funds_out, "externalReference": "w1", "action": "recordFundsOutPrepareReserve",
                "reason": "withdrawal", "amount": {"amount": "1", "currency": "XTS"}})
            assert status == 400 and body["errorInformation"]["errorCode"] == "3106"
            await assert_conserved(hub)

            # Endpoints: upsert by type.
            for value in ("http://127.0.0.1:9/old", "http://127.0.0.1:9/transfers"):
                status, _ = await admin(hub, "POST", "/participants/payeefsp/endpoints",
                                        {"type": "FSPIOP_CALLBACK_URL_TRANSFER_POST", "value": value})
                assert status == 201
            status, endpoints = await admin(hub, "GET", "/participants/payeefsp/endpoints")
            assert endpoints == [{"type": "FSPIOP_CALLBACK_URL_TRANSFER_POST", "value": "http://127.0.0.1:9/transfers"}]

            # Deactivation is live in the actor and durable.
            status, body = await admin(hub, "PUT", "/participants/payeefsp", {"isActive": False})
            assert status == 200 and body["isActive"] == 0

            # The same state, from the ops gRPC service and from the admin endpoint that uses it.
            # The CLI's blocking client, from a thread: the gRPC server runs on this event loop.
            state = await asyncio.to_thread(query_state, f"127.0.0.1:{hub.ops_port}", participant="payerfsp")
            assert state["participant"]["name"] == "payerfsp"
            position = next(a for a in state["participant"]["accounts"] if a["ledger_account_type"] == "POSITION")
            assert position["net_debit_cap"] == "7500.25" and position["value"] == "0"
            assert state["shard"]["last_durable_seq"] == state["shard"]["last_seq"]
            status, via_admin = await admin(hub, "GET", "/state/participants/payerfsp")
            assert status == 200 and via_admin["participant"] == state["participant"]
            status, shards = await admin(hub, "GET", "/state/shards")
            assert status == 200 and len(shards["shards"]) == 2
            status, conservation = await admin(hub, "GET", "/state/conservation")
            assert conservation["durable"]["XTS"]["imbalance"] == "0"

    uvloop.run(scenario())


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("GET", "/participants/nobody", None, 404, "3200"),
        ("POST", "/participants", {"currency": "XTS"}, 400, "3102"),
        ("POST", "/participants", {"name": "x", "currency": "XTS"}, 400, "3101"),
        ("POST", "/participants", {"name": "okname", "currency": "usd"}, 400, "3101"),
        ("POST", "/participants/payerfsp/initialPositionAndLimits",
         {"currency": "XTS", "limit": {"type": "NET_DEBIT_CAP", "value": "-1"}}, 400, "3101"),
        ("POST", "/participants/payerfsp/initialPositionAndLimits",
         {"currency": "XTS", "limit": {"type": "NET_DEBIT_CAP", "value": 1.5}}, 400, "3003"),
        ("PUT", "/participants/payerfsp/limits",
         {"currency": "XTS", "limit": {"type": "NET_DEBIT_CAP", "value": "1.00001"}}, 400, "3101"),
        ("DELETE", "/participants", None, 405, "3000"),
        ("GET", "/no/such/route", None, 404, "3002"),
    ],
)
def test_admin_errors(database_url, method, path, body, status, code):
    async def scenario():
        async with running_hub(database_url, shards=1) as hub:
            await onboard(hub, ["payerfsp"])
            got_status, got = await admin(hub, method, path, body)
            assert (got_status, got["errorInformation"]["errorCode"]) == (status, code), got
            await assert_conserved(hub)

    uvloop.run(scenario())


def test_initial_position_is_a_conserved_move_and_can_be_retried(database_url):
    async def scenario():
        async with running_hub(database_url, shards=2) as hub:
            await onboard(hub, ["payerfsp"])  # hub accounts for XTS
            status, body = await admin(hub, "POST", "/participants", {"name": "latefsp", "currency": "XTS"})
            assert status == 201, body
            # An inactive participant: the initial position is refused and nothing is set...
            status, _ = await admin(hub, "PUT", "/participants/latefsp", {"isActive": False})
            assert status == 200
            request = {"currency": "XTS", "limit": {"type": "NET_DEBIT_CAP", "value": 1000}, "initialPosition": 150}
            status, body = await admin(hub, "POST", "/participants/latefsp/initialPositionAndLimits", request)
            assert status == 400 and body["errorInformation"]["errorCode"] == "3100"
            status, limits = await admin(hub, "GET", "/participants/latefsp/limits")
            assert limits == []
            # ...so once active the same call works, and the position is a move against the hub.
            status, _ = await admin(hub, "PUT", "/participants/latefsp", {"isActive": True})
            status, body = await admin(hub, "POST", "/participants/latefsp/initialPositionAndLimits", request)
            assert status == 201, body
            status, body = await admin(hub, "GET", "/participants/latefsp/positions?currency=XTS")
            assert body["value"] == 150
            await assert_conserved(hub)

    uvloop.run(scenario())
