"""Exact money for the ledger.

Every amount in rayloop's core is an ``int`` of *ledger minor units*: one ten-thousandth of the
currency's major unit, because FSPIOP amounts carry at most 4 decimals whatever the currency
(RULES.md section 3). ``"12.5"`` is ``125000``. Floats never appear on the money path.
"""

from __future__ import annotations

import re
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal

SCALE = 4
MINOR_PER_MAJOR = 10**SCALE
# FSPIOP Amount: at most 18 integer digits, at most 4 decimals, no trailing zeros, no sign.
AMOUNT_PATTERN = re.compile(r"^([0]|([1-9][0-9]{0,17}))([.][0-9]{0,3}[1-9])?$")
# Tolerant form accepted from operators on the admin API (trailing zeros allowed, as central-ledger does).
_ADMIN_AMOUNT_PATTERN = re.compile(r"^(0|[1-9][0-9]{0,17})(\.[0-9]{1,4})?$")
MAX_AMOUNT_MINOR = (10**18) * MINOR_PER_MAJOR - 1
# Moving the decimal point must never round, whatever the thread's decimal context says.
_EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)


class AmountError(ValueError):
    """An amount that is not a valid FSPIOP amount."""


def parse_amount(text: str, *, strict: bool = True) -> int:
    """Parse an FSPIOP amount string into ledger minor units, exactly.

    ``strict`` follows the FSPIOP pattern (no trailing zeros); the admin API is lenient about
    trailing zeros, like central-ledger, but never about scale or sign.
    """
    if not isinstance(text, str):
        raise AmountError("amount must be a string")
    pattern = AMOUNT_PATTERN if strict else _ADMIN_AMOUNT_PATTERN
    if pattern.fullmatch(text) is None:  # match() would let "$" accept a trailing newline
        raise AmountError(f"invalid amount {text!r}")
    whole, _, fraction = text.partition(".")
    return int(whole) * MINOR_PER_MAJOR + int(fraction.ljust(SCALE, "0") or "0")


def format_amount(amount_minor: int) -> str:
    """Format ledger minor units as an FSPIOP amount (no trailing zeros, sign kept for balances)."""
    sign = "-" if amount_minor < 0 else ""
    whole, fraction = divmod(abs(amount_minor), MINOR_PER_MAJOR)
    if fraction == 0:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{fraction:0{SCALE}d}".rstrip("0")


def to_decimal(amount_minor: int) -> Decimal:
    """Ledger minor units to a Decimal of major units (for NUMERIC columns and reports)."""
    return Decimal(amount_minor).scaleb(-SCALE, context=_EXACT)


def from_decimal(value: Decimal | int) -> int:
    """A Decimal of major units back to ledger minor units; refuses anything finer than the scale."""
    if isinstance(value, bool) or not isinstance(value, Decimal | int):
        raise AmountError(f"amount must be a Decimal or an int, not {type(value).__name__}")
    if not Decimal(value).is_finite():
        raise AmountError(f"{value} is not a finite amount")
    scaled = Decimal(value).scaleb(SCALE, context=_EXACT)
    if scaled != scaled.to_integral_value():
        raise AmountError(f"{value} has more than {SCALE} decimals")
    return int(scaled)
