"""A settlement survives the hub stopping half way: windows, states and the settlement's open
reservations are durable; the next hub goes on from PS_TRANSFERS_RESERVED to SETTLED exactly."""

from __future__ import annotations

import contextlib
from decimal import Decimal

import pytest
import ray
import uvloop

from cluster.settlement import SettlementSettings
from cluster.testing import HubThread, admin, assert_conserved, onboard_dfsps, start_local_ray
from sim.simulator import Simulator

MODEL = {"name": "DEFERREDNET", "settlementGranularity": "NET", "settlementInterchange": "MULTILATERAL",
         "settlementDelay": "DEFERRED", "requireLiquidityCheck": False, "ledgerAccountType": "POSITION",
         "autoPositionReset": True, "settlementAccountType": "SETTLEMENT"}


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    start_local_ray()
    yield
    ray.shutdown()


@contextlib.contextmanager
def hub_on(database_url: str):
    thread = HubThread(database_url, shards=2, ingress_workers=1, settlement=SettlementSettings(tick_ms=50)).start()
    try:
        yield thread
    finally:
        thread.stop()


async def position(hub: HubThread, name: str) -> tuple[Decimal, Decimal]:
    status, body = await admin(hub.hub, "GET", f"/participants/{name}/positions?currency=XTS")
    assert status == 200, body
    return Decimal(str(body["value"])), Decimal(str(body["reservedValue"]))


async def acknowledge(hub: HubThread, settlement: dict, state: str) -> dict:
    body = {"participants": [{"id": p["id"], "accounts": [{"id": a["id"], "state": state, "reason": "ok"}
                                                          for a in p["accounts"]]} for p in settlement["participants"]]}
    status, answer = await admin(hub.hub, "PUT", f"/v2/settlements/{settlement['id']}", body)
    assert status == 200 and answer["state"] == state, answer
    return answer


def test_settlement_goes_on_after_the_hub_restarts(database_url):
    async def before_restart(hub: HubThread) -> dict:
        status, body = await admin(hub.hub, "POST", "/settlementModels", MODEL)
        assert status == 201, body
        sim = Simulator(hub.fspiop_url)
        await sim.start()
        try:
            await onboard_dfsps(hub.hub, sim, ["rpayer", "rpayee"], "XTS", ndc="1000", deposit="1000")
            status, _, prepare = await sim.send_prepare("rpayer", "rpayee", "40", "XTS")
            assert status == 202
            transfer_id = prepare["transferId"]
            await sim.wait_for("rpayer", lambda r: r.method == "PUT" and transfer_id in r.path, 15)
        finally:
            await sim.stop()
        status, opened = await admin(hub.hub, "POST", "/v2/settlementWindows/1", {"state": "CLOSED", "reason": "r"})
        assert status == 200 and opened["id"] == 2, opened
        status, settlement = await admin(hub.hub, "POST", "/v2/settlements", {
            "settlementModel": "DEFERREDNET", "reason": "r", "settlementWindows": [{"id": 1}]})
        assert status == 200, settlement
        await acknowledge(hub, settlement, "PS_TRANSFERS_RECORDED")
        await acknowledge(hub, settlement, "PS_TRANSFERS_RESERVED")
        assert await position(hub, "rpayee") == (Decimal(0), Decimal(40))  # -40, then 40 reserved
        await hub.acall(assert_conserved(hub.hub))
        return settlement

    async def after_restart(hub: HubThread, settlement: dict) -> None:
        # The settlement's reservation came back with the shard (it has no expiry).
        assert await position(hub, "rpayee") == (Decimal(0), Decimal(40))
        status, window = await admin(hub.hub, "GET", "/v2/settlementWindows/1")
        assert status == 200 and window["state"] == "PENDING_SETTLEMENT", window
        status, opened = await admin(hub.hub, "GET", "/v2/settlementWindows?state=OPEN")
        assert [w["id"] for w in opened] == [2]
        await acknowledge(hub, settlement, "PS_TRANSFERS_RESERVED")  # a repeat: accepted, nothing moves
        assert await position(hub, "rpayee") == (Decimal(0), Decimal(40))
        await acknowledge(hub, settlement, "PS_TRANSFERS_COMMITTED")
        await acknowledge(hub, settlement, "SETTLED")
        assert await position(hub, "rpayer") == (Decimal(0), Decimal(0))
        assert await position(hub, "rpayee") == (Decimal(0), Decimal(0))
        status, window = await admin(hub.hub, "GET", "/v2/settlementWindows/1")
        assert window["state"] == "SETTLED", window
        await hub.acall(assert_conserved(hub.hub))

    with hub_on(database_url) as hub:
        settlement = uvloop.run(before_restart(hub))
    with hub_on(database_url) as hub:
        uvloop.run(after_restart(hub, settlement))
