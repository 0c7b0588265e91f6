"""The simulator's control routes, for people with curl (docs/USE_CASES.md).

Under each DFSP's prefix, next to ``GET /{dfsp}/_prepare`` (``sim/simulator.py``):

- ``GET /{dfsp}/_endpoints``: every callback endpoint to register with the hub for this DFSP.
- ``GET /{dfsp}/_register[?currency=]``: ``POST /participants/{Type}/{ID}`` for each of its parties.
- ``GET /{dfsp}/_pay?type=&id=[&subId=]&amount=&currency=[&amountType=SEND|RECEIVE][&scenario=]
  [&initiatorType=][&subScenario=][&refundOf=TRANSACTION_ID[&refundReason=]][&note=]``: a payer-initiated
  transaction from this DFSP (lookup, quote, transfer); ``refundOf`` adds ``refundInfo`` (scenario REFUND).
- ``GET /{dfsp}/_request_to_pay?type=&id=&amount=&currency=[&scenario=][&initiatorType=]
  [&authenticationType=OTP][&otp=]``: a transaction request from this DFSP as the payee.

Each answers 200 with what happened as JSON once the flow has ended; 400 for bad parameters; 502
with the step and FSPIOP error when a step failed, 504 when a step got no answer.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import orjson

from api.http import Request, Response
from sim.flows import FlowError, FlowTimeout, transaction_type

if TYPE_CHECKING:
    from sim.simulator import Simulator

__all__ = ["control"]

_JSON = "application/json"


def _json(status: int, value: Any) -> Response:
    return Response(status, orjson.dumps(value, default=_default), content_type=_JSON)


def _default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


def _kind(query: dict[str, str], initiator: str, scenario: str, initiator_type: str) -> dict[str, Any]:
    return transaction_type(query.get("scenario", scenario), initiator, query.get("initiatorType", initiator_type),
                            sub_scenario=query.get("subScenario"), refund_of=query.get("refundOf"),
                            refund_reason=query.get("refundReason"))


async def control(sim: Simulator, dfsp: str, route: str, request: Request) -> Response | None:
    """The answer to control route ``route`` (``/_pay`` ...) of ``dfsp``; None when there is no such route."""
    query = request.query
    flows = sim.flows
    try:
        if route == "/_endpoints":
            return _json(200, sim.all_endpoints(dfsp))
        if route == "/_register":
            parties = await flows.register_parties(dfsp, currency=query.get("currency"))
            return _json(200, {"registered": [dataclasses.asdict(party) for party in parties]})
        if route == "/_pay":
            payment = await flows.pay(
                dfsp, query["type"], query["id"], query["amount"], query["currency"], party_sub_id=query.get("subId"),
                amount_type=query.get("amountType", "SEND"), note=query.get("note"),
                transaction=_kind(query, "PAYER", "TRANSFER", "CONSUMER"))
            return _json(200, payment)
        if route == "/_request_to_pay":
            result = await flows.request_to_pay(
                dfsp, query["type"], query["id"], query["amount"], query["currency"], party_sub_id=query.get("subId"),
                transaction=_kind(query, "PAYEE", "PAYMENT", "BUSINESS"),
                authentication_type=query.get("authenticationType"), otp=query.get("otp"), note=query.get("note"))
            return _json(200, result)
    except KeyError as missing:
        return _json(400, {"error": f"missing query parameter {missing}"})
    except (TypeError, ValueError) as problem:
        return _json(400, {"error": str(problem)})
    except FlowTimeout as timeout:
        return _json(504, {"step": timeout.step, "error": timeout.description})
    except FlowError as failure:
        return _json(502, {"step": failure.step, "errorCode": failure.code, "errorDescription": failure.description})
    return None
