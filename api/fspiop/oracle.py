"""Oracles: who holds a party. The registry of the ALS admin API, the built-in oracle, external oracles.

An oracle answers "which FSP holds party {Type}/{ID}[/{SubId}] (in this currency)?" and records
registrations (RULES.md section 9). Three pieces:

- ``choose_oracle`` (pure): which registered oracle serves a lookup. Rule, in order: the oracle
  registered for the party id type and the request's currency; else the type's default oracle
  (``isDefault``); else the **built-in** oracle. So a hub with no oracle registered serves every type
  from its own table, and registering ``{"endpoint": {"value": "builtin"}}`` names it explicitly.
- ``BuiltinOracle``: the ``party_registration`` table (migration 0005). A lookup is one statement
  (an index range scan on the primary key's prefix); a registration or deletion is one transaction,
  committed before the caller sends its callback.
- ``HttpOracle``: an external service speaking the oracle API (``api/spec/als-oracle-api.yaml``:
  synchronous REST ``GET/POST/PUT/DELETE /participants/{Type}/{ID}[/{SubId}]`` and the batch
  ``POST /participants``) through the pooled client of ``api/http.py``, each call bounded by
  ``oracle_timeout_ms``. Failures raise ``OracleUnavailable``; the caller turns them into FSPIOP errors.

``OracleRegistry`` caches the ``oracle`` rows in each ingress process and reloads them every
``refresh_ms`` (admin changes are made in another process, so there is nothing to invalidate from here).
``OracleAdmin`` serves ``GET/POST /oracles`` and ``PUT/DELETE /oracles/{ID}`` on the admin port with the
shapes of ``api/spec/als-admin-swagger.yaml``, and the built-in oracle over the oracle API under
``/oracle/participants/...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from enum import StrEnum
from urllib.parse import quote, urlencode, urlsplit

import asyncpg
import orjson

from api.http import ClientPool, HttpConnectionError, Request, Response
from core.errors import error_body

log = logging.getLogger(__name__)

BUILTIN = "builtin"  # the endpoint value naming the built-in oracle

# FSPIOP v1.1 PartyIdType: what a DFSP may look up or register.
PARTY_ID_TYPES = frozenset({"MSISDN", "EMAIL", "PERSONAL_ID", "BUSINESS", "DEVICE", "ACCOUNT_ID", "IBAN", "ALIAS"})
# The ALS admin API also accepts the third-party types; oracles may be registered for them.
ORACLE_ID_TYPES = PARTY_ID_TYPES | {"CONSENT", "THIRD_PARTY_LINK"}
_CURRENCY = re.compile(r"^[A-Z]{3}$")
# RFC 3986 pchar minus '%': what stays literal in a path segment sent to an oracle ('+' of MSISDNs included).
_SEGMENT_SAFE = "!$&'()*+,;=:@"


class OracleUnavailable(Exception):
    """An external oracle could not be asked or gave an answer we cannot use (timeout, 5xx, bad body)."""


class Registered(StrEnum):
    OK = "ok"
    OTHER_OWNER = "other_owner"  # another FSP holds the party (for this currency)


class Deleted(StrEnum):
    OK = "ok"
    NOT_FOUND = "not_found"  # nobody holds it
    NOT_OWNER = "not_owner"  # someone else holds it


@dataclass(frozen=True, slots=True)
class PartyKey:
    party_id_type: str
    party_identifier: str
    party_sub_id: str = ""  # "" when the request has no {SubId}

    def path(self) -> str:
        """``/participants/{Type}/{ID}[/{SubId}]`` with each segment percent-encoded."""
        parts = [self.party_id_type, self.party_identifier] + ([self.party_sub_id] if self.party_sub_id else [])
        return "/participants/" + "/".join(quote(p, safe=_SEGMENT_SAFE) for p in parts)


@dataclass(frozen=True, slots=True)
class Oracle:
    oracle_id: int
    party_id_type: str
    endpoint: str
    currency: str | None  # None: any currency
    is_default: bool

    @property
    def builtin(self) -> bool:
        return self.endpoint == BUILTIN

    def to_json(self) -> dict:
        """``OracleInfoGetResponse`` of the ALS admin API."""
        info: dict = {
            "oracleId": str(self.oracle_id),
            "oracleIdType": self.party_id_type,
            "endpoint": {"value": self.endpoint, "endpointType": "URL"},
            "isDefault": self.is_default,
        }
        if self.currency is not None:
            info["currency"] = self.currency
        return info


def choose_oracle(oracles: Iterable[Oracle], party_id_type: str, currency: str | None) -> Oracle | None:
    """The registered oracle for a lookup, or None for the built-in one (see the module docstring)."""
    default = None
    for oracle in oracles:
        if oracle.party_id_type != party_id_type:
            continue
        if currency is not None and oracle.currency == currency:
            return oracle
        if oracle.is_default and default is None:
            default = oracle
    return default


# --------------------------------------------------------------------------------------------------
# The built-in oracle


class BuiltinOracle:
    """Registrations in Postgres; ``currency`` None means "any" (stored as '')."""

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def lookup(self, key: PartyKey, currency: str | None) -> list[str]:
        with _database_errors():
            rows = await self.pool.fetch(
                "SELECT fsp_id FROM party_registration"
                " WHERE party_id_type = $1 AND party_identifier = $2 AND party_sub_id = $3"
                " AND ($4::text IS NULL OR currency = '' OR currency = $4) ORDER BY created_at, currency",
                key.party_id_type, key.party_identifier, key.party_sub_id, currency,
            )
        return _distinct(row["fsp_id"] for row in rows)

    async def register(self, key: PartyKey, fsp_id: str, currency: str | None) -> Registered:
        reasons = await self.register_many([(key, fsp_id)], currency, "")
        return Registered.OK if reasons[0] is None else Registered.OTHER_OWNER

    async def register_many(
        self, parties: Sequence[tuple[PartyKey, str]], currency: str | None, request_id: str
    ) -> list[str | None]:
        """Register (key, fspId) pairs in one transaction; per pair None (done) or why not.

        A party held by another FSP for the same currency, or by another FSP for any currency, or
        registered here for any currency while another FSP holds it in one, is refused: only its holder
        may change it. FSPs holding one party in different currencies is allowed (and a lookup without
        currency then names all of them).
        """
        unique: dict[PartyKey, str] = {}
        for key, fsp_id in parties:
            unique.setdefault(key, fsp_id)  # ON CONFLICT may not touch one row twice in a statement
        keys = list(unique)
        columns = (
            [k.party_id_type for k in keys], [k.party_identifier for k in keys], [k.party_sub_id for k in keys],
            currency or "", [unique[k] for k in keys],
        )
        with _database_errors():
            rows = await self._register(columns)
        done = {PartyKey(r["party_id_type"], r["party_identifier"], r["party_sub_id"]) for r in rows}
        return [
            None if key in done and unique[key] == fsp_id else "registered to another FSP" for key, fsp_id in parties
        ]

    async def _register(self, columns: tuple) -> list:
        async with self.pool.acquire() as connection, connection.transaction():
            # The owner check spans rows of other currencies, which ON CONFLICT cannot see: serialise
            # registrations of one party with a transaction lock per party (taken in one order: no deadlock).
            await connection.execute(
                "SELECT pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtext(t || chr(31) || i || chr(31) || s) AS h"
                " FROM unnest($1::text[], $2::text[], $3::text[]) AS u(t, i, s)) AS locks ORDER BY h",
                *columns[:3],
            )
            return await connection.fetch(
                "INSERT INTO party_registration (party_id_type, party_identifier, party_sub_id, currency, fsp_id)"
                " SELECT t, i, s, $4, f FROM unnest($1::text[], $2::text[], $3::text[], $5::text[]) AS u(t, i, s, f)"
                " WHERE NOT EXISTS (SELECT 1 FROM party_registration r WHERE r.party_id_type = u.t"
                "  AND r.party_identifier = u.i AND r.party_sub_id = u.s AND r.fsp_id <> u.f"
                "  AND ($4 = '' OR r.currency = '' OR r.currency = $4))"
                " ON CONFLICT (party_id_type, party_identifier, party_sub_id, currency)"
                " DO UPDATE SET changed_at = now() WHERE party_registration.fsp_id = EXCLUDED.fsp_id"
                " RETURNING party_id_type, party_identifier, party_sub_id",
                *columns,
            )

    async def delete(self, key: PartyKey, fsp_id: str, currency: str | None) -> Deleted:
        """Without ``currency``: every registration of ``fsp_id`` for the party; with it, that currency's."""
        with _database_errors():
            row = await self.pool.fetchrow(
                "WITH gone AS (DELETE FROM party_registration"
                "  WHERE party_id_type = $1 AND party_identifier = $2 AND party_sub_id = $3"
                "  AND ($4::text IS NULL OR currency = $4) AND fsp_id = $5 RETURNING 1)"
                " SELECT (SELECT count(*) FROM gone) AS deleted,"
                "  (SELECT count(*) FROM party_registration WHERE party_id_type = $1 AND party_identifier = $2"
                "   AND party_sub_id = $3 AND ($4::text IS NULL OR currency = $4) AND fsp_id <> $5) AS others",
                key.party_id_type, key.party_identifier, key.party_sub_id, currency, fsp_id,
            )
        if row["deleted"]:
            return Deleted.OK
        return Deleted.NOT_OWNER if row["others"] else Deleted.NOT_FOUND


    async def delete_any(self, key: PartyKey, currency: str | None) -> bool:
        """Remove the party whoever holds it (the oracle API's DELETE: its caller checked the owner)."""
        with _database_errors():
            deleted = await self.pool.fetchval(
                "WITH gone AS (DELETE FROM party_registration"
                "  WHERE party_id_type = $1 AND party_identifier = $2 AND party_sub_id = $3"
                "  AND ($4::text IS NULL OR currency = $4) RETURNING 1) SELECT count(*) FROM gone",
                key.party_id_type, key.party_identifier, key.party_sub_id, currency,
            )
        return bool(deleted)


@contextlib.contextmanager
def _database_errors():
    # Postgres down or failing is an unavailable oracle to the caller: an error callback, not a lost request.
    try:
        yield
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as error:
        raise OracleUnavailable(f"built-in oracle: {type(error).__name__}: {error}") from error


def _distinct(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------------------------------
# External oracles


class HttpOracle:
    """An oracle service at ``base_url`` (``http://host:port[/prefix]``), over the oracle API."""

    def __init__(self, base_url: str, client: ClientPool, *, timeout_ms: int):
        self.base_url = base_url.rstrip("/")
        self.client = client
        self.timeout_s = timeout_ms / 1000

    async def _call(self, method: str, path: str, query: dict | None = None, body: dict | None = None):
        url = self.base_url + path
        if query:
            url += "?" + urlencode(query)
        headers = [("Accept", "application/json"), ("Date", _http_date())]
        payload = b""
        if body is not None:
            headers.append(("Content-Type", "application/json"))
            payload = orjson.dumps(body)
        try:
            async with asyncio.timeout(self.timeout_s):
                status, _, answer = await self.client.request(method, url, headers, payload)
        except (TimeoutError, HttpConnectionError, OSError, ValueError) as error:
            raise OracleUnavailable(f"{method} {url}: {type(error).__name__}: {error}") from None
        return status, answer

    async def lookup(self, key: PartyKey, currency: str | None) -> list[str]:
        status, answer = await self._call("GET", key.path(), {"currency": currency} if currency else None)
        if status == 404:
            return []  # the oracle says nobody holds it
        if status != 200:
            raise OracleUnavailable(f"GET {key.path()}: HTTP {status}")
        try:
            party_list = orjson.loads(answer).get("partyList") or []
            return _distinct(str(item["fspId"]) for item in party_list)
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
            raise OracleUnavailable(f"GET {key.path()}: not a partyList: {answer[:200]!r}") from None

    async def register(self, key: PartyKey, fsp_id: str, currency: str | None) -> Registered:
        # The oracle API has no owner concept: ask first, then create (POST) or update (PUT) our own.
        holders = await self.lookup(key, currency)
        if any(holder != fsp_id for holder in holders):
            return Registered.OTHER_OWNER
        body: dict = {"fspId": fsp_id}
        if currency:
            body["currency"] = currency
        if key.party_sub_id:
            body["partySubIdOrType"] = key.party_sub_id
        method = "PUT" if holders else "POST"
        status, answer = await self._call(method, key.path(), None, body)
        if not 200 <= status < 300:
            raise OracleUnavailable(f"{method} {key.path()}: HTTP {status} {answer[:200]!r}")
        return Registered.OK

    async def register_many(
        self, parties: Sequence[tuple[PartyKey, str]], currency: str | None, request_id: str
    ) -> list[str | None]:
        """The oracle's batch ``POST /participants``; its per-party errors are passed on as reasons."""
        party_list = []
        for key, fsp_id in parties:
            item = {"partyIdType": key.party_id_type, "partyIdentifier": key.party_identifier, "fspId": fsp_id}
            if key.party_sub_id:
                item["partySubIdOrType"] = key.party_sub_id
            party_list.append(item)
        body: dict = {"requestId": request_id, "partyList": party_list}
        if currency:
            body["currency"] = currency
        status, answer = await self._call("POST", "/participants", None, body)
        if not 200 <= status < 300:
            raise OracleUnavailable(f"POST /participants: HTTP {status} {answer[:200]!r}")
        failed: dict[tuple[str, str, str], str] = {}
        try:
            results = (orjson.loads(answer).get("partyList") or []) if answer else []
            for result in results:
                info = result.get("errorInformation")
                if info:
                    party = result["partyId"]
                    ident = (party["partyIdType"], party["partyIdentifier"], party.get("partySubIdOrType") or "")
                    failed[ident] = str(info.get("errorDescription") or info.get("errorCode") or "oracle error")
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
            raise OracleUnavailable(f"POST /participants: not a partyList: {answer[:200]!r}") from None
        return [
            failed.get((key.party_id_type, key.party_identifier, key.party_sub_id)) for key, _ in parties
        ]

    async def delete(self, key: PartyKey, fsp_id: str, currency: str | None) -> Deleted:
        holders = await self.lookup(key, currency)
        if not holders:
            return Deleted.NOT_FOUND
        if any(holder != fsp_id for holder in holders):
            # The oracle API's DELETE removes whatever matches: never let it take another FSP's record along.
            return Deleted.NOT_OWNER
        status, answer = await self._call("DELETE", key.path(), {"currency": currency} if currency else None)
        if not 200 <= status < 300:
            raise OracleUnavailable(f"DELETE {key.path()}: HTTP {status} {answer[:200]!r}")
        return Deleted.OK


def _http_date() -> str:
    return formatdate(usegmt=True)


# --------------------------------------------------------------------------------------------------
# The registry, cached per ingress process


async def load_oracles(pool: asyncpg.Pool) -> tuple[Oracle, ...]:
    rows = await pool.fetch(
        "SELECT oracle_id, party_id_type, endpoint, currency, is_default FROM oracle ORDER BY oracle_id"
    )
    return tuple(_oracle_of(row) for row in rows)


def _oracle_of(row) -> Oracle:
    currency = row["currency"].strip() if row["currency"] is not None else None
    return Oracle(row["oracle_id"], row["party_id_type"], row["endpoint"], currency, row["is_default"])


class OracleRegistry:
    """Which oracle serves a lookup, from a cache of the ``oracle`` table reloaded every ``refresh_ms``.

    A failed reload keeps the previous cache (a stale registry beats none) and is logged.
    """

    def __init__(
        self, pool: asyncpg.Pool, *, refresh_ms: int = 1_000, timeout_ms: int = 3_000, connections_max: int = 16
    ):
        if refresh_ms <= 0 or timeout_ms <= 0 or connections_max < 1:
            raise ValueError("refresh_ms and timeout_ms must be > 0, connections_max >= 1")
        self.pool = pool
        self.refresh_ms = refresh_ms
        self.timeout_ms = timeout_ms
        self.builtin = BuiltinOracle(pool)
        self.oracles: tuple[Oracle, ...] = ()
        self._client = ClientPool(
            request_timeout_s=timeout_ms / 1000, connect_timeout_s=min(2.0, timeout_ms / 1000),
            max_connections=connections_max,
        )
        self._external: dict[str, HttpOracle] = {}
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.reload()
        self._task = asyncio.get_running_loop().create_task(self._refresh_forever(), name="oracle-refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._client.close()

    async def reload(self) -> None:
        self.oracles = await load_oracles(self.pool)

    def oracle_for(self, party_id_type: str, currency: str | None) -> BuiltinOracle | HttpOracle:
        chosen = choose_oracle(self.oracles, party_id_type, currency)
        if chosen is None or chosen.builtin:
            return self.builtin
        client = self._external.get(chosen.endpoint)
        if client is None:
            client = self._external[chosen.endpoint] = HttpOracle(
                chosen.endpoint, self._client, timeout_ms=self.timeout_ms
            )
        return client

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_ms / 1000)
            try:
                await self.reload()
            except (OSError, asyncpg.PostgresError) as error:
                log.warning("oracle registry refresh failed, keeping the previous one: %r", error)


# --------------------------------------------------------------------------------------------------
# The ALS admin API: /oracles on the admin port


class _Invalid(Exception):
    def __init__(self, code: int, detail: str, status: int = 400):
        super().__init__(detail)
        self.code, self.detail, self.status = code, detail, status


def _json_response(status: int, payload) -> Response:
    return Response(status, orjson.dumps(payload), content_type="application/json")


def parse_oracle_info(raw: bytes) -> tuple[str, str, str | None, bool]:
    """An ``OracleInfo`` body -> (oracleIdType, endpoint value, currency, isDefault); raises _Invalid."""
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError) as error:
        raise _Invalid(3101, f"body is not JSON: {error}") from None
    if not isinstance(body, dict):
        raise _Invalid(3101, "body must be a JSON object")
    for name in ("oracleIdType", "endpoint"):
        if name not in body:
            raise _Invalid(3102, name)
    id_type = body["oracleIdType"]
    if id_type not in ORACLE_ID_TYPES:
        raise _Invalid(3101, f"oracleIdType must be one of {', '.join(sorted(ORACLE_ID_TYPES))}")
    endpoint = body["endpoint"]
    if not isinstance(endpoint, dict) or "value" not in endpoint or "endpointType" not in endpoint:
        raise _Invalid(3102, "endpoint needs value and endpointType")
    if endpoint["endpointType"] != "URL":
        raise _Invalid(3101, "endpoint.endpointType must be URL")
    value = endpoint["value"]
    if not isinstance(value, str) or not 1 <= len(value) <= 512:
        raise _Invalid(3101, "endpoint.value must be 1 to 512 characters")
    if value != BUILTIN:
        parts = urlsplit(value)
        # The oracle client speaks plain HTTP (api/http.py has no TLS); refuse what it could never call.
        if parts.scheme != "http" or not parts.hostname or parts.query or parts.fragment:
            raise _Invalid(3101, f"endpoint.value must be an http:// base URL or {BUILTIN!r}")
    currency = body.get("currency")
    if currency is not None and (not isinstance(currency, str) or not _CURRENCY.match(currency)):
        raise _Invalid(3101, "currency must be an ISO 4217 code")
    is_default = body.get("isDefault", False)
    if not isinstance(is_default, bool):
        raise _Invalid(3101, "isDefault must be a boolean")
    return id_type, value, currency, is_default


class OracleAdmin:
    """``/oracles`` of the ALS admin API; ``routes()`` plugs into ``api/admin.py``'s route table."""

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool
        self.builtin = BuiltinOracle(pool)

    def routes(self) -> list:
        routes = [
            ("GET", ("oracles",), self.list_oracles),
            ("POST", ("oracles",), self.create_oracle),
            ("PUT", ("oracles", None), self.update_oracle),
            ("DELETE", ("oracles", None), self.delete_oracle),
            ("POST", ("oracle", "participants"), self.oracle_batch),
        ]
        # The built-in oracle over the oracle API, so another ALS (or this hub, registered as an external
        # oracle) can use it: /oracle/participants/{Type}/{ID}[/{SubId}].
        for party in (("oracle", "participants", None, None), ("oracle", "participants", None, None, None)):
            routes += [
                ("GET", party, self.oracle_get),
                ("POST", party, self.oracle_put),
                ("PUT", party, self.oracle_put),
                ("DELETE", party, self.oracle_delete),
            ]
        return routes

    async def list_oracles(self, request: Request) -> Response:
        id_type = request.query.get("type") or None
        currency = request.query.get("currency") or None
        rows = await self.pool.fetch(
            "SELECT oracle_id, party_id_type, endpoint, currency, is_default FROM oracle"
            " WHERE ($1::text IS NULL OR party_id_type = $1) AND ($2::text IS NULL OR currency = $2)"
            " ORDER BY oracle_id",
            id_type, currency,
        )
        return _json_response(200, [_oracle_of(row).to_json() for row in rows])

    async def create_oracle(self, request: Request) -> Response:
        try:
            id_type, value, currency, is_default = parse_oracle_info(request.body)
            await self._write(None, id_type, value, currency, is_default)
        except _Invalid as error:
            return _json_response(error.status, error_body(error.code, error.detail))
        return Response(201)

    async def update_oracle(self, request: Request, oracle_id: str) -> Response:
        try:
            number = _oracle_id(oracle_id)
            id_type, value, currency, is_default = parse_oracle_info(request.body)
            await self._write(number, id_type, value, currency, is_default)
        except _Invalid as error:
            return _json_response(error.status, error_body(error.code, error.detail))
        return Response(204)

    async def delete_oracle(self, request: Request, oracle_id: str) -> Response:
        try:
            number = _oracle_id(oracle_id)
        except _Invalid as error:
            return _json_response(error.status, error_body(error.code, error.detail))
        deleted = await self.pool.fetchval("DELETE FROM oracle WHERE oracle_id = $1 RETURNING oracle_id", number)
        if deleted is None:
            return _json_response(404, error_body(3200, f"oracle {oracle_id} not found"))
        return Response(204)

    # ---- the built-in oracle over the oracle API (api/spec/als-oracle-api.yaml)

    async def oracle_get(self, request: Request, id_type: str, identifier: str, sub_id: str = "") -> Response:
        try:
            key = _oracle_key(id_type, identifier, sub_id or request.query.get("partySubIdOrType", ""))
            currency = _oracle_currency(request.query.get("currency"))
            holders = await self.builtin.lookup(key, currency)
        except _Invalid as error:
            return _json_response(error.status, error_body(error.code, error.detail))
        if not holders:
            return _json_response(404, error_body(3204, "no FSP holds this party"))
        party_list = [{"fspId": fsp, **({"partySubIdOrType": key.party_sub_id} if key.party_sub_id else {})}
                      for fsp in holders]
        return _json_response(200, {"partyList": party_list})

    async def oracle_put(self, request: Request, id_type: str, identifier: str, sub_id: str = "") -> Response:
        try:
            body = _json_object(request.body)
            fsp_id = body.get("fspId")
            if not isinstance(fsp_id, str) or not 1 <= len(fsp_id) <= 32:
                raise _Invalid(3102 if fsp_id is None else 3101, "fspId")
            key = _oracle_key(id_type, identifier, sub_id or body.get("partySubIdOrType") or "")
            outcome = await self.builtin.register(key, fsp_id, _oracle_currency(body.get("currency")))
        except _Invalid as error:
            return _json_response(error.status, error_body(error.code, error.detail))
        if outcome is Registered.OTHER_OWNER:
            return _json_response(400, error_body(3003, "the party is registered to another FSP"))
        return Response(201 if request.method == "POST" else 200)

    async def oracle_delete(self, request: Request, id_type: str, identifier: str, sub_id: str = "") -> Response:
        try:
            key = _oracle_key(id_type, identifier, sub_id or request.query.get("partySubIdOrType", ""))
            found = await self.builtin.delete_any(key, _oracle_currency(request.query.get("currency")))
        except _Invalid as error:
            return _json_response(error.status, error_body(error.code, error.detail))
        return Response(204) if found else _json_response(404, error_body(3204, "no FSP holds this party"))

    async def oracle_batch(self, request: Request) -> Response:
        try:
            body = _json_object(request.body)
            party_list = body.get("partyList")
            if not isinstance(party_list, list) or not 1 <= len(party_list) <= 10_000:
                raise _Invalid(3101, "partyList must hold 1 to 10000 parties")
            currency = _oracle_currency(body.get("currency"))
            pairs = []
            for party in party_list:
                if not isinstance(party, dict) or not isinstance(party.get("fspId"), str):
                    raise _Invalid(3101, "each party needs partyIdType, partyIdentifier and fspId")
                key = _oracle_key(party.get("partyIdType"), party.get("partyIdentifier"),
                                  party.get("partySubIdOrType") or "")
                pairs.append((key, party["fspId"]))
            reasons = await self.builtin.register_many(pairs, currency, str(body.get("requestId", "")))
        except _Invalid as error:
            return _json_response(error.status, error_body(error.code, error.detail))
        results = []
        for party, reason in zip(party_list, reasons, strict=True):
            result: dict = {"partyId": party}
            if reason is not None:
                result["errorInformation"] = error_body(3003, reason)["errorInformation"]
            results.append(result)
        answer: dict = {"partyList": results}
        if currency:
            answer["currency"] = currency
        return _json_response(201, answer)

    async def _write(self, oracle_id: int | None, id_type: str, value: str, currency: str | None,
                     is_default: bool) -> None:
        async with self.pool.acquire() as connection, connection.transaction():
            if is_default:
                # One default per type (as the ALS does): a new default replaces the previous one.
                await connection.execute(
                    "UPDATE oracle SET is_default = false, changed_at = now()"
                    " WHERE party_id_type = $1 AND is_default AND oracle_id IS DISTINCT FROM $2",
                    id_type, oracle_id,
                )
            try:
                if oracle_id is None:
                    await connection.execute(
                        "INSERT INTO oracle (party_id_type, endpoint, currency, is_default) VALUES ($1, $2, $3, $4)",
                        id_type, value, currency, is_default,
                    )
                    return
                found = await connection.fetchval(
                    "UPDATE oracle SET party_id_type = $2, endpoint = $3, currency = $4, is_default = $5,"
                    " changed_at = now() WHERE oracle_id = $1 RETURNING oracle_id",
                    oracle_id, id_type, value, currency, is_default,
                )
            except asyncpg.UniqueViolationError:
                # Only (type, currency) can collide: the type's previous default was cleared above.
                raise _Invalid(3100, f"an oracle for {id_type} in {currency} exists already") from None
            if found is None:
                raise _Invalid(3200, f"oracle {oracle_id} not found", status=404)


def _oracle_id(text: str) -> int:
    if not text.isdigit() or len(text) > 9:
        raise _Invalid(3200, f"oracle {text} not found", status=404)
    return int(text)


def _json_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError) as error:
        raise _Invalid(3101, f"body is not JSON: {error}") from None
    if not isinstance(body, dict):
        raise _Invalid(3101, "body must be a JSON object")
    return body


def _oracle_key(id_type, identifier, sub_id) -> PartyKey:
    if id_type not in ORACLE_ID_TYPES:
        raise _Invalid(3101, "Type must be a PartyIdType")
    for name, value in (("ID", identifier), ("partySubIdOrType", sub_id)):
        if not isinstance(value, str) or len(value) > 128 or "\x00" in value or (name == "ID" and not value):
            raise _Invalid(3101, name)
    return PartyKey(id_type, identifier, sub_id)


def _oracle_currency(currency) -> str | None:
    if currency is None or currency == "":
        return None
    if not isinstance(currency, str) or not _CURRENCY.match(currency):
        raise _Invalid(3101, "currency must be an ISO 4217 code")
    return currency
