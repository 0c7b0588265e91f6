"""The /v2 settlement API's edges on a real hub: validation errors, the net debit cap raised at
PS_TRANSFERS_RESERVED, bilateral nets, and retried steps that never move money twice."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
import uvloop

from api.settlement import SettlementApi
from cluster.settlement import SettlementSettings
from cluster.testing import HubThread, admin, assert_conserved, module_hub, onboard, onboard_dfsps
from sim.simulator import Simulator

SPEC = Path(__file__).resolve().parent.parent / "api" / "spec" / "central-settlement-swagger.json"
P, Q = "dfspp", "dfspq"
MODELS = [
    # The default model (no currency), bilateral: settles every currency without a model of its own.
    {"name": "DEFAULTNETBILATERAL", "settlementGranularity": "NET", "settlementInterchange": "BILATERAL",
     "settlementDelay": "DEFERRED", "requireLiquidityCheck": True, "ledgerAccountType": "POSITION",
     "autoPositionReset": True, "settlementAccountType": "SETTLEMENT"},
    {"name": "CGSEUR", "settlementGranularity": "GROSS", "settlementInterchange": "BILATERAL",
     "settlementDelay": "IMMEDIATE", "currency": "EUR", "requireLiquidityCheck": False,
     "ledgerAccountType": "POSITION", "autoPositionReset": False, "settlementAccountType": "SETTLEMENT"},
]


def test_every_route_of_the_central_settlement_api_is_served():
    routes = {(method, tuple(None if p.startswith("{") else p for p in path.strip("/").split("/")))
              for method, path in _spec_routes()}
    served = {(method, pattern) for method, pattern, _ in SettlementApi(None, None)._routes}
    assert routes - served == set()


def _spec_routes():
    spec = json.loads(SPEC.read_text())
    for path, operations in spec["paths"].items():
        if path == "/health":  # the admin API's own /health answers for the whole hub
            continue
        for method in operations:
            if method != "parameters":
                yield method.upper(), path


@pytest.fixture(scope="module")
def hub(module_database_url):
    with module_hub(module_database_url, hub_accounts=(), shards=2, ingress_workers=1,
                    settlement=SettlementSettings(tick_ms=50)) as thread:
        for model in MODELS:
            status, body = thread.admin("POST", "/settlementModels", model)
            assert status == 201, body
        yield thread


@pytest.fixture(autouse=True)
def conserved(hub):
    yield
    hub.call(assert_conserved(hub.hub))


@contextlib.asynccontextmanager
async def simulator(hub: HubThread):
    sim = Simulator(hub.fspiop_url)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


async def transfer(sim: Simulator, payer: str, payee: str, amount: str, currency: str) -> None:
    status, body, prepare = await sim.send_prepare(payer, payee, amount, currency)
    assert status == 202, body
    transfer_id = prepare["transferId"]
    committed = await sim.wait_for(
        payer, lambda r: r.method == "PUT" and transfer_id in r.path and not r.path.endswith("/error"), 15)
    assert committed.body["transferState"] == "COMMITTED", committed.body


async def accounts(hub: HubThread, name: str) -> dict[tuple[str, str], dict]:
    status, found = await admin(hub.hub, "GET", f"/participants/{name}/accounts")
    assert status == 200, found
    # changedDate is the time of the answer: left out so two readings compare by value.
    return {(a["currency"], a["ledgerAccountType"]): {k: v for k, v in a.items() if k != "changedDate"}
            for a in found}


async def acknowledge(hub: HubThread, settlement: dict, state: str) -> dict:
    body = {"participants": [{"id": p["id"], "accounts": [{"id": a["id"], "state": state, "reason": "ok"}
                                                          for a in p["accounts"]]} for p in settlement["participants"]]}
    status, answer = await admin(hub.hub, "PUT", f"/v2/settlements/{settlement['id']}", body)
    assert status == 200 and answer["state"] == state, answer
    return answer


async def open_window(hub: HubThread) -> int:
    status, windows = await admin(hub.hub, "GET", "/v2/settlementWindows?state=OPEN")
    assert status == 200 and len(windows) == 1, windows
    return windows[0]["id"]


def test_recipient_cap_raised_bilateral_nets_and_retries_move_nothing(hub):
    async def scenario():
        async with simulator(hub) as sim:
            await onboard_dfsps(hub.hub, sim, [P, Q], "XTS", ndc="100", deposit="1000")
            await onboard(hub.hub, [P, Q], "EUR", ndc="100", deposit="1000")
            await transfer(sim, P, Q, "90", "XTS")
            await transfer(sim, P, Q, "5", "EUR")
            window = await open_window(hub)
            status, _ = await admin(hub.hub, "POST", f"/v2/settlementWindows/{window}",
                                    {"state": "CLOSED", "reason": "day"})
            assert status == 200
            # In the next window Q sends more than it is owed: its position is above zero when the
            # settlement reserves the 90 it is owed, so the reservation would pass its cap of 100.
            await transfer(sim, Q, P, "150", "XTS")
            status, settlement = await admin(hub.hub, "POST", "/v2/settlements", {
                "settlementModel": "DEFAULTNETBILATERAL", "reason": "r", "settlementWindows": [{"id": window}]})
            assert status == 200, settlement
            # Only XTS: EUR content belongs to the gross model and was settled as it committed.
            assert {a["netSettlementAmount"]["currency"] for p in settlement["participants"]
                    for a in p["accounts"]} == {"XTS"}
            await acknowledge(hub, settlement, "PS_TRANSFERS_RECORDED")
            await acknowledge(hub, settlement, "PS_TRANSFERS_RESERVED")
            q = await accounts(hub, Q)
            assert Decimal(str(q[("XTS", "POSITION")]["value"])) == Decimal(150)  # -90 + 150, then 90 reserved
            assert Decimal(str(q[("XTS", "POSITION")]["reservedValue"])) == Decimal(90)
            assert Decimal(str(q[("XTS", "POSITION")]["netDebitCap"])) == Decimal(190)  # raised by 90
            await acknowledge(hub, settlement, "PS_TRANSFERS_COMMITTED")
            p_before, q_before = await accounts(hub, P), await accounts(hub, Q)
            assert Decimal(str(p_before[("XTS", "POSITION")]["value"])) == Decimal(-150)  # 90 - 150 - 90
            # Each step again, as a retry after a lost reply would do it: duplicates, nothing moves.
            service = hub.hub.settlement
            await hub.acall(service._reserve_recipients(settlement["id"], await hub.acall(_model(service, settlement))))
            await hub.acall(service._commit_all(settlement["id"]))
            await acknowledge(hub, settlement, "PS_TRANSFERS_COMMITTED")  # the same state again is accepted
            assert await accounts(hub, P) == p_before and await accounts(hub, Q) == q_before
            await acknowledge(hub, settlement, "SETTLED")
            status, report = await admin(hub.hub, "GET", f"/v2/reports/settlementWindows/{window}")
            assert status == 200
            assert {"currency": "XTS", "ledgerAccountType": "POSITION", "partyA": P, "partyB": Q, "net": "90"} in \
                report["bilateral"]
            assert {"currency": "EUR", "ledgerAccountType": "POSITION", "partyA": P, "partyB": Q, "net": "5"} in \
                report["bilateral"]
            # The post-commit processor re-reads the whole journal: every gross move is a duplicate.
            before = (await accounts(hub, P), await accounts(hub, Q))
            connection = await asyncpg.connect(hub.hub.database_url)
            try:
                await connection.execute("UPDATE settlement_cursor SET seq = 0")
                for _ in range(100):
                    await asyncio.sleep(0.05)
                    if await connection.fetchval("SELECT min(seq) > 0 FROM settlement_cursor"):
                        break
            finally:
                await connection.close()
            await asyncio.sleep(0.2)
            assert (await accounts(hub, P), await accounts(hub, Q)) == before
            assert Decimal(str(before[1][("EUR", "POSITION")]["value"])) == 0
            assert Decimal(str(before[1][("EUR", "SETTLEMENT")]["value"])) == Decimal(-1005)

    uvloop.run(scenario())


async def _model(service, settlement: dict):
    async with service.pool.acquire() as connection:
        row = await service._settlement_row(connection, settlement["id"])
    return await service._model_of(row)


# (case, method, path, body, status, errorCode)
INVALID = [
    ("window id not a number", "GET", "/v2/settlementWindows/abc", None, 400, "3101"),
    ("unknown window", "GET", "/v2/settlementWindows/9999", None, 400, "3100"),
    ("bad date filter", "GET", "/v2/settlementWindows?fromDateTime=yesterday", None, 400, "3101"),
    ("date without zone", "GET", "/v2/settlementWindows?fromDateTime=2026-01-01T00:00:00", None, 400, "3101"),
    ("close without reason", "POST", "/v2/settlementWindows/1", {"state": "CLOSED"}, 400, "3102"),
    ("close body not JSON", "POST", "/v2/settlementWindows/1", "nope", 400, "3101"),
    ("no settlement filter", "GET", "/v2/settlements", None, 400, "3100"),
    ("unknown settlement", "GET", "/v2/settlements/9999", None, 400, "3100"),
    ("unknown model", "POST", "/v2/settlements",
     {"settlementModel": "NOSUCHMODEL", "reason": "r", "settlementWindows": [{"id": 1}]}, 400, "3100"),
    ("gross model", "POST", "/v2/settlements",
     {"settlementModel": "CGSEUR", "reason": "r", "settlementWindows": [{"id": 1}]}, 400, "3100"),
    ("windows empty", "POST", "/v2/settlements",
     {"settlementModel": "DEFAULTNETBILATERAL", "reason": "r", "settlementWindows": []}, 400, "3101"),
    ("windows repeated", "POST", "/v2/settlements",
     {"settlementModel": "DEFAULTNETBILATERAL", "reason": "r", "settlementWindows": [{"id": 1}, {"id": 1}]},
     400, "3101"),
    ("window id a string", "POST", "/v2/settlements",
     {"settlementModel": "DEFAULTNETBILATERAL", "reason": "r", "settlementWindows": [{"id": "1"}]}, 400, "3101"),
    ("unknown window in settlement", "POST", "/v2/settlements",
     {"settlementModel": "DEFAULTNETBILATERAL", "reason": "r", "settlementWindows": [{"id": 9999}]}, 400, "3100"),
    ("missing reason", "POST", "/v2/settlements",
     {"settlementModel": "DEFAULTNETBILATERAL", "settlementWindows": [{"id": 1}]}, 400, "3102"),
    ("acknowledge unknown settlement", "PUT", "/v2/settlements/9999",
     {"participants": [{"id": 1, "accounts": [{"id": 1, "state": "PS_TRANSFERS_RECORDED"}]}]}, 400, "3100"),
    ("settlement to another state", "PUT", "/v2/settlements/1", {"state": "SETTLED", "reason": "r"}, 400, "3100"),
    ("fee rule without basis points", "PUT", "/v2/interchangeFees/XTS", {"paidBy": "PAYER"}, 400, "3102"),
    ("fee rule over 100%", "PUT", "/v2/interchangeFees/XTS", {"basisPoints": 10001, "paidBy": "PAYER"}, 400, "3101"),
    ("basis points as a string", "PUT", "/v2/interchangeFees/XTS", {"basisPoints": "50", "paidBy": "PAYER"},
     400, "3101"),
    ("fee rule unknown payer", "PUT", "/v2/interchangeFees/XTS", {"basisPoints": 5, "paidBy": "HUB"}, 400, "3101"),
    ("fee rule bad currency", "PUT", "/v2/interchangeFees/usd", {"basisPoints": 5, "paidBy": "PAYER"}, 400, "3101"),
    ("unknown route", "GET", "/v2/nothing", None, 404, "3002"),
    ("wrong method", "DELETE", "/v2/settlements/1", None, 405, "3000"),
]


@pytest.mark.parametrize(("case", "method", "path", "body", "status", "code"), INVALID, ids=[c[0] for c in INVALID])
def test_refusals(hub, case, method, path, body, status, code):
    got_status, answer = _raw(hub, method, path, body)
    assert (got_status, answer["errorInformation"]["errorCode"]) == (status, code), answer


def _raw(hub: HubThread, method: str, path: str, body):
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", hub.hub.admin_port, timeout=30)
    try:
        payload = body.encode() if isinstance(body, str) else (json.dumps(body).encode() if body is not None else None)
        connection.request(method, path, body=payload, headers={"Content-Type": "application/json"} if payload else {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_fee_rules_are_listed(hub):
    status, body = hub.admin("PUT", "/v2/interchangeFees/XTS", {"basisPoints": 25, "paidBy": "PAYEE"})
    assert status == 200 and body == {"currency": "XTS", "basisPoints": 25, "paidBy": "PAYEE"}
    status, body = hub.admin("PUT", "/v2/interchangeFees/XTS", {"basisPoints": 0, "paidBy": "PAYER"})
    assert status == 200
    status, rules = hub.admin("GET", "/v2/interchangeFees")
    assert status == 200 and rules == [{"currency": "XTS", "basisPoints": 0, "paidBy": "PAYER"}]


def test_every_transfer_lands_in_exactly_one_window_while_windows_close_under_load(hub):
    """Windows are closed again and again while transfers flow: each committed transfer is counted in
    exactly one window, so the windows' nets add up to the positions, exactly."""
    names = ["loadx", "loady", "loadz"]

    async def scenario():
        async with simulator(hub) as sim:
            await onboard_dfsps(hub.hub, sim, names, "USD", ndc="100000", deposit="100000")
            rng = random.Random(11)
            plan = [(*rng.sample(names, 2), str(rng.randint(1, 50))) for _ in range(60)]
            queue = asyncio.Queue()
            for item in plan:
                queue.put_nowait(item)

            async def payer_loop() -> None:
                while not queue.empty():
                    payer, payee, amount = queue.get_nowait()
                    await transfer(sim, payer, payee, amount, "USD")

            async def closer() -> int:
                closed = 0
                for _ in range(4):
                    await asyncio.sleep(0.15)
                    status, body = await admin(hub.hub, "POST", f"/v2/settlementWindows/{await open_window(hub)}",
                                               {"state": "CLOSED", "reason": "under load"})
                    assert status in (200, 400), body  # 400: nothing committed since the last close
                    closed += status == 200
                return closed

            results = await asyncio.gather(*(payer_loop() for _ in range(6)), closer())
            assert results[-1] >= 1
            status, body = await admin(hub.hub, "POST", f"/v2/settlementWindows/{await open_window(hub)}",
                                       {"state": "CLOSED", "reason": "the rest"})
            assert status in (200, 400), body
            connection = await asyncpg.connect(hub.hub.database_url)
            try:
                for _ in range(100):  # the last close may still be aggregating
                    if not await connection.fetchval(
                            "SELECT count(*) FROM settlement_window WHERE state IN ('PROCESSING', 'FAILED')"):
                        break
                    await asyncio.sleep(0.05)
                rows = await connection.fetch(
                    "SELECT p.name, sum(a.net) AS net, sum(a.sent_count) AS sent FROM settlement_content_account a"
                    " JOIN participant p USING (participant_id) JOIN settlement_window_content w USING (content_id)"
                    " WHERE p.name = ANY($1) AND w.currency = 'USD' GROUP BY p.name", names)
            finally:
                await connection.close()
            by_name = {r["name"]: r for r in rows}
            for name in names:
                status, position = await admin(hub.hub, "GET", f"/participants/{name}/positions?currency=USD")
                assert Decimal(str(position["value"])) == by_name[name]["net"], name
                assert by_name[name]["sent"] == sum(1 for payer, _, _ in plan if payer == name)

    uvloop.run(scenario())
