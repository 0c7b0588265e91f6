"""A DFSP simulator: one HTTP server that is any number of FSPIOP v1.1 DFSPs (tests, benchmarks, users).

Each DFSP lives under its own path prefix, ``http://{host}:{port}/{name}``; register its endpoints
with the hub as ``{base}/transfers``, ``{base}/transfers/{{transferId}}`` and
``{base}/transfers/{{transferId}}/error`` (``Simulator.endpoints(name)`` gives the three).

As a payee, a DFSP answers every request from the hub at once (202 to GET/POST/DELETE, 200 to
PUT/PATCH), then does the work: for ``POST /transfers`` it regenerates the fulfilment from its own
secret and the prepare's ``ilpPacket`` (RULES §7: HMAC-SHA256 over the packet string — no condition
is stored, as with a real DFSP) and calls back ``{hub}/transfers/{ID}`` according to its
``Behaviour``. As a payer, ``prepare_body`` builds valid prepares (ILPv1 packet, condition from the
payee's secret) and ``send`` sends any FSPIOP request with correct headers.

Beyond transfers (``Simulator.all_endpoints`` lists every endpoint to register): each DFSP holds
parties (``add_party``, ``sim/parties.py``) and answers lookups, quotes (``sim/quotes.py``),
transaction requests and authorizations (``sim/requests.py``) per its ``Behaviour``; ``sim.flows``
(``sim/flows.py``) drives whole flows as a payer or payee and awaits their outcome, also from curl
through the control routes ``GET /{dfsp}/_pay``, ``/_request_to_pay``, ``/_register``,
``/_endpoints`` (``sim/control.py``). docs/USE_CASES.md shows every use case.

Everything inbound is recorded (bounded, or off for benchmarks) and counted per DFSP.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from email.utils import formatdate
from typing import Any

import orjson

from api.http import ClientPool, HttpConnectionError, HttpServer, HttpTimeout, Request, Response
from core.fspiop_errors import ERRORS
from sim.control import control
from sim.fees import to_amount
from sim.flows import Flows
from sim.ilp import b64url_encode, build_ilp_packet, condition_of, hmac_fulfilment, make_condition, new_secret
from sim.parties import PartyRegistry, SimParty

log = logging.getLogger(__name__)

__all__ = ["MODES", "Behaviour", "Counters", "Dfsp", "Received", "Simulator", "iso_now", "main"]

MODES = ("commit", "reserve", "reject", "invalid_fulfilment", "ignore")
_CHOICES = {
    "lookup_mode": ("answer", "ignore"),
    "quote_mode": ("accept", "reject", "ignore"),
    "fee_mode": ("non_disclosing", "disclosing"),
    "request_mode": ("approve", "reject", "ignore"),
    "authorization_mode": ("enter", "reject", "ignore"),
}

_AMOUNT = re.compile(r"^([0]|([1-9][0-9]{0,17}))([.][0-9]{0,3}[1-9])?$")  # RULES §3 Amount
_WITH_ACCEPT = frozenset({"GET", "POST", "DELETE"})
# FSPIOP v1.1 left these two resources at 1.0 (API Definition Table 6); every other one is at 1.1.
_RESOURCE_VERSIONS = {"authorizations": "1.0", "transactions": "1.0"}
_JSON = "application/json"


def iso_now(offset_ms: float = 0.0) -> str:
    """UTC now (+ offset) as FSPIOP DateTime: ``2024-01-02T03:04:05.678Z`` (milliseconds mandatory)."""
    moment = datetime.now(UTC) + timedelta(milliseconds=offset_ms)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class _HttpDate:
    """RFC 7231 IMF-fixdate for the Date header, formatted once per second."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._text = formatdate(second, usegmt=True)
        return self._text


_http_date = _HttpDate()


def _format_amount(amount: str | int | Decimal) -> str:
    """An FSPIOP amount string (no trailing zeros); ValueError when it cannot be one."""
    if isinstance(amount, str):
        text = amount
    else:
        if isinstance(amount, bool) or not isinstance(amount, int | Decimal):
            raise TypeError(f"amount must be str, int or Decimal, not {type(amount).__name__}")
        try:
            value = Decimal(amount)
        except InvalidOperation:
            raise ValueError(f"not an amount: {amount!r}") from None
        text = format(value.normalize(), "f") if value else "0"
    if not _AMOUNT.match(text):
        raise ValueError(f"not an FSPIOP amount (≤18 digits, ≤4 decimals, no trailing zeros): {text!r}")
    return text


# --------------------------------------------------------------------------------------------------
# Public data types


@dataclass(slots=True)
class Behaviour:
    """How a simulated DFSP answers the hub. Change it at runtime with ``Simulator.set_behaviour``.

    ``mode`` (what a prepare gets):
      - ``commit``: ``PUT /transfers/{ID}`` {transferState COMMITTED, fulfilment, completedTimestamp}
      - ``reserve``: the same with RESERVED (v1.1 commit notification); the hub then owes a PATCH
      - ``reject``: ``PUT /transfers/{ID}/error`` {errorInformation{errorCode, errorDescription}}
      - ``invalid_fulfilment``: COMMITTED with a well-formed fulfilment that does not match the condition
      - ``ignore``: no callback at all (the transfer will expire)

    ``delay_ms``: wait this long (after the synchronous 202) before calling back.
    ``fail_http``: answer the hub's requests with an HTTP failure and do nothing else — ``True``
    (500), an HTTP status (e.g. 503), or ``"close"`` (drop the connection without an answer).
    ``version``: the transfers resource version in callback Content-Types (``"1.0"`` to test the
    hub's v1.0 guard on RESERVED). ``headers``: extra headers on every callback.

    Beyond transfers (``sim/flows.py``, ``sim/quotes.py``, ``sim/requests.py``):

    - as the payee FSP: ``lookup_mode`` (``answer`` from the party registry, or ``ignore``);
      ``quote_mode`` (``accept``, ``reject`` with ``quote_error_code``, ``ignore``) with its
      ``fee`` (payeeFspFee) and ``commission`` (payeeFspCommission), exact Decimals, and
      ``quote_expiration_ms``; its POS/ATM's ``authorization_mode`` (``enter``, ``reject``,
      ``ignore``), entering a wrong OTP ``otp_wrong_entries`` times before the customer's.
    - as the payer FSP: ``fee_mode`` (``non_disclosing``, or ``disclosing``: its ``payer_fee`` goes
      in the quote's ``fees``); ``request_mode`` for transaction requests (``approve``, ``reject``,
      ``ignore``); the ``otp`` it issued its customers and ``otp_retries`` (retriesLeft of the first
      authorization); ``transfer_expiration_ms`` of its prepares; ``flow_timeout_ms``, how long it
      waits for each callback of a flow it runs.
    """

    mode: str = "commit"
    delay_ms: float = 0.0
    fail_http: bool | int | str = False
    error_code: str = "5104"
    error_description: str | None = None  # default: the code's name from the error table
    version: str = "1.1"
    headers: dict[str, str] | None = None
    lookup_mode: str = "answer"
    quote_mode: str = "accept"
    quote_error_code: str = "5101"
    fee: Decimal = Decimal(0)
    commission: Decimal = Decimal(0)
    quote_expiration_ms: float = 60_000.0
    fee_mode: str = "non_disclosing"
    payer_fee: Decimal = Decimal(0)
    request_mode: str = "approve"
    otp: str = "123456"
    otp_retries: int = 3
    authorization_mode: str = "enter"
    otp_wrong_entries: int = 0
    transfer_expiration_ms: float = 30_000.0
    flow_timeout_ms: float = 10_000.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; not {self.mode!r}")
        if self.delay_ms < 0:
            raise ValueError("delay_ms must be >= 0")
        failure = self.fail_http
        if not (
            failure is False
            or failure is True
            or failure == "close"
            or (isinstance(failure, int) and not isinstance(failure, bool) and 400 <= failure <= 599)
        ):
            raise ValueError("fail_http must be False, True (500), an HTTP status 400-599, or 'close'")
        self.error_code = str(self.error_code)
        if not (len(self.error_code) == 4 and self.error_code.isdigit() and self.error_code[0] != "0"):
            raise ValueError(f"error_code must be four digits: {self.error_code!r}")
        major, dot, minor = self.version.partition(".")
        if not (dot and major.isdigit() and minor.isdigit()):
            raise ValueError(f"version must be major.minor, e.g. '1.1': {self.version!r}")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; not {getattr(self, name)!r}")
        self.quote_error_code = str(self.quote_error_code)
        if not (len(self.quote_error_code) == 4 and self.quote_error_code.isdigit()):
            raise ValueError(f"quote_error_code must be four digits: {self.quote_error_code!r}")
        for name in ("fee", "commission", "payer_fee"):
            setattr(self, name, to_amount(getattr(self, name), name))  # exact: str/int/Decimal, never float
        if not (self.otp.isdigit() and 3 <= len(self.otp) <= 10):
            raise ValueError(f"otp must be 3 to 10 digits: {self.otp!r}")
        if self.otp_retries < 1 or self.otp_wrong_entries < 0:
            raise ValueError("otp_retries must be >= 1 and otp_wrong_entries >= 0")
        for name in ("quote_expiration_ms", "transfer_expiration_ms", "flow_timeout_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")


@dataclass(frozen=True, slots=True)
class Received:
    """One inbound request to a simulated DFSP. ``path`` is without the DFSP prefix (``/transfers/…``)."""

    dfsp: str
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: dict[str, Any]  # parsed JSON object; {} when the body was empty or not a JSON object
    at_monotonic: float


@dataclass(slots=True)
class Counters:
    """Per-DFSP counts; kept even when recording is off."""

    requests: int = 0  # every inbound request
    prepares: int = 0  # POST /transfers received
    prepares_answered: int = 0  # callbacks for prepares (PUT or PUT /error) the hub accepted (2xx)
    put_transfers: int = 0  # PUT /transfers/{ID} received (the hub's result to a payer, or a notification)
    put_errors: int = 0  # PUT /transfers/{ID}/error received
    patches: int = 0  # PATCH /transfers/{ID} received (commit notification to a RESERVED payee)
    http_failures: int = 0  # requests answered with fail_http
    callback_failures: int = 0  # callbacks the hub did not accept: connect error, timeout, or not 2xx
    condition_mismatches: int = 0  # prepares whose condition our fulfilment does not meet (wrong secret?)
    malformed: int = 0  # prepares without a usable transferId

    def add(self, other: Counters) -> None:
        for item in fields(self):
            setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))


@dataclass(slots=True)
class Dfsp:
    name: str
    behaviour: Behaviour
    secret: bytes
    counters: Counters = field(default_factory=Counters)
    awaiting_patch: dict[str, float] = field(default_factory=dict)  # transferId -> when RESERVED was sent
    parties: PartyRegistry = field(default_factory=PartyRegistry)  # the parties it holds (sim/parties.py)


# --------------------------------------------------------------------------------------------------
# The simulator


class Simulator:
    """One HTTP server playing every added DFSP; see the module docstring.

    ``max_recorded`` bounds the recording (oldest dropped); ``record=False`` (also settable at
    runtime) keeps nothing but counters — for benchmarks. ``max_connections`` is per hub origin for
    outbound requests; ``request_timeout_s`` bounds each of them.

    ``auto_answer`` (also settable at runtime): the DFSPs answer lookups, quotes, transaction
    requests and authorizations themselves, per their ``Behaviour`` (docs/USE_CASES.md). Off (the
    default, so that tests playing one side by hand get no second answer), only prepares are
    answered; callbacks a ``flows`` helper awaits are recognised either way.
    """

    def __init__(
        self,
        hub_url: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        hub_name: str = "Hub",
        record: bool = True,
        max_recorded: int = 100_000,
        max_connections: int = 64,
        request_timeout_s: float = 10.0,
        auto_answer: bool = False,
    ):
        self.hub_url = hub_url.rstrip("/")
        self.auto_answer = auto_answer
        self.host = host
        self.port = port
        self.hub_name = hub_name
        self.record = record
        self._dfsps: dict[str, Dfsp] = {}
        self._recorded: deque[Received] = deque(maxlen=max_recorded)
        self._waiters: list[tuple[str | None, Callable[[Received], bool] | None, asyncio.Future[Received]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: HttpServer | None = None
        self._client = ClientPool(max_connections=max_connections, request_timeout_s=request_timeout_s)
        self._max_awaiting = max_recorded
        self.on_request: Callable[[Received], None] | None = None  # called for every inbound request
        self.flows = Flows(self, max_links=max(max_recorded, 10_000))  # lookups, quotes, requests, payer helpers

    @property
    def max_recorded(self) -> int:
        return self._recorded.maxlen or 0

    # ---- lifecycle

    async def start(self) -> int:
        """Start listening; returns the port (useful with ``port=0``)."""
        if self._server is not None:
            return self.port
        server = HttpServer(self._handle, self.host, self.port, request_timeout_s=30.0)
        self.port = await server.start()
        self._server = server
        return self.port

    async def stop(self) -> None:
        """Stop listening, cancel pending callbacks and close outbound connections."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        if self._server is not None:
            await self._server.stop()
            self._server = None
        await self._client.close()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ---- DFSPs

    def add_dfsp(self, name: str, behaviour: Behaviour | None = None, secret: bytes | None = None) -> Dfsp:
        """Add (or replace) a simulated DFSP. ``secret``: 32 random bytes unless given."""
        if not name or "/" in name or "?" in name or len(name) > 32:
            raise ValueError(f"a DFSP name is 1..32 characters without '/' or '?': {name!r}")
        dfsp = Dfsp(name, behaviour if behaviour is not None else Behaviour(), secret or new_secret())
        self._dfsps[name] = dfsp
        return dfsp

    def dfsp(self, name: str) -> Dfsp:
        try:
            return self._dfsps[name]
        except KeyError:
            raise KeyError(f"no simulated DFSP named {name!r}") from None

    @property
    def dfsps(self) -> list[str]:
        return list(self._dfsps)

    def behaviour(self, name: str) -> Behaviour:
        return self.dfsp(name).behaviour

    def set_behaviour(self, name: str, behaviour: Behaviour | None = None, **changes: Any) -> Behaviour:
        """Replace a DFSP's behaviour and/or change some fields: ``set_behaviour("b", mode="reject")``.

        Takes effect for requests arriving from now on; callbacks already scheduled keep the old one.
        """
        dfsp = self.dfsp(name)
        dfsp.behaviour = replace(behaviour if behaviour is not None else dfsp.behaviour, **changes)
        return dfsp.behaviour

    def base_url(self, name: str) -> str:
        """``http://{host}:{port}/{name}`` (a wildcard listen address is given as 127.0.0.1)."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/{name}"

    def endpoints(self, name: str) -> dict[str, str]:
        """The transfer callback endpoints to register with the hub for DFSP ``name``."""
        base = self.base_url(name)
        return {
            "FSPIOP_CALLBACK_URL_TRANSFER_POST": f"{base}/transfers",
            "FSPIOP_CALLBACK_URL_TRANSFER_PUT": f"{base}/transfers/{{{{transferId}}}}",
            "FSPIOP_CALLBACK_URL_TRANSFER_ERROR": f"{base}/transfers/{{{{transferId}}}}/error",
        }

    def all_endpoints(self, name: str) -> dict[str, str]:
        """Every callback endpoint DFSP ``name`` serves: transfers, lookups, quotes, transaction requests,
        authorizations (the templates the hub expands; quotes and the rest are base URLs)."""
        base = self.base_url(name)
        party = "{{partyIdType}}/{{partyIdentifier}}"
        sub = party + "/{{partySubIdOrType}}"
        endpoints = self.endpoints(name)
        for kind, template in (("PARTIES_GET", party), ("PARTIES_SUB_ID_GET", sub)):
            endpoints[f"FSPIOP_CALLBACK_URL_{kind}"] = f"{base}/parties/{template}"
        for prefix, resource in (("PARTIES", "parties"), ("PARTICIPANT", "participants")):
            endpoints[f"FSPIOP_CALLBACK_URL_{prefix}_PUT"] = f"{base}/{resource}/{party}"
            endpoints[f"FSPIOP_CALLBACK_URL_{prefix}_SUB_ID_PUT"] = f"{base}/{resource}/{sub}"
            endpoints[f"FSPIOP_CALLBACK_URL_{prefix}_PUT_ERROR"] = f"{base}/{resource}/{party}/error"
            endpoints[f"FSPIOP_CALLBACK_URL_{prefix}_SUB_ID_PUT_ERROR"] = f"{base}/{resource}/{sub}/error"
        endpoints["FSPIOP_CALLBACK_URL_PARTICIPANT_BATCH_PUT"] = f"{base}/participants/{{{{requestId}}}}"
        endpoints["FSPIOP_CALLBACK_URL_PARTICIPANT_BATCH_PUT_ERROR"] = f"{base}/participants/{{{{requestId}}}}/error"
        for kind in ("QUOTES", "TRX_REQ_SERVICE", "AUTHORIZATIONS"):
            endpoints[f"FSPIOP_CALLBACK_URL_{kind}"] = base
        return endpoints

    def add_party(self, dfsp: str, party: SimParty) -> SimParty:
        """Give DFSP ``dfsp`` an account holder (answered to lookups; see ``flows.register_parties``)."""
        return self.dfsp(dfsp).parties.add(party)

    def spawn(self, coroutine: Any) -> None:
        """Run a coroutine in the background; cancelled by ``stop``."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def send_callback(self, dfsp: Dfsp, method: str, path: str, payload: dict[str, Any],
                            destination: str) -> bool:
        """A callback (``PUT /quotes/{ID}``, ``PUT /parties/...``) to the hub as ``dfsp``; True when accepted."""
        return await self._callback(dfsp, dfsp.behaviour, path, payload, destination, method=method)

    # ---- recording

    def received(
        self, dfsp: str | None, *, method: str | None = None, path_contains: str | None = None
    ) -> list[Received]:
        """Recorded requests, oldest first; ``dfsp=None`` for all DFSPs."""
        method = method.upper() if method else None
        return [
            item
            for item in self._recorded
            if (dfsp is None or item.dfsp == dfsp)
            and (method is None or item.method == method)
            and (path_contains is None or path_contains in item.path)
        ]

    async def wait_for(
        self, dfsp: str | None, predicate: Callable[[Received], bool] | None = None, timeout_s: float = 5.0
    ) -> Received:
        """The first request to ``dfsp`` matching ``predicate``: an already recorded one (oldest
        first), else the next to arrive (even with recording off). Raises TimeoutError."""
        for item in self._recorded:
            if (dfsp is None or item.dfsp == dfsp) and (predicate is None or predicate(item)):
                return item
        future: asyncio.Future[Received] = asyncio.get_running_loop().create_future()
        waiter = (dfsp, predicate, future)
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            raise TimeoutError(f"no matching request to {dfsp or 'any DFSP'} within {timeout_s} s") from None
        finally:
            self._waiters.remove(waiter)

    def clear(self, *, counters: bool = False) -> None:
        """Forget recorded requests (and reset counters and pending PATCH expectations if asked)."""
        self._recorded.clear()
        if counters:
            for dfsp in self._dfsps.values():
                dfsp.counters = Counters()
                dfsp.awaiting_patch.clear()

    def counters(self, dfsp: str | None = None) -> Counters:
        """One DFSP's counters (live object), or a sum over all DFSPs (a copy) when ``dfsp`` is None."""
        if dfsp is not None:
            return self.dfsp(dfsp).counters
        total = Counters()
        for item in self._dfsps.values():
            total.add(item.counters)
        return total

    def awaiting_patch(self, dfsp: str) -> list[str]:
        """Transfer IDs this DFSP answered RESERVED for and has had no PATCH about yet."""
        return list(self.dfsp(dfsp).awaiting_patch)

    # ---- as a payer

    def prepare_body(
        self,
        payer: str,
        payee: str,
        amount: str | int | Decimal,
        currency: str,
        *,
        transfer_id: str | None = None,
        expiration_ms: float = 30_000,
        payee_party: tuple[str, str] = ("MSISDN", "123"),
        payer_party: tuple[str, str] = ("MSISDN", "456"),
        payee_name: str | None = None,
        payer_name: str | None = None,
        note: str | None = None,
        secret: bytes | None = None,
    ) -> dict[str, Any]:
        """A valid ``POST /transfers`` body, as if a quote had been agreed with ``payee``.

        The ILP packet carries the Transaction object (transactionId = transferId); the condition
        comes from the payee's secret (``secret``, else the simulated payee's). ``expiration_ms`` is
        relative to now (negative for an already expired prepare).
        """
        amount_text = _format_amount(amount)
        if secret is None:
            secret = self.dfsp(payee).secret
        transfer_id = transfer_id or str(uuid.uuid4())
        payee_info: dict[str, Any] = {"partyIdInfo": _party_id_info(payee_party, payee)}
        if payee_name is not None:
            payee_info["name"] = payee_name
        payer_info: dict[str, Any] = {"partyIdInfo": _party_id_info(payer_party, payer)}
        if payer_name is not None:
            payer_info["name"] = payer_name
        transaction: dict[str, Any] = {
            "transactionId": transfer_id,
            "quoteId": str(uuid.uuid4()),
            "payee": payee_info,
            "payer": payer_info,
            "amount": {"amount": amount_text, "currency": currency},
            "transactionType": {"scenario": "TRANSFER", "initiator": "PAYER", "initiatorType": "CONSUMER"},
        }
        if note is not None:
            transaction["note"] = note
        ilp_packet = build_ilp_packet(transaction)
        _, condition = make_condition(secret, ilp_packet)
        return {
            "transferId": transfer_id,
            "payerFsp": payer,
            "payeeFsp": payee,
            "amount": {"amount": amount_text, "currency": currency},
            "ilpPacket": ilp_packet,
            "condition": condition,
            "expiration": iso_now(expiration_ms),
        }

    async def send(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | list[Any] | bytes | str | None = None,
        *,
        source: str,
        destination: str | None = None,
        version: str | None = None,
        headers: dict[str, str | None] | None = None,
    ) -> tuple[int, Any]:
        """Send an FSPIOP request to the hub: ``(status, parsed JSON body or None)``.

        Headers: Content-Type ``application/vnd.interoperability.{resource}+json;version={version}``,
        Accept (GET/POST/DELETE only) with the same version, Date, FSPIOP-Source, and
        FSPIOP-Destination when given. ``headers`` adds or overrides (case-insensitively); a value of
        None removes a default header (to test the hub's header validation). ``body`` may be raw
        bytes/str to send malformed JSON.
        """
        method = method.upper()
        path = path if path.startswith("/") else f"/{path}"
        resource = _resource(path)
        version = version or _RESOURCE_VERSIONS.get(resource, "1.1")
        media = f"application/vnd.interoperability.{resource}+json;version={version}"
        defaults: list[tuple[str, str]] = [("Content-Type", media)]
        if method in _WITH_ACCEPT:
            defaults.append(("Accept", media))
        defaults.append(("Date", _http_date()))
        defaults.append(("FSPIOP-Source", source))
        if destination is not None:
            defaults.append(("FSPIOP-Destination", destination))
        request_headers = _merge_headers(defaults, headers)
        if body is None:
            payload = b""
        elif isinstance(body, bytes):
            payload = body
        elif isinstance(body, str):
            payload = body.encode()
        else:
            payload = orjson.dumps(body)
        status, _, raw = await self._client.request(method, self.hub_url + path, request_headers, payload)
        return status, _parse_json(raw)

    async def send_prepare(
        self,
        payer: str,
        payee: str,
        amount: str | int | Decimal,
        currency: str,
        *,
        version: str = "1.1",
        headers: dict[str, str | None] | None = None,
        **prepare_options: Any,
    ) -> tuple[int, Any, dict[str, Any]]:
        """``prepare_body`` + ``POST /transfers`` from ``payer`` to ``payee``: ``(status, body, prepare)``."""
        prepare = self.prepare_body(payer, payee, amount, currency, **prepare_options)
        status, answer = await self.send(
            "POST", "/transfers", prepare, source=payer, destination=payee, version=version, headers=headers
        )
        return status, answer, prepare

    # ---- inbound

    async def _handle(self, request: Request) -> Response:
        path = request.path
        name, _, rest = path[1:].partition("/")
        dfsp = self._dfsps.get(name)
        if dfsp is None:
            return _error_response(404, "3002", f"Unknown URI: no simulated DFSP {name!r}")
        sub_path = f"/{rest}"
        method = request.method
        if method == "GET" and sub_path == "/_prepare":
            return self._example_prepare(name, request)
        if method == "GET" and sub_path.startswith("/_"):
            answer = await control(self, name, sub_path, request)  # sim/control.py: flows for curl users
            if answer is not None:
                return answer
        body = _parse_object(request.body)
        received = Received(name, method, sub_path, request.headers, body, time.monotonic())
        if self.record:
            self._recorded.append(received)
        if self._waiters:
            self._notify(received)
        if self.on_request is not None:
            self.on_request(received)

        counters = dfsp.counters
        counters.requests += 1
        kind = _kind(method, rest)
        if kind == "prepare":
            counters.prepares += 1
        elif kind == "put":
            counters.put_transfers += 1
        elif kind == "error":
            counters.put_errors += 1
        elif kind == "patch":
            counters.patches += 1
            dfsp.awaiting_patch.pop(rest.split("/")[1], None)

        behaviour = dfsp.behaviour
        if behaviour.fail_http is not False:
            counters.http_failures += 1
            return await self._fail(request, behaviour.fail_http)
        if kind != "prepare" and (method == "PUT" or not rest.startswith("transfers")):
            # Lookups, quotes, transaction requests, authorizations, and the callbacks a flow awaits.
            self.flows.inbound(dfsp, received)
        if kind == "prepare":
            task = asyncio.get_running_loop().create_task(self._answer_prepare(dfsp, behaviour, received))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return Response(202 if method in _WITH_ACCEPT else 200)

    def _example_prepare(self, payer: str, request: Request) -> Response:
        """``GET /{payer}/_prepare?payee=&amount=&currency=``: a valid prepare body, for curl users.

        Only the simulator knows its payees' secrets, so it builds the ILP packet and condition;
        the caller sends the body to the hub itself (README: "Send a transfer with curl").
        """
        query = request.query
        try:
            body = self.prepare_body(payer, query["payee"], query.get("amount", "1"), query.get("currency", "USD"),
                                     expiration_ms=float(query.get("expiration_ms", 60_000)))
        except (KeyError, ValueError) as error:
            return _error_response(400, "3100", f"cannot build a prepare: {error}")
        return Response(200, orjson.dumps(body), content_type="application/json")

    def _notify(self, received: Received) -> None:
        for dfsp, predicate, future in self._waiters:
            if future.done() or (dfsp is not None and dfsp != received.dfsp):
                continue
            try:
                if predicate is None or predicate(received):
                    future.set_result(received)
            except Exception as exc:  # a broken predicate fails its own wait_for, not the server
                future.set_exception(exc)

    async def _fail(self, request: Request, failure: bool | int | str) -> Response:
        if failure == "close" and self._drop_connection(request.peer):
            await asyncio.sleep(3600)  # cancelled when the server notices the connection is gone
        status = failure if isinstance(failure, int) and not isinstance(failure, bool) else 500
        return _error_response(status, "2001" if status >= 500 else "3000", "Simulated failure", close=True)

    def _drop_connection(self, peer: str | None) -> bool:
        # api.http has no public way for a handler to drop its connection; reach into the server's
        # connection set (by peer address) rather than change the shared HTTP module.
        server = self._server
        if server is None or peer is None:
            return False
        for connection in list(getattr(server, "_connections", ())):
            transport = getattr(connection, "_transport", None)
            if getattr(connection, "_peer", None) == peer and transport is not None:
                transport.abort()
                return True
        return False

    async def _answer_prepare(self, dfsp: Dfsp, behaviour: Behaviour, prepare: Received) -> None:
        body = prepare.body
        transfer_id = body.get("transferId")
        if not isinstance(transfer_id, str) or not transfer_id or "/" in transfer_id or "?" in transfer_id:
            dfsp.counters.malformed += 1
            log.warning("sim %s: prepare without a usable transferId", dfsp.name)
            return
        linked_request = self.flows.on_prepare(dfsp, body)  # a transfer paying a transaction request?
        if behaviour.mode == "ignore":
            return
        if behaviour.delay_ms > 0:
            await asyncio.sleep(behaviour.delay_ms / 1000)
        payer = body.get("payerFsp") or prepare.headers.get("fspiop-source") or self.hub_name
        ilp_packet = body.get("ilpPacket")
        fulfilment, condition = make_condition(dfsp.secret, ilp_packet if isinstance(ilp_packet, str) else "")
        if condition != body.get("condition"):
            dfsp.counters.condition_mismatches += 1

        mode = behaviour.mode
        if mode == "reject":
            code = behaviour.error_code
            description = behaviour.error_description or _error_name(code)
            path = f"/transfers/{transfer_id}/error"
            payload: dict[str, Any] = {"errorInformation": {"errorCode": code, "errorDescription": description}}
        else:
            if mode == "invalid_fulfilment":
                fulfilment = _wrong_fulfilment(fulfilment, body.get("condition"))
            state = "RESERVED" if mode == "reserve" else "COMMITTED"
            path = f"/transfers/{transfer_id}"
            payload = {"transferState": state, "fulfilment": fulfilment, "completedTimestamp": iso_now()}
            if mode == "reserve":
                awaiting = dfsp.awaiting_patch
                awaiting[transfer_id] = time.monotonic()
                if len(awaiting) > self._max_awaiting:
                    del awaiting[next(iter(awaiting))]
        if await self._callback(dfsp, behaviour, path, payload, payer):
            dfsp.counters.prepares_answered += 1
            if linked_request is not None:
                state = "REJECTED" if mode == "reject" else payload.get("transferState", "")
                code = behaviour.error_code if mode == "reject" else None
                self.flows.on_prepare_answered(dfsp, linked_request, transfer_id, state, code)

    async def _callback(
        self, dfsp: Dfsp, behaviour: Behaviour, path: str, payload: dict[str, Any], destination: str,
        *, method: str = "PUT",
    ) -> bool:
        """PUT a callback to the hub as ``dfsp``; True when the hub accepted it (2xx)."""
        resource = _resource(path)
        # behaviour.version is about transfers (the v1.0 RESERVED guard); the others speak their own.
        version = behaviour.version if resource == "transfers" else _RESOURCE_VERSIONS.get(resource, "1.1")
        headers: list[tuple[str, str]] = [
            ("Content-Type", f"application/vnd.interoperability.{resource}+json;version={version}"),
            ("Date", _http_date()),
            ("FSPIOP-Source", dfsp.name),
            ("FSPIOP-Destination", destination),
        ]
        if behaviour.headers:
            headers = _merge_headers(headers, behaviour.headers)
        try:
            status, _, _ = await self._client.request(method, self.hub_url + path, headers, orjson.dumps(payload))
        except (HttpConnectionError, HttpTimeout, OSError) as exc:
            dfsp.counters.callback_failures += 1
            log.warning("sim %s: %s %s failed: %s", dfsp.name, method, path, exc)
            return False
        if not 200 <= status < 300:
            dfsp.counters.callback_failures += 1
            log.warning("sim %s: %s %s answered %d", dfsp.name, method, path, status)
            return False
        return True


# --------------------------------------------------------------------------------------------------
# Helpers


def _party_id_info(party: tuple[str, str], fsp_id: str) -> dict[str, str]:
    party_id_type, party_identifier = party
    return {"partyIdType": party_id_type, "partyIdentifier": party_identifier, "fspId": fsp_id}


def _resource(path: str) -> str:
    return path.split("?", 1)[0].lstrip("/").split("/", 1)[0] or "transfers"


def _kind(method: str, rest: str) -> str:
    """Classify a DFSP-relative path (without the leading slash) for the counters."""
    parts = rest.split("/")
    if not parts or parts[0] != "transfers":
        return "other"
    if method == "POST" and len(parts) == 1:
        return "prepare"
    if method == "PUT" and len(parts) == 2 and parts[1]:
        return "put"
    if method == "PUT" and len(parts) == 3 and parts[2] == "error":
        return "error"
    if method == "PATCH" and len(parts) == 2 and parts[1]:
        return "patch"
    return "other"


def _merge_headers(
    defaults: list[tuple[str, str]], overrides: Mapping[str, str | None] | None
) -> list[tuple[str, str]]:
    if not overrides:
        return defaults
    lowered = {name.lower(): (name, value) for name, value in overrides.items()}
    merged = [(name, value) for name, value in defaults if name.lower() not in lowered]
    merged.extend((name, value) for name, value in lowered.values() if value is not None)
    return merged


def _parse_json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {"raw": raw.decode("utf-8", "replace")}


def _parse_object(raw: bytes) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _error_name(code: str) -> str:
    definition = ERRORS.get(int(code))
    return definition.name if definition is not None else "Payee error"


def _error_response(status: int, code: str, description: str, *, close: bool = False) -> Response:
    body = orjson.dumps({"errorInformation": {"errorCode": code, "errorDescription": description}})
    headers = [("Connection", "close")] if close else []
    return Response(status, body, headers, _JSON)


def _wrong_fulfilment(fulfilment: str, condition: Any) -> str:
    """A well-formed 32-byte fulfilment that does not meet the condition."""
    candidate = hmac_fulfilment(b"simulator: invalid fulfilment", fulfilment.encode())
    if isinstance(condition, str) and condition_of(candidate) == condition:  # astronomically unlikely
        candidate = b64url_encode(bytes(32))
    return candidate


# --------------------------------------------------------------------------------------------------
# CLI


def _parse_dfsp(spec: str) -> tuple[str, Behaviour]:
    """``name[:mode[:delay_ms]]`` -> (name, Behaviour)."""
    name, _, rest = spec.partition(":")
    mode, _, delay = rest.partition(":")
    try:
        behaviour = Behaviour(mode=mode or "commit", delay_ms=float(delay) if delay else 0.0)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--dfsp {spec}: {exc}") from None
    return name, behaviour


def _parse_party(spec: str) -> tuple[str, SimParty]:
    """``dfsp:TYPE:ID[:FULL NAME]`` -> (dfsp, SimParty)."""
    parts = spec.split(":", 3)
    if len(parts) < 3:
        raise argparse.ArgumentTypeError(f"--party {spec}: expected DFSP:TYPE:ID[:FULL NAME]")
    try:
        if len(parts) == 4 and parts[3].strip():
            return parts[0], SimParty.named(parts[1], parts[2], parts[3])
        return parts[0], SimParty(parts[1], parts[2])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--party {spec}: {exc}") from None


def _parse_setting(spec: str) -> tuple[str, str, str]:
    """``dfsp.field=value`` -> (dfsp, field, value as text); the value is converted by ``_coerce``."""
    target, equals, value = spec.partition("=")
    name, dot, field_name = target.rpartition(".")
    if not (equals and dot and name and field_name):
        raise argparse.ArgumentTypeError(f"--set {spec}: expected DFSP.FIELD=VALUE")
    if field_name not in {item.name for item in fields(Behaviour)} or field_name in ("headers", "fail_http"):
        raise argparse.ArgumentTypeError(f"--set {spec}: no settable Behaviour field {field_name!r}")
    return name, field_name, value


def _coerce(field_name: str, value: str) -> Any:
    """A command-line value as the Behaviour field's type (money stays text: Behaviour makes it a Decimal)."""
    default = getattr(Behaviour(), field_name)
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "yes")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sim.simulator",
        description="Simulated FSPIOP v1.1 DFSPs on one HTTP server, each under /{name}.",
    )
    parser.add_argument("--hub", required=True, help="the hub's FSPIOP base URL, e.g. http://127.0.0.1:3000")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=4000, help="listen port (default 4000)")
    parser.add_argument("--hub-name", default="Hub", help="the hub's FSPIOP-Source name (default Hub)")
    parser.add_argument(
        "--dfsp",
        action="append",
        type=_parse_dfsp,
        required=True,
        metavar="NAME[:MODE[:DELAY_MS]]",
        help=f"a simulated DFSP; MODE one of {', '.join(MODES)} (default commit); repeatable",
    )
    parser.add_argument(
        "--party",
        action="append",
        type=_parse_party,
        default=[],
        metavar="DFSP:TYPE:ID[:FULL NAME]",
        help="a party DFSP holds (answered to GET /parties), e.g. payeefsp:MSISDN:27713803912:'Zoë Ñúñez'; repeatable",
    )
    parser.add_argument(
        "--set",
        action="append",
        type=_parse_setting,
        default=[],
        metavar="DFSP.FIELD=VALUE",
        help="a Behaviour field, e.g. payeefsp.fee=1.5, payerfsp.fee_mode=disclosing, payerfsp.request_mode=reject; "
        "repeatable",
    )
    parser.add_argument("--no-record", action="store_true", help="keep counters only (benchmarks)")
    parser.add_argument("--transfers-only", action="store_true",
                        help="answer only prepares: leave lookups, quotes, transaction requests and authorizations "
                        "unanswered (to answer them by hand)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every inbound request")
    return parser


async def _serve(args: argparse.Namespace) -> None:
    simulator = Simulator(args.hub, host=args.host, port=args.port, hub_name=args.hub_name, record=not args.no_record,
                          auto_answer=not args.transfers_only)
    for name, behaviour in args.dfsp:
        simulator.add_dfsp(name, behaviour)
    try:
        for name, party in args.party:
            simulator.add_party(name, party)
        for name, field_name, value in args.set:
            simulator.set_behaviour(name, **{field_name: _coerce(field_name, value)})
    except (KeyError, TypeError, ValueError) as problem:
        raise SystemExit(f"python -m sim.simulator: {problem}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix
            pass
    await simulator.start()
    lines = [f"simulator on http://{args.host}:{simulator.port}, answering to {simulator.hub_url}"]
    for name in simulator.dfsps:
        lines.append(f"  {name} ({simulator.behaviour(name).mode}):")
        lines.extend(f"    {kind:48} {url}" for kind, url in simulator.all_endpoints(name).items())
    print("\n".join(lines), flush=True)
    if args.verbose:
        simulator.on_request = _print_request
    try:
        await stop.wait()
    finally:
        await simulator.stop()
        for name in simulator.dfsps:
            print(f"{name}: {simulator.counters(name)}", flush=True)


def _print_request(item: Received) -> None:
    print(f"{item.dfsp}: {item.method} {item.path} {orjson.dumps(item.body).decode()}", flush=True)


def main(argv: Iterable[str] | None = None) -> int:
    args = _parser().parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        import uvloop

        uvloop.run(_serve(args))
    except KeyboardInterrupt:  # pragma: no cover - a second Ctrl-C
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
