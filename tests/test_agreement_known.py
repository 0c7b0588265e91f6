"""RAYLOOP_TRANSFER_QUOTE_CHECK=known on a real hub: the quote must exist (and carry the prepare's ILP
packet), but its expiry and terms are not checked. ``valid`` is covered in test_agreement.py, ``off``
(the default) by every transfer test."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from cluster.testing import assert_conserved, module_hub
from tests.test_agreement import CURRENCY, agreed_quote, error_code, pair, run, simulator, to


@pytest.fixture(scope="module")
def hub(module_database_url):
    with module_hub(module_database_url, hub_accounts=(CURRENCY,), shards=2, ingress_workers=1,
                    transfer_quote_check="known") as thread:
        yield thread


@pytest.fixture(autouse=True)
def conserved(hub):
    yield
    hub.call(assert_conserved(hub.hub))


def test_known_mode_needs_the_quote_and_its_packet_only(hub):
    async def scenario():
        async with simulator(hub) as sim:
            payer, payee = pair(hub, sim)
            # No quote with this condition: 3205, nothing reserved.
            _, _, unquoted = await sim.send_prepare(payer, payee, "2", CURRENCY)
            refused = await sim.wait_for(payer, to(f"/transfers/{unquoted['transferId']}/error"), 10)
            assert error_code(refused) == "3205"
            # The quote's condition with another ILP packet: 3100.
            _, quoted, _ = await agreed_quote(sim, payer, payee, "2")
            other_packet = sim.prepare_body(payer, payee, "2", CURRENCY)["ilpPacket"]
            tampered = {**quoted, "transferId": str(uuid.uuid4()), "ilpPacket": other_packet}
            await sim.send("POST", "/transfers", tampered, source=payer, destination=payee)
            refused = await sim.wait_for(payer, to(f"/transfers/{tampered['transferId']}/error"), 10)
            assert error_code(refused) == "3100"
            # An expired quote is still known: the transfer paying it commits.
            _, short, _ = await agreed_quote(sim, payer, payee, "2", expiration_ms=200)
            await asyncio.sleep(0.4)
            await sim.send("POST", "/transfers", short, source=payer, destination=payee)
            committed = await sim.wait_for(payer, to(f"/transfers/{short['transferId']}"), 10)
            assert committed.body["transferState"] == "COMMITTED"
            status, body = hub.admin("GET", f"/participants/{payer}/positions?currency={CURRENCY}")
            assert str(body["value"]) == "2"

    run(scenario())
