"""CI load smoke: a few seconds of the benchmark's own driver through a real hub (real Ray, real Postgres,
the payee simulator in its own process). It asserts correctness under concurrency, never a timing: no
errors of any kind, conservation, and every position exactly what the committed transfers add up to.
The benchmark's null forwarder is checked the same way: every prepare and fulfil relayed, none lost."""

from __future__ import annotations

import asyncio
import json

import pytest
import uvloop

from cluster.testing import assert_conserved, onboard, running_hub
from loadtests.bench import CURRENCY, register_endpoints, settled_positions, transfer_endpoints
from loadtests.driver import PayerDriver
from loadtests.null_forwarder import ForwarderProcesses, free_port
from loadtests.sim_process import PayeeProcess
from sim.ilp import new_secret

DURATION_S = 3.0
USERS = 8


async def _scenario(database_url: str, shard_host: str, ingress_workers: int) -> None:
    # payee0 is paid by two payers, on whichever shards they landed: credits from more than one shard.
    pairs = [("payer0", "payee0"), ("payer1", "payee1"), ("payer2", "payee0")]
    secrets = {"payee0": new_secret(), "payee1": new_secret()}
    async with running_hub(database_url, shards=2, ingress_workers=ingress_workers, shard_host=shard_host) as hub:
        url = f"http://127.0.0.1:{hub.fspiop_port}"
        payees = await asyncio.to_thread(PayeeProcess.start, url, secrets)
        driver = PayerDriver(url, secrets, pairs, CURRENCY, "1.25", callback_timeout_s=20.0)
        try:
            await driver.start()
            names = sorted({name for pair in pairs for name in pair})
            await onboard(hub, names, CURRENCY, ndc="1000000", deposit="1000000")
            table = {payee: transfer_endpoints(payees.base_url(payee)) for payee in secrets}
            table.update({payer: driver.endpoints(payer) for payer, _ in pairs})
            await register_endpoints(hub, table)

            result = await driver.run(DURATION_S, users=USERS)

            summary = result.summary()
            assert result.errors == 0, summary["errors_by_kind"]
            assert result.transfers > 0
            assert sum(result.committed_by_pair.values()) == result.transfers
            await assert_conserved(hub)
            assert await settled_positions(hub, result.committed_by_pair, "1.25") == {}
            await assert_conserved(hub)
        finally:
            await driver.stop()
            counters = await asyncio.to_thread(payees.stop)
    assert counters["callback_failures"] == 0, counters
    assert counters["prepares"] == counters["answered"] == result.transfers, counters


# Both homes of the shards: in the ingress worker (the default; with two workers, half the requests reach
# the worker that does not host the payer's shard and go through the other), and shard actors of their own.
@pytest.mark.parametrize(("shard_host", "ingress_workers"), [("ingress", 1), ("ingress", 2), ("actors", 1)])
def test_transfers_under_load_lose_nothing(database_url, shard_host, ingress_workers):
    uvloop.run(_scenario(database_url, shard_host, ingress_workers))


async def _null_scenario(endpoints_file) -> None:
    port = free_port("127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    pairs = [("payer0", "payee0"), ("payer1", "payee0")]
    secrets = {"payee0": new_secret()}
    payees = await asyncio.to_thread(PayeeProcess.start, url, secrets)
    driver = PayerDriver(url, secrets, pairs, CURRENCY, "1", callback_timeout_s=20.0)
    forwarder = None
    try:
        await driver.start()
        table = {"payee0": transfer_endpoints(payees.base_url("payee0"))}
        table.update({payer: driver.endpoints(payer) for payer, _ in pairs})
        endpoints_file.write_text(json.dumps(table))
        # Two processes on one port, as the benchmark runs it beside a hub with two ingress workers.
        forwarder = await asyncio.to_thread(ForwarderProcesses, endpoints_file, workers=2, port=port)
        result = await driver.run(1.5, users=4)
        await asyncio.sleep(0.5)  # the forwarder counts a forward once the payer's 200 is back
    finally:
        counters = await asyncio.to_thread(forwarder.stop) if forwarder is not None else {}
        await driver.stop()
        payee_counters = await asyncio.to_thread(payees.stop)
    assert result.errors == 0, result.summary()["errors_by_kind"]
    assert result.transfers > 0
    # Each transfer: the prepare to the payee and the fulfil to the payer, nothing lost or refused.
    assert counters == {"forwarded": 2 * result.transfers, "failed": 0, "dropped": 0}
    assert payee_counters["prepares"] == payee_counters["answered"] == result.transfers


def test_null_forwarder_relays_every_transfer(tmp_path):
    uvloop.run(_null_scenario(tmp_path / "endpoints.json"))
