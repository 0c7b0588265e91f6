"""The settlement API on the admin port under ``/v2``, wire-compatible with Mojaloop central-settlement v2
(``central-settlement-swagger.json``, RULES.md section 15), plus reports and interchange fee rules.

| route | what |
|---|---|
| ``GET /v2/settlementWindows?state=&fromDateTime=&toDateTime=&currency=&participantId=`` | windows (a filter) |
| ``GET /v2/settlementWindows/{id}``; ``POST`` ``{state: CLOSED, reason}`` | a window; close it |
| ``POST /v2/settlements`` ``{settlementModel, reason, settlementWindows: [{id}]}`` | settle windows |
| ``GET /v2/settlements?...``; ``GET, PUT /v2/settlements/{id}`` | settlements; acknowledge or abort |
| ``GET, PUT /v2/settlements/{sid}/participants/{pid}[/accounts/{aid}]`` | drill-downs and acknowledgements |
| ``GET /v2/reports/settlementWindows/{id}``, ``/v2/reports/settlements/{id}`` (``?format=csv``) | reports |
| ``GET /v2/interchangeFees``; ``PUT /v2/interchangeFees/{currency}`` ``{basisPoints, paidBy}`` | fee rules |

This module only translates HTTP to ``SettlementService`` calls and rows to JSON/CSV.
"""

from __future__ import annotations

import csv
import io
import logging
from collections import defaultdict
from datetime import datetime
from decimal import Decimal

import asyncpg

from api.admin import AdminError, _choice, _currency, _iso, _json, _number, _parse_body, _require, dispatch
from api.http import Request, Response
from cluster.settlement import SettlementService
from core.errors import error_body
from core.ledger import AccountType
from core.money import format_amount, from_decimal
from core.settlement import MAX_BASIS_POINTS, FeePayer, SettlementState

log = logging.getLogger(__name__)

_WINDOW_FILTERS = ("participantId", "state", "fromDateTime", "toDateTime", "currency")
_SETTLEMENT_FILTERS = ("currency", "participantId", "settlementWindowId", "accountId", "state", "fromDateTime",
                       "toDateTime", "fromSettlementWindowDateTime", "toSettlementWindowDateTime")
_REPORT_COLUMNS = ("participant", "currency", "sent", "received", "sentCount", "receivedCount", "feesPaid",
                   "feesReceived", "feeNet", "multilateralNet")
_BILATERAL_COLUMNS = ("currency", "ledgerAccountType", "partyA", "partyB", "net")


def _text(value: Decimal) -> str:
    return format_amount(from_decimal(value))


def _int(value: str, what: str) -> int:
    if not value.isdigit() or len(value) > 9:
        raise AdminError(3101, f"{what} must be a positive integer")
    return int(value)


def _moment(value: str, what: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise AdminError(3101, f"{what} must be an ISO 8601 date-time") from None
    if moment.tzinfo is None:
        raise AdminError(3101, f"{what} must carry a time zone")
    return moment


class SettlementApi:
    def __init__(self, pool: asyncpg.Pool, service: SettlementService):
        self.pool = pool
        self.service = service
        self._routes = [
            ("GET", ("settlementWindows",), self.list_windows),
            ("GET", ("settlementWindows", None), self.get_window),
            ("POST", ("settlementWindows", None), self.close_window),
            ("GET", ("settlements",), self.list_settlements),
            ("POST", ("settlements",), self.create_settlement),
            ("GET", ("settlements", None), self.get_settlement),
            ("PUT", ("settlements", None), self.put_settlement),
            ("GET", ("settlements", None, "participants", None), self.get_participant),
            ("PUT", ("settlements", None, "participants", None), self.put_participant),
            ("GET", ("settlements", None, "participants", None, "accounts", None), self.get_account),
            ("PUT", ("settlements", None, "participants", None, "accounts", None), self.put_account),
            ("GET", ("reports", "settlementWindows", None), self.window_report),
            ("GET", ("reports", "settlements", None), self.settlement_report),
            ("GET", ("interchangeFees",), self.list_fee_rules),
            ("PUT", ("interchangeFees", None), self.put_fee_rule),
        ]

    async def handle(self, request: Request, segments: tuple[str, ...]) -> Response:
        return await dispatch(self._routes, request, segments, api="settlement")

    # ------------------------------------------------------------------ windows

    async def _windows_json(self, connection, window_ids: list[int]) -> list[dict]:
        windows = await connection.fetch(
            "SELECT settlement_window_id, state, reason, created_at, changed_at FROM settlement_window"
            " WHERE settlement_window_id = ANY($1) ORDER BY settlement_window_id", window_ids,
        )
        content: dict[int, list[dict]] = defaultdict(list)
        for r in await connection.fetch(
            "SELECT content_id, settlement_window_id, state, ledger_account_type, currency, created_at, changed_at,"
            " settlement_id FROM settlement_window_content WHERE settlement_window_id = ANY($1) ORDER BY content_id",
            window_ids,
        ):
            item = {"id": r["content_id"], "state": r["state"], "ledgerAccountType": r["ledger_account_type"],
                    "currencyId": r["currency"].strip(), "createdDate": _iso(r["created_at"]),
                    "changedDate": _iso(r["changed_at"])}
            if r["settlement_id"] is not None:
                item["settlementId"] = r["settlement_id"]
            content[r["settlement_window_id"]].append(item)
        return [
            {"id": w["settlement_window_id"], "state": w["state"], "reason": w["reason"],
             "createdDate": _iso(w["created_at"]), "changedDate": _iso(w["changed_at"]),
             "content": content.get(w["settlement_window_id"], [])}
            for w in windows
        ]

    async def _window(self, connection, window_id: int) -> dict:
        found = await self._windows_json(connection, [window_id])
        if not found:
            raise AdminError(3100, f"settlement window {window_id} not found")
        return found[0]

    async def list_windows(self, request: Request) -> Response:
        query = request.query
        if not any(query.get(k) for k in _WINDOW_FILTERS):
            raise AdminError(3100, f"Use at least one parameter: {', '.join(_WINDOW_FILTERS)}")
        clauses, args = [], []

        def add(clause: str, value) -> None:
            args.append(value)
            clauses.append(clause.replace("?", f"${len(args)}"))

        if query.get("state"):
            add("w.state = ?", query["state"])
        if query.get("fromDateTime"):
            add("w.created_at >= ?", _moment(query["fromDateTime"], "fromDateTime"))
        if query.get("toDateTime"):
            add("w.created_at <= ?", _moment(query["toDateTime"], "toDateTime"))
        if query.get("currency"):
            add("EXISTS (SELECT 1 FROM settlement_window_content c WHERE c.settlement_window_id ="
                " w.settlement_window_id AND c.currency = ?)", _currency(query["currency"]))
        if query.get("participantId"):
            add("EXISTS (SELECT 1 FROM settlement_window_content c JOIN settlement_content_account a USING"
                " (content_id) WHERE c.settlement_window_id = w.settlement_window_id AND a.participant_id = ?)",
                _int(query["participantId"], "participantId"))
        async with self.pool.acquire() as connection:
            ids = [r["settlement_window_id"] for r in await connection.fetch(
                f"SELECT w.settlement_window_id FROM settlement_window w WHERE {' AND '.join(clauses)}", *args)]
            return _json(200, await self._windows_json(connection, ids))

    async def get_window(self, request: Request, window_id: str) -> Response:
        async with self.pool.acquire() as connection:
            return _json(200, await self._window(connection, _int(window_id, "id")))

    async def close_window(self, request: Request, window_id: str) -> Response:
        body = _parse_body(request)
        _choice(body, "state", ("CLOSED",))
        reason = _require(body, "reason")
        new_id = await self.service.close_window(_int(window_id, "id"), reason)
        # central-settlement answers with the window that opened in its place.
        async with self.pool.acquire() as connection:
            return _json(200, await self._window(connection, new_id))

    # ------------------------------------------------------------------ settlements

    async def _settlements_json(self, connection, settlement_ids: list[int]) -> list[dict]:
        settlements = await connection.fetch(
            "SELECT s.settlement_id, s.state, s.reason, s.created_at, s.changed_at, m.name FROM settlement s"
            " JOIN settlement_model m USING (settlement_model_id) WHERE s.settlement_id = ANY($1)"
            " ORDER BY s.settlement_id", settlement_ids,
        )
        windows: dict[int, list[int]] = defaultdict(list)
        for r in await connection.fetch(
            "SELECT settlement_id, settlement_window_id FROM settlement_settlement_window"
            " WHERE settlement_id = ANY($1) ORDER BY settlement_window_id", settlement_ids,
        ):
            windows[r["settlement_id"]].append(r["settlement_window_id"])
        window_json = {w["id"]: w for w in await self._windows_json(
            connection, sorted({w for ids in windows.values() for w in ids}))}
        participants: dict[int, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
        for r in await connection.fetch(
            "SELECT settlement_id, participant_id, account_id, currency, net, state, reason, external_reference"
            " FROM settlement_participant_account WHERE settlement_id = ANY($1) ORDER BY participant_id, account_id",
            settlement_ids,
        ):
            participants[r["settlement_id"]][r["participant_id"]].append(_account_json(r))
        return [
            {"id": s["settlement_id"], "state": s["state"], "reason": s["reason"], "settlementModel": s["name"],
             "createdDate": _iso(s["created_at"]), "changedDate": _iso(s["changed_at"]),
             "settlementWindows": [window_json[w] for w in windows.get(s["settlement_id"], [])],
             "participants": [{"id": pid, "accounts": accounts}
                              for pid, accounts in participants[s["settlement_id"]].items()]}
            for s in settlements
        ]

    async def _settlement(self, settlement_id: int) -> dict:
        async with self.pool.acquire() as connection:
            found = await self._settlements_json(connection, [settlement_id])
        if not found:
            raise AdminError(3100, f"settlement {settlement_id} not found")
        return found[0]

    async def list_settlements(self, request: Request) -> Response:
        query = request.query
        if not any(query.get(k) for k in _SETTLEMENT_FILTERS):
            raise AdminError(3100, f"Use at least one parameter: {', '.join(_SETTLEMENT_FILTERS)}")
        clauses, args = [], []

        def add(clause: str, value) -> None:
            args.append(value)
            clauses.append(clause.replace("?", f"${len(args)}"))

        if query.get("state"):
            add("s.state = ?", query["state"])
        if query.get("fromDateTime"):
            add("s.created_at >= ?", _moment(query["fromDateTime"], "fromDateTime"))
        if query.get("toDateTime"):
            add("s.created_at <= ?", _moment(query["toDateTime"], "toDateTime"))
        if query.get("currency"):
            add("EXISTS (SELECT 1 FROM settlement_participant_account a WHERE a.settlement_id = s.settlement_id"
                " AND a.currency = ?)", _currency(query["currency"]))
        if query.get("participantId"):
            add("EXISTS (SELECT 1 FROM settlement_participant_account a WHERE a.settlement_id = s.settlement_id"
                " AND a.participant_id = ?)", _int(query["participantId"], "participantId"))
        if query.get("accountId"):
            add("EXISTS (SELECT 1 FROM settlement_participant_account a WHERE a.settlement_id = s.settlement_id"
                " AND a.account_id = ?)", _int(query["accountId"], "accountId"))
        if query.get("settlementWindowId"):
            add("EXISTS (SELECT 1 FROM settlement_settlement_window x WHERE x.settlement_id = s.settlement_id"
                " AND x.settlement_window_id = ?)", _int(query["settlementWindowId"], "settlementWindowId"))
        for key, op in (("fromSettlementWindowDateTime", ">="), ("toSettlementWindowDateTime", "<=")):
            if query.get(key):
                add("EXISTS (SELECT 1 FROM settlement_settlement_window x JOIN settlement_window w USING"
                    f" (settlement_window_id) WHERE x.settlement_id = s.settlement_id AND w.created_at {op} ?)",
                    _moment(query[key], key))
        async with self.pool.acquire() as connection:
            ids = [r["settlement_id"] for r in await connection.fetch(
                f"SELECT s.settlement_id FROM settlement s WHERE {' AND '.join(clauses)}", *args)]
            return _json(200, await self._settlements_json(connection, ids))

    async def create_settlement(self, request: Request) -> Response:
        body = _parse_body(request)
        model = _require(body, "settlementModel")
        reason = _require(body, "reason")
        windows = body.get("settlementWindows")
        if windows is None:
            raise AdminError(3102, "missing settlementWindows")
        if not isinstance(windows, list) or not windows:
            raise AdminError(3101, "settlementWindows must be a non-empty array")
        ids = []
        for item in windows:
            if not isinstance(item, dict) or not isinstance(item.get("id"), int) or isinstance(item["id"], bool):
                raise AdminError(3101, "each settlement window must be an object with an integer id")
            ids.append(item["id"])
        if len(set(ids)) != len(ids):
            raise AdminError(3101, "settlementWindows must be unique")
        settlement_id = await self.service.create_settlement(model, reason, ids)
        return _json(200, await self._settlement(settlement_id))

    async def get_settlement(self, request: Request, settlement_id: str) -> Response:
        return _json(200, await self._settlement(_int(settlement_id, "id")))

    async def put_settlement(self, request: Request, settlement_id: str) -> Response:
        sid = _int(settlement_id, "id")
        body = _parse_body(request)
        if "participants" not in body:
            state = _require(body, "state")
            if state != SettlementState.ABORTED:
                raise AdminError(3100, f"a settlement can only be set to ABORTED (not {state}) as a whole")
            await self.service.abort(sid, _require(body, "reason"))
            return _json(200, await self._settlement(sid))
        participants = body["participants"]
        if not isinstance(participants, list):
            raise AdminError(3101, "participants must be an array")
        updates = []
        for participant in participants:
            if not isinstance(participant, dict) or not isinstance(participant.get("id"), int):
                raise AdminError(3101, "each participant must be an object with an integer id")
            updates.extend(_account_updates(participant["id"], participant.get("accounts")))
        return await self._apply(sid, updates)

    async def get_participant(self, request: Request, settlement_id: str, participant_id: str) -> Response:
        settlement = await self._settlement(_int(settlement_id, "id"))
        pid = _int(participant_id, "participant id")
        found = [p for p in settlement["participants"] if p["id"] == pid]
        if not found:
            raise AdminError(3100, f"participant {pid} is not in settlement {settlement_id}")
        return _json(200, {"id": settlement["id"], "state": settlement["state"], "participants": found})

    async def put_participant(self, request: Request, settlement_id: str, participant_id: str) -> Response:
        body = _parse_body(request)
        updates = _account_updates(_int(participant_id, "participant id"), body.get("accounts"))
        return await self._apply(_int(settlement_id, "id"), updates)

    async def get_account(self, request: Request, settlement_id: str, participant_id: str, account_id: str
                          ) -> Response:
        settlement = await self._settlement(_int(settlement_id, "id"))
        pid, aid = _int(participant_id, "participant id"), _int(account_id, "account id")
        for participant in settlement["participants"]:
            accounts = [a for a in participant["accounts"] if participant["id"] == pid and a["id"] == aid]
            if accounts:
                return _json(200, {"id": settlement["id"], "state": settlement["state"],
                                   "participants": [{"id": pid, "accounts": accounts}]})
        raise AdminError(3100, f"account {aid} of participant {pid} is not in settlement {settlement_id}")

    async def put_account(self, request: Request, settlement_id: str, participant_id: str, account_id: str
                          ) -> Response:
        body = _parse_body(request)
        body["id"] = _int(account_id, "account id")
        _require(body, "reason")
        updates = _account_updates(_int(participant_id, "participant id"), [body])
        sid = _int(settlement_id, "id")
        refused = await self.service.update_accounts(sid, updates)
        if refused:
            code, description = refused[updates[0]["account_id"]]
            raise AdminError(code, description)
        return await self.get_account(request, settlement_id, participant_id, account_id)

    async def _apply(self, settlement_id: int, updates: list[dict]) -> Response:
        """Accounts whose acknowledgement was refused carry their error; the others moved."""
        refused = await self.service.update_accounts(settlement_id, updates)
        settlement = await self._settlement(settlement_id)
        for participant in settlement["participants"]:
            for account in participant["accounts"]:
                if account["id"] in refused:
                    code, description = refused[account["id"]]
                    account["errorInformation"] = error_body(code, description)["errorInformation"]
        return _json(200, settlement)

    # ------------------------------------------------------------------ reports

    async def window_report(self, request: Request, window_id: str) -> Response:
        wid = _int(window_id, "id")
        async with self.pool.acquire() as connection:
            window = await self._window(connection, wid)
            content_ids = [c["id"] for c in window["content"]]
            rows, pairs = await _report(connection, content_ids)
        return _report_response(request, {"settlementWindowId": wid, "state": window["state"]}, rows, pairs,
                                f"settlement-window-{wid}")

    async def settlement_report(self, request: Request, settlement_id: str) -> Response:
        settlement = await self._settlement(_int(settlement_id, "id"))
        async with self.pool.acquire() as connection:
            content_ids = [r["content_id"] for r in await connection.fetch(
                "SELECT content_id FROM settlement_content_link WHERE settlement_id = $1", settlement["id"])]
            rows, pairs = await _report(connection, content_ids)
        states = {a["id"]: a for p in settlement["participants"] for a in p["accounts"]}
        for row in rows:
            account = states.get(row.pop("_position_account", None))
            row["settlementState"] = account["state"] if account else ""
        head = {"settlementId": settlement["id"], "state": settlement["state"],
                "settlementModel": settlement["settlementModel"]}
        return _report_response(request, head, rows, pairs, f"settlement-{settlement['id']}",
                                extra_columns=("settlementState",))

    # ------------------------------------------------------------------ interchange fee rules

    async def list_fee_rules(self, request: Request) -> Response:
        rows = await self.pool.fetch("SELECT currency, basis_points, paid_by FROM interchange_fee_rule ORDER BY 1")
        return _json(200, [{"currency": r["currency"].strip(), "basisPoints": r["basis_points"],
                            "paidBy": r["paid_by"]} for r in rows])

    async def put_fee_rule(self, request: Request, currency: str) -> Response:
        currency = _currency(currency)
        body = _parse_body(request)
        basis_points = body.get("basisPoints")
        if basis_points is None:
            raise AdminError(3102, "missing basisPoints")
        if not isinstance(basis_points, int) or isinstance(basis_points, bool) \
                or not 0 <= basis_points <= MAX_BASIS_POINTS:
            raise AdminError(3101, f"basisPoints must be an integer from 0 to {MAX_BASIS_POINTS}")
        paid_by = FeePayer(_choice(body, "paidBy", tuple(FeePayer)))
        await self.service.set_fee_rule(currency, basis_points, paid_by)
        return _json(200, {"currency": currency, "basisPoints": basis_points, "paidBy": str(paid_by)})


def _account_json(r) -> dict:
    return {"id": r["account_id"], "state": r["state"], "reason": r["reason"],
            "externalReference": r["external_reference"],
            "netSettlementAmount": {"amount": _number(_text(r["net"])), "currency": r["currency"].strip()}}


def _account_updates(participant_id: int, accounts) -> list[dict]:
    if not isinstance(accounts, list) or not accounts:
        raise AdminError(3101, "accounts must be a non-empty array")
    updates = []
    for account in accounts:
        if not isinstance(account, dict) or not isinstance(account.get("id"), int) or isinstance(account["id"], bool):
            raise AdminError(3101, "each account must be an object with an integer id")
        state = _require(account, "state")
        reason = account.get("reason", "")
        reference = account.get("externalReference", "")
        if not isinstance(reason, str) or not isinstance(reference, str):
            raise AdminError(3101, "reason and externalReference must be strings")
        updates.append({"participant_id": participant_id, "account_id": account["id"], "state": state,
                        "reason": reason, "external_reference": reference})
    return updates


async def _report(connection, content_ids: list[int]) -> tuple[list[dict], list[dict]]:
    """Per participant and currency: sent, received, fees and the multilateral net; bilateral pairs."""
    rows: dict[tuple[str, str], dict] = {}
    for r in await connection.fetch(
        "SELECT p.name, w.currency, w.ledger_account_type, a.account_id, sum(a.sent) AS sent,"
        " sum(a.received) AS received, sum(a.sent_count) AS sent_count, sum(a.received_count) AS received_count,"
        " sum(a.net) AS net FROM settlement_content_account a JOIN settlement_window_content w USING (content_id)"
        " JOIN participant p USING (participant_id) WHERE a.content_id = ANY($1) GROUP BY 1, 2, 3, 4 ORDER BY 1, 2",
        content_ids,
    ):
        currency = r["currency"].strip()
        row = rows.setdefault((r["name"], currency), {
            "participant": r["name"], "currency": currency, "sent": "0", "received": "0", "sentCount": 0,
            "receivedCount": 0, "feesPaid": "0", "feesReceived": "0", "feeNet": "0", "multilateralNet": "0"})
        if r["ledger_account_type"] == AccountType.INTERCHANGE_FEE:
            row.update(feesPaid=_text(r["sent"]), feesReceived=_text(r["received"]), feeNet=_text(r["net"]))
        else:
            row.update(sent=_text(r["sent"]), received=_text(r["received"]), sentCount=int(r["sent_count"]),
                       receivedCount=int(r["received_count"]), multilateralNet=_text(r["net"]),
                       _position_account=r["account_id"])
    pairs = [
        {"currency": r["currency"].strip(), "ledgerAccountType": r["ledger_account_type"], "partyA": r["party_a"],
         "partyB": r["party_b"], "net": _text(r["net"])}
        for r in await connection.fetch(
            "SELECT w.currency, w.ledger_account_type, b.party_a, b.party_b, sum(b.net) AS net"
            " FROM settlement_content_bilateral b JOIN settlement_window_content w USING (content_id)"
            " WHERE b.content_id = ANY($1) GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
            content_ids,
        )
    ]
    return list(rows.values()), pairs


def _report_response(request: Request, head: dict, rows: list[dict], pairs: list[dict], name: str, *,
                     extra_columns: tuple[str, ...] = ()) -> Response:
    for row in rows:
        row.pop("_position_account", None)
    if request.query.get("format") != "csv":
        return _json(200, {**head, "participants": rows, "bilateral": pairs})
    bilateral_view = request.query.get("view") == "bilateral"
    columns = _BILATERAL_COLUMNS if bilateral_view else _REPORT_COLUMNS + extra_columns
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(pairs if bilateral_view else rows)
    suffix = "-bilateral" if bilateral_view else ""
    return Response(200, out.getvalue().encode(), content_type="text/csv; charset=utf-8",
                    headers=[("Content-Disposition", f'attachment; filename="{name}{suffix}.csv"')])
