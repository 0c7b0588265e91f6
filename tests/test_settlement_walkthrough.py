"""The Settlement v2 walkthrough end to end: real HTTP, Ray shards, Postgres and the DFSP simulator.

One scheme, three DFSPs, three currencies:

* USD: DEFERRED NET MULTILATERAL on POSITION (requireLiquidityCheck, autoPositionReset), plus an
  INTERCHANGE_FEE model (DEFERRED NET MULTILATERAL) with a 1% fee paid by the payer;
* EUR: IMMEDIATE GROSS (continuous gross settlement): each transfer is settled as it commits;
* XTS: DEFERRED NET MULTILATERAL without autoPositionReset (settling changes states, not positions).

Windows are closed, settled, acknowledged step by step (with refused acknowledgements), aborted and
settled again while transfers keep flowing. After every step the positions, settlement balances and
fee accounts are checked exactly, and every currency is conserved.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import random
from decimal import Decimal

import pytest
import uvloop

from cluster.settlement import SettlementSettings
from cluster.testing import HubThread, admin, assert_conserved, module_hub, onboard, onboard_dfsps
from sim.simulator import Simulator

A, B, C = "dfspa", "dfspb", "dfspc"
DEPOSIT = Decimal(10000)
MODELS = [
    {"name": "DEFERREDNETUSD", "settlementGranularity": "NET", "settlementInterchange": "MULTILATERAL",
     "settlementDelay": "DEFERRED", "currency": "USD", "requireLiquidityCheck": True,
     "ledgerAccountType": "POSITION", "autoPositionReset": True, "settlementAccountType": "SETTLEMENT"},
    {"name": "INTERCHANGEFEEUSD", "settlementGranularity": "NET", "settlementInterchange": "MULTILATERAL",
     "settlementDelay": "DEFERRED", "currency": "USD", "requireLiquidityCheck": False,
     "ledgerAccountType": "INTERCHANGE_FEE", "autoPositionReset": True,
     "settlementAccountType": "INTERCHANGE_FEE_SETTLEMENT"},
    {"name": "CGSEUR", "settlementGranularity": "GROSS", "settlementInterchange": "BILATERAL",
     "settlementDelay": "IMMEDIATE", "currency": "EUR", "requireLiquidityCheck": False,
     "ledgerAccountType": "POSITION", "autoPositionReset": False, "settlementAccountType": "SETTLEMENT"},
    {"name": "DEFERREDNOREST", "settlementGranularity": "NET", "settlementInterchange": "MULTILATERAL",
     "settlementDelay": "DEFERRED", "currency": "XTS", "requireLiquidityCheck": False,
     "ledgerAccountType": "POSITION", "autoPositionReset": False, "settlementAccountType": "SETTLEMENT"},
]
FEE_BASIS_POINTS = 100


@pytest.fixture(scope="module")
def hub(module_database_url):
    with module_hub(module_database_url, hub_accounts=(), shards=2, ingress_workers=1,
                    settlement=SettlementSettings(tick_ms=50)) as thread:
        yield thread


def fee(amount: Decimal) -> Decimal:
    # 1% rounded down to the ledger's 4 decimals (core.settlement.fee_minor).
    return (amount * FEE_BASIS_POINTS / 10_000).quantize(Decimal("0.0001"), rounding="ROUND_DOWN")


class Scheme:
    """The scheme's view for the assertions: expected balances per (dfsp, currency, account type)."""

    def __init__(self, hub: HubThread, sim: Simulator):
        self.hub = hub
        self.sim = sim
        self.expected: dict[tuple[str, str, str], Decimal] = {}
        for name in (A, B, C):
            for currency in ("USD", "EUR", "XTS"):
                self.expected[(name, currency, "POSITION")] = Decimal(0)
                self.expected[(name, currency, "SETTLEMENT")] = -DEPOSIT
            self.expected[(name, "USD", "INTERCHANGE_FEE")] = Decimal(0)

    def move(self, key: tuple[str, str, str], amount: Decimal) -> None:
        self.expected[key] += amount

    async def transfer(self, payer: str, payee: str, amount: str, currency: str) -> None:
        """One FSPIOP transfer through the hub, committed; updates what the ledger should show."""
        status, body, prepare = await self.sim.send_prepare(payer, payee, amount, currency)
        assert status == 202, body
        transfer_id = prepare["transferId"]
        committed = await self.sim.wait_for(
            payer, lambda r: r.method == "PUT" and transfer_id in r.path and not r.path.endswith("/error"), 15)
        assert committed.body["transferState"] == "COMMITTED", committed.body
        value = Decimal(amount)
        if currency == "EUR":  # continuous gross: positions come back, settlement balances move
            self.move((payer, currency, "SETTLEMENT"), value)
            self.move((payee, currency, "SETTLEMENT"), -value)
        else:
            self.move((payer, currency, "POSITION"), value)
            self.move((payee, currency, "POSITION"), -value)
        if currency == "USD" and fee(value):
            self.move((payer, currency, "INTERCHANGE_FEE"), fee(value))
            self.move((payee, currency, "INTERCHANGE_FEE"), -fee(value))

    async def balances(self) -> dict[tuple[str, str, str], Decimal]:
        found = {}
        for name in (A, B, C):
            status, accounts = await admin(self.hub.hub, "GET", f"/participants/{name}/accounts")
            assert status == 200, accounts
            for account in accounts:
                key = (name, account["currency"], account["ledgerAccountType"])
                if key in self.expected:
                    found[key] = Decimal(str(account["value"]))
        return found

    async def check(self, timeout_s: float = 10.0) -> None:
        """Every balance as expected (the post-commit processor may need a tick), and conservation."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            found = await self.balances()
            if found == self.expected or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.1)
        wrong = {k: (found.get(k), v) for k, v in self.expected.items() if found.get(k) != v}
        assert not wrong, f"(found, expected): {wrong}"
        await self.hub.acall(assert_conserved(self.hub.hub))

    async def v2(self, method: str, path: str, body=None):
        return await admin(self.hub.hub, method, f"/v2{path}", body)


def account_of(settlement: dict, account_id: int) -> dict:
    return next(a for p in settlement["participants"] for a in p["accounts"] if a["id"] == account_id)


async def account_ids(hub: HubThread, currency: str, account_type: str) -> dict[str, int]:
    """DFSP -> its account id (the settlement API's participantCurrencyId)."""
    out = {}
    for name in (A, B, C):
        status, accounts = await admin(hub.hub, "GET", f"/participants/{name}/accounts")
        assert status == 200, accounts
        account = next(a for a in accounts if a["currency"] == currency and a["ledgerAccountType"] == account_type)
        out[name] = account["id"]
    return out


async def acknowledge(scheme: Scheme, settlement: dict, state: str) -> dict:
    """All accounts of a settlement to ``state`` in one PUT /settlements/{id}."""
    body = {"participants": [
        {"id": p["id"], "accounts": [{"id": a["id"], "state": state, "reason": f"bank says {state}",
                                      "externalReference": f"ref-{a['id']}"} for a in p["accounts"]]}
        for p in settlement["participants"]
    ]}
    status, answer = await scheme.v2("PUT", f"/settlements/{settlement['id']}", body)
    assert status == 200, answer
    assert not any("errorInformation" in a for p in answer["participants"] for a in p["accounts"]), answer
    return answer


@contextlib.asynccontextmanager
async def simulator(hub: HubThread):
    sim = Simulator(hub.fspiop_url)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


def test_settlement_v2_walkthrough(hub):
    uvloop.run(_walkthrough(hub))


async def _walkthrough(hub: HubThread) -> None:
    async with simulator(hub) as sim:
        scheme = Scheme(hub, sim)
        for model in MODELS:
            status, body = await admin(hub.hub, "POST", "/settlementModels", model)
            assert status == 201, body
        status, body = await scheme.v2("PUT", "/interchangeFees/USD", {"basisPoints": FEE_BASIS_POINTS,
                                                                      "paidBy": "PAYER"})
        assert status == 200, body
        await onboard_dfsps(hub.hub, sim, [A, B, C], "USD", ndc="1000", deposit=str(DEPOSIT))
        for currency in ("EUR", "XTS"):
            await onboard(hub.hub, [A, B, C], currency, ndc="1000", deposit=str(DEPOSIT))
        # Onboarding created the fee accounts the USD fee model needs (and none for EUR).
        status, accounts = await admin(hub.hub, "GET", f"/participants/{A}/accounts")
        types = {(a["currency"], a["ledgerAccountType"]) for a in accounts}
        assert {("USD", "INTERCHANGE_FEE"), ("USD", "INTERCHANGE_FEE_SETTLEMENT")} <= types
        assert ("EUR", "INTERCHANGE_FEE") not in types
        positions = await account_ids(hub, "USD", "POSITION")
        fee_accounts = await account_ids(hub, "USD", "INTERCHANGE_FEE")

        # ------------------------------------------------------------ window 1
        status, windows = await scheme.v2("GET", "/settlementWindows?state=OPEN")
        assert status == 200 and [w["id"] for w in windows] == [1], windows
        status, body = await scheme.v2("POST", "/settlementWindows/1", {"state": "CLOSED", "reason": "empty"})
        assert status == 400 and body["errorInformation"]["errorCode"] == "3100", body  # nothing to close
        for payer, payee, amount, currency in ((A, B, "100", "USD"), (B, C, "30", "USD"), (C, A, "50", "USD"),
                                               (A, B, "10", "EUR"), (B, A, "4", "EUR"), (A, C, "7", "XTS")):
            await scheme.transfer(payer, payee, amount, currency)
        await scheme.check()  # EUR positions are back at zero; USD fee accounts carry the fees

        status, opened = await scheme.v2("POST", "/settlementWindows/1", {"state": "CLOSED", "reason": "day 1"})
        assert status == 200 and opened["id"] == 2 and opened["state"] == "OPEN", opened
        status, window = await scheme.v2("GET", "/settlementWindows/1")
        assert status == 200 and window["state"] == "CLOSED" and window["reason"] == "day 1", window
        content = {(c["currencyId"], c["ledgerAccountType"]): c["state"] for c in window["content"]}
        assert content == {("USD", "POSITION"): "CLOSED", ("USD", "INTERCHANGE_FEE"): "CLOSED",
                           ("EUR", "POSITION"): "SETTLED", ("XTS", "POSITION"): "CLOSED"}
        status, body = await scheme.v2("POST", "/settlementWindows/1", {"state": "CLOSED", "reason": "again"})
        assert status == 400 and body["errorInformation"]["errorCode"] == "3100"
        status, body = await scheme.v2("POST", "/settlementWindows/2", {"state": "CLOSED", "reason": "empty"})
        assert status == 400 and body["errorInformation"]["errorCode"] == "3100"
        status, body = await scheme.v2("POST", "/settlementWindows/99", {"state": "CLOSED", "reason": "x"})
        assert status == 400 and body["errorInformation"]["errorCode"] == "3100"
        status, body = await scheme.v2("POST", "/settlementWindows/2", {"state": "OPEN", "reason": "x"})
        assert status == 400 and body["errorInformation"]["errorCode"] == "3101"
        status, body = await scheme.v2("GET", "/settlementWindows")
        assert status == 400 and body["errorInformation"]["errorCode"] == "3100"  # a filter is required

        # ------------------------------------------------------------ window 2
        await scheme.transfer(A, C, "20", "USD")
        status, opened = await scheme.v2("POST", "/settlementWindows/2", {"state": "CLOSED", "reason": "day 2"})
        assert status == 200 and opened["id"] == 3, opened
        status, found = await scheme.v2("GET", "/settlementWindows?state=CLOSED&currency=USD")
        assert status == 200 and [w["id"] for w in found] == [1, 2], found
        await scheme.check()

        # Only DEFERRED NET models settle by window; an open window cannot be settled.
        status, body = await scheme.v2("POST", "/settlements", {"settlementModel": "CGSEUR", "reason": "x",
                                                                "settlementWindows": [{"id": 1}]})
        assert status == 400 and body["errorInformation"]["errorCode"] == "3100", body
        status, body = await scheme.v2("POST", "/settlements", {"settlementModel": "DEFERREDNETUSD", "reason": "x",
                                                                "settlementWindows": [{"id": 3}]})
        assert status == 400 and body["errorInformation"]["errorCode"] == "3100", body
        status, body = await scheme.v2("POST", "/settlements", {"settlementModel": "DEFERREDNETUSD", "reason": "x"})
        assert status == 400 and body["errorInformation"]["errorCode"] == "3102", body

        # ------------------------------------------------------------ settlement 1: failed acks, then aborted
        status, first = await scheme.v2("POST", "/settlements", {
            "settlementModel": "DEFERREDNETUSD", "reason": "days 1-2", "settlementWindows": [{"id": 1}, {"id": 2}]})
        assert status == 200 and first["state"] == "PENDING_SETTLEMENT", first
        nets = {a["id"]: Decimal(str(a["netSettlementAmount"]["amount"]))
                for p in first["participants"] for a in p["accounts"]}
        # A sent 100 + 20 and got 50; B got 100 and sent 30; C got 30 + 20 and sent 50.
        assert nets == {positions[A]: Decimal(70), positions[B]: Decimal(-70), positions[C]: Decimal(0)}, nets
        status, window = await scheme.v2("GET", "/settlementWindows/1")
        # USD POSITION is pending, the fee content still CLOSED: the window is in its lowest state.
        assert window["state"] == "CLOSED", window
        recorded = await acknowledge(scheme, first, "PS_TRANSFERS_RECORDED")
        assert recorded["state"] == "PS_TRANSFERS_RECORDED"
        # A failed acknowledgement: skipping a step is refused per account, nothing moves.
        participant_a = next(p for p in first["participants"] if any(a["id"] == positions[A] for a in p["accounts"]))
        status, answer = await scheme.v2("PUT", f"/settlements/{first['id']}", {"participants": [
            {"id": participant_a["id"], "accounts": [{"id": positions[A], "state": "PS_TRANSFERS_COMMITTED",
                                                      "reason": "skipping"}]}]})
        assert status == 200, answer
        refused = account_of(answer, positions[A])
        assert refused["state"] == "PS_TRANSFERS_RECORDED"
        assert refused["errorInformation"]["errorCode"] == "3100", refused
        status, answer = await scheme.v2(
            "PUT", f"/settlements/{first['id']}/participants/{participant_a['id']}/accounts/{positions[A]}",
            {"state": "SETTLED", "reason": "bank failed"})
        assert status == 400 and answer["errorInformation"]["errorCode"] == "3100", answer
        reserved = await acknowledge(scheme, first, "PS_TRANSFERS_RESERVED")
        assert reserved["state"] == "PS_TRANSFERS_RESERVED"
        scheme.move((B, "USD", "POSITION"), Decimal(70))  # the net recipient is reserved toward zero
        await scheme.check()
        status, aborted = await scheme.v2("PUT", f"/settlements/{first['id']}",
                                          {"state": "ABORTED", "reason": "bank holiday"})
        assert status == 200 and aborted["state"] == "ABORTED", aborted
        scheme.move((B, "USD", "POSITION"), Decimal(-70))  # released
        await scheme.check()
        status, window = await scheme.v2("GET", "/settlementWindows/2")
        assert window["state"] == "ABORTED", window
        status, body = await scheme.v2("PUT", f"/settlements/{first['id']}",
                                       {"state": "ABORTED", "reason": "twice"})
        assert status == 400 and body["errorInformation"]["errorCode"] == "3100"

        # ------------------------------------------------------------ settlement 2, with transfers flowing
        status, second = await scheme.v2("POST", "/settlements", {
            "settlementModel": "DEFERREDNETUSD", "reason": "again", "settlementWindows": [{"id": 1}, {"id": 2}]})
        assert status == 200 and second["id"] != first["id"], second
        flow_done = asyncio.Event()

        async def flow() -> None:
            rng = random.Random(7)
            try:
                for _ in range(24):
                    payer, payee = rng.sample([A, B, C], 2)
                    await scheme.transfer(payer, payee, str(rng.randint(1, 9)), "USD")
            finally:
                flow_done.set()

        flowing = asyncio.get_running_loop().create_task(flow())
        for state in ("PS_TRANSFERS_RECORDED", "PS_TRANSFERS_RESERVED", "PS_TRANSFERS_COMMITTED"):
            answer = await acknowledge(scheme, second, state)
            assert answer["state"] == state, answer
        # Settled accounts one by one: SETTLING until the last.
        participants = second["participants"]
        for index, participant in enumerate(participants):
            status, answer = await scheme.v2("PUT", f"/settlements/{second['id']}/participants/{participant['id']}",
                                             {"accounts": [{"id": a["id"], "state": "SETTLED", "reason": "paid"}
                                                           for a in participant["accounts"]]})
            assert status == 200, answer
            assert answer["state"] == ("SETTLED" if index == len(participants) - 1 else "SETTLING"), answer
        await flowing
        assert flow_done.is_set()
        # autoPositionReset: the windows' nets are gone from the positions; only window 3's traffic is left.
        scheme.move((A, "USD", "POSITION"), Decimal(-70))
        scheme.move((B, "USD", "POSITION"), Decimal(70))
        await scheme.check()
        status, window = await scheme.v2("GET", "/settlementWindows/1")
        assert window["state"] == "CLOSED", window  # the fee and XTS content are not settled yet
        content = {(c["currencyId"], c["ledgerAccountType"]): c for c in window["content"]}
        assert content[("USD", "POSITION")]["state"] == "SETTLED"
        assert content[("USD", "POSITION")]["settlementId"] == second["id"]

        # ------------------------------------------------------------ interchange fees: no liquidity check
        status, fees = await scheme.v2("POST", "/settlements", {
            "settlementModel": "INTERCHANGEFEEUSD", "reason": "fees", "settlementWindows": [{"id": 1}, {"id": 2}]})
        assert status == 200, fees
        fee_nets = {a["id"]: Decimal(str(a["netSettlementAmount"]["amount"]))
                    for p in fees["participants"] for a in p["accounts"]}
        assert fee_nets == {fee_accounts[A]: Decimal("0.7"), fee_accounts[B]: Decimal("-0.7"),
                            fee_accounts[C]: Decimal(0)}, fee_nets
        for state in ("PS_TRANSFERS_RECORDED", "PS_TRANSFERS_RESERVED", "PS_TRANSFERS_COMMITTED", "SETTLED"):
            answer = await acknowledge(scheme, fees, state)
            assert answer["state"] == state, answer
        scheme.move((A, "USD", "INTERCHANGE_FEE"), Decimal("-0.7"))
        scheme.move((B, "USD", "INTERCHANGE_FEE"), Decimal("0.7"))
        await scheme.check()

        # ------------------------------------------------------------ XTS: settled without position reset
        status, xts = await scheme.v2("POST", "/settlements", {
            "settlementModel": "DEFERREDNOREST", "reason": "xts", "settlementWindows": [{"id": 1}]})
        assert status == 200, xts
        for state in ("PS_TRANSFERS_RECORDED", "PS_TRANSFERS_RESERVED", "PS_TRANSFERS_COMMITTED", "SETTLED"):
            answer = await acknowledge(scheme, xts, state)
            assert answer["state"] == state, answer
        await scheme.check()  # XTS positions unchanged: autoPositionReset is false
        for window_id in (1, 2):
            status, window = await scheme.v2("GET", f"/settlementWindows/{window_id}")
            assert window["state"] == "SETTLED", window

        # ------------------------------------------------------------ queries and reports
        status, found = await scheme.v2("GET", "/settlements?settlementWindowId=1&state=SETTLED")
        assert status == 200 and {s["id"] for s in found} == {second["id"], fees["id"], xts["id"]}, found
        status, found = await scheme.v2("GET", f"/settlementWindows?participantId={participant_a['id']}")
        assert status == 200 and [w["id"] for w in found] == [1, 2], found
        status, found = await scheme.v2("GET", f"/settlements?accountId={positions[B]}")
        assert {s["id"] for s in found} == {first["id"], second["id"]}
        status, drill = await scheme.v2(
            "GET", f"/settlements/{second['id']}/participants/{participant_a['id']}/accounts/{positions[A]}")
        assert status == 200 and drill["participants"][0]["accounts"][0]["state"] == "SETTLED", drill
        status, report = await scheme.v2("GET", "/reports/settlementWindows/1")
        assert status == 200, report
        rows = {(r["participant"], r["currency"]): r for r in report["participants"]}
        assert rows[(A, "USD")]["sent"] == "100" and rows[(A, "USD")]["received"] == "50"
        assert rows[(A, "USD")]["multilateralNet"] == "50" and rows[(A, "USD")]["feesPaid"] == "1"
        assert rows[(B, "USD")]["feeNet"] == "-0.7" and rows[(B, "EUR")]["received"] == "10"
        assert (C, "EUR") not in rows
        assert {"currency": "USD", "ledgerAccountType": "POSITION", "partyA": A, "partyB": B, "net": "100"} in \
            report["bilateral"]
        raw = await asyncio.to_thread(_get_text, hub.hub.admin_port, "/v2/reports/settlements/"
                                      f"{second['id']}?format=csv")
        table = list(csv.DictReader(io.StringIO(raw)))
        by_name = {r["participant"]: r for r in table}
        assert by_name[A]["multilateralNet"] == "70" and by_name[B]["multilateralNet"] == "-70"
        assert by_name[A]["settlementState"] == "SETTLED"
        raw = await asyncio.to_thread(_get_text, hub.hub.admin_port,
                                      "/v2/reports/settlementWindows/1?format=csv&view=bilateral")
        assert raw.splitlines()[0] == "currency,ledgerAccountType,partyA,partyB,net"
        await scheme.check()


def _get_text(port: int, path: str) -> str:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read().decode()
        assert response.status == 200, body
        assert response.getheader("Content-Type").startswith("text/csv")
        return body
    finally:
        connection.close()
