"""A simulated payee FSP's answer to ``POST /quotes`` (RULES.md 7 and 8), as a pure function.

``answer_quote`` takes the quote request, the DFSP's fee settings and secret, and returns either the
``PUT /quotes/{ID}`` body (transferAmount, payeeReceiveAmount, payeeFspFee, payeeFspCommission,
expiration, ilpPacket, condition) or the ``errorInformation`` of a ``PUT /quotes/{ID}/error``. The
ILP packet carries the Transaction object with the transfer amount, built by ``sim/ilp.py`` as
Mojaloop's SDK does, and the condition is SHA-256 of HMAC(secret, packet): the payee regenerates the
same fulfilment from the packet when the transfer arrives (``sim/simulator.py``), storing nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sim.fees import QuoteRefused, format_amount, quote_amounts
from sim.ilp import build_ilp_packet, decode_ilp_packet, ilp_amount, make_condition
from sim.parties import PartyRegistry

__all__ = ["QuoteAnswer", "QuoteSettings", "answer_quote", "check_quote_answer"]


@dataclass(frozen=True, slots=True)
class QuoteSettings:
    """What a payee FSP charges and how it answers (from its ``Behaviour``)."""

    fee: Decimal = Decimal(0)  # payeeFspFee
    commission: Decimal = Decimal(0)  # payeeFspCommission
    reject: bool = False  # answer every quote with an error
    error_code: str = "5101"  # the error code of a rejection (5101 Payee rejected quote)


@dataclass(frozen=True, slots=True)
class QuoteAnswer:
    ok: bool
    body: dict[str, Any]  # the PUT /quotes/{ID} body, or {"errorInformation": ...}
    transaction: dict[str, Any] | None = None  # the Transaction object inside the ILP packet


def _error(code: str, description: str) -> QuoteAnswer:
    return QuoteAnswer(False, {"errorInformation": {"errorCode": code, "errorDescription": description}})


def _money(value: Decimal, currency: str) -> dict[str, str]:
    return {"amount": format_amount(value), "currency": currency}


def answer_quote(
    fsp_id: str,
    secret: bytes,
    settings: QuoteSettings,
    request: dict[str, Any],
    *,
    expiration: str,
    parties: PartyRegistry | None = None,
) -> QuoteAnswer:
    """The payee FSP ``fsp_id``'s answer to a quote request (``expiration``: the quote's validity).

    Refusals: ``settings.reject`` (its error code); a payee this FSP does not hold when it holds any
    parties (3204); a currency mismatch between ``amount`` and ``fees`` (3100); fees that leave
    nothing to transfer, or an amount finer than the currency's minor unit (5101-ish: the
    configured error code).
    """
    if settings.reject:
        return _error(settings.error_code, "Payee rejected quote (simulated)")
    payee = request.get("payee") or {}
    payee_info = payee.get("partyIdInfo") or {}
    holder = parties.find(payee_info) if parties is not None else None
    if parties is not None and len(parties) and holder is None:
        return _error("3204", "Party not found")
    money = request["amount"]
    currency = money["currency"]
    fees = request.get("fees")
    if fees is not None and fees.get("currency") != currency:
        return _error("3100", "Generic validation error - fees currency differs from amount currency")
    try:
        amounts = quote_amounts(
            request["amountType"], money["amount"], payee_fsp_fee=settings.fee,
            payee_fsp_commission=settings.commission, payer_fee=fees["amount"] if fees is not None else None,
        )
        ilp_amount(amounts.transfer_amount, currency)  # refuse what the ILP packet cannot carry
    except (QuoteRefused, ValueError) as refusal:
        return _error(settings.error_code, f"Payee rejected quote - {refusal}")
    # The Transaction object as the SDK builds it: the payee as this FSP knows it, the transfer amount.
    payee_party = holder.to_fspiop(fsp_id) if holder is not None else {
        **payee, "partyIdInfo": {**payee_info, "fspId": payee_info.get("fspId") or fsp_id}}
    transaction: dict[str, Any] = {
        "transactionId": request["transactionId"],
        "quoteId": request["quoteId"],
        "payee": payee_party,
        "payer": request["payer"],
        "amount": _money(amounts.transfer_amount, currency),
        "transactionType": request["transactionType"],
    }
    if request.get("note") is not None:
        transaction["note"] = request["note"]
    ilp_packet = build_ilp_packet(transaction)
    _, condition = make_condition(secret, ilp_packet)
    body = {
        "transferAmount": _money(amounts.transfer_amount, currency),
        "payeeReceiveAmount": _money(amounts.payee_receive_amount, currency),
        "payeeFspFee": _money(amounts.payee_fsp_fee, currency),
        "payeeFspCommission": _money(amounts.payee_fsp_commission, currency),
        "expiration": expiration,
        "ilpPacket": ilp_packet,
        "condition": condition,
    }
    return QuoteAnswer(True, body, transaction)


def check_quote_answer(answer: dict[str, Any], now: datetime | None = None) -> str | None:
    """The payer FSP's check of a ``PUT /quotes/{ID}`` before it transfers: None when usable, else why not.

    The ILP packet must decode and carry the transfer amount (RULES.md 7, payee-side checks, applied
    here from the payer's side too: it is about to pay that amount), and the quote must not have
    expired (RULES.md 8: a transfer on an expired quote is refused anyway). ``now``: UTC, default
    the current time.
    """
    try:
        money = answer["transferAmount"]
        packet = decode_ilp_packet(answer["ilpPacket"])
        expected = ilp_amount(money["amount"], money["currency"])
        expiration = datetime.fromisoformat(answer["expiration"])
    except (KeyError, TypeError, ValueError) as problem:
        return f"unusable quote: {problem}"
    if packet.amount != expected:
        return f"ILP packet amount {packet.amount} is not transferAmount {money['amount']} {money['currency']}"
    if expiration.tzinfo is None:
        expiration = expiration.replace(tzinfo=UTC)
    if expiration <= (now or datetime.now(UTC)):
        return f"the quote expired at {answer['expiration']}"
    return None
