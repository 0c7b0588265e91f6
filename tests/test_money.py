"""Exact money: FSPIOP amount strings <-> ledger minor units <-> Decimal (core/money.py).

No floats here except to prove they are refused.
"""

from __future__ import annotations

from decimal import Decimal, localcontext

import pytest

from core.money import (
    MAX_AMOUNT_MINOR,
    MINOR_PER_MAJOR,
    AmountError,
    format_amount,
    from_decimal,
    parse_amount,
    to_decimal,
)

MAX_TEXT = "9" * 18 + ".9999"

# ------------------------------------------------------------------ parse_amount, strict (FSPIOP)

VALID_STRICT = [
    ("0", 0),
    ("1", 10_000),
    ("12.5", 125_000),
    ("0.0001", 1),
    ("0.001", 10),
    ("0.01", 100),
    ("0.1", 1_000),
    ("100.0101", 1_000_101),
    ("1" + "0" * 17, 10**17 * MINOR_PER_MAJOR),  # 18 integer digits
    ("9" * 18, (10**18 - 1) * MINOR_PER_MAJOR),
    (MAX_TEXT, MAX_AMOUNT_MINOR),  # 18 integer digits and 4 decimals
]


@pytest.mark.parametrize(("text", "minor"), VALID_STRICT)
def test_parse_strict_valid(text, minor):
    assert parse_amount(text) == minor
    assert parse_amount(text, strict=False) == minor  # lenient accepts every strict amount


INVALID_STRICT = [
    # (why, text)
    ("empty", ""),
    ("trailing zero in the fraction", "100.00"),
    ("trailing zero, one decimal", "1.0"),
    ("trailing zero, four decimals", "1.1230"),
    ("zero with a fraction of zeros", "0.0"),
    ("five decimals", "1.00001"),
    ("five decimals, max digits", "9" * 18 + ".99999"),
    ("19 integer digits", "1" + "0" * 18),
    ("negative", "-1"),
    ("negative zero", "-0"),
    ("plus sign", "+1"),
    ("leading zero", "01"),
    ("leading zeros", "007.5"),
    ("dot without fraction", "1."),
    ("fraction without integer", ".5"),
    ("comma decimal separator", "1,5"),
    ("exponent", "1e3"),
    ("leading space", " 1"),
    ("trailing space", "1 "),
    ("trailing newline", "100\n"),
    ("trailing newline after a fraction", "1.5\n"),
    ("non-ASCII digits", "\u0661\u0662"),  # Arabic-Indic 12
    ("letters", "abc"),
    ("NaN", "NaN"),
    ("Infinity", "Infinity"),
]


@pytest.mark.parametrize(("why", "text"), INVALID_STRICT, ids=[row[0] for row in INVALID_STRICT])
def test_parse_strict_invalid(why, text):
    with pytest.raises(AmountError):
        parse_amount(text)


@pytest.mark.parametrize("value", [1, 0, 12.5, 1.0, Decimal("1"), None, b"1", ["1"]], ids=repr)
def test_parse_refuses_non_strings(value):
    # Floats (12.5, 1.0) in particular: an amount is never a float.
    with pytest.raises(AmountError):
        parse_amount(value)
    with pytest.raises(AmountError):
        parse_amount(value, strict=False)


def test_amount_error_is_a_value_error():
    assert issubclass(AmountError, ValueError)


# ------------------------------------------------------------------ parse_amount, lenient (admin API)

VALID_LENIENT = [
    ("100.00", 1_000_000),
    ("100.0", 1_000_000),
    ("100.0000", 1_000_000),
    ("0.0", 0),
    ("0.0000", 0),
    ("1.2300", 12_300),
    ("12.5", 125_000),
    (MAX_TEXT, MAX_AMOUNT_MINOR),
]


@pytest.mark.parametrize(("text", "minor"), VALID_LENIENT)
def test_parse_lenient_accepts_trailing_zeros(text, minor):
    assert parse_amount(text, strict=False) == minor


INVALID_LENIENT = [
    ("empty", ""),
    ("five decimals", "1.00000"),
    ("five decimals, nonzero", "1.00001"),
    ("19 integer digits", "1" + "0" * 18),
    ("negative", "-1"),
    ("negative with zeros", "-100.00"),
    ("leading zero", "01.5"),
    ("dot without fraction", "100."),
    ("fraction without integer", ".50"),
    ("trailing newline", "100.00\n"),
    ("space", "100 .00"),
]


@pytest.mark.parametrize(("why", "text"), INVALID_LENIENT, ids=[row[0] for row in INVALID_LENIENT])
def test_parse_lenient_invalid(why, text):
    with pytest.raises(AmountError):
        parse_amount(text, strict=False)


# ------------------------------------------------------------------ format_amount

FORMAT = [
    (0, "0"),
    (1, "0.0001"),
    (10, "0.001"),
    (1_000, "0.1"),
    (10_000, "1"),
    (125_000, "12.5"),
    (1_000_101, "100.0101"),
    (MAX_AMOUNT_MINOR, MAX_TEXT),
    (-1, "-0.0001"),  # balances keep their sign
    (-1_650_000_000, "-165000"),
    (-125_000, "-12.5"),
]


@pytest.mark.parametrize(("minor", "text"), FORMAT)
def test_format_amount(minor, text):
    assert format_amount(minor) == text


@pytest.mark.parametrize("text", [text for text, _ in VALID_STRICT])
def test_round_trip_canonical_strings(text):
    assert format_amount(parse_amount(text)) == text


@pytest.mark.parametrize(("text", "canonical"), [("100.00", "100"), ("1.2300", "1.23"), ("0.0", "0")])
def test_format_canonicalises_lenient_input(text, canonical):
    assert format_amount(parse_amount(text, strict=False)) == canonical


@pytest.mark.parametrize("minor", [0, 1, 9, 10, 99, 10_000, 10_001, 123_456_789, MAX_AMOUNT_MINOR])
def test_round_trip_minor_units(minor):
    assert parse_amount(format_amount(minor)) == minor


# ------------------------------------------------------------------ Decimal

TO_DECIMAL = [
    (0, Decimal("0")),
    (1, Decimal("0.0001")),
    (125_000, Decimal("12.5")),
    (-125_000, Decimal("-12.5")),
    (MAX_AMOUNT_MINOR, Decimal(MAX_TEXT)),
    (10**30 + 1, Decimal("100000000000000000000000000.0001")),  # more digits than the default context
]


@pytest.mark.parametrize(("minor", "value"), TO_DECIMAL)
def test_to_decimal_is_exact(minor, value):
    converted = to_decimal(minor)
    assert converted == value
    assert from_decimal(converted) == minor


def test_to_decimal_ignores_a_narrow_thread_context():
    with localcontext() as context:
        context.prec = 5
        assert to_decimal(123_456_789) == Decimal("12345.6789")
        assert from_decimal(Decimal("12345.6789")) == 123_456_789


FROM_DECIMAL = [
    (Decimal("0"), 0),
    (Decimal("0.0001"), 1),
    (Decimal("12.5"), 125_000),
    (Decimal("12.50000000"), 125_000),  # trailing zeros beyond the scale are not extra precision
    (Decimal("-165000"), -1_650_000_000),
    (Decimal("1E+2"), 1_000_000),
    (Decimal(MAX_TEXT), MAX_AMOUNT_MINOR),
    (7, 70_000),  # an int is a whole number of major units
    (-3, -30_000),
]


@pytest.mark.parametrize(("value", "minor"), FROM_DECIMAL, ids=repr)
def test_from_decimal(value, minor):
    assert from_decimal(value) == minor


REFUSED_DECIMALS = [
    Decimal("0.00001"),
    Decimal("1.00001"),
    Decimal("-1.00001"),
    Decimal("1234567890123456789012345.00001"),  # would round away under the default 28-digit context
    Decimal("NaN"),
    Decimal("Infinity"),
    Decimal("-Infinity"),
]


@pytest.mark.parametrize("value", REFUSED_DECIMALS, ids=str)
def test_from_decimal_refuses_five_decimals_and_non_finite(value):
    with pytest.raises(AmountError):
        from_decimal(value)


@pytest.mark.parametrize("value", [0.5, 1.0, 0.1, True, "1.5", None], ids=repr)
def test_from_decimal_refuses_floats_and_other_types(value):
    # 0.5 and 1.0 are exact binary fractions; refused anyway, floats never reach the money path.
    with pytest.raises(AmountError):
        from_decimal(value)
