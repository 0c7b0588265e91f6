"""The agreement phase (quotes, transaction requests) as pure decisions: no I/O, no clock (``now_ms`` is given).

The hub relays these resources between DFSPs (RULES.md 4, 8, 10) but keeps a durable record of each
request it forwarded, so that it can answer duplicates (RULES.md 5) and, for quotes, link a later
transfer to the quote it pays (``check_quote_link``). ``api/fspiop/agreement.py`` is the I/O shell:
it reads the stored record, asks these functions what to do, writes, then sends callbacks.

Request life cycle (``RequestState``)::

    PENDING --answer PUT--> ANSWERED   (transactionRequests: later PUTs replace the answer)
    PENDING --error PUT---> REJECTED
    PENDING --late answer-> EXPIRED    (the answer came after the request's own ``expiration``)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from core.fspiop_errors import ERRORS

__all__ = [
    "AnswerVerdict",
    "QuoteCheckMode",
    "QuoteTerms",
    "RequestState",
    "RequestVerdict",
    "StoredRequest",
    "TransferTerms",
    "check_quote_link",
    "on_answer",
    "on_request",
]


class RequestState(StrEnum):
    PENDING = "PENDING"  # forwarded to the receiver; no answer yet
    ANSWERED = "ANSWERED"  # the receiver's PUT was forwarded to the sender
    REJECTED = "REJECTED"  # the receiver's PUT .../error was forwarded to the sender
    EXPIRED = "EXPIRED"  # the answer came after the request's expiration; both sides were told


@dataclass(frozen=True, slots=True)
class StoredRequest:
    """What the hub remembers of a forwarded ``POST /quotes`` or ``POST /transactionRequests``."""

    request_id: str
    sender: str  # FSPIOP-Source of the POST: where answers go
    receiver: str  # the DFSP the POST was forwarded to: who may answer
    request_hash: str
    expires_at_ms: int | None  # the request's own ``expiration`` (quotes: when the payer stops waiting)
    state: RequestState
    answer_hash: str | None = None


class RequestVerdict(StrEnum):
    NEW = "NEW"  # not seen before: forward it
    IGNORE = "IGNORE"  # the same request while it is still pending: its answer will come
    RESEND = "RESEND"  # the same request, already answered: send the stored answer again
    MODIFIED = "MODIFIED"  # the same id with other content: 3106 to the sender


def on_request(existing: StoredRequest | None, request_hash: str) -> RequestVerdict:
    """RULES.md 5 for a POST whose id may have been seen."""
    if existing is None:
        return RequestVerdict.NEW
    if existing.request_hash != request_hash:
        return RequestVerdict.MODIFIED
    if existing.state is RequestState.PENDING:
        return RequestVerdict.IGNORE
    return RequestVerdict.RESEND


class AnswerVerdict(StrEnum):
    ACCEPT = "ACCEPT"  # record it and forward it to the sender of the request
    UNKNOWN = "UNKNOWN"  # no such request went through the hub: 3205/3206 to whoever answered
    WRONG_SENDER = "WRONG_SENDER"  # only the receiver of the request may answer: 3100
    WRONG_DESTINATION = "WRONG_DESTINATION"  # an answer must go back to the requester: 3100
    DUPLICATE = "DUPLICATE"  # the same answer again: already forwarded, nothing to do
    MODIFIED = "MODIFIED"  # a different answer to a request that takes one answer only: 3106
    EXPIRED = "EXPIRED"  # the answer came after the request's expiration: 3300 to both sides


@dataclass(frozen=True, slots=True)
class AnswerDecision:
    verdict: AnswerVerdict
    code: int = 0
    description: str = ""


def _describe(code: int, detail: str) -> str:
    return f"{ERRORS[code].name} - {detail}"


def on_answer(
    stored: StoredRequest | None,
    *,
    source: str,
    destination: str | None,
    answer_hash: str,
    now_ms: int,
    not_found_code: int,
    single_answer: bool,
    error: bool = False,
) -> AnswerDecision:
    """What to do with a ``PUT /{resource}/{ID}`` (or ``.../error`` when ``error``) from ``source``.

    ``single_answer``: a quote is irrevocable (one answer; another one is 3106), while a transaction
    request's state moves on (RECEIVED, then ACCEPTED or REJECTED), so each new answer replaces the
    last. Order of checks: existence, sender, destination, duplicate, finality, expiry.
    """
    if stored is None:
        return AnswerDecision(AnswerVerdict.UNKNOWN, not_found_code, _describe(not_found_code, "not found"))
    if source != stored.receiver:
        return AnswerDecision(
            AnswerVerdict.WRONG_SENDER, 3100, _describe(3100, f"FSPIOP-Source must be {stored.receiver}")
        )
    if destination is not None and destination != stored.sender:
        return AnswerDecision(
            AnswerVerdict.WRONG_DESTINATION, 3100, _describe(3100, f"FSPIOP-Destination must be {stored.sender}")
        )
    if stored.answer_hash == answer_hash:
        return AnswerDecision(AnswerVerdict.DUPLICATE)
    if stored.state is RequestState.EXPIRED:
        return AnswerDecision(AnswerVerdict.EXPIRED, 3300, _describe(3300, "the request had expired"))
    if stored.state is not RequestState.PENDING and (single_answer or stored.state is RequestState.REJECTED):
        return AnswerDecision(AnswerVerdict.MODIFIED, 3106, _describe(3106, "this request was already answered"))
    if stored.state is RequestState.PENDING and stored.expires_at_ms is not None and now_ms > stored.expires_at_ms:
        return AnswerDecision(AnswerVerdict.EXPIRED, 3300, _describe(3300, "the request had expired"))
    return AnswerDecision(AnswerVerdict.ACCEPT)


# --------------------------------------------------------------------------------------------------
# The link from a transfer to its quote


class QuoteCheckMode(StrEnum):
    OFF = "off"  # transfers are not checked against quotes (Mojaloop's default: quoting is pass-through)
    KNOWN = "known"  # the condition must be a quote's the hub relayed, with the same ILP packet
    VALID = "valid"  # known, not expired, and the same payer, payee, amount and currency


@dataclass(frozen=True, slots=True)
class QuoteTerms:
    """What the payee's ``PUT /quotes/{ID}`` fixed, as stored by the hub."""

    quote_id: str
    payer: str  # the FSP that asked for the quote
    payee: str  # the FSP that answered it
    currency: str
    transfer_amount_minor: int
    expires_at_ms: int
    ilp_packet: str
    condition: str


@dataclass(frozen=True, slots=True)
class TransferTerms:
    payer: str
    payee: str
    currency: str
    amount_minor: int
    ilp_packet: str
    condition: str


def check_quote_link(
    mode: QuoteCheckMode, quote: QuoteTerms | None, transfer: TransferTerms, now_ms: int
) -> tuple[int, str] | None:
    """None when the transfer may go on; else the FSPIOP error code and rendered description.

    ``quote`` is the stored quote whose condition equals the transfer's (the caller looks it up).
    """
    if mode is QuoteCheckMode.OFF:
        return None
    if quote is None:
        return 3205, _describe(3205, "no quote has this transfer's condition")
    if quote.ilp_packet != transfer.ilp_packet:
        return 3100, _describe(3100, f"ilpPacket differs from quote {quote.quote_id}")
    if mode is QuoteCheckMode.KNOWN:
        return None
    if quote.expires_at_ms <= now_ms:
        return 3302, _describe(3302, f"quote {quote.quote_id} expired")
    if (quote.payer, quote.payee) != (transfer.payer, transfer.payee):
        return 3100, _describe(3100, f"payer or payee FSP differs from quote {quote.quote_id}")
    if (quote.currency, quote.transfer_amount_minor) != (transfer.currency, transfer.amount_minor):
        return 3100, _describe(3100, f"amount differs from quote {quote.quote_id} transferAmount")
    return None
