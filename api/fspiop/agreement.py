"""The agreement resources: ``/quotes``, ``/transactionRequests``, ``/authorizations``, ``/transactions``.

The hub relays these between DFSPs (RULES.md 4, 8, 10); no money moves. Requests arrive here routed,
header- and schema-checked (``api/fspiop/ingress.py``); ``AgreementHandler.work_for`` makes the
checks that can be made synchronously (a missing FSPIOP-Destination, the four query parameters of
``GET /authorizations``), and returns the coroutine that does the rest after the 202/200.

- ``POST /quotes``, ``POST /transactionRequests``: sender and receiver active DFSPs (3200/3201), the
  receiver has an endpoint (3201), duplicates by request hash (RULES.md 5: ignore, resend the answer,
  or 3106); the request is stored, then forwarded to FSPIOP-Destination (else the body's payee FSP
  of a quote, payer FSP of a transaction request).
- ``PUT /quotes/{ID}[/error]``, ``PUT /transactionRequests/{ID}[/error]``: a stored request
  (3205/3206), from its receiver, back to its sender (3100), not after the request's expiration
  (3300 to both), one answer per quote (3106); the answer (and a quote's terms) is stored, then
  forwarded to the sender of the request.
- ``GET /quotes/{ID}``, ``GET /transactionRequests/{ID}``: to FSPIOP-Destination, else where the
  stored request went. ``GET /authorizations/{ID}`` (four query parameters, sync 3102/3101),
  ``GET /transactions/{ID}`` and their ``PUT``/``PUT .../error`` answers: to FSPIOP-Destination
  (sync 3102 without one); sender and receiver active, receiver has an endpoint.

Endpoint types: ``FSPIOP_CALLBACK_URL_QUOTES`` (quotes), ``FSPIOP_CALLBACK_URL_TRX_REQ_SERVICE``
(transaction requests, and transactions: Mojaloop defines no endpoint type for them, and they belong
to the same payee-side service), ``FSPIOP_CALLBACK_URL_AUTHORIZATIONS`` (authorizations).

Forwarded messages keep their headers and body unchanged (``forward_headers``: a JWS signature still
verifies); errors the hub finds come from the hub (``hub_headers``, FSPIOP-Source = hub name) as
``PUT /{resource}/{ID}/error`` to the DFSP at fault. A request is durable in Postgres before it is
forwarded, and an answer is durable before it is passed on, so a resend after a crash is recognised.
New requests are written in batches by ``RequestStore`` (bounded queue, 2005 beyond it); an answer is
one statement (with a quote's terms in the same statement). Both use the ingress's own pool, whose
size bounds how many run at once; the ingress bounds the requests in progress.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from urllib.parse import quote as url_quote
from urllib.parse import urlencode

import asyncpg
import orjson

from api.fspiop.callbacks import CallbackDispatcher, EndpointDirectory, forward_headers, hub_headers
from api.fspiop.routes import Route, load_spec
from api.fspiop.transfers import parse_datetime_ms, request_hash
from api.http import Request
from core.agreement import (
    AnswerVerdict,
    QuoteCheckMode,
    QuoteTerms,
    RequestState,
    RequestVerdict,
    StoredRequest,
    TransferTerms,
    check_quote_link,
    on_answer,
    on_request,
)
from core.errors import FspiopError, normalise_error_code
from core.money import AMOUNT_PATTERN, AmountError, from_decimal, parse_amount, to_decimal

log = logging.getLogger(__name__)

QUOTES = "FSPIOP_CALLBACK_URL_QUOTES"
TRX_REQ_SERVICE = "FSPIOP_CALLBACK_URL_TRX_REQ_SERVICE"
AUTHORIZATIONS = "FSPIOP_CALLBACK_URL_AUTHORIZATIONS"

ENDPOINT_TYPES = {
    "quotes": QUOTES,
    "transactionRequests": TRX_REQ_SERVICE,
    "authorizations": AUTHORIZATIONS,
    "transactions": TRX_REQ_SERVICE,
}
# Resources whose POSTs the hub stores (duplicate checks, answers routed back to the requester).
STORED = frozenset({"quotes", "transactionRequests"})
_ID_FIELDS = {"quotes": "quoteId", "transactionRequests": "transactionRequestId"}
_NOT_FOUND = {"quotes": 3205, "transactionRequests": 3206}

# GET /authorizations/{ID}: the four query parameters the FSPIOP OpenAPI file leaves out (RULES.md 17.7),
# as transaction-requests-service-openapi.yaml declares them: all required.
_AUTHORIZATION_PARAMS = ("authenticationType", "retriesLeft", "amount", "currency")


def _schema_enum(name: str) -> frozenset[str]:
    return frozenset(load_spec()["components"]["schemas"][name]["enum"])


_AUTHENTICATION_TYPES = _schema_enum("AuthenticationType")
_CURRENCIES = _schema_enum("Currency")


def authorization_query(query: dict[str, str]) -> dict[str, str]:
    """The validated query of ``GET /authorizations/{ID}``; raises 3102 (missing) or 3101 (malformed)."""
    for name in _AUTHORIZATION_PARAMS:
        if not query.get(name, "").strip():
            raise FspiopError(3102, name)
    retries = query["retriesLeft"]
    if query["authenticationType"] not in _AUTHENTICATION_TYPES:
        raise FspiopError(3101, "authenticationType")
    # OpenAPI ``integer``; a count of retries left is never negative (1 means the last try).
    if not (retries.isascii() and retries.isdigit()) or len(retries) > 9:
        raise FspiopError(3101, "retriesLeft")
    if AMOUNT_PATTERN.fullmatch(query["amount"]) is None:
        raise FspiopError(3101, "amount")
    if query["currency"] not in _CURRENCIES:
        raise FspiopError(3101, "currency")
    return {name: query[name] for name in _AUTHORIZATION_PARAMS}


def _header(headers: dict, name: str) -> str | None:
    value = headers.get(name, "").strip()
    return value or None


def _receiver_from_body(resource: str, body: dict) -> str | None:
    """Where a POST goes when FSPIOP-Destination is absent: the payee FSP of a quote, the payer FSP of
    a transaction request (the FSP named in the body, as Mojaloop's persistent quoting mode routes)."""
    if resource == "quotes":
        return (body.get("payee") or {}).get("partyIdInfo", {}).get("fspId")
    return (body.get("payer") or {}).get("fspId")


class StoreFull(Exception):
    """The store's queue is full: the request is refused with 2005 rather than waiting without bound."""


@dataclass(frozen=True, slots=True)
class NewRequest:
    resource: str
    request_id: str
    sender: str
    receiver: str
    request_hash: str
    expires_at_ms: int | None
    transaction_id: str | None
    transaction_request_id: str | None
    version: str
    created_at_ms: int


class RequestStore:
    """Stores new requests in batches: one ``INSERT ... SELECT FROM unnest`` for all rows waiting.

    Each caller waits until its row is committed (nothing is forwarded before it is durable) and learns
    whether it was new (False: the id existed, a duplicate). While ``flushes_max`` flushes run, new rows
    wait and join the next one (group commit), so a burst costs a few transactions, not one per request;
    at most ``queue_max`` rows wait (``StoreFull`` beyond), at most ``batch_max`` go in one statement.
    """

    def __init__(self, pool: asyncpg.Pool, *, batch_max: int = 256, queue_max: int = 10_000, flushes_max: int = 2):
        if batch_max < 1 or queue_max < 1 or flushes_max < 1:
            raise ValueError("batch_max, queue_max and flushes_max must be >= 1")
        self.pool = pool
        self.batch_max = batch_max
        self.queue_max = queue_max
        self.flushes_max = flushes_max
        self._waiting: deque[tuple[NewRequest, asyncio.Future[bool]]] = deque()
        self._flushing = 0
        self.batches = 0  # statements run, for tests and diagnostics

    async def insert(self, row: NewRequest) -> bool:
        if len(self._waiting) >= self.queue_max:
            raise StoreFull(f"{len(self._waiting)} requests waiting to be stored")
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((row, future))
        if self._flushing < self.flushes_max:
            self._flushing += 1
            asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._waiting:
                batch = [self._waiting.popleft() for _ in range(min(self.batch_max, len(self._waiting)))]
                try:
                    inserted = await self._write([row for row, _ in batch])
                except Exception as error:  # the callers decide what to tell their DFSPs
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                for row, future in batch:
                    key = (row.resource, row.request_id)
                    if not future.done():
                        # A key inserted once: the first of several rows with it in one batch got it.
                        future.set_result(key in inserted)
                    inserted.discard(key)
        finally:
            self._flushing -= 1

    async def _write(self, rows: list[NewRequest]) -> set[tuple[str, str]]:
        self.batches += 1
        columns = list(zip(*(
            (r.resource, r.request_id, r.sender, r.receiver, r.request_hash, r.expires_at_ms, r.transaction_id,
             r.transaction_request_id, r.version, r.created_at_ms) for r in rows
        ), strict=True))
        found = await self.pool.fetch(
            "INSERT INTO agreement_request (resource, request_id, sender, receiver, request_hash, expires_at_ms,"
            " transaction_id, transaction_request_id, state, version, created_at_ms)"
            " SELECT resource, request_id, sender, receiver, request_hash, expires_at_ms, transaction_id,"
            " transaction_request_id, 'PENDING', version, created_at_ms"
            " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[],"
            " $8::text[], $9::text[], $10::bigint[])"
            " AS r(resource, request_id, sender, receiver, request_hash, expires_at_ms, transaction_id,"
            " transaction_request_id, version, created_at_ms)"
            " ON CONFLICT (resource, request_id) DO NOTHING RETURNING resource, request_id",
            *(list(column) for column in columns),
        )
        return {(r["resource"], r["request_id"]) for r in found}


class AgreementHandler:
    """What the hub does with each request of the four agreement resources (see the module doc)."""

    def __init__(
        self,
        *,
        directory,
        endpoints: EndpointDirectory,
        dispatcher: CallbackDispatcher,
        pool: asyncpg.Pool,
        hub_name: str,
        store: RequestStore | None = None,
        clock_ms: Callable[[], int] | None = None,
    ):
        self.directory = directory
        self.endpoints = endpoints
        self.dispatcher = dispatcher
        self.pool = pool
        self.store = store or RequestStore(pool)
        self.hub_name = hub_name
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)

    # ------------------------------------------------------------------ dispatch (synchronous part)

    def work_for(self, route: Route, request: Request, body: dict | None, version: str):
        resource, method = route.resource, route.method
        resource_id = route.params.get("ID", "")
        if "\x00" in resource_id:
            # Postgres text cannot hold NUL: refused here rather than failing after the 202.
            raise FspiopError(3101, "ID")
        headers = request.headers
        destination = _header(headers, "fspiop-destination")
        if method == "POST":
            receiver = destination or _receiver_from_body(resource, body)
            if not receiver:
                raise FspiopError(3102, "fspiop-destination")
            return self._post(resource, headers, request.body, body, receiver, version)
        if method == "GET":
            path = f"/{resource}/{url_quote(resource_id, safe='')}"
            if resource == "authorizations":
                path += "?" + urlencode(authorization_query(request.query))
            if destination is None and resource not in STORED:
                raise FspiopError(3102, "fspiop-destination")
            return self._get(resource, resource_id, headers, path, destination, version)
        error = route.template.endswith("/error")
        if resource in STORED:
            return self._answer(resource, resource_id, headers, request.body, body, error, version)
        if destination is None:
            raise FspiopError(3102, "fspiop-destination")
        return self._relay_put(resource, resource_id, headers, request.body, body, destination, error, version)

    # ------------------------------------------------------------------ POST /quotes, /transactionRequests

    async def _post(self, resource: str, headers: dict, raw: bytes, body: dict, receiver: str, version: str) -> None:
        source = _header(headers, "fspiop-source") or ""
        request_id = body[_ID_FIELDS[resource]]
        problem = await self._parties_problem(source, receiver)
        if problem is not None:
            await self._hub_error(resource, source, request_id, *problem, version=version)
            return
        url = await self._url(receiver, resource, f"/{resource}")
        if url is None:
            await self._no_endpoint(resource, source, request_id, receiver, version)
            return
        body_hash = request_hash(body)
        expires_at_ms = parse_datetime_ms(body["expiration"]) if body.get("expiration") else None
        if expires_at_ms is None or expires_at_ms > self._clock_ms():
            # The insert is the duplicate check too: a new id (the common case) costs a share of one statement.
            row = NewRequest(resource, request_id, source, receiver, body_hash, expires_at_ms,
                             body.get("transactionId"), body.get("transactionRequestId"), version, self._clock_ms())
            try:
                inserted = await self.store.insert(row)
            except StoreFull:
                await self._hub_error(resource, source, request_id, 2005, "retry later", version=version)
                return
            except (OSError, asyncpg.PostgresError) as error:
                log.error("%s %s not stored: %r", resource, request_id, error)
                await self._hub_error(resource, source, request_id, 2003, "retry later", version=version)
                return
            if inserted:
                # Durable now: forward it. Headers unchanged, Destination filled when the sender left it out.
                self.dispatcher.send(
                    receiver, "POST", url, forward_headers(headers, method="POST", destination=receiver), raw,
                    kind=f"{resource}_post",
                )
                return
        verdict, stored = await self._dedupe(resource, request_id, body_hash)
        if verdict is RequestVerdict.NEW:
            # Only an expired request gets here unstored (an insert that conflicted finds the row); a resend
            # of a stored request is answered as a duplicate whatever its expiration, a new one is refused.
            await self._hub_error(resource, source, request_id, 3100, "expiration date is in the past",
                                  version=version)
            return
        if verdict is RequestVerdict.MODIFIED:
            await self._hub_error(resource, source, request_id, 3106, "the ID was used with other content",
                                  version=version)
        elif verdict is RequestVerdict.RESEND:
            await self._resend(resource, request_id, stored, version)
        # IGNORE: the first request is still pending; its answer will come.

    async def _dedupe(self, resource: str, request_id: str, body_hash: str):
        row = await self._load(resource, request_id)
        stored = _stored_of(row) if row is not None else None
        return on_request(stored, body_hash), row

    async def _resend(self, resource: str, request_id: str, row, version: str) -> None:
        """A finished request sent again: its answer again to the requester, as if it had asked with GET."""
        sender = row["sender"]
        if row["state"] == RequestState.EXPIRED:
            await self._hub_error(resource, sender, request_id, 3300, "the request had expired", version=version)
            return
        path = f"/{resource}/{url_quote(request_id, safe='')}" + ("/error" if row["answer_error"] else "")
        url = await self._url(sender, resource, path)
        if url is None:
            log.warning("no %s endpoint for %s: %s %s answer not resent", ENDPOINT_TYPES[resource], sender,
                        resource, request_id)
            return
        headers = [tuple(pair) for pair in orjson.loads(row["answer_headers"])]
        self.dispatcher.send(sender, "PUT", url, headers, bytes(row["answer_body"]), kind=f"{resource}_resend")

    # ------------------------------------------------------------------ PUT answers to stored requests

    async def _answer(
        self, resource: str, request_id: str, headers: dict, raw: bytes, body: dict, error: bool, version: str
    ) -> None:
        source = _header(headers, "fspiop-source") or ""
        destination = _header(headers, "fspiop-destination")
        if error and normalise_error_code(body["errorInformation"]["errorCode"]) is None:
            await self._hub_error(resource, source, request_id, 3100, "API specification undefined errorCode",
                                  version=version)
            return
        terms = None
        if resource == "quotes" and not error:
            try:
                terms = _quote_terms(request_id, body)
            except (AmountError, ValueError) as problem:
                await self._hub_error(resource, source, request_id, 3101, str(problem), version=version)
                return
        answer_hash = request_hash(body)
        for _ in range(3):  # a concurrent answer may change the row between our read and our write
            row = await self._load(resource, request_id)
            stored = _stored_of(row) if row is not None else None
            decision = on_answer(
                stored, source=source, destination=destination, answer_hash=answer_hash, now_ms=self._clock_ms(),
                not_found_code=_NOT_FOUND[resource], single_answer=resource == "quotes", error=error,
            )
            verdict = decision.verdict
            if verdict is AnswerVerdict.DUPLICATE:
                return  # forwarded already; the requester can GET it
            if verdict in (AnswerVerdict.UNKNOWN, AnswerVerdict.WRONG_SENDER, AnswerVerdict.WRONG_DESTINATION,
                           AnswerVerdict.MODIFIED):
                await self._hub_error(resource, source, request_id, decision.code, description=decision.description,
                                      version=version)
                return
            if verdict is AnswerVerdict.EXPIRED:
                if not await self._record(resource, stored, RequestState.EXPIRED, answer_hash, error, None, None,
                                          None):
                    continue
                # The answer is refused: the answering DFSP hears why; the requester, who stopped waiting
                # at its expiration, hears that no answer will come (unless it was told already).
                await self._hub_error(resource, source, request_id, decision.code, description=decision.description,
                                      version=version)
                if stored.state is RequestState.PENDING:
                    await self._hub_error(resource, stored.sender, request_id, decision.code,
                                          description=decision.description, version=row["version"])
                return
            state = RequestState.REJECTED if error else RequestState.ANSWERED
            out_headers = forward_headers(headers, method="PUT", destination=stored.sender)
            if not await self._record(resource, stored, state, answer_hash, error, out_headers, raw, terms):
                continue
            path = f"/{resource}/{url_quote(request_id, safe='')}" + ("/error" if error else "")
            url = await self._url(stored.sender, resource, path)
            if url is None:
                log.warning("no %s endpoint for %s: %s %s answer not forwarded", ENDPOINT_TYPES[resource],
                            stored.sender, resource, request_id)
                return
            self.dispatcher.send(stored.sender, "PUT", url, out_headers, raw,
                                 kind=f"{resource}_{'error' if error else 'put'}")
            return
        log.warning("%s %s: the stored request kept changing; answer from %s dropped", resource, request_id, source)

    async def _record(
        self, resource: str, stored: StoredRequest, state: RequestState, answer_hash: str, error: bool,
        out_headers, raw: bytes | None, terms: AnswerTerms | None,
    ) -> bool:
        """Store the answer if the row is still as we read it (False: it changed, decide again).

        One statement, so one implicit transaction: the answer and a quote's terms are stored together.
        """
        has_terms = terms is not None
        updated = await self.pool.fetchval(
            "WITH answered AS (UPDATE agreement_request SET state = $3, answer_hash = $4, answer_error = $5,"
            " answer_headers = $6::jsonb, answer_body = $7, answered_at_ms = $8"
            " WHERE resource = $1 AND request_id = $2 AND state = $9 AND answer_hash IS NOT DISTINCT FROM $10"
            " RETURNING request_id, transaction_id, transaction_request_id, sender, receiver),"
            " terms AS (INSERT INTO quote_terms (quote_id, transaction_id, transaction_request_id, payer, payee,"
            " currency, transfer_amount, payee_receive_amount, expires_at_ms, ilp_packet, condition, created_at_ms)"
            " SELECT request_id, coalesce(transaction_id, ''), transaction_request_id, sender, receiver,"
            " $11, $12, $13, $14, $15, $16, $8 FROM answered WHERE $17)"
            " SELECT count(*) FROM answered",
            resource, stored.request_id, state.value, answer_hash, error,
            orjson.dumps(out_headers).decode() if out_headers is not None else None, raw, self._clock_ms(),
            stored.state.value, stored.answer_hash,
            terms.currency if has_terms else None,
            to_decimal(terms.transfer_amount_minor) if has_terms else None,
            terms.payee_receive_amount if has_terms else None,
            terms.expires_at_ms if has_terms else None,
            terms.ilp_packet if has_terms else None,
            terms.condition if has_terms else None,
            has_terms,
        )
        return bool(updated)

    async def _load(self, resource: str, request_id: str):
        return await self.pool.fetchrow(
            "SELECT request_id, sender, receiver, request_hash, expires_at_ms, state, answer_hash, answer_error,"
            " answer_headers, answer_body, version FROM agreement_request WHERE resource = $1 AND request_id = $2",
            resource, request_id,
        )

    # ------------------------------------------------------------------ GET requests

    async def _get(
        self, resource: str, resource_id: str, headers: dict, path: str, destination: str | None, version: str
    ) -> None:
        source = _header(headers, "fspiop-source") or ""
        if destination is None:
            # A GET of a stored request without FSPIOP-Destination goes where the request went.
            row = await self._load(resource, resource_id)
            if row is None:
                await self._hub_error(resource, source, resource_id, _NOT_FOUND[resource], "not found",
                                      version=version)
                return
            destination = row["receiver"]
        await self._relay(resource, resource_id, "GET", headers, b"", destination, path, version)

    # ------------------------------------------------------------------ PUT /authorizations, /transactions

    async def _relay_put(
        self, resource: str, resource_id: str, headers: dict, raw: bytes, body: dict, destination: str, error: bool,
        version: str,
    ) -> None:
        source = _header(headers, "fspiop-source") or ""
        if error and normalise_error_code(body["errorInformation"]["errorCode"]) is None:
            await self._hub_error(resource, source, resource_id, 3100, "API specification undefined errorCode",
                                  version=version)
            return
        path = f"/{resource}/{url_quote(resource_id, safe='')}" + ("/error" if error else "")
        await self._relay(resource, resource_id, "PUT", headers, raw, destination, path, version)

    async def _relay(
        self, resource: str, resource_id: str, method: str, headers: dict, raw: bytes, destination: str, path: str,
        version: str,
    ) -> None:
        """Pass a message on unchanged to ``destination``, or tell the sender why not."""
        source = _header(headers, "fspiop-source") or ""
        problem = await self._parties_problem(source, destination)
        if problem is not None:
            await self._hub_error(resource, source, resource_id, *problem, version=version)
            return
        url = await self._url(destination, resource, path)
        if url is None:
            await self._no_endpoint(resource, source, resource_id, destination, version)
            return
        self.dispatcher.send(
            destination, method, url, forward_headers(headers, method=method, destination=destination), raw,
            kind=f"{resource}_{method.lower()}",
        )

    # ------------------------------------------------------------------ building blocks

    async def _parties_problem(self, source: str, receiver: str) -> tuple[int, str] | None:
        """3200 when the sender, 3201 when the receiver is not an active DFSP; the cache is refreshed
        once before refusing, since it may predate an onboarding step made before this request."""
        arrived = time.monotonic()
        for attempt in range(2):
            sender_info = await self.directory.resolve(source) if source else None
            receiver_info = await self.directory.resolve(receiver)
            problem = None
            if sender_info is None or sender_info.is_hub or not sender_info.is_active:
                problem = 3200, f"FSPIOP-Source {source} is not an active participant"
            elif receiver_info is None or receiver_info.is_hub or not receiver_info.is_active:
                problem = 3201, f"destination FSP {receiver} is not an active participant"
            if problem is None or attempt:
                return problem
            await self.directory.refresh(since=arrived)
        return None

    async def _url(self, fsp: str, resource: str, path: str) -> str | None:
        return await self.endpoints.resolve(
            fsp, ENDPOINT_TYPES[resource], path=path, since=time.monotonic()
        )

    async def _no_endpoint(self, resource: str, source: str, resource_id: str, receiver: str, version: str) -> None:
        await self._hub_error(resource, source, resource_id, 3201,
                              f"{receiver} has no {ENDPOINT_TYPES[resource]} endpoint", version=version)

    async def _hub_error(
        self, resource: str, fsp: str, resource_id: str, code: int, detail: str | None = None, *,
        description: str | None = None, version: str,
    ) -> bool:
        """A hub-originated ``PUT /{resource}/{ID}/error`` to ``fsp`` (RULES.md 2.1: Source = hub)."""
        uri = f"/{resource}/{url_quote(resource_id, safe='')}/error"
        url = await self._url(fsp, resource, uri) if fsp else None
        if url is None:
            log.warning("no %s endpoint for %r: error %s on %s %s not sent", ENDPOINT_TYPES[resource], fsp, code,
                        resource, resource_id)
            return False
        headers = hub_headers(resource=resource, version=version, source=self.hub_name, destination=fsp,
                              method="PUT", uri=uri)
        body = orjson.dumps(FspiopError(code, detail, description=description).to_body())
        return self.dispatcher.send(fsp, "PUT", url, headers, body, kind=f"{resource}_error")


def _stored_of(row) -> StoredRequest:
    return StoredRequest(
        request_id=row["request_id"], sender=row["sender"], receiver=row["receiver"],
        request_hash=row["request_hash"], expires_at_ms=row["expires_at_ms"], state=RequestState(row["state"]),
        answer_hash=row["answer_hash"],
    )


@dataclass(frozen=True, slots=True)
class AnswerTerms:
    """What a payee's ``PUT /quotes/{ID}`` fixes; payer and payee come from the stored request."""

    quote_id: str
    currency: str
    transfer_amount_minor: int
    payee_receive_amount: Decimal | None  # major units, exact (a NUMERIC column)
    expires_at_ms: int
    ilp_packet: str
    condition: str


def _quote_terms(quote_id: str, body: dict) -> AnswerTerms:
    """The terms of a ``PUT /quotes/{ID}`` body (schema-checked already), exact."""
    transfer = body["transferAmount"]
    receive = body.get("payeeReceiveAmount")
    return AnswerTerms(
        quote_id=quote_id,
        currency=transfer["currency"],
        transfer_amount_minor=parse_amount(transfer["amount"]),
        payee_receive_amount=to_decimal(parse_amount(receive["amount"])) if receive else None,
        expires_at_ms=parse_datetime_ms(body["expiration"]),
        ilp_packet=body["ilpPacket"],
        condition=body["condition"],
    )


# --------------------------------------------------------------------------------------------------
# The transfer-to-quote check (RAYLOOP_TRANSFER_QUOTE_CHECK), used by the transfers prepare path


class QuoteLinkCheck:
    """Refuses a prepare that does not pay a quote the hub relayed (``core.agreement.check_quote_link``).

    The quote is found by the prepare's ``condition``: it is exactly what the payee bound to its quote
    answer, it is in every prepare, and it needs no decoding (ILP packet encodings differ between
    DFSP toolkits, RULES.md 7 and 17.12, so the transactionId inside the packet is not relied on).
    """

    def __init__(self, pool: asyncpg.Pool, mode: QuoteCheckMode | str, *, clock_ms: Callable[[], int] | None = None):
        self.pool = pool
        self.mode = QuoteCheckMode(mode)
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)

    async def __call__(self, body: dict) -> tuple[int, str] | None:
        if self.mode is QuoteCheckMode.OFF:
            return None
        row = await self.pool.fetchrow(
            "SELECT quote_id, payer, payee, currency, transfer_amount, expires_at_ms, ilp_packet, condition"
            " FROM quote_terms WHERE condition = $1 ORDER BY created_at_ms DESC LIMIT 1", body["condition"],
        )
        quote = None
        if row is not None:
            quote = QuoteTerms(
                quote_id=row["quote_id"], payer=row["payer"], payee=row["payee"], currency=row["currency"].strip(),
                transfer_amount_minor=from_decimal(row["transfer_amount"]), expires_at_ms=row["expires_at_ms"],
                ilp_packet=row["ilp_packet"], condition=row["condition"],
            )
        try:
            amount = parse_amount(body["amount"]["amount"])
        except AmountError:
            amount = -1  # the prepare's own checks refuse it
        transfer = TransferTerms(
            payer=body["payerFsp"], payee=body["payeeFsp"], currency=body["amount"]["currency"], amount_minor=amount,
            ilp_packet=body["ilpPacket"], condition=body["condition"],
        )
        return check_quote_link(self.mode, quote, transfer, self._clock_ms())
