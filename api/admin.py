"""The hub operator's admin API, wire-compatible with Mojaloop central-ledger's.

Resources follow ``central-ledger-admin-swagger.json`` (RULES.md section 14): participants and
their currencies, hub accounts, net debit caps, positions, accounts, funds in and out, callback
endpoints, ledger account types. Every ledger change goes through the owning position shard
(``LedgerClient``) and is answered only once it is durable; rows that only describe (participants,
accounts being created, endpoints) are written here directly.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

import asyncpg
import orjson
import ray
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from actors.position_shard import Overloaded
from api.fspiop.oracle import OracleAdmin
from api.http import Request, Response
from cluster.ledger_client import LedgerClient, ShardUnavailable
from cluster.settlement import SettlementError, onboarding_account_types
from core.errors import error_body
from core.fspiop_errors import ERRORS
from core.ledger import AccountType, Outcome
from core.money import AmountError, format_amount, from_decimal, parse_amount, to_decimal
from protos import ledger_pb2 as pb

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{2,30}$")
CURRENCY_PATTERN = re.compile(r"^[A-Z]{3}$")
UUID_PATTERN = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[1-7][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
ENDPOINT_TYPE_PATTERN = re.compile(r"^[A-Z][A-Z0-9_]{2,63}$")
HUB_ACCOUNT_TYPES = (AccountType.HUB_RECONCILIATION, AccountType.HUB_MULTILATERAL_SETTLEMENT)
# Settlement models (RULES.md section 15): Joi `alphanum().min(2).max(30)` in central-ledger.
SETTLEMENT_MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9]{2,30}$")
SETTLEMENT_GRANULARITIES = ("GROSS", "NET")
SETTLEMENT_INTERCHANGES = ("BILATERAL", "MULTILATERAL")
SETTLEMENT_DELAYS = ("IMMEDIATE", "DEFERRED")
# (delay, granularity, interchange): central-services-shared `ValidSettlementModels`.
VALID_SETTLEMENT_MODELS = frozenset({
    ("IMMEDIATE", "GROSS", "BILATERAL"),
    ("DEFERRED", "GROSS", "BILATERAL"),
    ("DEFERRED", "NET", "BILATERAL"),
    ("DEFERRED", "NET", "MULTILATERAL"),
})
_SETTLEMENT_MODEL_COLUMNS = (
    "settlement_model_id, name, is_active, settlement_granularity, settlement_interchange, settlement_delay,"
    " currency, require_liquidity_check, ledger_account_type, settlement_account_type, auto_position_reset"
)
_JSON = "application/json"


async def dispatch(routes, request: Request, segments: tuple[str, ...], *, api: str) -> Response:
    """The handler of the first route of ``routes`` ((method, pattern, handler); None in a pattern is a path
    parameter) that matches, its refusals and failures as FSPIOP error bodies: 404/3002 for no such path,
    405/3000 for another method, never a bare 500. Shared by the admin API and settlement (``api`` names it
    in the log)."""
    allowed = False
    for method, pattern, handler in routes:
        if len(pattern) != len(segments):
            continue
        if not all(p is None or p == s for p, s in zip(pattern, segments, strict=True)):
            continue
        if method != request.method:
            allowed = True
            continue
        args = [s for p, s in zip(pattern, segments, strict=True) if p is None]
        try:
            return await handler(request, *args)
        except (AdminError, SettlementError) as error:
            return _json(error.status, error_body(error.code, error.detail))
        except ShardUnavailable as error:
            log.error("%s %s %s: %s", api, request.method, request.path, error)
            return _json(503, error_body(2003, "ledger shard unavailable, retry"))
        except Overloaded:
            return _json(503, error_body(2005, "ledger shard busy, retry"))
        except (asyncpg.PostgresError, ray.exceptions.RayError) as error:
            # Never a bare 500: an FSPIOP error body, and the cause in the log.
            log.exception("%s %s %s failed", api, request.method, request.path)
            return _json(500, error_body(2001, type(error).__name__))
    if allowed:
        return _json(405, error_body(3000, f"method {request.method} not allowed on {request.path}"))
    return _json(404, error_body(3002, request.path))


class AdminError(Exception):
    """An answer other than success: FSPIOP error code, optional detail, HTTP status from the table."""

    def __init__(self, code: int, detail: str | None = None, status: int | None = None):
        super().__init__(detail or str(code))
        self.code = code
        self.detail = detail
        self.status = status or ERRORS[code].http_status


def _json(status: int, payload) -> Response:
    return Response(status, orjson.dumps(payload), content_type=_JSON)


def _number(text: str):
    """An exact decimal as a JSON number (central-ledger returns numbers; never via float)."""
    return orjson.Fragment(text.encode()) if text else None


def _funds_state(result: pb.CommandResult, done: str) -> str:
    """The funds transfer's state after a (possibly repeated) ledger call: a duplicate reports where
    the first call left it (a retried funds-out after its commit is COMMITTED, not RESERVED)."""
    if result.outcome == Outcome.OK:
        return done
    if result.outcome == Outcome.DUPLICATE and result.state:
        return result.state
    return "ABORTED"


def _ledger_id(funds_transfer_id: str) -> str:
    """Funds in/out ids live in their own namespace in the ledger, apart from FSPIOP transfer ids:
    a reused UUID must never make one look like a duplicate of the other."""
    return f"funds:{funds_transfer_id}"


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_body(request: Request) -> dict:
    try:
        # Decimal, never float: limits and amounts may arrive as JSON numbers.
        body = json.loads(request.body or b"{}", parse_float=Decimal)
    except (ValueError, UnicodeDecodeError) as error:
        raise AdminError(3101, f"body is not JSON: {error}") from None
    if not isinstance(body, dict):
        raise AdminError(3101, "body must be a JSON object")
    return body


def _require(body: dict, key: str, kind=str):
    if key not in body:
        raise AdminError(3102, f"missing {key}")
    value = body[key]
    if kind is str and not isinstance(value, str):
        raise AdminError(3101, f"{key} must be a string")
    if kind is bool and not isinstance(value, bool):
        raise AdminError(3101, f"{key} must be a boolean")
    if kind is dict and not isinstance(value, dict):
        raise AdminError(3101, f"{key} must be an object")
    return value


def _choice(body: dict, key: str, allowed: tuple[str, ...]) -> str:
    value = _require(body, key)
    if value not in allowed:
        raise AdminError(3101, f"{key} must be one of {', '.join(allowed)}")
    return value


def _currency(value) -> str:
    if not isinstance(value, str) or not CURRENCY_PATTERN.match(value):
        raise AdminError(3101, f"invalid currency {value!r}")
    return value


def _amount_minor(value, *, allow_zero: bool) -> int:
    """An admin amount (string or JSON number, never float) to ledger minor units."""
    if isinstance(value, bool):
        raise AdminError(3101, "amount must be a number")
    try:
        if isinstance(value, int | Decimal):
            amount = from_decimal(Decimal(value))
        elif isinstance(value, str):
            amount = parse_amount(value, strict=False)
        else:
            raise AdminError(3101, "amount must be a number or a decimal string")
    except (AmountError, InvalidOperation) as error:
        raise AdminError(3101, str(error)) from None
    if amount < 0 or (amount == 0 and not allow_zero):
        raise AdminError(3101, "amount must be positive" if not allow_zero else "amount must not be negative")
    return amount


class AdminApi:
    def __init__(self, pool: asyncpg.Pool, ledger: LedgerClient, *, hub_name: str, shard_count: int, ops=None):
        self.pool = pool
        self.ledger = ledger
        self.hub_name = hub_name
        self.shard_count = shard_count
        self.ops = ops
        self.settlement = None  # api.settlement.SettlementApi, set by the hub: serves /v2
        self.hub_metrics = None  # cluster.metrics_hub.HubMetrics, set by the hub: /metrics of every process
        self._routes = [
            ("GET", ("health",), self.health),
            ("GET", ("ledgerAccountTypes",), self.ledger_account_types),
            ("GET", ("participants",), self.list_participants),
            ("POST", ("participants",), self.create_participant),
            ("GET", ("participants", "limits"), self.all_limits),
            ("GET", ("participants", None), self.get_participant),
            ("PUT", ("participants", None), self.update_participant),
            ("POST", ("participants", None, "initialPositionAndLimits"), self.initial_position_and_limits),
            ("GET", ("participants", None, "limits"), self.get_limits),
            ("PUT", ("participants", None, "limits"), self.put_limits),
            ("GET", ("participants", None, "positions"), self.get_positions),
            ("GET", ("participants", None, "accounts"), self.get_accounts),
            ("POST", ("participants", None, "accounts"), self.create_hub_account),
            ("PUT", ("participants", None, "accounts", None), self.update_account),
            ("POST", ("participants", None, "accounts", None), self.record_funds),
            ("PUT", ("participants", None, "accounts", None, "transfers", None), self.funds_out_decision),
            ("GET", ("participants", None, "endpoints"), self.get_endpoints),
            ("POST", ("participants", None, "endpoints"), self.add_endpoint),
            ("GET", ("state", "participants", None), self.state_participant),
            ("GET", ("state", "shards"), self.state_shards),
            ("GET", ("state", "shards", None), self.state_shard),
            ("GET", ("state", "conservation"), self.state_conservation),
            ("GET", ("settlementModels",), self.list_settlement_models),
            ("POST", ("settlementModels",), self.create_settlement_model),
            ("GET", ("settlementModels", None), self.get_settlement_model),
            ("PUT", ("settlementModels", None), self.update_settlement_model),
            ("GET", ("metrics",), self.metrics),
        ]
        # The ALS admin API's oracle registry (docs/LOOKUP.md).
        self._routes += OracleAdmin(pool).routes()

    async def handle(self, request: Request) -> Response:
        segments = tuple(s for s in request.path.split("/") if s)
        if segments[:1] == ("v2",) and self.settlement is not None:
            return await self.settlement.handle(request, segments[1:])  # api/settlement.py (central-settlement)
        return await dispatch(self._routes, request, segments, api="admin")

    # ------------------------------------------------------------------ lookups

    async def _participant(self, name: str) -> asyncpg.Record:
        row = await self.pool.fetchrow(
            "SELECT participant_id, name, is_active, is_hub, is_proxy, shard_id, created_at"
            " FROM participant WHERE name = $1",
            name,
        )
        if row is None:
            raise AdminError(3200, f"participant {name} not found", status=404)
        return row

    async def _accounts(self, participant_id: int) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            "SELECT account_id, currency, ledger_account_type, is_active, net_debit_cap, alarm_percentage,"
            " created_at, changed_at FROM account WHERE participant_id = $1 ORDER BY account_id",
            participant_id,
        )

    async def _account_of(self, participant_id: int, currency: str, account_type: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow(
            "SELECT account_id, is_active, net_debit_cap FROM account"
            " WHERE participant_id = $1 AND currency = $2 AND ledger_account_type = $3",
            participant_id, currency, account_type,
        )

    async def _hub_account(self, currency: str, account_type: AccountType) -> int:
        row = await self.pool.fetchrow(
            "SELECT a.account_id FROM account a JOIN participant p USING (participant_id)"
            " WHERE p.is_hub AND a.currency = $1 AND a.ledger_account_type = $2",
            currency, str(account_type),
        )
        if row is None:
            raise AdminError(3200, f"hub account {account_type} for {currency} does not exist")
        return row["account_id"]

    async def _live(self, participant: asyncpg.Record) -> dict:
        reply = await self.ledger.describe(participant["shard_id"], participant["name"])
        found = reply["participants"]
        return found[0] if found else {"accounts": [], "is_active": participant["is_active"]}

    async def _run(self, shard_id: int, commands: list[pb.Command]) -> list[pb.CommandResult]:
        reply = await self.ledger.execute(shard_id, commands, wait_durable=True)
        return list(reply.results)

    # ------------------------------------------------------------------ health and reference data

    async def health(self, request: Request) -> Response:
        try:
            await self.pool.fetchval("SELECT 1")
            database = "OK"
        except (OSError, asyncpg.PostgresError) as error:
            log.warning("health: database check failed: %r", error)
            database = "DOWN"
        shards = "OK"
        try:
            for shard_id in range(self.shard_count):
                await self.ledger.describe(shard_id)
        except Exception as error:  # any shard failure makes the hub unhealthy, whatever its type
            log.warning("health: shard check failed: %r", error)
            shards = "DOWN"
        status = "OK" if database == shards == "OK" else "DOWN"
        return _json(
            200 if status == "OK" else 502,
            {"status": status, "services": [{"name": "datastore", "status": database},
                                            {"name": "positionShards", "status": shards}]},
        )

    async def metrics(self, request: Request) -> Response:
        """Prometheus exposition (central-ledger's `GET /metrics`): the whole hub, every ingress worker and
        shard merged, when the hub set ``hub_metrics``; else only this process's registry."""
        if self.hub_metrics is not None:
            return Response(200, await self.hub_metrics.exposition(), content_type=CONTENT_TYPE_LATEST)
        return Response(200, generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)

    async def ledger_account_types(self, request: Request) -> Response:
        rows = await self.pool.fetch(
            "SELECT name, description, is_active, is_settleable FROM ledger_account_type ORDER BY name"
        )
        return _json(200, [
            {"name": r["name"], "description": r["description"], "isActive": r["is_active"],
             "isSettleable": r["is_settleable"]}
            for r in rows
        ])

    # ------------------------------------------------------------------ participants

    def _participant_json(self, row: asyncpg.Record, accounts: list[asyncpg.Record], base: str) -> dict:
        return {
            "name": row["name"],
            "id": f"{base}/participants/{row['name']}",
            "created": _iso(row["created_at"]),
            "isActive": 1 if row["is_active"] else 0,
            "isProxy": row["is_proxy"],
            "links": {"self": f"{base}/participants/{row['name']}"},
            "accounts": [
                {"id": a["account_id"], "ledgerAccountType": a["ledger_account_type"],
                 "currency": a["currency"].strip(), "isActive": 1 if a["is_active"] else 0,
                 "createdDate": _iso(a["created_at"]), "createdBy": "unknown"}
                for a in accounts
            ],
        }

    @staticmethod
    def _base(request: Request) -> str:
        return f"http://{request.headers.get('host', 'localhost')}"

    async def list_participants(self, request: Request) -> Response:
        rows = await self.pool.fetch(
            "SELECT participant_id, name, is_active, is_hub, is_proxy, shard_id, created_at FROM participant"
            " ORDER BY participant_id"
        )
        base = self._base(request)
        return _json(200, [self._participant_json(r, await self._accounts(r["participant_id"]), base) for r in rows])

    async def get_participant(self, request: Request, name: str) -> Response:
        row = await self._participant(name)
        return _json(200, self._participant_json(row, await self._accounts(row["participant_id"]), self._base(request)))

    async def create_participant(self, request: Request) -> Response:
        body = _parse_body(request)
        name = _require(body, "name")
        if not NAME_PATTERN.match(name):
            raise AdminError(3101, "name must be 2 to 30 letters, digits, '_' or '-'")
        currency = _currency(_require(body, "currency"))
        is_proxy = bool(body.get("isProxy", False))
        if name == self.hub_name:
            raise AdminError(3100, f"{name} is the hub's own participant")
        # Hub accounts for the currency must exist first (central-ledger's onboarding order).
        for account_type in HUB_ACCOUNT_TYPES:
            await self._hub_account(currency, account_type)
        async with self.pool.acquire() as connection, connection.transaction():
            row = await connection.fetchrow(
                "SELECT participant_id, shard_id FROM participant WHERE name = $1 FOR UPDATE", name
            )
            if row is None:
                shard_id = await connection.fetchval(
                    "SELECT s.shard_id FROM shard s LEFT JOIN participant p ON p.shard_id = s.shard_id"
                    " WHERE s.shard_id < $1 GROUP BY s.shard_id ORDER BY count(p.participant_id), s.shard_id LIMIT 1",
                    self.shard_count,
                )
                row = await connection.fetchrow(
                    "INSERT INTO participant (name, is_proxy, shard_id) VALUES ($1, $2, $3)"
                    " RETURNING participant_id, shard_id",
                    name, is_proxy, shard_id,
                )
            exists = await connection.fetchval(
                "SELECT 1 FROM account WHERE participant_id = $1 AND currency = $2", row["participant_id"], currency
            )
            if exists:
                raise AdminError(3003, f"participant {name} already has currency {currency}")
            # Inactive until initialPositionAndLimits sets the net debit cap, as in central-ledger.
            account_ids = [
                await connection.fetchval(
                    "INSERT INTO account (participant_id, currency, ledger_account_type, is_active)"
                    " VALUES ($1, $2, $3, false) RETURNING account_id",
                    row["participant_id"], currency, str(account_type),
                )
                for account_type in (AccountType.POSITION, AccountType.SETTLEMENT)
            ]
            # Accounts the settlement models of this currency need besides those two (e.g. INTERCHANGE_FEE):
            # active at once, since only settlement moves (never a DFSP's prepare) touch them.
            for account_type in await onboarding_account_types(connection, currency):
                account_ids.append(await connection.fetchval(
                    "INSERT INTO account (participant_id, currency, ledger_account_type, is_active)"
                    " VALUES ($1, $2, $3, true) RETURNING account_id",
                    row["participant_id"], currency, account_type,
                ))
        await self._run(row["shard_id"], [pb.Command(load_account=pb.LoadAccount(account_id=a)) for a in account_ids])
        participant = await self._participant(name)
        return _json(
            201, self._participant_json(participant, await self._accounts(participant["participant_id"]),
                                        self._base(request))
        )

    async def update_participant(self, request: Request, name: str) -> Response:
        body = _parse_body(request)
        is_active = _require(body, "isActive", bool)
        participant = await self._participant(name)
        await self._run(participant["shard_id"], [
            pb.Command(set_participant_active=pb.SetParticipantActive(participant=name, is_active=is_active))
        ])
        participant = await self._participant(name)
        return _json(200, self._participant_json(participant, await self._accounts(participant["participant_id"]),
                                                  self._base(request)))

    # ------------------------------------------------------------------ limits and positions

    async def initial_position_and_limits(self, request: Request, name: str) -> Response:
        body = _parse_body(request)
        currency = _currency(_require(body, "currency"))
        limit = _require(body, "limit", dict)
        if limit.get("type") != "NET_DEBIT_CAP":
            raise AdminError(3101, "limit.type must be NET_DEBIT_CAP")
        cap_minor = _amount_minor(limit.get("value"), allow_zero=True)
        initial_minor = _amount_minor(body.get("initialPosition", 0), allow_zero=True)
        participant = await self._participant(name)
        position = await self._account_of(participant["participant_id"], currency, AccountType.POSITION)
        settlement = await self._account_of(participant["participant_id"], currency, AccountType.SETTLEMENT)
        if position is None or settlement is None:
            raise AdminError(3200, f"participant {name} has no {currency} accounts")
        if position["net_debit_cap"] is not None:
            raise AdminError(3003, f"{name} already has a net debit cap for {currency}")
        activate_position = pb.Command(
            set_account_active=pb.SetAccountActive(account_id=position["account_id"], is_active=True)
        )
        if initial_minor:
            # First the initial position, on its own: if it is refused (an inactive participant),
            # no cap is set yet and the call can simply be repeated. It is a debit against the hub's
            # multilateral settlement account, so the per-currency sum stays conserved; its id makes
            # a repeat a duplicate, not a second move.
            hub_account = await self._hub_account(currency, AccountType.HUB_MULTILATERAL_SETTLEMENT)
            results = await self._run(participant["shard_id"], [activate_position, pb.Command(reserve=pb.Reserve(
                transfer_id=f"initial-position:{name}:{currency}", debit_account_id=position["account_id"],
                credit_account_id=hub_account, amount_minor=str(initial_minor), check=pb.CHECK_NONE, commit_now=True,
            ))])
            if results[-1].outcome not in (Outcome.OK, Outcome.DUPLICATE):
                raise AdminError(3100, f"could not set the initial position: {results[-1].outcome}")
        results = await self._run(participant["shard_id"], [
            pb.Command(set_net_debit_cap=pb.SetNetDebitCap(
                account_id=position["account_id"], cap_minor=str(cap_minor))),
            activate_position,
            pb.Command(set_account_active=pb.SetAccountActive(account_id=settlement["account_id"], is_active=True)),
        ])
        failed = [r.outcome for r in results if r.outcome not in (Outcome.OK, Outcome.DUPLICATE)]
        if failed:
            raise AdminError(3100, f"could not set the limits: {', '.join(failed)}")
        return Response(201)

    async def _limits_json(self, participant: asyncpg.Record, currency: str | None) -> list[dict]:
        accounts = await self._accounts(participant["participant_id"])
        live = {a["account_id"]: a for a in (await self._live(participant))["accounts"]}
        out = []
        for account in accounts:
            if account["ledger_account_type"] != AccountType.POSITION:
                continue
            if currency and account["currency"].strip() != currency:
                continue
            cap = live.get(account["account_id"], {}).get("net_debit_cap", "")
            if cap == "":
                continue
            alarm = account["alarm_percentage"]
            out.append({
                "currency": account["currency"].strip(),
                "limit": {"type": "NET_DEBIT_CAP", "value": _number(cap),
                          "alarmPercentage": int(alarm) if alarm is not None and alarm == int(alarm)
                          else (str(alarm) if alarm is not None else 10)},
            })
        return out

    async def get_limits(self, request: Request, name: str) -> Response:
        participant = await self._participant(name)
        limit_type = request.query.get("type")
        if limit_type not in (None, "NET_DEBIT_CAP"):
            return _json(200, [])
        return _json(200, await self._limits_json(participant, request.query.get("currency")))

    async def all_limits(self, request: Request) -> Response:
        rows = await self.pool.fetch(
            "SELECT participant_id, name, is_active, is_hub, is_proxy, shard_id, created_at FROM participant"
            " WHERE NOT is_hub ORDER BY participant_id"
        )
        out = []
        for row in rows:
            for entry in await self._limits_json(row, request.query.get("currency")):
                out.append({"name": row["name"], **entry})
        return _json(200, out)

    async def put_limits(self, request: Request, name: str) -> Response:
        body = _parse_body(request)
        currency = _currency(_require(body, "currency"))
        limit = _require(body, "limit", dict)
        if limit.get("type") != "NET_DEBIT_CAP":
            raise AdminError(3101, "limit.type must be NET_DEBIT_CAP")
        cap_minor = _amount_minor(limit.get("value"), allow_zero=True)
        alarm = limit.get("alarmPercentage")
        valid_alarm = isinstance(alarm, int | Decimal) and not isinstance(alarm, bool) and 0 <= alarm <= 100
        if alarm is not None and not valid_alarm:
            raise AdminError(3101, "limit.alarmPercentage must be a number from 0 to 100")
        participant = await self._participant(name)
        position = await self._account_of(participant["participant_id"], currency, AccountType.POSITION)
        if position is None:
            raise AdminError(3200, f"participant {name} has no {currency} position account")
        results = await self._run(participant["shard_id"], [
            pb.Command(set_net_debit_cap=pb.SetNetDebitCap(
                account_id=position["account_id"], cap_minor=str(cap_minor)))
        ])
        if results[0].outcome != Outcome.OK:
            raise AdminError(3100, f"could not set the limit: {results[0].outcome}")
        if alarm is not None:
            await self.pool.execute(
                "UPDATE account SET alarm_percentage = $2 WHERE account_id = $1", position["account_id"], Decimal(alarm)
            )
        return _json(200, {"currency": currency, "limit": {
            "type": "NET_DEBIT_CAP", "value": _number(format_amount(cap_minor)),
            "alarmPercentage": alarm if alarm is not None else 10}})

    async def get_positions(self, request: Request, name: str) -> Response:
        participant = await self._participant(name)
        currency = request.query.get("currency")
        changed = _now_iso()
        positions = [
            {"currency": a["currency"], "value": _number(a["value"]), "reservedValue": _number(a["reserved_value"]),
             "changedDate": changed}
            for a in (await self._live(participant))["accounts"]
            if a["ledger_account_type"] == AccountType.POSITION and (currency is None or a["currency"] == currency)
        ]
        if currency is not None:
            if not positions:
                raise AdminError(3200, f"{name} has no {currency} position", status=404)
            return _json(200, positions[0])
        return _json(200, positions)

    async def get_accounts(self, request: Request, name: str) -> Response:
        participant = await self._participant(name)
        changed = _now_iso()
        return _json(200, [
            {"id": a["account_id"], "ledgerAccountType": a["ledger_account_type"], "currency": a["currency"],
             "isActive": 1 if a["is_active"] else 0, "value": _number(a["value"]),
             "reservedValue": _number(a["reserved_value"]), "netDebitCap": _number(a["net_debit_cap"]),
             "inFlight": a["in_flight"], "changedDate": changed}
            for a in (await self._live(participant))["accounts"]
        ])

    # ------------------------------------------------------------------ accounts and funds

    async def create_hub_account(self, request: Request, name: str) -> Response:
        body = _parse_body(request)
        currency = _currency(_require(body, "currency"))
        account_type = _require(body, "type")
        participant = await self._participant(name)
        if not participant["is_hub"]:
            raise AdminError(3100, "accounts can be created here only for the hub participant")
        if account_type not in (str(t) for t in HUB_ACCOUNT_TYPES + (AccountType.HUB_FEE,)):
            raise AdminError(3101, f"unsupported hub account type {account_type}")
        async with self.pool.acquire() as connection:
            account_id = await connection.fetchval(
                "INSERT INTO account (participant_id, currency, ledger_account_type, is_active)"
                " VALUES ($1, $2, $3, true)"
                " ON CONFLICT (participant_id, currency, ledger_account_type) DO NOTHING RETURNING account_id",
                participant["participant_id"], currency, account_type,
            )
        if account_id is None:
            raise AdminError(3003, f"hub account {account_type} for {currency} already exists")
        await self._run(participant["shard_id"], [pb.Command(load_account=pb.LoadAccount(account_id=account_id))])
        return _json(201, self._participant_json(participant, await self._accounts(participant["participant_id"]),
                                                  self._base(request)))

    async def update_account(self, request: Request, name: str, account_id: str) -> Response:
        body = _parse_body(request)
        is_active = _require(body, "isActive", bool)
        participant = await self._participant(name)
        account = await self._own_account(participant, account_id)
        await self._run(participant["shard_id"], [
            pb.Command(set_account_active=pb.SetAccountActive(account_id=account["account_id"], is_active=is_active))
        ])
        return Response(200)

    async def _own_account(self, participant: asyncpg.Record, account_id: str) -> asyncpg.Record:
        if not account_id.isdigit():
            raise AdminError(3101, "account id must be an integer")
        row = await self.pool.fetchrow(
            "SELECT account_id, currency, ledger_account_type FROM account"
            " WHERE account_id = $1 AND participant_id = $2",
            int(account_id), participant["participant_id"],
        )
        if row is None:
            raise AdminError(3200, f"account {account_id} of {participant['name']} not found", status=404)
        return row

    async def record_funds(self, request: Request, name: str, account_id: str) -> Response:
        body = _parse_body(request)
        transfer_id = _require(body, "transferId")
        if not UUID_PATTERN.match(transfer_id):
            raise AdminError(3101, "transferId must be a lowercase UUID")
        action = _require(body, "action")
        if action not in ("recordFundsIn", "recordFundsOutPrepareReserve"):
            raise AdminError(3101, f"unsupported action {action}")
        reason = _require(body, "reason")
        external_reference = body.get("externalReference", "")
        money = _require(body, "amount", dict)
        currency = _currency(money.get("currency"))
        amount_minor = _amount_minor(money.get("amount"), allow_zero=False)
        participant = await self._participant(name)
        account = await self._own_account(participant, account_id)
        if account["ledger_account_type"] != AccountType.SETTLEMENT or account["currency"].strip() != currency:
            raise AdminError(3100, f"account {account_id} is not {name}'s {currency} SETTLEMENT account")
        reconciliation = await self._hub_account(currency, AccountType.HUB_RECONCILIATION)
        inserted = await self.pool.fetchval(
            "INSERT INTO funds_transfer (transfer_id, participant_id, account_id, action, amount, currency,"
            " external_reference, reason, state) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'RECEIVED')"
            " ON CONFLICT (transfer_id) DO NOTHING RETURNING transfer_id",
            transfer_id, participant["participant_id"], account["account_id"], action, to_decimal(amount_minor),
            currency, str(external_reference), reason,
        )
        if inserted is None:
            existing = await self.pool.fetchrow(
                "SELECT action, amount, account_id, state FROM funds_transfer WHERE transfer_id = $1", transfer_id
            )
            same = (existing["action"], from_decimal(existing["amount"]), existing["account_id"]) == (
                action, amount_minor, account["account_id"])
            if not same:
                raise AdminError(3106, f"transfer {transfer_id} exists with other parameters")
            if existing["state"] != "RECEIVED":
                return Response(202)  # a resend of a finished request: nothing to do again
        if action == "recordFundsIn":
            # Hub reconciliation (debit, on the hub's shard) -> DFSP settlement (credit).
            hub = await self._participant(self.hub_name)
            result = (await self._run(hub["shard_id"], [pb.Command(reserve=pb.Reserve(
                transfer_id=_ledger_id(transfer_id), debit_account_id=reconciliation,
                credit_account_id=account["account_id"],
                amount_minor=str(amount_minor), check=pb.CHECK_NONE, commit_now=True,
            ))]))[0]
            state = _funds_state(result, "COMMITTED")
        else:
            # DFSP settlement (debit, reserved now) -> hub reconciliation (credit at commit).
            result = (await self._run(participant["shard_id"], [pb.Command(reserve=pb.Reserve(
                transfer_id=_ledger_id(transfer_id), debit_account_id=account["account_id"],
                credit_account_id=reconciliation,
                amount_minor=str(amount_minor), check=pb.CHECK_FUNDS_AVAILABLE,
            ))]))[0]
            state = _funds_state(result, "RESERVED")
        await self.pool.execute(
            "UPDATE funds_transfer SET state = $2, changed_at = now() WHERE transfer_id = $1", transfer_id, state
        )
        if result.outcome == Outcome.INSUFFICIENT_FUNDS:
            raise AdminError(4001, "funds out exceed the settlement balance; aborted")
        if result.outcome not in (Outcome.OK, Outcome.DUPLICATE):
            raise AdminError(3100, f"funds {action} refused: {result.outcome}")
        return Response(202)

    async def funds_out_decision(
        self, request: Request, name: str, account_id: str, transfer_id: str
    ) -> Response:
        body = _parse_body(request)
        action = _require(body, "action")
        _require(body, "reason")
        if action not in ("recordFundsOutCommit", "recordFundsOutAbort"):
            raise AdminError(3101, f"unsupported action {action}")
        participant = await self._participant(name)
        await self._own_account(participant, account_id)
        row = await self.pool.fetchrow(
            "SELECT state, action FROM funds_transfer WHERE transfer_id = $1 AND participant_id = $2",
            transfer_id, participant["participant_id"],
        )
        if row is None or row["action"] != "recordFundsOutPrepareReserve":
            raise AdminError(3208, f"funds-out transfer {transfer_id} not found", status=404)
        ledger_id = _ledger_id(transfer_id)
        command = (pb.Command(commit=pb.Commit(transfer_id=ledger_id)) if action == "recordFundsOutCommit"
                   else pb.Command(abort=pb.Abort(transfer_id=ledger_id, reason=body["reason"])))
        result = (await self._run(participant["shard_id"], [command]))[0]
        done = {"recordFundsOutCommit": (Outcome.OK, Outcome.ALREADY_COMMITTED),
                "recordFundsOutAbort": (Outcome.OK, Outcome.ALREADY_ABORTED)}[action]
        if result.outcome not in done:
            raise AdminError(3100, f"{action} refused: transfer is {result.state or result.outcome}")
        state = "COMMITTED" if action == "recordFundsOutCommit" else "ABORTED"
        await self.pool.execute(
            "UPDATE funds_transfer SET state = $2, changed_at = now() WHERE transfer_id = $1", transfer_id, state
        )
        return Response(202)

    # ------------------------------------------------------------------ endpoints

    async def get_endpoints(self, request: Request, name: str) -> Response:
        participant = await self._participant(name)
        rows = await self.pool.fetch(
            "SELECT endpoint_type, value FROM participant_endpoint WHERE participant_id = $1 ORDER BY endpoint_type",
            participant["participant_id"],
        )
        return _json(200, [{"type": r["endpoint_type"], "value": r["value"]} for r in rows])

    async def add_endpoint(self, request: Request, name: str) -> Response:
        body = _parse_body(request)
        endpoint_type = _require(body, "type")
        value = _require(body, "value")
        if not ENDPOINT_TYPE_PATTERN.match(endpoint_type):
            raise AdminError(3101, f"invalid endpoint type {endpoint_type!r}")
        if not value or len(value) > 512:
            raise AdminError(3101, "endpoint value must be 1 to 512 characters")
        participant = await self._participant(name)
        await self.pool.execute(
            "INSERT INTO participant_endpoint (participant_id, endpoint_type, value) VALUES ($1, $2, $3)"
            " ON CONFLICT (participant_id, endpoint_type) DO UPDATE SET value = EXCLUDED.value, changed_at = now()",
            participant["participant_id"], endpoint_type, value,
        )
        return Response(201)

    # ------------------------------------------------------------------ settlement models

    @staticmethod
    def _settlement_model_json(row: asyncpg.Record) -> dict:
        # central-ledger's `entityItem` (src/api/settlementModels/handler.js): booleans as JSON booleans,
        # the ledger account type's *name* under `ledgerAccountTypeId`. `ledgerAccountType` and
        # `settlementAccountType` are additions (central-ledger does not return the settlement account type).
        return {
            "settlementModelId": row["settlement_model_id"],
            "name": row["name"],
            "isActive": row["is_active"],
            "settlementGranularity": row["settlement_granularity"],
            "settlementInterchange": row["settlement_interchange"],
            "settlementDelay": row["settlement_delay"],
            "currency": row["currency"].strip() if row["currency"] is not None else None,
            "requireLiquidityCheck": row["require_liquidity_check"],
            "ledgerAccountTypeId": row["ledger_account_type"],
            "ledgerAccountType": row["ledger_account_type"],
            "settlementAccountType": row["settlement_account_type"],
            "autoPositionReset": row["auto_position_reset"],
        }

    async def _settlement_model(self, name: str) -> asyncpg.Record:
        row = await self.pool.fetchrow(
            f"SELECT {_SETTLEMENT_MODEL_COLUMNS} FROM settlement_model WHERE name = $1", name
        )
        if row is None:
            raise AdminError(3200, f"settlement model {name} not found", status=404)
        return row

    async def list_settlement_models(self, request: Request) -> Response:
        rows = await self.pool.fetch(
            f"SELECT {_SETTLEMENT_MODEL_COLUMNS} FROM settlement_model ORDER BY settlement_model_id"
        )
        return _json(200, [self._settlement_model_json(r) for r in rows])

    async def get_settlement_model(self, request: Request, name: str) -> Response:
        return _json(200, self._settlement_model_json(await self._settlement_model(name)))

    async def create_settlement_model(self, request: Request) -> Response:
        """Checks in central-ledger's order: schema (3101/3102), combination (3000), account types (3003),
        name taken (3000); a second model for the same (currency, ledger account type) is 3003."""
        body = _parse_body(request)
        name = _require(body, "name")
        if not SETTLEMENT_MODEL_NAME_PATTERN.match(name):
            raise AdminError(3101, "name must be 2 to 30 letters or digits")
        granularity = _choice(body, "settlementGranularity", SETTLEMENT_GRANULARITIES)
        interchange = _choice(body, "settlementInterchange", SETTLEMENT_INTERCHANGES)
        delay = _choice(body, "settlementDelay", SETTLEMENT_DELAYS)
        # Optional: no currency (or null) is the default model for every currency.
        currency = body.get("currency")
        if currency is not None:
            currency = _currency(currency)
        require_liquidity_check = _require(body, "requireLiquidityCheck", bool)
        ledger_account_type = _require(body, "ledgerAccountType")
        auto_position_reset = _require(body, "autoPositionReset", bool)
        settlement_account_type = _require(body, "settlementAccountType")
        if (delay, granularity, interchange) not in VALID_SETTLEMENT_MODELS:
            raise AdminError(3000, "Invalid settlement model definition - delay-granularity-interchange"
                                   " combination is not supported")
        async with self.pool.acquire() as connection, connection.transaction():
            known = {r["name"] for r in await connection.fetch(
                "SELECT name FROM ledger_account_type WHERE name = ANY($1::text[])",
                [ledger_account_type, settlement_account_type],
            )}
            if ledger_account_type not in known:
                raise AdminError(3003, "Ledger account type was not found")
            if settlement_account_type not in known:
                raise AdminError(3003, "Settlement account type was not found")
            if await connection.fetchval("SELECT 1 FROM settlement_model WHERE name = $1", name):
                raise AdminError(3000, "Settlement Model already exists")
            try:
                await connection.execute(
                    "INSERT INTO settlement_model (name, settlement_granularity, settlement_interchange,"
                    " settlement_delay, currency, require_liquidity_check, ledger_account_type,"
                    " settlement_account_type, auto_position_reset) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    name, granularity, interchange, delay, currency, require_liquidity_check, ledger_account_type,
                    settlement_account_type, auto_position_reset,
                )
            except asyncpg.UniqueViolationError as error:
                if error.constraint_name == "settlement_model_name_key":  # a concurrent create of the same name
                    raise AdminError(3000, "Settlement Model already exists") from None
                raise AdminError(3003, f"a settlement model for {currency or 'the default currency'} and"
                                       f" {ledger_account_type} already exists") from None
        return Response(201)

    async def update_settlement_model(self, request: Request, name: str) -> Response:
        body = _parse_body(request)
        is_active = _require(body, "isActive", bool)
        row = await self.pool.fetchrow(
            f"UPDATE settlement_model SET is_active = $2 WHERE name = $1 RETURNING {_SETTLEMENT_MODEL_COLUMNS}",
            name, is_active,
        )
        if row is None:
            raise AdminError(3200, f"settlement model {name} not found", status=404)
        return _json(200, self._settlement_model_json(row))

    # ------------------------------------------------------------------ ops views (same service as `rayloop state`)

    async def state_participant(self, request: Request, name: str) -> Response:
        return _json(200, await self.ops.participant_json(name))

    async def state_shards(self, request: Request) -> Response:
        return _json(200, await self.ops.shards_json())

    async def state_shard(self, request: Request, shard_id: str) -> Response:
        if not shard_id.isdigit():
            raise AdminError(3101, "shard id must be an integer")
        return _json(200, await self.ops.shard_json(int(shard_id)))

    async def state_conservation(self, request: Request) -> Response:
        """Per currency, live (actors) and durable (Postgres) sums: both must show zero imbalance."""
        live = await self.ledger.totals()
        rows = await self.pool.fetch("SELECT * FROM currency_conservation ORDER BY currency")
        def text(value: Decimal) -> str:
            return format_amount(from_decimal(value))

        durable = {
            r["currency"].strip(): {
                "accountTotal": text(r["account_total"]), "reservedTotal": text(r["reserved_total"]),
                "creditsInFlight": text(r["credits_in_flight"]), "imbalance": text(r["imbalance"]),
            }
            for r in rows
        }
        return _json(200, {
            "live": {c: {"accountTotal": format_amount(v[0]), "reservedTotal": format_amount(v[1]),
                         "creditsOwed": format_amount(v[2])} for c, v in sorted(live.items())},
            "durable": durable,
        })
