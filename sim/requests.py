"""Transaction requests (the payer FSP's side) and authorizations (the payee FSP's POS/ATM), RULES.md 10.

Payer FSP, on ``POST /transactionRequests`` (``Behaviour.request_mode``):

- ``reject``: ``PUT /transactionRequests/{ID}`` {transactionRequestState REJECTED}; nothing more.
- ``ignore``: no answer at all (the payee's request times out).
- ``approve``: ``PUT`` {RECEIVED, transactionId}, then, as its customer approves, it runs the
  transaction itself: ``POST /quotes`` (RECEIVE the requested amount, with transactionRequestId) to
  the payee FSP; with ``authenticationType`` OTP, ``GET /authorizations/{ID}?authenticationType=OTP
  &retriesLeft=N&amount=&currency=`` to the payee FSP, checking the OTP entered on the device against
  the one it issued (the payer party's ``otp``, else ``Behaviour.otp``), again with N-1 after a wrong
  one; then ``POST /transfers``. A refused quote, a refused authorization or the retries running out
  end in ``PUT`` {REJECTED}; a failed transfer is already known to the payee through the transfer.

Payee FSP, on ``GET /authorizations/{ID}`` (``Behaviour.authorization_mode``): ``enter`` answers
``PUT /authorizations/{ID}`` {responseType ENTERED, authenticationInfo {OTP, value}}, the value
being a wrong OTP for the first ``otp_wrong_entries`` attempts and then what the customer types
(``request_to_pay(otp=...)``, else the device's ``Behaviour.otp``); ``reject`` answers REJECTED (the
customer declined on the device); ``ignore`` never answers.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import quote as url_quote
from urllib.parse import urlencode

from sim.flows import FlowError, TransactionOutcome, _Bounded

if TYPE_CHECKING:
    from sim.flows import Flows
    from sim.simulator import Dfsp, Received

__all__ = ["TransactionRequests", "wrong_otp"]


def wrong_otp(otp: str) -> str:
    """A well-formed OTP (3-10 digits) that is not ``otp``."""
    digits = otp if otp.isdigit() and 3 <= len(otp) <= 10 else "000000"
    last = str((int(digits[-1]) + 1) % 10)
    return digits[:-1] + last


class TransactionRequests:
    def __init__(self, flows: Flows, *, max_links: int):
        self.flows = flows
        self.sim = flows.sim
        # (payee DFSP, transactionRequestId) -> the OTP its customer will type on the device
        self.customer_otp: _Bounded = _Bounded(max_links)
        # (payee DFSP, transactionRequestId) -> authorization requests answered so far
        self._attempts: _Bounded = _Bounded(max_links)

    # ---- payer FSP

    async def on_transaction_request(self, dfsp: Dfsp, received: Received) -> None:
        behaviour = dfsp.behaviour
        body = received.body
        request_id = body.get("transactionRequestId")
        payee_fsp = received.headers.get("fspiop-source")
        if behaviour.request_mode == "ignore" or not isinstance(request_id, str) or not payee_fsp:
            return
        path = f"/transactionRequests/{url_quote(request_id, safe='')}"
        payer = dfsp.parties.find(body.get("payer"))
        if payer is None and len(dfsp.parties):
            error = {"errorInformation": {"errorCode": "3204", "errorDescription": "Party not found"}}
            await self.sim.send_callback(dfsp, "PUT", f"{path}/error", error, payee_fsp)
            self._finish(dfsp, TransactionOutcome(request_id, "REJECTED", error_code="3204", detail="unknown payer"))
            return
        if behaviour.request_mode == "reject":
            await self.sim.send_callback(dfsp, "PUT", path, {"transactionRequestState": "REJECTED"}, payee_fsp)
            self._finish(dfsp, TransactionOutcome(request_id, "REJECTED", detail="rejected by behaviour"))
            return
        transaction_id = str(uuid.uuid4())
        answer = {"transactionId": transaction_id, "transactionRequestState": "RECEIVED"}
        if not await self.sim.send_callback(dfsp, "PUT", path, answer, payee_fsp):
            self._finish(dfsp, TransactionOutcome(request_id, "REJECTED", detail="the hub refused RECEIVED"))
            return
        outcome = await self._run(dfsp, received, request_id, transaction_id, payee_fsp, payer)
        if outcome.state == "REJECTED":
            await self.sim.send_callback(dfsp, "PUT", path, {"transactionId": transaction_id,
                                                             "transactionRequestState": "REJECTED"}, payee_fsp)
        self._finish(dfsp, outcome)

    def _finish(self, dfsp: Dfsp, outcome: TransactionOutcome) -> None:
        self.flows.expectations.resolve(dfsp.name, f"payer-outcome/{outcome.transaction_request_id}", outcome)

    async def _run(self, dfsp: Dfsp, received: Received, request_id: str, transaction_id: str, payee_fsp: str,
                   payer: Any) -> TransactionOutcome:
        """Quote, authorize (OTP), transfer: the payer FSP's own transaction for the request."""
        body = received.body
        flows = self.flows
        payer_party = payer.to_fspiop(dfsp.name) if payer is not None else {"partyIdInfo": body["payer"]}
        quote_request = flows.quote_request(
            dfsp.name, body["payee"], body["amount"]["amount"], body["amount"]["currency"], amount_type="RECEIVE",
            transaction=body["transactionType"], payer_party=payer_party, transaction_request_id=request_id,
            note=body.get("note"))
        quote_request["transactionId"] = transaction_id
        try:
            quote = await flows.quote(dfsp.name, payee_fsp, quote_request)
        except FlowError as failure:
            return TransactionOutcome(request_id, "REJECTED", error_code=failure.code,
                                      detail=f"quote failed: {failure.description}")
        attempts = 0
        if body.get("authenticationType") == "OTP":
            expected = (payer.otp if payer is not None and payer.otp else None) or dfsp.behaviour.otp
            attempts, refusal = await self._authorize(dfsp, request_id, payee_fsp, quote, expected)
            if refusal is not None:
                return TransactionOutcome(request_id, "REJECTED", detail=refusal, authorization_attempts=attempts,
                                          quote=quote)
        try:
            result = await flows.transfer(dfsp.name, payee_fsp, quote, transfer_id=transaction_id)
        except FlowError as failure:
            return TransactionOutcome(request_id, "ABORTED", transaction_id, failure.code, failure.description,
                                      attempts, quote)
        return TransactionOutcome(request_id, result.get("transferState", "COMMITTED"), transaction_id, None,
                                  "transfer completed", attempts, quote)

    async def _authorize(self, dfsp: Dfsp, request_id: str, payee_fsp: str, quote: dict[str, Any],
                         expected: str) -> tuple[int, str | None]:
        """(attempts, None) once the right OTP is entered; (attempts, why) when refused or out of retries."""
        money = quote["transferAmount"]
        retries_left = dfsp.behaviour.otp_retries
        attempts = 0
        # RESEND asks for the same try again; bounded so that a device that keeps asking cannot loop forever.
        max_attempts = 2 * dfsp.behaviour.otp_retries
        while retries_left > 0 and attempts < max_attempts:
            attempts += 1
            query = urlencode({"authenticationType": "OTP", "retriesLeft": retries_left, "amount": money["amount"],
                               "currency": money["currency"]})
            try:
                answer = await self.flows.request_and_wait(
                    "authorization", dfsp.name, f"authorizations/{request_id}", "GET",
                    f"/authorizations/{url_quote(request_id, safe='')}?{query}", None, payee_fsp,
                    self.flows.timeout_for(dfsp.name, None))
            except FlowError as failure:
                return attempts, f"authorization failed: {failure}"
            response = answer.body.get("responseType")
            if response == "REJECTED":
                return attempts, "the customer rejected the transaction on the device"
            if response == "RESEND":
                continue
            entered = (answer.body.get("authenticationInfo") or {}).get("authenticationValue")
            if response == "ENTERED" and entered == expected:
                return attempts, None
            retries_left -= 1
        return attempts, "OTP retries exhausted"

    # ---- payee FSP (its POS or ATM)

    async def on_authorization_request(self, dfsp: Dfsp, received: Received) -> None:
        behaviour = dfsp.behaviour
        request_id = received.path.split("/", 3)[2] if received.path.count("/") >= 2 else ""
        requester = received.headers.get("fspiop-source")
        if behaviour.authorization_mode == "ignore" or not request_id or not requester:
            return
        key = (dfsp.name, request_id)
        attempt = self._attempts.get(key, 0) + 1
        self._attempts[key] = attempt
        if behaviour.authorization_mode == "reject":
            body: dict[str, Any] = {"responseType": "REJECTED"}
        else:
            right = self.customer_otp.get(key) or behaviour.otp
            value = wrong_otp(right) if attempt <= behaviour.otp_wrong_entries else right
            body = {"authenticationInfo": {"authentication": "OTP", "authenticationValue": value},
                    "responseType": "ENTERED"}
        await self.sim.send_callback(dfsp, "PUT", f"/authorizations/{url_quote(request_id, safe='')}", body,
                                     requester)
