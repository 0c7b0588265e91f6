"""The FSPIOP ``/transfers`` resource: what the hub does with each request, and the callbacks it owes.

Requests arrive here already routed and checked (headers, version, schema: ``api/fspiop/ingress.py``)
and answered 202/200. This module validates what needs the hub's knowledge (participants, accounts,
expiration; RULES.md 6.5), hands the ledger part to the payer's shard through a ``ShardBatcher``,
and sends callbacks only after the shard says the change is durable (its replies wait for that).

Callback rules (RULES.md sections 5 and 6, Mojaloop-compatible):

| decision | to the payer | to the payee |
|---|---|---|
| prepare reserved | | the original ``POST /transfers`` (headers and signature unchanged) |
| prepare refused (4001, 4200, 3100...) | ``PUT .../error`` from the hub | |
| committed, payee said COMMITTED | the payee's ``PUT`` forwarded unchanged | |
| committed, payee said RESERVED (v1.1) | ``PUT`` COMMITTED from the hub | ``PATCH`` COMMITTED |
| invalid fulfil / wrong destination | ``PUT .../error`` 3100 | ``PATCH`` ABORTED (RESERVED) or ``PUT .../error` 3100 |
| fulfil after expiry, expiry timer | ``PUT .../error`` 3303 | ``PUT .../error`` 3303 |
| payee error | the payee's ``PUT .../error`` forwarded | |
| duplicate, same content, finished | the current state again (``PUT``) | (fulfil duplicates: to the payee) |
| duplicate, other content | ``PUT .../error`` 3106 to the sender | |
"""

from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import logging
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson

from actors.position_shard import Overloaded
from api.fspiop.callbacks import (
    CallbackDispatcher,
    CallbackMetrics,
    EndpointDirectory,
    Outcome,
    forward_headers,
    hub_headers,
)
from cluster import metrics
from cluster.ledger_client import ShardUnavailable
from core.errors import FspiopError, normalise_error_code
from core.ledger import TransferState
from core.money import AmountError, parse_amount
from core.transfers import TransferRecord
from protos import ledger_pb2 as pb

log = logging.getLogger(__name__)

TRANSFER_POST = "FSPIOP_CALLBACK_URL_TRANSFER_POST"
TRANSFER_PUT = "FSPIOP_CALLBACK_URL_TRANSFER_PUT"
TRANSFER_ERROR = "FSPIOP_CALLBACK_URL_TRANSFER_ERROR"


def request_hash(body: dict) -> str:
    """SHA-256 of the canonical JSON (sorted keys): the same content hashes the same in any key order."""
    digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).digest()
    return base64.b64encode(digest).decode()


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


def iso_ms(epoch_ms: int) -> str:
    """FSPIOP DateTime: ISO 8601 with milliseconds, UTC."""
    return (_EPOCH + timedelta(milliseconds=epoch_ms)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_datetime_ms(text: str) -> int:
    """An FSPIOP DateTime (already schema-checked) to epoch milliseconds.

    Integer arithmetic on the timedelta: through a float (``timestamp() * 1000``) about one value in 160
    came out a millisecond early (``...10.272Z`` as 271 ms), so a completedTimestamp echoed back changed."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _ONE_MS


def amount_minor(text: str) -> int:
    try:
        return parse_amount(text)
    except AmountError:
        return -1


@functools.cache
def _process_metrics() -> CallbackMetrics:
    # One set of callback metrics per process: several dispatchers (shards in one test process) share it.
    return CallbackMetrics()


class TransferNotifier:
    """Builds and sends the transfer callbacks; the ingress and the shards (expiry) both use it."""

    def __init__(self, endpoints: EndpointDirectory, dispatcher: CallbackDispatcher, *, hub_name: str):
        self.endpoints = endpoints
        self.dispatcher = dispatcher
        self.hub_name = hub_name

    @classmethod
    async def create(
        cls, pool: asyncpg.Pool, *, hub_name: str, sender_process: bool = False, **dispatcher_options
    ) -> TransferNotifier:
        """``sender_process``: deliveries run in a child process (api/fspiop/callback_sender.py)."""
        # A short reload interval: a DFSP registered a moment ago must be found on its first callback.
        endpoints = EndpointDirectory(pool, reload_min_interval_ms=50)
        await endpoints.start()
        if sender_process:
            from api.fspiop.callback_sender import CallbackSenderProcess

            dispatcher = CallbackSenderProcess(metrics=_process_metrics(), **dispatcher_options)
            await dispatcher.start()
        else:
            dispatcher = CallbackDispatcher(metrics=_process_metrics(), **dispatcher_options)
        return cls(endpoints, dispatcher, hub_name=hub_name)

    async def close(self) -> None:
        await self.dispatcher.close()
        await self.endpoints.stop()

    # ------------------------------------------------------------------ building blocks

    async def _send(
        self, fsp: str, endpoint_type: str, transfer_id: str, method: str, headers, body: bytes, kind: str,
        on_outcome=None,
    ) -> bool:
        # resolve(): a DFSP whose endpoints were registered a moment ago is found after one reload.
        url = await self.endpoints.resolve(
            fsp, endpoint_type, transferId=transfer_id, since=time.monotonic()
        )
        if url is None:
            log.warning("no %s endpoint for %s: %s callback for %s not sent", endpoint_type, fsp, kind, transfer_id)
            if on_outcome is not None:
                on_outcome(Outcome.FAILED)  # the flow ends here, unsuccessfully (docs/METRICS.md)
            return False
        return self.dispatcher.send(fsp, method, url, headers, body, kind=kind, on_outcome=on_outcome)

    async def error(
        self, fsp: str, transfer_id: str, code: int, description: str | None, *, version: str = "1.1", extensions=(),
        on_outcome=None,
    ) -> bool:
        """A hub-originated ``PUT /transfers/{ID}/error``."""
        uri = f"/transfers/{transfer_id}/error"
        headers = hub_headers(
            resource="transfers", version=version, source=self.hub_name, destination=fsp, method="PUT", uri=uri
        )
        # Descriptions from the desk are already rendered ("Generic validation error - ..."): verbatim.
        body = orjson.dumps(FspiopError(code, extensions=extensions, description=description or None).to_body())
        return await self._send(fsp, TRANSFER_ERROR, transfer_id, "PUT", headers, body, "transfer_error", on_outcome)

    async def state(self, fsp: str, record: TransferRecord, *, method: str = "PUT", on_outcome=None) -> bool:
        """The transfer's state from the hub: a GET answer, a duplicate resend, a commit notification."""
        uri = f"/transfers/{record.transfer_id}"
        headers = hub_headers(
            resource="transfers", version=record.version, source=self.hub_name, destination=fsp, method=method, uri=uri
        )
        body = orjson.dumps(state_body(record, patch=method == "PATCH"))
        kind = "transfer_patch" if method == "PATCH" else "transfer_put"
        return await self._send(fsp, TRANSFER_PUT, record.transfer_id, method, headers, body, kind, on_outcome)

    async def forward(
        self,
        fsp: str,
        endpoint_type: str,
        transfer_id: str,
        method: str,
        incoming_headers: dict,
        body: bytes,
        kind: str,
        on_outcome=None,
    ) -> bool:
        """A DFSP's message passed on unchanged (its signature still verifies)."""
        return await self._send(
            fsp, endpoint_type, transfer_id, method, forward_headers(incoming_headers, method=method), body, kind,
            on_outcome,
        )

    # ------------------------------------------------------------------ decisions

    async def expired(self, record: TransferRecord) -> None:
        """The expiry timer aborted a reserved transfer: 3303 to both (RULES.md 6.4)."""
        metrics.count_result(record.payer, record.payee, "expired")
        for fsp in (record.payer, record.payee):
            await self.error(fsp, record.transfer_id, 3303, "Transfer expired", version=record.version)


def state_body(record: TransferRecord, *, patch: bool = False) -> dict:
    """``PUT /transfers/{ID}`` (or ``PATCH``) body for the record's current state."""
    body: dict = {"transferState": record.state.value}
    if record.completed_ms is not None:
        body["completedTimestamp"] = iso_ms(record.completed_ms)
    if record.state.value == "COMMITTED" and record.fulfilment and not patch:
        body["fulfilment"] = record.fulfilment
    if record.state.value == "ABORTED" and record.error_code:
        # Mojaloop's way of saying why (RULES.md 6.2): an extension named "cause".
        cause = f"{record.error_code}: {record.error_description or ''}"[:128]
        body["extensionList"] = {"extension": [{"key": "cause", "value": cause}]}
    return body


class TransfersHandler:
    """What the hub does with each ``/transfers`` request once it is routed, checked and answered."""

    def __init__(
        self,
        *,
        directory,
        batchers: dict,
        notifier: TransferNotifier,
        pool: asyncpg.Pool,
        hub_name: str,
        allow_on_us: bool = False,
        completed_future_tolerance_ms: int = 200,
        completed_max_age_ms: int = 300_000,
        clock_ms=None,
        quote_check=None,
    ):
        self.directory = directory
        self.batchers = batchers
        self.notifier = notifier
        self.pool = pool
        self.hub_name = hub_name
        self.allow_on_us = allow_on_us
        self.completed_future_tolerance_ms = completed_future_tolerance_ms
        self.completed_max_age_ms = completed_max_age_ms
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        # Links a prepare to the quote it pays (api/fspiop/agreement.py QuoteLinkCheck, docs/AGREEMENT.md):
        # an async callable of the body answering None or (error code, description).
        self.quote_check = quote_check
        self._requests = itertools.count()
        self._prefix = uuid.uuid4().hex[:12]

    def _request_id(self) -> str:
        return f"{self._prefix}-{next(self._requests)}"

    # ------------------------------------------------------------------ synchronous checks

    def check_fulfil(self, body: dict, version: str) -> None:
        """What ml-api-adapter refuses at once, with a 400 (RULES.md 6.5)."""
        completed = body.get("completedTimestamp")
        if completed is not None:
            completed_ms = parse_datetime_ms(completed)
            now = self._clock_ms()
            if completed_ms > now + self.completed_future_tolerance_ms:
                raise FspiopError(3100, "completedTimestamp is in the future")
            if completed_ms < now - self.completed_max_age_ms:
                raise FspiopError(3100, "completedTimestamp is too old")

    # ------------------------------------------------------------------ POST /transfers

    async def prepare(
        self, headers: dict, raw_body: bytes, body: dict, version: str, *, received_at: float | None = None
    ) -> None:
        """``received_at`` (perf_counter) starts the prepare flow's clock (moja_tx_transfer_prepare)."""
        timer = metrics.prepare_timer(received_at)
        transfer_id = body["transferId"]
        source = headers.get("fspiop-source", "")
        payer_name, payee_name = body["payerFsp"], body["payeeFsp"]
        currency = body["amount"]["currency"]
        expires_at_ms = parse_datetime_ms(body["expiration"])
        amount = amount_minor(body["amount"]["amount"])
        arrived = time.monotonic()
        problem, payer, payee = await self._check_prepare(source, body, expires_at_ms, amount)
        if problem is not None:
            # The cache may predate an onboarding step made before this request: look again first.
            await self.directory.refresh(since=arrived)
            problem, payer, payee = await self._check_prepare(source, body, expires_at_ms, amount)
        if problem is not None:
            # Central-ledger answers every prepare validation failure with 3100 and the reasons.
            metrics.count_prepare(payer.name if payer is not None else None, "invalid")
            await self.notifier.error(
                source, transfer_id, 3100, f"Generic validation error - {problem}", version=version, on_outcome=timer
            )
            return
        if self.quote_check is not None:
            refusal = await self.quote_check(body)
            # A transfer already prepared goes on to the shard, whose duplicate check answers it (its quote
            # may have expired since).
            if refusal is not None and not await self.pool.fetchval(
                "SELECT true FROM transfer WHERE transfer_id = $1", transfer_id
            ):
                metrics.count_prepare(payer_name, "invalid")
                await self.notifier.error(source, transfer_id, refusal[0], refusal[1], version=version,
                                          on_outcome=timer)
                return
        command = pb.Command(
            prepare_transfer=pb.PrepareTransfer(
                transfer_id=transfer_id,
                payer=payer_name,
                payee=payee_name,
                currency=currency,
                amount_minor=str(amount),
                condition=body["condition"],
                expires_at_ms=expires_at_ms,
                prepare_hash=request_hash(body),
                payer_account_id=payer.account(currency).account_id,
                payee_account_id=payee.account(currency).account_id,
                version=version,
                request_id=self._request_id(),
            )
        )
        result = await self._submit(payer.shard_id, command, transfer_id, sender=source, payer=payer_name,
                                    on_outcome=timer)
        if result is None:
            return
        verdict = result.outcome
        metrics.count_prepare(payer_name, _PREPARE_OUTCOMES.get(verdict, "duplicate"))
        if verdict == "RESERVED":
            await self.notifier.forward(
                payee_name, TRANSFER_POST, transfer_id, "POST", headers, raw_body, "transfer_post", on_outcome=timer
            )
        elif verdict == "REFUSED":
            await self.notifier.error(
                payer_name, transfer_id, result.error_code, result.error_description, version=version,
                on_outcome=timer,
            )
        elif verdict == "RESEND":
            await self.notifier.state(source, _record_of(result.transfer))
        elif verdict == "MODIFIED":
            await self.notifier.error(source, transfer_id, 3106, result.error_description, version=version)
        # IGNORE: the first request is still in progress; its callbacks will come.

    async def _check_prepare(self, source: str, body: dict, expires_at_ms: int, amount: int):
        """RULES.md 6.5, in central-ledger's order: the first problem, and the two participants."""
        payer_name, payee_name = body["payerFsp"], body["payeeFsp"]
        currency = body["amount"]["currency"]
        payer = await self.directory.resolve(payer_name)
        payee = await self.directory.resolve(payee_name)
        problem = None
        if source != payer_name:
            problem = "FSPIOP-Source does not match payerFsp"
        elif payer is None or payer.is_hub:
            problem = f"payer FSP {payer_name} not found"
        elif payee is None or payee.is_hub:
            problem = f"payee FSP {payee_name} not found"
        elif not payee.is_active:
            problem = f"payee FSP {payee_name} is not active"
        elif payer_name == payee_name and not self.allow_on_us:
            problem = "payer FSP and payee FSP are the same"
        elif payer.account(currency) is None:
            problem = f"payer FSP has no {currency} account"
        elif payee.account(currency) is None or not payee.account(currency).is_active:
            problem = f"payee FSP has no active {currency} account"
        elif expires_at_ms <= self._clock_ms():
            problem = "expiration date is in the past"
        elif amount <= 0:
            problem = "amount must be positive"
        return problem, payer, payee

    # ------------------------------------------------------------------ PUT /transfers/{ID}

    async def fulfil(
        self, headers: dict, raw_body: bytes, body: dict, transfer_id: str, version: str, *,
        received_at: float | None = None,
    ) -> None:
        """``received_at`` (perf_counter) starts the fulfil flow's clock (moja_tx_transfer_fulfil)."""
        source = headers.get("fspiop-source", "")
        destination = headers.get("fspiop-destination", "")
        state = body.get("transferState")
        if state not in ("COMMITTED", "RESERVED"):
            # ABORTED is not a valid fulfil (RULES.md 6.3, 17.1): a payee rejects with PUT .../error.
            await self.notifier.error(
                source,
                transfer_id,
                3100,
                "Generic validation error - transferState must be COMMITTED or RESERVED;"
                " reject with PUT /transfers/{ID}/error",
                version=version,
            )
            return
        if state == "RESERVED" and version.startswith("1.0"):
            await self.notifier.error(
                source,
                transfer_id,
                3100,
                "Generic validation error - RESERVED needs transfers version 1.1",
                version=version,
            )
            return
        command = pb.Command(
            fulfil_transfer=pb.FulfilTransfer(
                transfer_id=transfer_id,
                fulfilment=body.get("fulfilment", ""),
                fulfil_hash=request_hash(body),
                completed_ms=parse_datetime_ms(body["completedTimestamp"]) if body.get("completedTimestamp") else 0,
                reserved_mode=state == "RESERVED",
                source=source,
                destination=destination,
                request_id=self._request_id(),
            )
        )
        result = await self._submit_for_transfer(destination, command, transfer_id)
        if result is None:
            return
        verdict = result.outcome
        record = _record_of(result.transfer) if result.HasField("transfer") else None
        if verdict == "COMMITTED":
            metrics.count_result(record.payer, record.payee, "committed")
            # The flow ends with the callback that tells the payer (the PATCH to the payee is not timed).
            timer = metrics.fulfil_timer(received_at, record.created_ms)
            if record.reserved_mode:
                await self.notifier.state(record.payer, record, on_outcome=timer)
                await self.notifier.state(record.payee, record, method="PATCH")
            else:
                await self.notifier.forward(
                    record.payer, TRANSFER_PUT, transfer_id, "PUT", headers, raw_body, "transfer_put", on_outcome=timer
                )
        elif verdict == "ABORTED":
            metrics.count_result(record.payer, record.payee, "expired" if result.error_code == 3303 else "aborted")
            await self._aborted_by_fulfil(record, result, on_outcome=metrics.fulfil_timer(received_at,
                                                                                         record.created_ms))
        elif verdict == "RESEND" and record.state is TransferState.ABORTED and not record.fulfilment \
                and record.error_code:
            # Aborted before this fulfil (e.g. the expiry timer): the payee hears why (RULES.md 6.4).
            await self.notifier.error(source, transfer_id, record.error_code, record.error_description,
                                      version=version)
        elif verdict == "RESEND":
            await self.notifier.state(source, record)
        elif verdict in ("MODIFIED", "UNKNOWN", "WRONG_SENDER"):
            await self.notifier.error(source, transfer_id, result.error_code, result.error_description, version=version)

    async def _aborted_by_fulfil(self, record: TransferRecord, result, on_outcome=None) -> None:
        code, description = result.error_code, result.error_description
        await self.notifier.error(record.payer, record.transfer_id, code, description, version=record.version,
                                  on_outcome=on_outcome)
        if code != 3303 and record.reserved_mode:
            await self.notifier.state(record.payee, record, method="PATCH")
        else:
            await self.notifier.error(record.payee, record.transfer_id, code, description, version=record.version)

    # ------------------------------------------------------------------ PUT /transfers/{ID}/error

    async def reject(
        self, headers: dict, raw_body: bytes, body: dict, transfer_id: str, version: str, *,
        received_at: float | None = None,
    ) -> None:
        """The payee's refusal; like a fulfil, its flow runs until the payer has been told."""
        source = headers.get("fspiop-source", "")
        destination = headers.get("fspiop-destination", "")
        info = body["errorInformation"]
        code = normalise_error_code(info["errorCode"])
        if code is None:
            await self.notifier.error(
                source,
                transfer_id,
                3100,
                "Generic validation error - API specification undefined errorCode",
                version=version,
            )
            return
        command = pb.Command(
            reject_transfer=pb.RejectTransfer(
                transfer_id=transfer_id,
                source=source,
                error_code=code,
                description=info["errorDescription"][:128],
            )
        )
        result = await self._submit_for_transfer(destination, command, transfer_id)
        if result is None:
            return
        verdict = result.outcome
        if verdict == "ABORTED":
            record = _record_of(result.transfer)
            metrics.count_result(record.payer, record.payee, "aborted")
            await self.notifier.forward(
                record.payer, TRANSFER_ERROR, transfer_id, "PUT", headers, raw_body, "transfer_error",
                on_outcome=metrics.fulfil_timer(received_at, record.created_ms),
            )
        elif verdict in ("UNKNOWN", "WRONG_SENDER"):
            await self.notifier.error(source, transfer_id, result.error_code, result.error_description, version=version)

    # ------------------------------------------------------------------ GET /transfers/{ID}

    async def get(self, headers: dict, transfer_id: str, version: str) -> None:
        source = headers.get("fspiop-source", "")
        payer = await self._payer_of(transfer_id, hint=source)
        result = None
        if payer is not None:
            result = await self._submit(
                payer.shard_id, pb.Command(get_transfer=pb.GetTransfer(transfer_id=transfer_id)), transfer_id
            )
            if result is None:
                return
        if result is None or result.outcome == "UNKNOWN":
            await self.notifier.error(source, transfer_id, 3208, "Transfer ID not found", version=version)
            return
        record = _record_of(result.transfer)
        if source not in (record.payer, record.payee):
            await self.notifier.error(
                source, transfer_id, 3000, "Generic client error - only the payer or the payee may ask", version=version
            )
            return
        await self.notifier.state(source, record)

    # ------------------------------------------------------------------ routing to shards

    async def _submit(self, shard_id: int, command: pb.Command, transfer_id: str, *, sender: str = "",
                      payer: str | None = None, on_outcome=None):
        """``payer`` and ``on_outcome`` (prepares only): count and time a prepare the shard did not decide."""
        try:
            return await self.batchers[shard_id].submit(command)
        except Overloaded:
            # Nothing was applied (the shard refuses before its apply loop): say so, 2005.
            log.warning("transfer %s: shard %s overloaded", transfer_id, shard_id)
            if payer is not None:
                metrics.count_prepare(payer, "busy")
            if sender:
                await self.notifier.error(sender, transfer_id, 2005, "Server busy - retry later", on_outcome=on_outcome)
        except ShardUnavailable as error:
            # Unknown outcome: no callback claims anything; the DFSP learns the state with a GET.
            log.error("transfer %s: %s", transfer_id, error)
            if payer is not None:
                metrics.count_prepare(payer, "unavailable")
        return None

    async def _payer_of(self, transfer_id: str, *, hint: str):
        """The payer of a transfer: the hinted participant if it is, else Postgres says who."""
        payer_name = await self.pool.fetchval("SELECT payer FROM transfer WHERE transfer_id = $1", transfer_id)
        name = payer_name or hint
        return await self.directory.resolve(name) if name else None

    async def _submit_for_transfer(self, destination: str, command: pb.Command, transfer_id: str):
        """Fulfils and errors go to the payer's shard: FSPIOP-Destination names the payer, normally."""
        participant = await self.directory.resolve(destination) if destination else None
        result = None
        if participant is not None and not participant.is_hub:
            result = await self._submit(participant.shard_id, command, transfer_id)
            if result is None or result.outcome != "UNKNOWN":
                return result
        # Unknown there: a wrong destination, or the desk forgot it. Ask Postgres for the payer.
        payer = await self._payer_of(transfer_id, hint="")
        if payer is not None and (participant is None or payer.shard_id != participant.shard_id):
            return await self._submit(payer.shard_id, command, transfer_id)
        return result or _unknown()


# What the payer's shard decided about a prepare, as the outcome label of rayloop_transfer_prepares_total;
# any other verdict (RESEND, MODIFIED, IGNORE) is a duplicate of a prepare already counted.
_PREPARE_OUTCOMES = {"RESERVED": "reserved", "REFUSED": "refused"}


def _unknown():
    return pb.CommandResult(outcome="UNKNOWN", error_code=3208, error_description="Transfer ID not found")


def _record_of(view: pb.TransferView) -> TransferRecord:
    return TransferRecord(
        transfer_id=view.transfer_id,
        payer=view.payer,
        payee=view.payee,
        currency=view.currency,
        amount_minor=int(view.amount_minor or 0),
        condition="",
        expires_at_ms=0,
        prepare_hash="",
        payer_account_id=0,
        payee_account_id=0,
        created_ms=view.created_ms,  # when the payer's shard recorded the prepare (0: unknown)
        state=TransferState(view.state),
        fulfilment=view.fulfilment or None,
        completed_ms=view.completed_ms or None,
        reserved_mode=view.reserved_mode,
        error_code=view.error_code or None,
        error_description=view.error_description or None,
        version=view.version or "1.1",
    )
