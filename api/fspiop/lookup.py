"""FSPIOP account lookup: ``/parties`` (the hub routes to the payee FSP) and ``/participants`` (the hub is the ALS).

Requests arrive here routed, header-checked and schema-validated (``api/fspiop/ingress.py``). What can be
refused at once is refused synchronously: a path parameter that is not a PartyIdType / PartyIdentifier
(3101), a callback without FSPIOP-Destination (3102), a bad ``?currency=`` (3101). The rest runs after the
202/200 and ends in callbacks (RULES.md sections 4 and 9, Mojaloop's account-lookup-service):

- ``GET /parties/{Type}/{ID}[/{SubId}]`` with FSPIOP-Destination: the GET, unchanged, to the
  destination's ``FSPIOP_CALLBACK_URL_PARTIES_[SUB_ID_]GET``.
- The same without Destination: the oracle (``api/fspiop/oracle.py``) names the FSPs holding the
  party; the GET goes to each (at most ``fanout_max``) with FSPIOP-Destination set to it and the
  original FSPIOP-Source kept. Nobody: ``PUT /parties/.../error`` 3204 to the requester.
- ``PUT /parties/...[/error]``: relayed unchanged to FSPIOP-Destination's ``..._PARTIES_[SUB_ID_]PUT[_ERROR]``.
- ``GET /participants/{Type}/{ID}[/{SubId}]``: ``PUT /participants/...`` {fspId} from the oracle; nobody: 3204.
- ``POST /participants/{Type}/{ID}[/{SubId}]``: fspId must be the sender, and the oracle records it
  unless another FSP holds the party: ``PUT /participants/...`` {fspId}; else 3003.
- ``DELETE /participants/{Type}/{ID}[/{SubId}]``: only the FSP holding the party may delete it:
  ``PUT /participants/...`` without fspId (the spec's "empty"); 3204 when nobody holds it, 3040 not the owner.
- ``POST /participants`` (bulk): per party, fspId must be the sender (3204) and the oracle must take
  it (3003); ``PUT /participants/{requestId}`` with a result per party.
- ``PUT /participants/...[/error]`` from a DFSP (the no-common-ALS model): relayed to FSPIOP-Destination.

An unknown or inactive requester gets 3200; an unknown or inactive destination, or one without the
endpoint, 3201 (to the sender; never in answer to an error callback, which is only logged). Errors the
hub originates come from the hub's name, in the version negotiated with the requester. Registrations in
the built-in oracle are committed in Postgres before their callback is queued.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from urllib.parse import quote

import orjson

from api.fspiop.callbacks import CallbackDispatcher, EndpointDirectory, forward_headers, hub_headers
from api.fspiop.oracle import (
    PARTY_ID_TYPES,
    Deleted,
    OracleRegistry,
    OracleUnavailable,
    PartyKey,
    Registered,
)
from core.errors import FspiopError

log = logging.getLogger(__name__)

PARTIES_GET = "FSPIOP_CALLBACK_URL_PARTIES_GET"
PARTIES_SUB_ID_GET = "FSPIOP_CALLBACK_URL_PARTIES_SUB_ID_GET"
PARTIES_PUT = "FSPIOP_CALLBACK_URL_PARTIES_PUT"
PARTIES_SUB_ID_PUT = "FSPIOP_CALLBACK_URL_PARTIES_SUB_ID_PUT"
PARTIES_PUT_ERROR = "FSPIOP_CALLBACK_URL_PARTIES_PUT_ERROR"
PARTIES_SUB_ID_PUT_ERROR = "FSPIOP_CALLBACK_URL_PARTIES_SUB_ID_PUT_ERROR"
PARTICIPANT_PUT = "FSPIOP_CALLBACK_URL_PARTICIPANT_PUT"
PARTICIPANT_SUB_ID_PUT = "FSPIOP_CALLBACK_URL_PARTICIPANT_SUB_ID_PUT"
PARTICIPANT_PUT_ERROR = "FSPIOP_CALLBACK_URL_PARTICIPANT_PUT_ERROR"
PARTICIPANT_SUB_ID_PUT_ERROR = "FSPIOP_CALLBACK_URL_PARTICIPANT_SUB_ID_PUT_ERROR"
PARTICIPANT_BATCH_PUT = "FSPIOP_CALLBACK_URL_PARTICIPANT_BATCH_PUT"
PARTICIPANT_BATCH_PUT_ERROR = "FSPIOP_CALLBACK_URL_PARTICIPANT_BATCH_PUT_ERROR"

# Endpoint types by (resource, what, has SubId).
_ENDPOINTS = {
    ("parties", "get", False): PARTIES_GET,
    ("parties", "get", True): PARTIES_SUB_ID_GET,
    ("parties", "put", False): PARTIES_PUT,
    ("parties", "put", True): PARTIES_SUB_ID_PUT,
    ("parties", "error", False): PARTIES_PUT_ERROR,
    ("parties", "error", True): PARTIES_SUB_ID_PUT_ERROR,
    ("participants", "put", False): PARTICIPANT_PUT,
    ("participants", "put", True): PARTICIPANT_SUB_ID_PUT,
    ("participants", "error", False): PARTICIPANT_PUT_ERROR,
    ("participants", "error", True): PARTICIPANT_SUB_ID_PUT_ERROR,
}

_CURRENCY = re.compile(r"^[A-Z]{3}$")
_IDENTIFIER_MAX = 128  # PartyIdentifier and PartySubIdOrType are String(1..128)
_SEGMENT_SAFE = "!$&'()*+,;=:@"


def party_key(params: Mapping[str, str]) -> PartyKey:
    """The party a path names; 3101 when a parameter cannot be one (checked before the 202)."""
    id_type = params["Type"]
    if id_type not in PARTY_ID_TYPES:
        raise FspiopError(3101, "Type must be a PartyIdType")
    identifier = params["ID"]
    sub_id = params.get("SubId", "")
    for name, value in (("ID", identifier), ("SubId", sub_id)):
        # NUL: Postgres text cannot hold it, and no identifier needs it.
        if len(value) > _IDENTIFIER_MAX or "\x00" in value:
            raise FspiopError(3101, name)
    return PartyKey(id_type, identifier, sub_id)


def currency_query(query: Mapping[str, str]) -> str | None:
    """``?currency=`` of GET/DELETE /participants (RULES.md 4: in the prose, not the OpenAPI file)."""
    currency = query.get("currency") or None
    if currency is not None and not _CURRENCY.match(currency):
        raise FspiopError(3101, "currency")
    return currency


def _template_params(key: PartyKey) -> dict[str, str]:
    params = {"partyIdType": key.party_id_type, "partyIdentifier": key.party_identifier}
    if key.party_sub_id:
        params["partySubIdOrType"] = key.party_sub_id
    return params


def _uri(resource: str, *segments: str) -> str:
    # FSPIOP-URI as it appears on the wire: percent-encoded, so a Burmese identifier fits a latin-1 header.
    return f"/{resource}/" + "/".join(quote(s, safe=_SEGMENT_SAFE) for s in segments if s)


def _key_segments(key: PartyKey) -> tuple[str, ...]:
    return (key.party_id_type, key.party_identifier, key.party_sub_id)


def _destination(headers: Mapping[str, str]) -> str:
    value = (headers.get("fspiop-destination") or "").strip()
    if not value:
        # A callback goes back to whoever asked; without Destination nobody knows who that is.
        raise FspiopError(3102, "fspiop-destination")
    return value


class LookupCallbacks:
    """Sends lookup callbacks through the shared delivery component (endpoints + dispatcher)."""

    def __init__(self, endpoints: EndpointDirectory, dispatcher: CallbackDispatcher, *, hub_name: str):
        self.endpoints = endpoints
        self.dispatcher = dispatcher
        self.hub_name = hub_name

    async def url(self, fsp: str, endpoint_type: str, *, fresh: bool, **params: str) -> str | None:
        """``fresh``: make sure endpoints registered before now are seen (costs a reload on a miss)."""
        since = time.monotonic() if fresh else None
        try:
            return await self.endpoints.resolve(fsp, endpoint_type, since=since, **params)
        except ValueError as error:  # a template naming a placeholder this message has no value for
            log.warning("endpoint %s of %s unusable: %s", endpoint_type, fsp, error)
            return None

    async def forward(
        self, fsp: str, endpoint_type: str, method: str, headers: Mapping[str, str], body: bytes, kind: str,
        *, destination: str | None = None, fresh: bool = True, **params: str,
    ) -> bool:
        """A DFSP's message passed on with its headers (and so its signature) unchanged."""
        url = await self.url(fsp, endpoint_type, fresh=fresh, **params)
        if url is None:
            return False
        return self.dispatcher.send(
            fsp, method, url, forward_headers(headers, method=method, destination=destination), body, kind=kind
        )

    async def hub(
        self, fsp: str, endpoint_type: str, resource: str, version: str, uri: str, body: dict, kind: str,
        **params: str,
    ) -> bool:
        """A ``PUT`` the hub originates (FSPIOP-Source = the hub's name)."""
        url = await self.url(fsp, endpoint_type, fresh=True, **params)
        if url is None:
            log.warning("no %s endpoint for %s: %s %s not sent", endpoint_type, fsp, kind, uri)
            return False
        headers = hub_headers(
            resource=resource, version=version, source=self.hub_name, destination=fsp, method="PUT", uri=uri
        )
        return self.dispatcher.send(fsp, "PUT", url, headers, orjson.dumps(body), kind=kind)

    async def error(self, fsp: str, resource: str, key: PartyKey, code: int, detail: str, version: str) -> bool:
        """``PUT /{resource}/{Type}/{ID}[/{SubId}]/error`` from the hub."""
        endpoint_type = _ENDPOINTS[(resource, "error", bool(key.party_sub_id))]
        uri = _uri(resource, *_key_segments(key), "error")
        body = FspiopError(code, detail).to_body()
        return await self.hub(fsp, endpoint_type, resource, version, uri, body, f"{resource}_error",
                              **_template_params(key))


def _problem_of(name: str, role: str, info) -> str | None:
    if info is None or info.is_hub:
        return f"{role} FSP {name} not found"
    if not info.is_active:
        return f"{role} FSP {name} is not active"
    return None


class _Lookup:
    """What both resources share: participant checks and relaying a callback to its destination."""

    resource = ""

    def __init__(self, *, directory, registry: OracleRegistry, callbacks: LookupCallbacks):
        self.directory = directory
        self.registry = registry
        self.callbacks = callbacks
        self.hub_name = callbacks.hub_name

    async def _problem_with(self, name: str, role: str, *, recheck: bool = True) -> str | None:
        """Why ``name`` cannot take part (unknown, the hub itself, inactive), or None.

        A name missing from the cache is looked up after a reload (it may have been onboarded a moment
        ago). With ``recheck``, any refusal is made on a fresh load (the cache may predate an activation);
        without it an inactive FSP is skipped on the cache's word, so an oracle naming one does not cost
        a reload per lookup.
        """
        asked = time.monotonic()
        problem = _problem_of(name, role, await self.directory.resolve(name, since=asked))
        if problem is not None and recheck:
            await self.directory.refresh(since=asked)
            problem = _problem_of(name, role, self.directory.get(name))
        return problem

    async def _relay(
        self, headers: Mapping[str, str], raw_body: bytes, destination: str, *, error: bool,
        endpoint_type: str, params: dict[str, str], uri_segments: tuple[str, ...], key: PartyKey | None,
        version: str,
    ) -> None:
        """A DFSP's ``PUT`` (or ``PUT .../error``) passed on to FSPIOP-Destination."""
        source = headers.get("fspiop-source", "")
        kind = f"{self.resource}_{'error' if error else 'put'}"
        problem = await self._problem_with(destination, "destination")
        if problem is None and await self.callbacks.forward(
            destination, endpoint_type, "PUT", headers, raw_body, kind, **params
        ):
            return
        problem = problem or f"destination FSP {destination} has no {endpoint_type} endpoint"
        if error:
            # Never answer an error callback with another one (they could bounce forever).
            log.warning("%s %s from %s not relayed: %s", kind, "/".join(uri_segments), source, problem)
        elif key is not None:
            await self.callbacks.error(source, self.resource, key, 3201, problem, version)
        else:  # a bulk result: PUT /participants/{requestId}/error
            await self.callbacks.hub(
                source, PARTICIPANT_BATCH_PUT_ERROR, self.resource, version,
                _uri(self.resource, *uri_segments, "error"), FspiopError(3201, problem).to_body(),
                f"{self.resource}_error", **params,
            )


class PartiesHandler(_Lookup):
    """``/parties``: the hub finds the payee FSP and routes between the two."""

    resource = "parties"

    def __init__(self, *, fanout_max: int = 10, **parts):
        super().__init__(**parts)
        if fanout_max < 1:
            raise ValueError("fanout_max must be >= 1")
        self.fanout_max = fanout_max

    def work_for(self, route, request, body, version: str):
        key = party_key(route.params)
        headers = request.headers
        if route.method == "GET":
            return self.lookup(key, headers, currency_query(request.query), version)
        error = route.template.endswith("/error")
        destination = _destination(headers)
        endpoint_type = _ENDPOINTS[("parties", "error" if error else "put", bool(key.party_sub_id))]
        return self._relay(
            headers, request.body, destination, error=error, endpoint_type=endpoint_type,
            params=_template_params(key), uri_segments=_key_segments(key), key=key, version=version,
        )

    async def lookup(self, key: PartyKey, headers: Mapping[str, str], currency: str | None, version: str) -> None:
        source = headers.get("fspiop-source", "")
        problem = await self._problem_with(source, "requester")
        if problem is not None:
            await self.callbacks.error(source, "parties", key, 3200, problem, version)
            return
        endpoint_type = _ENDPOINTS[("parties", "get", bool(key.party_sub_id))]
        params = _template_params(key)
        destination = (headers.get("fspiop-destination") or "").strip()
        if destination == self.hub_name:
            # [AD 3.2.3.6]: left "empty (or set to the Switch's ID)"; the hub sets it to each FSP it asks.
            headers = {name: value for name, value in headers.items() if name != "fspiop-destination"}
            destination = ""
        if destination:
            problem = await self._problem_with(destination, "destination")
            if problem is None and not await self.callbacks.forward(
                destination, endpoint_type, "GET", headers, b"", "parties_get", **params
            ):
                problem = f"destination FSP {destination} has no {endpoint_type} endpoint"
            if problem is not None:
                await self.callbacks.error(source, "parties", key, 3201, problem, version)
            return
        try:
            holders = await self.registry.oracle_for(key.party_id_type, currency).lookup(key, currency)
        except OracleUnavailable as error:
            log.warning("parties lookup of %s/%s: %s", key.party_id_type, key.party_identifier, error)
            await self.callbacks.error(source, "parties", key, 2003, "oracle unavailable", version)
            return
        forwarded = 0
        for fsp in holders:
            if forwarded >= self.fanout_max:
                break
            if await self._problem_with(fsp, "payee", recheck=False) is not None:
                continue
            # fresh=False: an FSP the oracle names without a GET endpoint must not cost a reload per lookup.
            if await self.callbacks.forward(
                fsp, endpoint_type, "GET", headers, b"", "parties_get", destination=fsp, fresh=False, **params
            ):
                forwarded += 1
        if not forwarded:
            await self.callbacks.error(source, "parties", key, 3204, "no FSP holds this party", version)


class ParticipantsHandler(_Lookup):
    """``/participants``: the hub is the account lookup service, answering from the oracles."""

    resource = "participants"

    def work_for(self, route, request, body, version: str):
        headers = request.headers
        params = route.params
        if route.template == "/participants":
            return self.register_many(headers, body, version)
        if "Type" not in params:  # PUT /participants/{ID}[/error]: a bulk result between DFSPs
            error = route.template.endswith("/error")
            request_id = params["ID"]
            if len(request_id) > _IDENTIFIER_MAX or "\x00" in request_id:
                raise FspiopError(3101, "ID")
            return self._relay(
                headers, request.body, _destination(headers), error=error,
                endpoint_type=PARTICIPANT_BATCH_PUT_ERROR if error else PARTICIPANT_BATCH_PUT,
                params={"requestId": request_id}, uri_segments=(request_id,), key=None, version=version,
            )
        key = party_key(params)
        if route.method == "GET":
            return self.lookup(key, headers, currency_query(request.query), version)
        if route.method == "POST":
            return self.register(key, headers, body, version)
        if route.method == "DELETE":
            return self.delete(key, headers, currency_query(request.query), version)
        error = route.template.endswith("/error")
        endpoint_type = _ENDPOINTS[("participants", "error" if error else "put", bool(key.party_sub_id))]
        return self._relay(
            headers, request.body, _destination(headers), error=error, endpoint_type=endpoint_type,
            params=_template_params(key), uri_segments=_key_segments(key), key=key, version=version,
        )

    async def _answer(self, fsp: str, key: PartyKey, body: dict, version: str) -> None:
        endpoint_type = _ENDPOINTS[("participants", "put", bool(key.party_sub_id))]
        uri = _uri("participants", *_key_segments(key))
        await self.callbacks.hub(fsp, endpoint_type, "participants", version, uri, body, "participants_put",
                                 **_template_params(key))

    async def _error(self, fsp: str, key: PartyKey, code: int, detail: str, version: str) -> None:
        await self.callbacks.error(fsp, "participants", key, code, detail, version)

    async def lookup(self, key: PartyKey, headers: Mapping[str, str], currency: str | None, version: str) -> None:
        source = headers.get("fspiop-source", "")
        problem = await self._problem_with(source, "requester")
        if problem is not None:
            await self._error(source, key, 3200, problem, version)
            return
        try:
            holders = await self.registry.oracle_for(key.party_id_type, currency).lookup(key, currency)
        except OracleUnavailable as error:
            log.warning("participants lookup of %s/%s: %s", key.party_id_type, key.party_identifier, error)
            await self._error(source, key, 2003, "oracle unavailable", version)
            return
        if not holders:
            await self._error(source, key, 3204, "no FSP holds this party", version)
            return
        await self._answer(source, key, {"fspId": holders[0]}, version)

    async def register(self, key: PartyKey, headers: Mapping[str, str], body: dict, version: str) -> None:
        source = headers.get("fspiop-source", "")
        problem = await self._problem_with(source, "requester")
        if problem is not None:
            await self._error(source, key, 3200, problem, version)
            return
        fsp_id = body["fspId"]
        if fsp_id != source:
            # An FSP registers its own customers only: anything else would let it divert payments.
            await self._error(source, key, 3003, f"fspId {fsp_id} is not the FSPIOP-Source", version)
            return
        currency = body.get("currency")
        try:
            outcome = await self.registry.oracle_for(key.party_id_type, currency).register(key, fsp_id, currency)
        except OracleUnavailable as error:
            log.warning("participants register of %s/%s: %s", key.party_id_type, key.party_identifier, error)
            await self._error(source, key, 3003, "oracle unavailable", version)
            return
        if outcome is Registered.OTHER_OWNER:
            await self._error(source, key, 3003, "the party is registered to another FSP", version)
            return
        await self._answer(source, key, {"fspId": fsp_id}, version)

    async def delete(self, key: PartyKey, headers: Mapping[str, str], currency: str | None, version: str) -> None:
        source = headers.get("fspiop-source", "")
        problem = await self._problem_with(source, "requester")
        if problem is not None:
            await self._error(source, key, 3200, problem, version)
            return
        try:
            outcome = await self.registry.oracle_for(key.party_id_type, currency).delete(key, source, currency)
        except OracleUnavailable as error:
            log.warning("participants delete of %s/%s: %s", key.party_id_type, key.party_identifier, error)
            await self._error(source, key, 3040, "oracle unavailable", version)
            return
        if outcome is Deleted.NOT_FOUND:
            await self._error(source, key, 3204, "no FSP holds this party", version)
        elif outcome is Deleted.NOT_OWNER:
            await self._error(source, key, 3040, "only the FSP holding the party may delete it", version)
        else:
            # [AD 6.2.4.1]: after a delete "the fspId element should be empty"; FspId is String(1..32),
            # so empty means absent.
            await self._answer(source, key, {}, version)

    async def register_many(self, headers: Mapping[str, str], body: dict, version: str) -> None:
        source = headers.get("fspiop-source", "")
        request_id = body["requestId"]
        currency = body.get("currency")
        problem = await self._problem_with(source, "requester")
        if problem is not None:
            await self.callbacks.hub(
                source, PARTICIPANT_BATCH_PUT_ERROR, "participants", version,
                _uri("participants", request_id, "error"), FspiopError(3200, problem).to_body(),
                "participants_error", requestId=request_id,
            )
            return
        party_list = body["partyList"]
        errors: list[FspiopError | None] = [None] * len(party_list)
        # Parties of one id type go to one oracle in one call.
        groups: dict[str, list[int]] = {}
        for index, party in enumerate(party_list):
            fsp_id = party.get("fspId", source)
            if fsp_id != source:
                errors[index] = FspiopError(3204, f"fspId {fsp_id} is not the FSPIOP-Source")
            elif "\x00" in party["partyIdentifier"] or "\x00" in party.get("partySubIdOrType", ""):
                errors[index] = FspiopError(3003, "NUL character in the party")
            else:
                groups.setdefault(party["partyIdType"], []).append(index)
        for id_type, indexes in groups.items():
            keys = [
                (PartyKey(id_type, party_list[i]["partyIdentifier"], party_list[i].get("partySubIdOrType", "")),
                 source)
                for i in indexes
            ]
            try:
                reasons = await self.registry.oracle_for(id_type, currency).register_many(keys, currency, request_id)
            except OracleUnavailable as error:
                log.warning("participants bulk %s for %s: %s", request_id, id_type, error)
                reasons = ["oracle unavailable"] * len(indexes)
            for i, reason in zip(indexes, reasons, strict=True):
                if reason is not None:
                    errors[i] = FspiopError(3003, reason)
        results = []
        for party, error in zip(party_list, errors, strict=True):
            result: dict = {"partyId": party}
            if error is not None:
                result["errorInformation"] = error.to_body()["errorInformation"]
            results.append(result)
        answer: dict = {"partyList": results}
        if currency:
            answer["currency"] = currency
        await self.callbacks.hub(
            source, PARTICIPANT_BATCH_PUT, "participants", version, _uri("participants", request_id), answer,
            "participants_put", requestId=request_id,
        )
