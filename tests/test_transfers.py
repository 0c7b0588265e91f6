"""FSPIOP transfers end to end: real HTTP, real Ray actors, real Postgres, the DFSP simulator.

One hub serves the whole module (it runs on its own thread); every test onboards its own DFSPs,
so tests do not see each other's positions. After every test the money is conserved.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid

import pytest
import ray
import uvloop

from cluster.testing import HubThread, assert_conserved, module_hub
from sim.simulator import Behaviour, Simulator

CURRENCY = "XTS"
_names = itertools.count()


@pytest.fixture(scope="module")
def hub(module_database_url):
    with module_hub(module_database_url, hub_accounts=(CURRENCY,), shards=2, ingress_workers=1) as thread:
        yield thread


@pytest.fixture(autouse=True)
def conserved(hub):
    yield
    hub.call(assert_conserved(hub.hub))


def onboard(
    hub: HubThread,
    sim: Simulator,
    name: str,
    *,
    ndc: str = "1000",
    deposit: str = "1000",
    behaviour: Behaviour | None = None,
    endpoints: dict | None = None,
) -> None:
    sim.add_dfsp(name, behaviour)
    status, body = hub.admin("POST", "/participants", {"name": name, "currency": CURRENCY})
    assert status == 201, body
    status, body = hub.admin(
        "POST",
        f"/participants/{name}/initialPositionAndLimits",
        {"currency": CURRENCY, "limit": {"type": "NET_DEBIT_CAP", "value": ndc}, "initialPosition": 0},
    )
    assert status == 201, body
    for endpoint_type, value in (endpoints or sim.endpoints(name)).items():
        status, body = hub.admin("POST", f"/participants/{name}/endpoints", {"type": endpoint_type, "value": value})
        assert status == 201, body
    if deposit != "0":
        status, accounts = hub.admin("GET", f"/participants/{name}/accounts")
        settlement = next(a for a in accounts if a["ledgerAccountType"] == "SETTLEMENT")
        status, body = hub.admin(
            "POST",
            f"/participants/{name}/accounts/{settlement['id']}",
            {
                "transferId": str(uuid.uuid4()),
                "externalReference": "test",
                "action": "recordFundsIn",
                "reason": "test deposit",
                "amount": {"amount": deposit, "currency": CURRENCY},
            },
        )
        assert status == 202, body


def position(hub: HubThread, name: str) -> str:
    status, body = hub.admin("GET", f"/participants/{name}/positions?currency={CURRENCY}")
    assert status == 200, body
    return str(body["value"])  # a JSON number, parsed exactly (Decimal), never float


def pair(prefix: str = "fsp") -> tuple[str, str]:
    n = next(_names)
    return f"{prefix}{n}payer", f"{prefix}{n}payee"


def run(coroutine):
    return uvloop.run(coroutine)


@contextlib.asynccontextmanager
async def simulator(hub: HubThread):
    """A simulator on this test's loop, pointed at the module's hub, stopped whatever happens."""
    sim = Simulator(hub.fspiop_url)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


def transfer_callbacks(sim: Simulator, dfsp: str, transfer_id: str):
    return [r for r in sim.received(dfsp) if transfer_id in r.path]


async def wait_callback(
    sim: Simulator,
    dfsp: str,
    transfer_id: str,
    *,
    method: str = "PUT",
    error: bool | None = None,
    timeout_s: float = 10.0,
):
    def matches(received) -> bool:
        if received.method != method or transfer_id not in received.path:
            return False
        return error is None or received.path.endswith("/error") == error

    return await sim.wait_for(dfsp, matches, timeout_s)


# ---------------------------------------------------------------------------------------------- golden path


def test_golden_path_commits_and_both_sides_hear(hub):
    async def scenario():
        payer, payee = pair()
        async with simulator(hub) as sim:
            onboard(hub, sim, payer)
            onboard(hub, sim, payee)
            status, _, prepare = await sim.send_prepare(payer, payee, "12.34", CURRENCY)
            assert status == 202
            transfer_id = prepare["transferId"]
            forwarded = await sim.wait_for(payee, lambda r: r.method == "POST" and r.path == "/transfers", 10)
            assert forwarded.body == prepare
            assert forwarded.headers["fspiop-source"] == payer and forwarded.headers["fspiop-destination"] == payee
            committed = await wait_callback(sim, payer, transfer_id, error=False)
            assert committed.body["transferState"] == "COMMITTED"
            assert committed.headers["fspiop-source"] == payee and committed.headers["fspiop-destination"] == payer
            assert "accept" not in committed.headers
            assert committed.headers["content-type"] == "application/vnd.interoperability.transfers+json;version=1.1"
            await asyncio.sleep(0.2)
            assert position(hub, payer) == "12.34"
            assert position(hub, payee) == "-12.34"
            # GET by the payer and by the payee: the state from the hub. A third DFSP may not ask.
            for asker in (payer, payee):
                status, _ = await sim.send("GET", f"/transfers/{transfer_id}", source=asker)
                assert status == 202
                answer = await sim.wait_for(
                    asker,
                    lambda r, a=asker: (
                        r.method == "PUT" and r.headers.get("fspiop-source") == "Hub" and transfer_id in r.path
                    ),
                    10,
                )
                assert answer.body["transferState"] == "COMMITTED"
                assert answer.body["fulfilment"] == committed.body["fulfilment"]
                assert answer.headers["fspiop-uri"] == f"/transfers/{transfer_id}"
                assert answer.headers["fspiop-http-method"] == "PUT"
            stranger, _ = pair("stranger")
            onboard(hub, sim, stranger)
            await sim.send("GET", f"/transfers/{transfer_id}", source=stranger)
            refused = await wait_callback(sim, stranger, transfer_id, error=True)
            assert refused.body["errorInformation"]["errorCode"] == "3000"
            await sim.send("GET", f"/transfers/{uuid.uuid4()}", source=payer)
            unknown = await sim.wait_for(payer, lambda r: r.path.endswith("/error") and "3208" in str(r.body), 10)
            assert unknown.body["errorInformation"]["errorCode"] == "3208"

    run(scenario())


def test_reserved_fulfil_gets_patch_and_payer_gets_committed(hub):
    async def scenario():
        payer, payee = pair()
        async with simulator(hub) as sim:
            onboard(hub, sim, payer)
            onboard(hub, sim, payee, behaviour=Behaviour(mode="reserve"))
            _, _, prepare = await sim.send_prepare(payer, payee, "5", CURRENCY)
            transfer_id = prepare["transferId"]
            patch = await wait_callback(sim, payee, transfer_id, method="PATCH")
            assert patch.body["transferState"] == "COMMITTED" and "completedTimestamp" in patch.body
            committed = await wait_callback(sim, payer, transfer_id, error=False)
            assert committed.body["transferState"] == "COMMITTED"
            assert committed.headers["fspiop-source"] == "Hub"
            assert committed.body["fulfilment"]
            await asyncio.sleep(0.2)
            assert position(hub, payee) == "-5"

    run(scenario())


# ---------------------------------------------------------------------------------------------- negative paths


def test_payee_rejection_releases_and_forwards_error(hub):
    async def scenario():
        payer, payee = pair()
        async with simulator(hub) as sim:
            onboard(hub, sim, payer)
            onboard(hub, sim, payee, behaviour=Behaviour(mode="reject", error_code="5104"))
            _, _, prepare = await sim.send_prepare(payer, payee, "7", CURRENCY)
            error = await wait_callback(sim, payer, prepare["transferId"], error=True)
            assert error.body["errorInformation"]["errorCode"] == "5104"
            assert error.headers["fspiop-source"] == payee
            await asyncio.sleep(0.2)
            assert position(hub, payer) == "0"

    run(scenario())


def test_invalid_fulfilment_aborts_and_tells_both(hub):
    async def scenario():
        payer, payee = pair()
        async with simulator(hub) as sim:
            onboard(hub, sim, payer)
            onboard(hub, sim, payee, behaviour=Behaviour(mode="invalid_fulfilment"))
            _, _, prepare = await sim.send_prepare(payer, payee, "3", CURRENCY)
            transfer_id = prepare["transferId"]
            to_payer = await wait_callback(sim, payer, transfer_id, error=True)
            to_payee = await wait_callback(sim, payee, transfer_id, error=True)
            for callback in (to_payer, to_payee):
                assert callback.body["errorInformation"]["errorCode"] == "3100"
                assert callback.headers["fspiop-source"] == "Hub"
            await asyncio.sleep(0.2)
            assert position(hub, payer) == "0"
            await sim.send("GET", f"/transfers/{transfer_id}", source=payer)
            state = await sim.wait_for(payer, lambda r: r.method == "PUT" and r.path == f"/transfers/{transfer_id}", 10)
            assert state.body["transferState"] == "ABORTED"
            assert (
                state.body["extensionList"]["extension"][0]["value"]
                == "3100: Generic validation error - invalid fulfilment"
            )

    run(scenario())


def test_invalid_fulfilment_in_reserved_mode_patches_aborted(hub):
    async def scenario():
        payer, payee = pair()
        async with simulator(hub) as sim:
            onboard(hub, sim, payer)
            onboard(hub, sim, payee, behaviour=Behaviour(mode="reserve"))
            prepare = sim.prepare_body(payer, payee, "2", CURRENCY)
            prepare["condition"] = "GRzLaTP7DJ9t4P-a_BA0WA9wzzlsugf00-Tn6kESAfM"  # not the payee's condition
            await sim.send("POST", "/transfers", prepare, source=payer, destination=payee)
            patch = await wait_callback(sim, payee, prepare["transferId"], method="PATCH")
            assert patch.body["transferState"] == "ABORTED"
            error = await wait_callback(sim, payer, prepare["transferId"], error=True)
            assert error.body["errorInformation"]["errorCode"] == "3100"

    run(scenario())


def test_no_answer_until_expiry_aborts_with_3303_to_both(hub):
    async def scenario():
        payer, payee = pair()
        async with simulator(hub) as sim:
            onboard(hub, sim, payer)
            onboard(hub, sim, payee, behaviour=Behaviour(mode="ignore"))
            _, _, prepare = await sim.send_prepare(payer, payee, "4", CURRENCY, expiration_ms=1_500)
            transfer_id = prepare["transferId"]
            await sim.wait_for(payee, lambda r: r.method == "POST", 10)
            await asyncio.sleep(0.3)
            assert position(hub, payer) == "4"
            for dfsp in (payer, payee):
                expired = await wait_callback(sim, dfsp, transfer_id, error=True)
                assert expired.body["errorInformation"]["errorCode"] == "3303"
                assert expired.headers["fspiop-source"] == "Hub"
            assert position(hub, payer) == "0"

    run(scenario())


def test_fulfil_after_expiry_is_refused_with_3303(hub):
    async def scenario():
        payer, payee = pair()
        async with simulator(hub) as sim:
            onboard(hub, sim, payer)
            onboard(hub, sim, payee, behaviour=Behaviour(mode="commit", delay_ms=1_500))
            _, _, prepare = await sim.send_prepare(payer, payee, "4", CURRENCY, expiration_ms=1_000)
            transfer_id = prepare["transferId"]
            to_payer = await wait_callback(sim, payer, transfer_id, error=True)
            assert to_payer.body["errorInformation"]["errorCode"] == "3303"
            await wait_callback(sim, payee, transfer_id, error=True)
            await asyncio.sleep(2.0)  # the late fulfil arrives and must change nothing
            assert not [r for r in transfer_callbacks(sim, payer, transfer_id) if not r.path.endswith("/error")]
            assert position(hub, payer) == "0" and position(hub, payee) == "0"

    run(scenario())


@pytest.mark.parametrize(
    ("ndc", "deposit", "amount", "code"),
    [("100", "1000", "100.01", "4200"), ("1000", "50", "50.01", "4001")],
    ids=["net-debit-cap", "liquidity"],
)
def test_limits_refuse_with_4200_and_4001(hub, ndc, deposit, amount, code):
    async def scenario():
        payer, payee = pair()
        async with simulator(hub) as sim:
            onboard(hub, sim, payer, ndc=ndc, deposit=deposit)
            onboard(hub, sim, payee)
            _, _, prepare = await sim.send_prepare(payer, payee, amount, CURRENCY)
            error = await wait_callback(sim, payer, prepare["transferId"], error=True)
            assert error.body["errorInformation"]["errorCode"] == code
            assert error.headers["fspiop-source"] == "Hub"
            assert not sim.received(payee, method="POST")
            assert position(hub, payer) == "0"
            # Exactly the headroom passes.
            exact = deposit if code == "4001" else ndc
            _, _, prepare = await sim.send_prepare(payer, payee, exact, CURRENCY)
            committed = await wait_callback(sim, payer, prepare["transferId"], error=False)
            assert committed.body["transferState"] == "COMMITTED"

    run(scenario())


def test_validation_failures_answer_3100(hub):
    async def scenario():
        payer, payee = pair()
        inactive, _ = pair("inactive")
        async with simulator(hub) as sim:
            onboard(hub, sim, payer)
            onboard(hub, sim, payee)
            onboard(hub, sim, inactive)
            status, _ = hub.admin("PUT", f"/participants/{inactive}", {"isActive": False})
            assert status == 200
            cases = {
                "unknown payee": dict(sim.prepare_body(payer, payee, "1", CURRENCY), payeeFsp="nosuchfsp"),
                "inactive payee": sim.prepare_body(payer, inactive, "1", CURRENCY),
                "payer is payee": sim.prepare_body(payer, payer, "1", CURRENCY),
                "expired": sim.prepare_body(payer, payee, "1", CURRENCY, expiration_ms=-1_000),
            }
            for label, body in cases.items():
                status, _ = await sim.send("POST", "/transfers", body, source=payer, destination=body["payeeFsp"])
                assert status == 202, label
                error = await wait_callback(sim, payer, body["transferId"], error=True)
                assert error.body["errorInformation"]["errorCode"] == "3100", label
            # FSPIOP-Source is not the payer: the sender hears 3100.
            body = sim.prepare_body(payer, payee, "1", CURRENCY)
            await sim.send("POST", "/transfers", body, source=payee, destination=payer)
            error = await wait_callback(sim, payee, body["transferId"], error=True)
            assert error.body["errorInformation"]["errorCode"] == "3100"
            # An inactive payer is refused by its shard.
            body = sim.prepare_body(inactive, payee, "1", CURRENCY)
            await sim.send("POST", "/transfers", body, source=inactive, destination=payee)
            error = await wait_callback(sim, inactive, body["transferId"], error=True)
            assert error.body["errorInformation"]["errorCode"] == "3100"
            assert position(hub, payer) == "0"

    run(scenario())


# ---------------------------------------------------------------------------------------------- duplicates


def test_duplicate_prepares_and_fulfils(hub):
    async def scenario():
        payer, payee = pair()
        async with simulator(hub) as sim:
            onboard(hub, sim, payer)
            onboard(hub, sim, payee)
            _, _, prepare = await sim.send_prepare(payer, payee, "1", CURRENCY)
            transfer_id = prepare["transferId"]
            committed = await wait_callback(sim, payer, transfer_id, error=False)
            # Same prepare again (keys in another order): the finished state is sent again.
            reordered = dict(reversed(list(prepare.items())))
            await sim.send("POST", "/transfers", reordered, source=payer, destination=payee)
            resent = await sim.wait_for(
                payer, lambda r: r.method == "PUT" and transfer_id in r.path and r.headers["fspiop-source"] == "Hub", 10
            )
            assert resent.body["transferState"] == "COMMITTED"
            # Same id, other content: 3106.
            modified = dict(prepare, amount={"amount": "2", "currency": CURRENCY})
            await sim.send("POST", "/transfers", modified, source=payer, destination=payee)
            error = await wait_callback(sim, payer, transfer_id, error=True)
            assert error.body["errorInformation"]["errorCode"] == "3106"
            # The payee's fulfil again: resent to the payee; with another fulfilment: 3106.
            fulfil = {
                "transferState": "COMMITTED",
                "fulfilment": committed.body["fulfilment"],
                "completedTimestamp": committed.body["completedTimestamp"],
            }
            await sim.send("PUT", f"/transfers/{transfer_id}", fulfil, source=payee, destination=payer)
            again = await sim.wait_for(payee, lambda r: r.method == "PUT" and r.path == f"/transfers/{transfer_id}", 10)
            assert again.body["transferState"] == "COMMITTED"
            await sim.send(
                "PUT", f"/transfers/{transfer_id}", dict(fulfil, fulfilment="A" * 43), source=payee, destination=payer
            )
            error = await wait_callback(sim, payee, transfer_id, error=True)
            assert error.body["errorInformation"]["errorCode"] == "3106"
            await asyncio.sleep(0.2)
            assert position(hub, payer) == "1" and position(hub, payee) == "-1"

    run(scenario())


# ---------------------------------------------------------------------------------------------- synchronous errors


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"accept": "application/vnd.interoperability.transfers+json;version=2.0"}, 406, "3001"),
        ({"content-type": "application/vnd.interoperability.transfers+json;version=3.0"}, 406, "3001"),
        ({"date": None}, 400, "3102"),
        ({"date": "yesterday"}, 400, "3101"),
        ({"fspiop-source": None}, 400, "3102"),
        ({"content-type": "application/vnd.interoperability.quotes+json;version=1.1"}, 400, "3101"),
    ],
)
def test_header_and_version_errors_are_synchronous(hub, change, status, code):
    async def scenario():
        payer, payee = pair()
        async with simulator(hub) as sim:
            sim.add_dfsp(payer)
            sim.add_dfsp(payee)
            body = sim.prepare_body(payer, payee, "1", CURRENCY)
            got_status, got = await sim.send(
                "POST", "/transfers", body, source=payer, destination=payee, headers=change
            )
            assert (got_status, got["errorInformation"]["errorCode"]) == (status, code), got
            if code == "3001":
                assert got["errorInformation"]["extensionList"]["extension"]

    run(scenario())


def test_schema_errors_are_synchronous(hub):
    async def scenario():
        payer, payee = pair()
        async with simulator(hub) as sim:
            sim.add_dfsp(payer)
            sim.add_dfsp(payee)
            good = sim.prepare_body(payer, payee, "1", CURRENCY)
            cases = [
                (dict(good, amount={"amount": "5.ABC", "currency": CURRENCY}), "3101"),
                ({k: v for k, v in good.items() if k != "transferId"}, "3102"),
                (dict(good, condition="short"), "3101"),
                (b"{not json", "3101"),
            ]
            for body, code in cases:
                status, got = await sim.send("POST", "/transfers", body, source=payer, destination=payee)
                assert (status, got["errorInformation"]["errorCode"]) == (400, code), got
            status, got = await sim.send("GET", "/nothing/here", source=payer)
            assert (status, got["errorInformation"]["errorCode"]) == (404, "3002")

    run(scenario())


# ---------------------------------------------------------------------------------------------- isolation


def test_dead_payee_does_not_stall_others(hub):
    async def scenario():
        payer, payee = pair()
        _, dead = pair("dead")
        async with simulator(hub) as sim:
            onboard(hub, sim, payer, ndc="100000", deposit="100000")
            onboard(hub, sim, payee)
            # A payee whose endpoints point at a closed port.
            onboard(
                hub,
                sim,
                dead,
                endpoints={
                    "FSPIOP_CALLBACK_URL_TRANSFER_POST": "http://127.0.0.1:9/transfers",
                    "FSPIOP_CALLBACK_URL_TRANSFER_PUT": "http://127.0.0.1:9/transfers/{{transferId}}",
                    "FSPIOP_CALLBACK_URL_TRANSFER_ERROR": "http://127.0.0.1:9/transfers/{{transferId}}/error",
                },
            )
            for _ in range(20):
                await sim.send_prepare(payer, dead, "1", CURRENCY, expiration_ms=60_000)
            started = asyncio.get_running_loop().time()
            prepares = [(await sim.send_prepare(payer, payee, "1", CURRENCY))[2] for _ in range(20)]
            for prepare in prepares:
                callback = await wait_callback(sim, payer, prepare["transferId"], error=False, timeout_s=10)
                assert callback.body["transferState"] == "COMMITTED"
            assert asyncio.get_running_loop().time() - started < 8
            await asyncio.sleep(0.2)
            assert position(hub, payer) == "40"  # 20 committed, 20 still reserved towards the dead payee

    run(scenario())


# ---------------------------------------------------------------------------------------------- versions


def test_version_1_0_is_negotiated_and_used_for_callbacks(hub):
    async def scenario():
        payer, payee = pair()
        async with simulator(hub) as sim:
            onboard(hub, sim, payer)
            onboard(hub, sim, payee, behaviour=Behaviour(mode="commit", version="1.0"))
            _, _, prepare = await sim.send_prepare(payer, payee, "1", CURRENCY, version="1.0")
            forwarded = await sim.wait_for(payee, lambda r: r.method == "POST", 10)
            assert forwarded.headers["content-type"].endswith("version=1.0")
            committed = await wait_callback(sim, payer, prepare["transferId"], error=False)
            assert committed.headers["content-type"].endswith("version=1.0")
            # A refusal the hub originates speaks the payer's version too.
            body = sim.prepare_body(payer, payee, "100000", CURRENCY)
            await sim.send("POST", "/transfers", body, source=payer, destination=payee, version="1.0")
            error = await wait_callback(sim, payer, body["transferId"], error=True)
            assert error.headers["content-type"] == "application/vnd.interoperability.transfers+json;version=1.0"

    run(scenario())


# ---------------------------------------------------------------------------------------------- failures


def test_payer_shard_killed_mid_stream_loses_nothing(hub):
    """SIGKILL the payer's shard while 60 transfers are in flight: each ends COMMITTED or 3303, once."""
    import os
    import signal

    async def scenario():
        payer, payee = pair("kill")
        async with simulator(hub) as sim:
            onboard(hub, sim, payer, ndc="100000", deposit="100000")
            onboard(hub, sim, payee)
            shard_id = hub.hub.handles and next(
                s for s in hub.hub.handles
                if payer in [p["name"] for p in hub.call(hub.hub.ledger.describe(s))["participants"]])
            victim = hub.call(_ping(hub.hub.handles[shard_id]))["pid"]
            prepares = []

            async def send_some(count: int) -> None:
                for _ in range(count):
                    _, _, prepare = await sim.send_prepare(payer, payee, "1", CURRENCY, expiration_ms=4_000)
                    prepares.append(prepare["transferId"])

            sender = asyncio.get_running_loop().create_task(send_some(60))
            await asyncio.sleep(0.15)
            os.kill(victim, signal.SIGKILL)
            await sender
            outcomes = {}
            for transfer_id in prepares:
                try:
                    callback = await wait_callback(sim, payer, transfer_id, timeout_s=20)
                except TimeoutError:
                    rows = hub.call(_transfer_rows(hub.hub, transfer_id))
                    seen = [(r.dfsp, r.method, r.path) for r in sim.received(None) if transfer_id in r.path
                            or r.body.get("transferId") == transfer_id]
                    raise AssertionError(f"{transfer_id}: no final callback; db={rows} seen={seen}") from None
                outcomes[transfer_id] = "3303" if callback.path.endswith("/error") else callback.body["transferState"]
                if callback.path.endswith("/error"):
                    assert callback.body["errorInformation"]["errorCode"] == "3303"
            await asyncio.sleep(1.0)
            committed = sum(1 for state in outcomes.values() if state == "COMMITTED")
            assert committed > 0
            # Exactly the committed transfers moved money: nothing lost, nothing applied twice.
            assert position(hub, payer) == str(committed)
            assert position(hub, payee) == str(-committed)
            assert hub.call(_ping(hub.hub.handles[shard_id]))["pid"] != victim

    run(scenario())


async def _transfer_rows(hub, transfer_id):
    import asyncpg

    connection = await asyncpg.connect(hub.database_url)
    try:
        transfer = await connection.fetch("SELECT state, error_code FROM transfer WHERE transfer_id = $1", transfer_id)
        journal = await connection.fetch("SELECT shard_id, seq, kind FROM journal WHERE transfer_id = $1", transfer_id)
        return [dict(r) for r in transfer], [dict(r) for r in journal]
    finally:
        await connection.close()


async def _ping(handle):
    for _ in range(100):
        try:
            return await handle.ping.remote()
        except ray.exceptions.RayActorError:
            await asyncio.sleep(0.1)
    raise AssertionError("shard did not come back")


def test_nul_in_a_body_is_refused_synchronously(hub):
    """Postgres cannot store NUL: refused at the door, so no DFSP can make a shard's flush fail."""
    async def scenario():
        payer, payee = pair()
        async with simulator(hub) as sim:
            onboard(hub, sim, payer)
            onboard(hub, sim, payee, behaviour=Behaviour(mode="ignore"))
            _, _, prepare = await sim.send_prepare(payer, payee, "1", CURRENCY)
            await sim.wait_for(payee, lambda r: r.method == "POST", 10)
            raw = (b'{"errorInformation":{"errorCode":"5104","errorDescription":"bad\\u0000byte"}}')
            status, body = await sim.send("PUT", f"/transfers/{prepare['transferId']}/error", raw, source=payee,
                                          destination=payer)
            assert (status, body["errorInformation"]["errorCode"]) == (400, "3101")
            # The shard is unharmed: a proper rejection still goes through.
            error = {"errorInformation": {"errorCode": "5104", "errorDescription": "rejected"}}
            await sim.send("PUT", f"/transfers/{prepare['transferId']}/error", error, source=payee, destination=payer)
            forwarded = await wait_callback(sim, payer, prepare["transferId"], error=True)
            assert forwarded.body["errorInformation"]["errorCode"] == "5104"

    run(scenario())


def test_a_transfer_id_is_unique_across_payers(hub):
    """A payer reusing another payer's transfer id gets 3106; the first transfer is untouched."""
    async def scenario():
        first_payer, payee = pair()
        other_payer, _ = pair("other")
        async with simulator(hub) as sim:
            for name in (first_payer, payee, other_payer):
                onboard(hub, sim, name)
            _, _, prepare = await sim.send_prepare(first_payer, payee, "2", CURRENCY)
            committed = await wait_callback(sim, first_payer, prepare["transferId"], error=False)
            assert committed.body["transferState"] == "COMMITTED"
            copy = sim.prepare_body(other_payer, payee, "2", CURRENCY, transfer_id=prepare["transferId"])
            await sim.send("POST", "/transfers", copy, source=other_payer, destination=payee)
            error = await wait_callback(sim, other_payer, prepare["transferId"], error=True)
            assert error.body["errorInformation"]["errorCode"] == "3106"
            await asyncio.sleep(0.3)
            assert position(hub, other_payer) == "0"
            assert position(hub, first_payer) == "2" and position(hub, payee) == "-2"

    run(scenario())
