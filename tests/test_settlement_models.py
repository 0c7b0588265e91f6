"""Settlement models and /metrics on the admin API, over real HTTP, on a real hub and real Postgres."""

from __future__ import annotations

import asyncio
import http.client

import asyncpg
import pytest
import ray
import uvloop

from cluster.testing import admin, running_hub, start_local_ray

# The four POST /settlementModels bodies of the TTK's provisioning/hub_setup.json, verbatim, with
# {$environment.cgscurrency} substituted by environment_hub.json's value (INR).
CGS_CURRENCY = "INR"
TTK_MODELS = [
    {"name": "DEFERREDNETXXX", "settlementGranularity": "NET", "settlementInterchange": "MULTILATERAL",
     "settlementDelay": "DEFERRED", "requireLiquidityCheck": False, "ledgerAccountType": "POSITION",
     "autoPositionReset": True, "currency": "XXX", "settlementAccountType": "SETTLEMENT"},
    {"name": "DEFAULTDEFERREDNET", "settlementGranularity": "NET", "settlementInterchange": "MULTILATERAL",
     "settlementDelay": "DEFERRED", "requireLiquidityCheck": False, "ledgerAccountType": "POSITION",
     "autoPositionReset": True, "settlementAccountType": "SETTLEMENT"},
    {"name": "CGS", "settlementGranularity": "GROSS", "settlementInterchange": "BILATERAL",
     "settlementDelay": "IMMEDIATE", "currency": CGS_CURRENCY, "requireLiquidityCheck": False,
     "ledgerAccountType": "POSITION", "autoPositionReset": False, "settlementAccountType": "SETTLEMENT"},
    {"name": "INTERCHANGEFEE", "settlementGranularity": "NET", "settlementInterchange": "MULTILATERAL",
     "settlementDelay": "DEFERRED", "currency": CGS_CURRENCY, "requireLiquidityCheck": False,
     "ledgerAccountType": "INTERCHANGE_FEE", "autoPositionReset": True,
     "settlementAccountType": "INTERCHANGE_FEE_SETTLEMENT"},
]

VALID = {"name": "VALIDMODEL", "settlementGranularity": "NET", "settlementInterchange": "MULTILATERAL",
         "settlementDelay": "DEFERRED", "currency": "XTS", "requireLiquidityCheck": True,
         "ledgerAccountType": "POSITION", "autoPositionReset": True, "settlementAccountType": "SETTLEMENT"}
REQUIRED = ("name", "settlementGranularity", "settlementInterchange", "settlementDelay", "requireLiquidityCheck",
            "ledgerAccountType", "autoPositionReset", "settlementAccountType")


def _changed(**changes) -> dict:
    return {**VALID, **changes}


def _without(key: str) -> dict:
    return {k: v for k, v in VALID.items() if k != key}


# (case, body, HTTP status, errorCode)
INVALID = [
    *[(f"combination {d}/{g}/{i}", _changed(settlementDelay=d, settlementGranularity=g, settlementInterchange=i),
       400, "3000")
      for d, g, i in (("IMMEDIATE", "NET", "BILATERAL"), ("IMMEDIATE", "NET", "MULTILATERAL"),
                      ("IMMEDIATE", "GROSS", "MULTILATERAL"), ("DEFERRED", "GROSS", "MULTILATERAL"))],
    ("bad granularity", _changed(settlementGranularity="NETT"), 400, "3101"),
    ("lowercase interchange", _changed(settlementInterchange="multilateral"), 400, "3101"),
    ("bad delay", _changed(settlementDelay="CONTINUOUS"), 400, "3101"),
    *[(f"missing {key}", _without(key), 400, "3102") for key in REQUIRED],
    ("name too short", _changed(name="A"), 400, "3101"),
    ("name too long", _changed(name="A" * 31), 400, "3101"),
    ("name with underscore", _changed(name="DEFERRED_NET"), 400, "3101"),
    ("name with space", _changed(name="DEFERRED NET"), 400, "3101"),
    ("name not a string", _changed(name=12345), 400, "3101"),
    ("lowercase currency", _changed(currency="xts"), 400, "3101"),
    ("numeric currency", _changed(currency=840), 400, "3101"),
    ("unknown ledger account type", _changed(ledgerAccountType="NO_SUCH_TYPE"), 400, "3003"),
    ("unknown settlement account type", _changed(settlementAccountType="NO_SUCH_TYPE"), 400, "3003"),
    ("string boolean", _changed(requireLiquidityCheck="false"), 400, "3101"),
    ("numeric boolean", _changed(autoPositionReset=1), 400, "3101"),
    ("null boolean", _changed(autoPositionReset=None), 400, "3101"),
    ("body not an object", [VALID], 400, "3101"),
]


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    start_local_ray()
    yield
    ray.shutdown()


async def _model_rows(database_url: str) -> int:
    connection = await asyncpg.connect(database_url)
    try:
        return await connection.fetchval("SELECT count(*) FROM settlement_model")
    finally:
        await connection.close()


def _get_raw(port: int, path: str) -> tuple[int, str, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read().decode()
    finally:
        connection.close()


def _error(body) -> tuple[str, str]:
    info = body["errorInformation"]
    return info["errorCode"], info["errorDescription"]


def test_ttk_models_list_get_deactivate_and_duplicates(database_url):
    async def scenario():
        async with running_hub(database_url, shards=1) as hub:
            status, listed = await admin(hub, "GET", "/settlementModels")
            assert (status, listed) == (200, [])

            for body in TTK_MODELS:
                status, answer = await admin(hub, "POST", "/settlementModels", body)
                assert status == 201, answer
                assert answer is None  # central-ledger answers 201 with no body

            status, listed = await admin(hub, "GET", "/settlementModels")
            assert status == 200
            assert [m["name"] for m in listed] == [m["name"] for m in TTK_MODELS]
            by_name = {m["name"]: m for m in listed}
            assert by_name["DEFAULTDEFERREDNET"]["currency"] is None
            assert by_name["DEFERREDNETXXX"]["currency"] == "XXX"
            ids = [m["settlementModelId"] for m in listed]
            assert len(set(ids)) == 4 and all(isinstance(i, int) for i in ids)

            status, cgs = await admin(hub, "GET", "/settlementModels/CGS")
            assert status == 200
            assert cgs == {
                "settlementModelId": by_name["CGS"]["settlementModelId"], "name": "CGS", "isActive": True,
                "settlementGranularity": "GROSS", "settlementInterchange": "BILATERAL",
                "settlementDelay": "IMMEDIATE", "currency": CGS_CURRENCY, "requireLiquidityCheck": False,
                "ledgerAccountTypeId": "POSITION", "ledgerAccountType": "POSITION",
                "settlementAccountType": "SETTLEMENT", "autoPositionReset": False,
            }
            status, fee = await admin(hub, "GET", "/settlementModels/INTERCHANGEFEE")
            assert status == 200 and fee["ledgerAccountTypeId"] == "INTERCHANGE_FEE"
            assert fee["settlementAccountType"] == "INTERCHANGE_FEE_SETTLEMENT" and fee["autoPositionReset"] is True

            # Deactivate, then reactivate; the answer is the updated model.
            status, body = await admin(hub, "PUT", "/settlementModels/CGS", {"isActive": False})
            assert status == 200 and body == {**cgs, "isActive": False}
            status, body = await admin(hub, "GET", "/settlementModels/CGS")
            assert status == 200 and body["isActive"] is False
            status, body = await admin(hub, "PUT", "/settlementModels/DEFERREDNETXXX", {"isActive": True})
            assert status == 200 and body["isActive"] is True
            for put_body, code in (({"isActive": "false"}, "3101"), ({"isActive": 0}, "3101"), ({}, "3102")):
                status, body = await admin(hub, "PUT", "/settlementModels/CGS", put_body)
                assert (status, _error(body)[0]) == (400, code), (put_body, body)
            status, body = await admin(hub, "PUT", "/settlementModels/NOSUCHMODEL", {"isActive": True})
            assert (status, _error(body)[0]) == (404, "3200")
            status, body = await admin(hub, "GET", "/settlementModels/NOSUCHMODEL")
            assert (status, _error(body)[0]) == (404, "3200")
            status, body = await admin(hub, "DELETE", "/settlementModels/CGS")
            assert (status, _error(body)[0]) == (405, "3000")

            # A rerun of hub_setup: each model already exists (the TTK accepts 400 with this description).
            for model in TTK_MODELS:
                status, body = await admin(hub, "POST", "/settlementModels", model)
                code, description = _error(body)
                assert (status, code) == (400, "3000")
                assert "Settlement Model already exists" in description
            # Another name for a (currency, ledger account type) that has a model, default currency included.
            for duplicate in (
                {**TTK_MODELS[0], "name": "OTHERXXX"},
                {**TTK_MODELS[1], "name": "OTHERDEFAULT"},
                {**TTK_MODELS[3], "name": "OTHERFEE", "settlementDelay": "DEFERRED", "settlementGranularity": "NET",
                 "settlementInterchange": "BILATERAL"},
            ):
                status, body = await admin(hub, "POST", "/settlementModels", duplicate)
                assert (status, _error(body)[0]) == (400, "3003"), body
            assert await _model_rows(database_url) == 4
            status, listed = await admin(hub, "GET", "/settlementModels")
            assert [m["name"] for m in listed] == [m["name"] for m in TTK_MODELS]

            # The same currency with another ledger account type, or another currency, is a new model.
            status, body = await admin(hub, "POST", "/settlementModels", {
                **TTK_MODELS[3], "name": "XXXFEE", "currency": "XXX"})
            assert status == 201, body
            status, body = await admin(hub, "POST", "/settlementModels", {
                **TTK_MODELS[2], "name": "CGSUSD", "currency": "USD"})
            assert status == 201, body
            assert await _model_rows(database_url) == 6

            # Prometheus exposition on the admin port.
            status, content_type, text = await asyncio.to_thread(_get_raw, hub.admin_port, "/metrics")
            assert status == 200 and content_type.startswith("text/plain")
            assert "# HELP" in text

    uvloop.run(scenario())


def test_invalid_settlement_models_are_refused_and_not_stored(database_url):
    async def scenario():
        async with running_hub(database_url, shards=1) as hub:
            failures = []
            for case, body, status, code in INVALID:
                got_status, got = await admin(hub, "POST", "/settlementModels", body)
                got_code = got["errorInformation"]["errorCode"] if isinstance(got, dict) else None
                if (got_status, got_code) != (status, code):
                    failures.append((case, got_status, got))
            assert not failures, failures
            status, body = await admin(hub, "POST", "/settlementModels",
                                       _changed(settlementDelay="IMMEDIATE", settlementGranularity="NET"))
            assert "Invalid settlement model definition" in _error(body)[1]
            assert await _model_rows(database_url) == 0

            # The reference body itself is valid; a null currency is the default model.
            status, body = await admin(hub, "POST", "/settlementModels", VALID)
            assert status == 201, body
            status, body = await admin(hub, "POST", "/settlementModels", _changed(name="NULLCURRENCY", currency=None))
            assert status == 201, body
            status, body = await admin(hub, "GET", "/settlementModels/NULLCURRENCY")
            assert status == 200 and body["currency"] is None and body["requireLiquidityCheck"] is True
            assert await _model_rows(database_url) == 2

    uvloop.run(scenario())
