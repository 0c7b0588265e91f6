"""Whole FSPIOP flows for the simulator: the answers to lookups and quotes, and payer-side helpers.

``Simulator`` (``sim/simulator.py``) owns one ``Flows``, reachable as ``sim.flows``, and hands it every
inbound request that is not a transfer, and the transfer callbacks a payer waits for. What a
simulated DFSP does on its own (with ``Simulator(auto_answer=True)``):

- ``GET /parties/...`` (payee FSP): ``PUT /parties/...`` with the Party from its registry
  (``sim/parties.py``), or ``PUT .../error`` 3204 (``Behaviour.lookup_mode`` "ignore": no answer).
- ``POST /quotes`` (payee FSP): ``PUT /quotes/{ID}`` from ``sim/quotes.py``, or ``.../error``.
- ``POST /transactionRequests`` (payer FSP) and ``GET /authorizations/{ID}`` (payee FSP's POS/ATM):
  ``sim/requests.py``.

Payer-side helpers, each awaiting the callback that ends its step (``FlowError`` with the FSPIOP
error code, ``FlowTimeout`` when nothing came): ``lookup``, ``register_parties``, ``quote``,
``transfer``, ``pay`` (lookup, quote, transfer) and ``request_to_pay`` (the payee's side of a
transaction request, returning what payee and payer saw).

Correlation: a helper registers what it expects (``Expectations``) before it sends, so a callback
that arrives before the 202 is not missed, even with recording off (benchmarks).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import quote as url_quote

from api.http import HttpConnectionError, HttpTimeout
from sim.fees import format_amount, to_amount
from sim.ilp import decode_transaction
from sim.parties import SimParty, party_key_of_path
from sim.quotes import QuoteSettings, answer_quote, check_quote_answer

if TYPE_CHECKING:
    from sim.simulator import Dfsp, Received, Simulator

__all__ = [
    "Expectations",
    "FlowError",
    "FlowTimeout",
    "Flows",
    "Payment",
    "RequestToPay",
    "TransactionOutcome",
    "transaction_type",
]


def transaction_type(scenario: str, initiator: str, initiator_type: str, *, sub_scenario: str | None = None,
                     refund_of: str | None = None, refund_reason: str | None = None) -> dict[str, Any]:
    """A TransactionType object; ``refund_of`` (the original transactionId) adds ``refundInfo``."""
    value: dict[str, Any] = {"scenario": scenario, "initiator": initiator, "initiatorType": initiator_type}
    if sub_scenario is not None:
        value["subScenario"] = sub_scenario
    if refund_of is not None:
        refund: dict[str, str] = {"originalTransactionId": refund_of}
        if refund_reason is not None:
            refund["refundReason"] = refund_reason
        value["refundInfo"] = refund
    return value


P2P = transaction_type("TRANSFER", "PAYER", "CONSUMER")


class FlowError(Exception):
    """A step of a flow ended in an FSPIOP error (``code``: the errorCode as a string, or None)."""

    def __init__(self, step: str, code: str | None, description: str, received: Received | None = None):
        super().__init__(f"{step}: {code or '-'} {description}")
        self.step = step
        self.code = code
        self.description = description
        self.received = received


class FlowTimeout(FlowError):
    """No callback ended the step in time."""

    def __init__(self, step: str, timeout_s: float):
        super().__init__(step, None, f"no answer within {timeout_s} s")
        self.timeout_s = timeout_s


@dataclass(frozen=True, slots=True)
class Payment:
    """A payer-initiated flow that reached its transfer's end (COMMITTED, as the payer was told)."""

    party: dict[str, Any]  # the payee Party the lookup returned
    payee_fsp: str
    quote_request: dict[str, Any]
    quote: dict[str, Any]  # the payee's PUT /quotes/{ID} body
    transfer_id: str
    transfer: dict[str, Any]  # the PUT /transfers/{ID} body the payer got


@dataclass(slots=True)
class TransactionOutcome:
    """How a transaction request ended, as one side saw it.

    ``state``: COMMITTED or RESERVED (the transfer was fulfilled), REJECTED (the payer FSP refused
    the request: behaviour, OTP retries exhausted, its quote refused), ABORTED (its transfer failed:
    ``error_code`` 3303 for an expired one, the payee's own error code for a rejected one).
    """

    transaction_request_id: str
    state: str
    transfer_id: str | None = None
    error_code: str | None = None
    detail: str = ""
    authorization_attempts: int = 0
    quote: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class RequestToPay:
    transaction_request_id: str
    payer_party: dict[str, Any]  # the Party the payee FSP's lookup returned
    payer_fsp: str
    first_answer: dict[str, Any]  # the payer FSP's first PUT /transactionRequests/{ID} body
    payee: TransactionOutcome  # what the payee FSP saw
    payer: TransactionOutcome | None  # what the payer FSP did (when it is simulated here too)


class Expectations:
    """Futures for callbacks not yet arrived, by (DFSP, key); at most ``max_pending`` at once."""

    def __init__(self, max_pending: int = 100_000):
        self._futures: dict[tuple[str, str], list[asyncio.Future[Any]]] = {}
        self._max_pending = max_pending
        self._pending = 0

    def expect(self, dfsp: str, key: str) -> asyncio.Future[Any]:
        if self._pending >= self._max_pending:
            raise RuntimeError(f"more than {self._max_pending} callbacks awaited at once")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._futures.setdefault((dfsp, key), []).append(future)
        self._pending += 1
        return future

    def resolve(self, dfsp: str, key: str, value: Any) -> bool:
        """Give ``value`` to every waiter on (dfsp, key); True when there was one."""
        futures = self._futures.pop((dfsp, key), None)
        if not futures:
            return False
        self._pending -= len(futures)
        for future in futures:
            if not future.done():
                future.set_result(value)
        return True

    def discard(self, dfsp: str, key: str, future: asyncio.Future[Any]) -> None:
        futures = self._futures.get((dfsp, key))
        if futures and future in futures:
            futures.remove(future)
            self._pending -= 1
            if not futures:
                del self._futures[(dfsp, key)]

    async def wait(self, dfsp: str, key: str, future: asyncio.Future[Any], step: str, timeout_s: float) -> Any:
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            raise FlowTimeout(step, timeout_s) from None
        finally:
            self.discard(dfsp, key, future)


class _Bounded(OrderedDict):
    """A dict that forgets its oldest entries beyond ``limit`` (links and counters must not grow forever)."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        if len(self) > self.limit:
            self.popitem(last=False)


def _callback_key(path: str) -> str:
    """``/quotes/ID/error`` -> ``quotes/ID``: success and error callbacks of one request share a key."""
    key = path.lstrip("/")
    return key[:-6] if key.endswith("/error") else key


def _is_error(received: Received) -> bool:
    return received.path.endswith("/error")


def _error_of(received: Received) -> tuple[str | None, str]:
    info = received.body.get("errorInformation") or {}
    return info.get("errorCode"), info.get("errorDescription") or ""


def _party_path(party_id_type: str, party_identifier: str, party_sub_id: str | None) -> str:
    segments = [party_id_type, party_identifier] + ([party_sub_id] if party_sub_id else [])
    return "/".join(url_quote(segment, safe="") for segment in segments)


def _party_key(party_id_type: str, party_identifier: str, party_sub_id: str | None) -> str:
    return "/".join([party_id_type, party_identifier] + ([party_sub_id] if party_sub_id else []))


class Flows:
    """Everything the simulated DFSPs do beyond transfers; see the module docstring."""

    def __init__(self, sim: Simulator, *, max_links: int = 100_000):
        from sim.requests import TransactionRequests  # here: sim/requests.py builds on this module

        self.sim = sim
        self.expectations = Expectations(max_links)
        # payee FSP: transactionId of a quote it answered -> transactionRequestId (to recognise the transfer)
        self._quote_links: dict[str, _Bounded] = {}
        # payee FSP: transferId of a prepare it got -> transactionRequestId
        self._transfer_links: dict[str, _Bounded] = {}
        self._max_links = max_links
        self.requests = TransactionRequests(self, max_links=max_links)

    # ---- inbound (called by Simulator._handle after the request is recorded)

    def inbound(self, dfsp: Dfsp, received: Received) -> None:
        method, path = received.method, received.path
        resource = path.split("/", 2)[1] if path.count("/") >= 1 else ""
        if method == "PUT":
            key = _callback_key(path)
            self.expectations.resolve(dfsp.name, key, received)
            if resource == "transactionRequests":
                self._transaction_request_answered(dfsp, received, key.split("/", 1)[1] if "/" in key else "")
            elif resource == "transfers" and _is_error(received):
                self._transfer_failed(dfsp, received, key.split("/", 1)[1] if "/" in key else "")
            return
        if not self.sim.auto_answer:
            return  # someone plays this side by hand (Simulator auto_answer off)
        if method == "GET" and resource == "parties":
            self.sim.spawn(self._answer_lookup(dfsp, received))
        elif method == "POST" and path == "/quotes":
            self.sim.spawn(self._answer_quote(dfsp, received))
        elif method == "POST" and path == "/transactionRequests":
            self.sim.spawn(self.requests.on_transaction_request(dfsp, received))
        elif method == "GET" and resource == "authorizations":
            self.sim.spawn(self.requests.on_authorization_request(dfsp, received))

    def on_prepare(self, dfsp: Dfsp, prepare: dict[str, Any]) -> str | None:
        """A payee FSP got a prepare: the transaction request it pays, if it pays one of ours."""
        links = self._quote_links.get(dfsp.name)
        if not links:
            return None  # the common case (plain transfers, benchmarks): no ILP decoding
        packet = prepare.get("ilpPacket")
        if not isinstance(packet, str):
            return None
        try:
            transaction_id = decode_transaction(packet).get("transactionId")
        except (TypeError, ValueError):  # not a packet we can read: not one of our quotes either
            return None
        request_id = links.get(transaction_id) if isinstance(transaction_id, str) else None
        if request_id is not None:
            self._transfer_links.setdefault(dfsp.name, _Bounded(self._max_links))[prepare["transferId"]] = request_id
        return request_id

    def on_prepare_answered(self, dfsp: Dfsp, request_id: str, transfer_id: str, state: str,
                            error_code: str | None) -> None:
        """The payee FSP answered (and the hub accepted) the prepare paying transaction request ``request_id``."""
        outcome = TransactionOutcome(request_id, "ABORTED" if state == "REJECTED" else state, transfer_id,
                                     error_code, "the payee answered the prepare")
        self.expectations.resolve(dfsp.name, f"outcome/{request_id}", outcome)

    def _transaction_request_answered(self, dfsp: Dfsp, received: Received, request_id: str) -> None:
        if _is_error(received):
            code, description = _error_of(received)
            outcome = TransactionOutcome(request_id, "REJECTED", error_code=code, detail=description)
        elif received.body.get("transactionRequestState") == "REJECTED":
            outcome = TransactionOutcome(request_id, "REJECTED", detail="the payer FSP rejected the request")
        else:
            return
        self.expectations.resolve(dfsp.name, f"outcome/{request_id}", outcome)

    def _transfer_failed(self, dfsp: Dfsp, received: Received, transfer_id: str) -> None:
        links = self._transfer_links.get(dfsp.name)
        request_id = links.get(transfer_id) if links else None
        if request_id is None:
            return
        code, description = _error_of(received)
        outcome = TransactionOutcome(request_id, "ABORTED", transfer_id, code, description)
        self.expectations.resolve(dfsp.name, f"outcome/{request_id}", outcome)

    # ---- answers as the payee FSP

    async def _answer_lookup(self, dfsp: Dfsp, received: Received) -> None:
        behaviour = dfsp.behaviour
        if behaviour.lookup_mode == "ignore":
            return
        key = party_key_of_path(received.path.lstrip("/"))
        requester = received.headers.get("fspiop-source") or self.sim.hub_name
        if key is None:
            return
        party = dfsp.parties.get(*key)
        path = f"/parties/{_party_path(*key)}"
        if party is None:
            body: dict[str, Any] = {"errorInformation": {"errorCode": "3204", "errorDescription": "Party not found"}}
            path += "/error"
        else:
            body = {"party": party.to_fspiop(dfsp.name)}
        await self.sim.send_callback(dfsp, "PUT", path, body, requester)

    async def _answer_quote(self, dfsp: Dfsp, received: Received) -> None:
        behaviour = dfsp.behaviour
        body = received.body
        quote_id = body.get("quoteId")
        if behaviour.quote_mode == "ignore" or not isinstance(quote_id, str) or not quote_id:
            return
        settings = QuoteSettings(fee=behaviour.fee, commission=behaviour.commission,
                                 reject=behaviour.quote_mode == "reject", error_code=behaviour.quote_error_code)
        from sim.simulator import iso_now  # here: sim/simulator.py imports this module

        try:
            answer = answer_quote(dfsp.name, dfsp.secret, settings, body,
                                  expiration=iso_now(behaviour.quote_expiration_ms), parties=dfsp.parties)
        except (KeyError, TypeError, ValueError) as problem:  # the hub validated the schema; be safe anyway
            answer = None
            error = {"errorInformation": {"errorCode": "3100", "errorDescription": f"Generic validation error - "
                                                                                    f"{problem}"}}
        path = f"/quotes/{url_quote(quote_id, safe='')}"
        if answer is not None and answer.ok:
            request_id = body.get("transactionRequestId")
            if isinstance(request_id, str):
                self._quote_links.setdefault(dfsp.name, _Bounded(self._max_links))[body["transactionId"]] = request_id
            payload = answer.body
        else:
            path += "/error"
            payload = answer.body if answer is not None else error
        requester = received.headers.get("fspiop-source") or self.sim.hub_name
        await self.sim.send_callback(dfsp, "PUT", path, payload, requester)

    # ---- payer-side helpers

    def timeout_for(self, dfsp: str, timeout_s: float | None) -> float:
        return timeout_s if timeout_s is not None else self.sim.behaviour(dfsp).flow_timeout_ms / 1000

    async def request_and_wait(self, step: str, dfsp: str, key: str, method: str, path: str, body: Any,
                               destination: str | None, timeout_s: float) -> Received:
        """Send a request as ``dfsp`` and await the callback with ``key``; FlowError for an error callback."""
        future = self.expectations.expect(dfsp, key)
        try:
            status, answer = await self.sim.send(method, path, body, source=dfsp, destination=destination)
        except (HttpConnectionError, HttpTimeout, OSError) as failure:
            self.expectations.discard(dfsp, key, future)
            raise FlowError(step, None, f"the hub did not answer: {failure}") from None
        except BaseException:
            self.expectations.discard(dfsp, key, future)
            raise
        if status not in (200, 202):
            self.expectations.discard(dfsp, key, future)
            info = (answer or {}).get("errorInformation", {}) if isinstance(answer, dict) else {}
            raise FlowError(step, info.get("errorCode"), info.get("errorDescription") or f"HTTP {status}")
        received = await self.expectations.wait(dfsp, key, future, step, timeout_s)
        if _is_error(received):
            code, description = _error_of(received)
            raise FlowError(step, code, description, received)
        return received

    async def lookup(self, payer: str, party_id_type: str, party_identifier: str, party_sub_id: str | None = None,
                     *, timeout_s: float | None = None) -> dict[str, Any]:
        """``GET /parties/...`` as ``payer``: the Party object of the payee's FSP (FlowError 3204 etc.)."""
        received = await self.request_and_wait(
            "lookup", payer, f"parties/{_party_key(party_id_type, party_identifier, party_sub_id)}", "GET",
            f"/parties/{_party_path(party_id_type, party_identifier, party_sub_id)}", None, None,
            self.timeout_for(payer, timeout_s))
        party = received.body.get("party")
        if not isinstance(party, dict):
            raise FlowError("lookup", "3100", "PUT /parties without a party", received)
        return party

    async def register_parties(self, dfsp: str, *, currency: str | None = None,
                               timeout_s: float | None = None) -> list[SimParty]:
        """``POST /participants/{Type}/{ID}[/{SubId}]`` for every party of ``dfsp``; awaits each confirmation."""
        parties = list(self.sim.dfsp(dfsp).parties)
        timeout = self.timeout_for(dfsp, timeout_s)

        async def register(party: SimParty) -> None:
            body: dict[str, Any] = {"fspId": dfsp}
            if currency is not None:
                body["currency"] = currency
            key = f"participants/{_party_key(*party.key)}"
            received = await self.request_and_wait("register", dfsp, key, "POST",
                                                   f"/participants/{_party_path(*party.key)}", body, None, timeout)
            if received.body.get("fspId") != dfsp:
                raise FlowError("register", "3003", f"registered to {received.body.get('fspId')!r}", received)

        await asyncio.gather(*(register(party) for party in parties))
        return parties

    def payer_party(self, payer: str, party: SimParty | None = None) -> SimParty:
        if party is not None:
            return party
        for candidate in self.sim.dfsp(payer).parties:
            return candidate
        raise ValueError(f"{payer} holds no party to pay from: add one (sim.dfsp(name).parties.add)")

    def quote_request(self, payer: str, payee_party: dict[str, Any], amount: str | Decimal, currency: str, *,
                      amount_type: str, transaction: dict[str, Any], payer_party: dict[str, Any],
                      transaction_request_id: str | None = None, note: str | None = None,
                      expiration: str | None = None) -> dict[str, Any]:
        """A ``POST /quotes`` body as ``payer`` makes it; its fee in ``fees`` when it discloses fees."""
        behaviour = self.sim.behaviour(payer)
        body: dict[str, Any] = {
            "quoteId": str(uuid.uuid4()),
            "transactionId": str(uuid.uuid4()),
            "payee": payee_party,
            "payer": payer_party,
            "amountType": amount_type,
            "amount": {"amount": format_amount(to_amount(amount)), "currency": currency},
            "transactionType": transaction,
        }
        if transaction_request_id is not None:
            body["transactionRequestId"] = transaction_request_id
        if behaviour.fee_mode == "disclosing":
            body["fees"] = {"amount": format_amount(behaviour.payer_fee), "currency": currency}
        if note is not None:
            body["note"] = note
        if expiration is not None:
            body["expiration"] = expiration
        return body

    async def quote(self, payer: str, payee_fsp: str, request: dict[str, Any], *,
                    timeout_s: float | None = None) -> dict[str, Any]:
        """``POST /quotes`` to ``payee_fsp``: the payee's answer, checked (FlowError on an error or a bad packet)."""
        received = await self.request_and_wait("quote", payer, f"quotes/{request['quoteId']}", "POST", "/quotes",
                                               request, payee_fsp, self.timeout_for(payer, timeout_s))
        problem = check_quote_answer(received.body)
        if problem is not None:
            raise FlowError("quote", "3302" if "expired" in problem else "3100", problem, received)
        return received.body

    async def transfer(self, payer: str, payee_fsp: str, quote: dict[str, Any], *, transfer_id: str | None = None,
                       timeout_s: float | None = None) -> dict[str, Any]:
        """``POST /transfers`` paying ``quote``: the payer's ``PUT /transfers/{ID}`` body (FlowError otherwise).

        Waits past the transfer's expiration, so that an ignored prepare ends in the hub's 3303.
        """
        from sim.simulator import iso_now  # here: sim/simulator.py imports this module

        behaviour = self.sim.behaviour(payer)
        transfer_id = transfer_id or str(uuid.uuid4())
        body = {
            "transferId": transfer_id,
            "payerFsp": payer,
            "payeeFsp": payee_fsp,
            "amount": quote["transferAmount"],
            "ilpPacket": quote["ilpPacket"],
            "condition": quote["condition"],
            "expiration": iso_now(behaviour.transfer_expiration_ms),
        }
        timeout = self.timeout_for(payer, timeout_s) + behaviour.transfer_expiration_ms / 1000
        received = await self.request_and_wait("transfer", payer, f"transfers/{transfer_id}", "POST", "/transfers",
                                               body, payee_fsp, timeout)
        return received.body

    async def pay(self, payer: str, party_id_type: str, party_identifier: str, amount: str | Decimal,
                  currency: str, *, party_sub_id: str | None = None, amount_type: str = "RECEIVE",
                  transaction: dict[str, Any] | None = None, payer_party: SimParty | None = None,
                  note: str | None = None, timeout_s: float | None = None) -> Payment:
        """A payer-initiated transaction: lookup, quote, transfer; returns once the payer has its result."""
        party = await self.lookup(payer, party_id_type, party_identifier, party_sub_id, timeout_s=timeout_s)
        payee_fsp = party["partyIdInfo"].get("fspId")
        if not payee_fsp:
            raise FlowError("lookup", "3100", "the payee party has no fspId")
        from_party = self.payer_party(payer, payer_party).to_fspiop(payer)
        request = self.quote_request(payer, party, amount, currency, amount_type=amount_type,
                                     transaction=transaction or P2P, payer_party=from_party, note=note)
        answer = await self.quote(payer, payee_fsp, request, timeout_s=timeout_s)
        result = await self.transfer(payer, payee_fsp, answer, transfer_id=request["transactionId"],
                                     timeout_s=timeout_s)
        return Payment(party, payee_fsp, request, answer, request["transactionId"], result)

    async def request_to_pay(self, payee: str, party_id_type: str, party_identifier: str, amount: str | Decimal,
                             currency: str, *, transaction: dict[str, Any], party_sub_id: str | None = None,
                             payee_party: SimParty | None = None, authentication_type: str | None = None,
                             otp: str | None = None, note: str | None = None,
                             timeout_s: float | None = None) -> RequestToPay:
        """A payee-initiated transaction from ``payee``'s side: lookup of the payer, ``POST /transactionRequests``,
        then the end as the payee sees it (and as the payer FSP saw it, when it is simulated here).

        ``otp``: what the customer will type on the payee's device (default: the device's ``Behaviour.otp``).
        """
        party = await self.lookup(payee, party_id_type, party_identifier, party_sub_id, timeout_s=timeout_s)
        payer_fsp = party["partyIdInfo"].get("fspId")
        if not payer_fsp:
            raise FlowError("lookup", "3100", "the payer party has no fspId")
        request_id = str(uuid.uuid4())
        body: dict[str, Any] = {
            "transactionRequestId": request_id,
            "payee": self.payer_party(payee, payee_party).to_fspiop(payee),
            "payer": party["partyIdInfo"],
            "amount": {"amount": format_amount(to_amount(amount)), "currency": currency},
            "transactionType": transaction,
        }
        if authentication_type is not None:
            body["authenticationType"] = authentication_type
        if note is not None:
            body["note"] = note
        if otp is not None:
            self.requests.customer_otp[(payee, request_id)] = otp
        timeout = self.timeout_for(payee, timeout_s)
        # Everything that can end it is awaited from before the request leaves (callbacks can overtake the 202).
        outcome_key, payer_key = f"outcome/{request_id}", f"payer-outcome/{request_id}"
        outcome_future = self.expectations.expect(payee, outcome_key)
        local_payer = payer_fsp in self.sim.dfsps
        payer_future = self.expectations.expect(payer_fsp, payer_key) if local_payer else None
        try:
            received = await self.request_and_wait("transactionRequest", payee, f"transactionRequests/{request_id}",
                                                   "POST", "/transactionRequests", body, payer_fsp, timeout)
            # The end: a later REJECTED, the prepare this payee fulfils or rejects, or its transfer's error.
            # An OTP flow waits for up to otp_retries authorizations, each up to the payer's flow timeout.
            payer_behaviour = self.sim.behaviour(payer_fsp) if local_payer else self.sim.behaviour(payee)
            budget = timeout * (2 + payer_behaviour.otp_retries) + payer_behaviour.transfer_expiration_ms / 1000
            payee_outcome = await self.expectations.wait(payee, outcome_key, outcome_future, "transaction", budget)
            payer_outcome = None
            if payer_future is not None:
                payer_outcome = await self.expectations.wait(payer_fsp, payer_key, payer_future, "payer", budget)
        finally:
            self.expectations.discard(payee, outcome_key, outcome_future)
            if payer_future is not None:
                self.expectations.discard(payer_fsp, payer_key, payer_future)
            self.requests.customer_otp.pop((payee, request_id), None)
        return RequestToPay(request_id, party, payer_fsp, received.body, payee_outcome, payer_outcome)
