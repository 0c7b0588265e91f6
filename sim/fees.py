"""The payee FSP's quote arithmetic (RULES.md 8, API Definition Listings 7-11), exact in Decimal.

Pure functions: the simulator's quote handler (``sim/quotes.py``) calls them with the quote request's
amount and the DFSP's configured fee and commission. No float anywhere: an amount is an FSPIOP amount
string or a Decimal, and every result is exact.

Fee modes: **non-disclosing** (the payer FSP keeps its fee to itself; the quote request has no
``fees``) and **disclosing** (the request's ``fees`` is the payer FSP's fee, which the payee FSP's
commission may subsidise). ``amountType`` SEND means the amount the payer sends, RECEIVE the amount
the payee should receive.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

__all__ = ["AMOUNT_TYPES", "QuoteAmounts", "QuoteRefused", "format_amount", "quote_amounts", "to_amount"]

AMOUNT_TYPES = ("SEND", "RECEIVE")


class QuoteRefused(ValueError):
    """The configured fees leave nothing to transfer (or a negative amount to receive)."""


@dataclass(frozen=True, slots=True)
class QuoteAmounts:
    transfer_amount: Decimal  # what the hub moves from payer FSP to payee FSP
    payee_receive_amount: Decimal  # what the payee's account gets
    payee_fsp_fee: Decimal
    payee_fsp_commission: Decimal


def to_amount(value: str | int | Decimal, what: str = "amount") -> Decimal:
    """A non-negative finite Decimal; ValueError otherwise (floats are refused: money is exact)."""
    if isinstance(value, bool) or isinstance(value, float):
        raise TypeError(f"{what} must be str, int or Decimal, not {type(value).__name__}")
    try:
        result = value if isinstance(value, Decimal) else Decimal(value)
    except (InvalidOperation, TypeError):
        raise ValueError(f"{what} is not a number: {value!r}") from None
    if not result.is_finite() or result < 0:
        raise ValueError(f"{what} must be a non-negative number: {value!r}")
    return result


def quote_amounts(
    amount_type: str,
    amount: str | Decimal,
    *,
    payee_fsp_fee: str | Decimal = Decimal(0),
    payee_fsp_commission: str | Decimal = Decimal(0),
    payer_fee: str | Decimal | None = None,
) -> QuoteAmounts:
    """transferAmount and payeeReceiveAmount for a quote (RULES.md 8).

    ``payer_fee`` is the request's ``fees`` amount: None means non-disclosing. The equations:

    - RECEIVE (either mode): ``transfer = amount + payeeFspFee - payeeFspCommission``
    - non-disclosing SEND: ``transfer = amount - payeeFspCommission``
    - disclosing SEND: ``transfer = amount`` when ``payerFee <= payeeFspCommission``, else
      ``amount - (payerFee - payeeFspCommission)``
    - always ``payeeReceiveAmount = transfer - payeeFspFee + payeeFspCommission``

    QuoteRefused when the transfer amount would not be positive or the payee would receive less
    than nothing; the payee FSP then rejects the quote.
    """
    if amount_type not in AMOUNT_TYPES:
        raise ValueError(f"amountType must be SEND or RECEIVE: {amount_type!r}")
    quote_amount = to_amount(amount)
    fee = to_amount(payee_fsp_fee, "payeeFspFee")
    commission = to_amount(payee_fsp_commission, "payeeFspCommission")
    if amount_type == "RECEIVE":
        transfer = quote_amount + fee - commission
    elif payer_fee is None:
        transfer = quote_amount - commission
    else:
        disclosed = to_amount(payer_fee, "fees")
        transfer = quote_amount if disclosed <= commission else quote_amount - (disclosed - commission)
    receive = transfer - fee + commission
    if transfer <= 0:
        raise QuoteRefused(f"fees leave no amount to transfer ({transfer})")
    if receive < 0:
        raise QuoteRefused(f"the payee would receive {receive}")
    return QuoteAmounts(transfer, receive, fee, commission)


def format_amount(value: Decimal) -> str:
    """An FSPIOP amount string for an exact Decimal: no exponent, no trailing zeros (``"100"``, ``"1.5"``)."""
    return format(value.normalize(), "f") if value else "0"
