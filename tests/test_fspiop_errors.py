"""FSPIOP error table (generated from the API Definition) and the FspiopError helpers."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from core import fspiop_errors as fe
from core.errors import (
    KNOWN_CATEGORIES,
    FspiopError,
    error_body,
    error_def,
    normalise_error_code,
)
from core.fspiop_errors import ERRORS, RESOURCES, ErrorDef

REPO_ROOT = Path(__file__).resolve().parents[1]
SPEC_DIR = REPO_ROOT.parent / "shared" / "spec"
API_DEFINITION = SPEC_DIR / "docs" / "API-Definition_v1.1.md"
RULES_MD = SPEC_DIR / "RULES.md"


def _load_generator():
    spec = importlib.util.spec_from_file_location(
        "gen_fspiop_errors", REPO_ROOT / "tools" / "gen_fspiop_errors.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


gen = _load_generator()

# RULES.md section 12 table: code -> name (names as in API Definition Tables 110-117).
RULES_12 = {
    1000: "Communication error",
    1001: "Destination communication error",
    2000: "Generic server error",
    2001: "Internal server error",
    2002: "Not implemented",
    2003: "Service currently unavailable",
    2004: "Server timed out",
    2005: "Server busy",
    3000: "Generic client error",
    3001: "Unacceptable version requested",
    3002: "Unknown URI",
    3003: "Add Party information error",
    3100: "Generic validation error",
    3101: "Malformed syntax",
    3102: "Missing mandatory element",
    3103: "Too many elements",
    3104: "Too large payload",
    3105: "Invalid signature",
    3106: "Modified request",
    3107: "Missing mandatory extension parameter",
    3200: "Generic ID not found",
    3201: "Destination FSP Error",
    3202: "Payer FSP ID not found",
    3203: "Payee FSP ID not found",
    3204: "Party not found",
    3205: "Quote ID not found",
    3206: "Transaction request ID not found",
    3207: "Transaction ID not found",
    3208: "Transfer ID not found",
    3209: "Bulk quote ID not found",
    3210: "Bulk transfer ID not found",
    3300: "Generic expired error",
    3301: "Transaction request expired",
    3302: "Quote expired",
    3303: "Transfer expired",
    4000: "Generic Payer error",
    4001: "Payer FSP insufficient liquidity",
    4100: "Generic Payer rejection",
    4101: "Payer rejected transaction request",
    4102: "Payer FSP unsupported transaction type",
    4103: "Payer unsupported currency",
    4200: "Payer limit error",
    4300: "Payer permission error",
    4400: "Generic Payer blocked error",
    5000: "Generic Payee error",
    5001: "Payee FSP insufficient liquidity",
    5100: "Generic Payee rejection",
    5101: "Payee rejected quote",
    5102: "Payee FSP unsupported transaction type",
    5103: "Payee FSP rejected quote",
    5104: "Payee rejected transaction",
    5105: "Payee FSP rejected transaction",
    5106: "Payee unsupported currency",
    5200: "Payee limit error",
    5300: "Payee permission error",
    5400: "Generic Payee blocked error",
}
IMPL_ONLY = {2006, 3040, 5107, 6000}
ALL = frozenset(RESOURCES)


# --- the table ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "name"), sorted(RULES_12.items()))
def test_rules_table_code_present_with_name(code, name):
    assert ERRORS[code].code == code
    assert ERRORS[code].name == name
    assert ERRORS[code].spec is True
    assert ERRORS[code].description


def test_table_is_spec_codes_plus_impl_only():
    assert set(ERRORS) == set(RULES_12) | IMPL_ONLY
    for code in IMPL_ONLY:
        assert ERRORS[code].spec is False
        assert ERRORS[code].resources == frozenset()


@pytest.mark.skipif(not RULES_MD.exists(), reason="shared spec not available")
def test_embedded_copy_matches_rules_md():
    text = RULES_MD.read_text(encoding="utf-8")
    section = text[text.index("## 12. ") : text.index("## 13. ")]
    rows = dict(re.findall(r"^\| (\d{4}) \| ([^|]+?) \|", section, flags=re.MULTILINE))
    assert {int(c): n for c, n in rows.items()} == RULES_12


def test_error_def_is_frozen():
    with pytest.raises(AttributeError):
        ERRORS[3100].code = 1  # type: ignore[misc]
    assert isinstance(ERRORS[3100], ErrorDef)


def test_named_constants():
    assert fe.GENERIC_VALIDATION_ERROR == 3100
    assert fe.MALFORMED_SYNTAX == 3101
    assert fe.MODIFIED_REQUEST == 3106
    assert fe.UNACCEPTABLE_VERSION == 3001
    assert fe.TRANSFER_ID_NOT_FOUND == 3208
    assert fe.TRANSFER_EXPIRED == 3303
    assert fe.PAYER_FSP_INSUFFICIENT_LIQUIDITY == 4001
    assert fe.PAYER_LIMIT_ERROR == 4200
    assert fe.PAYEE_REJECTED_TRANSACTION == 5104
    assert fe.TEMPORARY_PARTY_RESOLUTION_FAILED == 2006
    assert fe.DELETE_PARTY_INFORMATION_ERROR == 3040
    assert fe.PAYEE_IDENTIFIER_NOT_VALID == 5107
    assert fe.GENERIC_SETTLEMENT_ERROR == 6000
    # every code has exactly one named constant, and __all__ lists them
    consts = {n: v for n, v in vars(fe).items() if n.isupper() and isinstance(v, int)}
    assert sorted(consts.values()) == sorted(ERRORS)
    assert set(consts) <= set(fe.__all__)


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (1000, 503),
        (1001, 503),
        (2000, 500),
        (2001, 500),
        (2002, 501),
        (2003, 503),
        (2004, 500),
        (2005, 500),
        (2006, 503),
        (3000, 400),
        (3001, 406),
        (3002, 404),
        (3100, 400),
        (3303, 400),
        (4001, 400),
        (5104, 400),
        (6000, 400),
    ],
)
def test_http_status(code, status):
    assert ERRORS[code].http_status == status


def test_http_status_by_category_for_all():
    overrides = {2002: 501, 2003: 503, 2006: 503, 3001: 406, 3002: 404}
    for code, d in ERRORS.items():
        default = {1: 503, 2: 500}.get(code // 1000, 400)
        assert d.http_status == overrides.get(code, default), code


def test_resource_applicability():
    assert RESOURCES == (
        "participants",
        "parties",
        "transactionRequests",
        "quotes",
        "authorizations",
        "transfers",
        "transactions",
        "bulkQuotes",
        "bulkTransfers",
    )
    for code in (1000, 1001, 2000, 2005, 3000, 3100, 3105, 3200, 3201, 3300, 3303):
        assert ERRORS[code].resources == ALL, code
    # the `||`-style empty cells in the markdown
    assert ERRORS[3106].resources == ALL - {"participants", "parties"}
    assert ERRORS[3202].resources == {"transfers", "bulkTransfers"}
    assert ERRORS[3204].resources == {"participants", "parties", "transactionRequests", "quotes"}
    assert ERRORS[3302].resources == {"authorizations", "transfers", "bulkTransfers"}
    assert ERRORS[4102].resources == {"transactionRequests"}  # row with trailing whitespace
    assert ERRORS[4200].resources == {
        "transactionRequests",
        "quotes",
        "transfers",
        "bulkQuotes",
        "bulkTransfers",
    }
    assert ERRORS[5101].resources == {"quotes", "bulkQuotes"}
    assert ERRORS[5102].resources == {"quotes", "bulkTransfers"}
    assert ERRORS[5106].resources == {"quotes", "transfers", "bulkQuotes", "bulkTransfers"}
    for code, d in ERRORS.items():
        if d.spec and code >= 4000:
            assert not d.resources & {"participants", "parties"}, code


def test_descriptions_have_markup_stripped_and_errata_applied():
    assert "**" not in ERRORS[3101].description
    assert "amount set to 5.ABC" in ERRORS[3101].description
    assert "due to the Payee or Payee FSP" in ERRORS[5000].description
    for d in ERRORS.values():
        assert d.name == d.name.strip() and "  " not in d.description


# --- generator ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not API_DEFINITION.exists(), reason="shared spec not available")
def test_generated_module_is_up_to_date():
    assert gen.generate(API_DEFINITION) == (REPO_ROOT / "core" / "fspiop_errors.py").read_text(
        encoding="utf-8"
    )


def test_generated_module_header():
    head = (REPO_ROOT / "core" / "fspiop_errors.py").read_text(encoding="utf-8").splitlines()[:8]
    assert "GENERATED" in head[0]
    assert any("API-Definition_v1.1.md" in line for line in head)
    assert any("tools/gen_fspiop_errors.py" in line for line in head)


IRREGULAR = """\
## 7. Data
### 7.6 Error Codes
Some prose with a | pipe.

| Other | Table |
| --- | --- |
| 9999 | ignored |

| **Error Code** | **Name** | **Description** |/participants| /parties |  /quotes  |
| --- | :--- | --- | --- | --- | --- |
| **3000** |Generic client error| A _generic_ error with `code` and a \\| pipe. | X |X| x |
| **3100** | Generic validation error | Plain &amp; simple.|||X|<TRAILING-SPACES>
3101 | Malformed syntax | No outer pipes, short row | X
| **3200** | Generic ID not found | Extra empty cells | X | X | X | | |

#### 7.6.1 Sub-section still belongs to 7.6

| Error Code | Name | Description | /quotes |
|---|---|---|---|
| **3300** | Generic expired error | Expired. | X |

## 8. Next section
| **Error Code** | **Name** | **Description** | /quotes |
| --- | --- | --- | --- |
| **3999** | Not in 7.6 | Must be ignored. | X |
""".replace("<TRAILING-SPACES>", "   ")


def test_parser_handles_irregular_markdown():
    rows = {e.code: e for e in gen.parse_error_tables(IRREGULAR)}
    assert sorted(rows) == [3000, 3100, 3101, 3200, 3300]
    assert rows[3000].name == "Generic client error"
    assert rows[3000].description == "A generic error with code and a | pipe."
    assert rows[3000].resources == ("participants", "parties", "quotes")
    assert rows[3100].description == "Plain & simple."
    assert rows[3100].resources == ("quotes",)
    assert rows[3101].resources == ("participants",)
    assert rows[3200].resources == ("participants", "parties", "quotes")
    assert rows[3300].resources == ("quotes",)


@pytest.mark.parametrize(
    "row",
    [
        "| **31x0** | Bad code | d | X |",
        "| **3100** | Bad mark | d | maybe |",
        "| **3100** | Too many | d | X | X |",
        "| **3100** | | empty name | X |",
    ],
)
def test_parser_rejects_uninterpretable_rows(row):
    md = (
        "### 7.6 Error Codes\n| Error Code | Name | Description | /quotes |\n| --- | --- | --- | --- |\n"
        + row
        + "\n"
    )
    with pytest.raises(gen.SpecParseError):
        gen.parse_error_tables(md)


def test_parser_rejects_duplicates_and_missing_section():
    md = (
        "### 7.6 Error Codes\n| Error Code | Name | Description | /quotes |\n| --- | --- | --- | --- |\n"
        "| 3100 | a | b | X |\n| 3100 | a | b | X |\n"
    )
    with pytest.raises(gen.SpecParseError, match="duplicate"):
        gen.parse_error_tables(md)
    with pytest.raises(gen.SpecParseError, match="not found"):
        gen.parse_error_tables("## 7.5 Something else\n")


def test_constant_names():
    assert gen.constant_name(3100, "Generic validation error") == "GENERIC_VALIDATION_ERROR"
    assert gen.constant_name(3001, "Unacceptable version requested") == "UNACCEPTABLE_VERSION"
    assert gen.constant_name(3201, "Destination FSP Error") == "DESTINATION_FSP_ERROR"


# --- FspiopError / error_body ------------------------------------------------------------------------


def test_error_defaults_from_table():
    err = FspiopError(3100)
    assert err.code == 3100
    assert err.http_status == 400
    assert err.description == "Generic validation error"
    assert err.extensions == []
    assert err.to_body() == {
        "errorInformation": {"errorCode": "3100", "errorDescription": "Generic validation error"}
    }
    assert FspiopError(3001).http_status == 406
    assert isinstance(err, Exception)


def test_error_with_detail_and_extensions():
    err = FspiopError(4001, "payer position exceeds liquidity cover", [("cause", "position"), ("k2", 5)])
    assert err.to_body() == {
        "errorInformation": {
            "errorCode": "4001",
            "errorDescription": "Payer FSP insufficient liquidity - payer position exceeds liquidity cover",
            "extensionList": {
                "extension": [{"key": "cause", "value": "position"}, {"key": "k2", "value": "5"}]
            },
        }
    }


def test_error_body_shortcut():
    assert error_body(3303) == {
        "errorInformation": {"errorCode": "3303", "errorDescription": "Transfer expired"}
    }
    body = error_body(3100, "amount: too many decimals", [("a", "b")])
    assert (
        body["errorInformation"]["errorDescription"] == "Generic validation error - amount: too many decimals"
    )
    assert body["errorInformation"]["extensionList"] == {"extension": [{"key": "a", "value": "b"}]}
    # empty extensions -> no extensionList at all
    assert "extensionList" not in error_body(3100, "x", [])["errorInformation"]


def test_extensions_accept_extension_list_and_dicts():
    ext_list = {"extension": [{"key": "cause", "value": "x"}]}
    assert FspiopError(5104, extensions=ext_list).extensions == [("cause", "x")]
    assert FspiopError(5104, extensions=[{"key": "a", "value": "b"}]).extensions == [("a", "b")]
    assert FspiopError(5104, extensions={"a": "b"}).extensions == [("a", "b")]


def test_description_truncated_to_128():
    err = FspiopError(3100, "x" * 300)
    desc = err.to_body()["errorInformation"]["errorDescription"]
    assert len(desc) == 128
    assert desc.startswith("Generic validation error - xxx")
    assert len(err.description) > 128  # full text kept for logs
    verbatim = FspiopError(5104, description="é" * 129).to_body()["errorInformation"]["errorDescription"]
    assert verbatim == "é" * 128


def test_extension_limits():
    many = [(f"k{i}", "v") for i in range(20)]
    ext = FspiopError(3100, extensions=many).to_body()["errorInformation"]["extensionList"]["extension"]
    assert len(ext) == 16
    long = FspiopError(3100, extensions=[("k" * 40, "v" * 200)]).to_body()
    (item,) = long["errorInformation"]["extensionList"]["extension"]
    assert len(item["key"]) == 32 and len(item["value"]) == 128


def test_verbatim_description_and_status_override():
    err = FspiopError(5104, description="Payee rejected transaction - insufficient funds at payee")
    assert err.to_body()["errorInformation"]["errorDescription"] == (
        "Payee rejected transaction - insufficient funds at payee"
    )
    assert FspiopError(3000, "Method Not Allowed", http_status=405).http_status == 405
    assert FspiopError(3100, description="  ").description == "Generic validation error"


def test_scheme_specific_code_uses_category_generic():
    err = FspiopError(5140)
    assert err.http_status == 400
    assert err.description == "Generic Payee rejection"
    assert err.to_body()["errorInformation"]["errorCode"] == "5140"
    assert error_def(1040).http_status == 503
    assert error_def(2099).http_status == 500


@pytest.mark.parametrize("code", [9999, 3139, 3401, 1100, 7000, 999])
def test_unknown_code_rejected(code):
    with pytest.raises(ValueError):
        FspiopError(code)


# --- normalise_error_code ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5104", 5104),  # known
        ("1000", 1000),
        ("3100", 3100),
        ("5107", 5107),  # Mojaloop implementation-only code
        ("3040", 3040),
        ("6000", 6000),
        ("5140", 5140),  # scheme-specific xx40-xx99 of a known category
        ("5199", 5199),
        ("1040", 1040),
        ("4499", 4499),
        ("6041", 6041),  # settlement category 60 (IMPL)
        ("9999", None),  # unknown category
        ("3400", None),  # 34xx is not a category
        ("5139", None),  # API-reserved range, undefined
        ("3001 ", None),
        (" 3001", None),
        ("0100", None),
        ("31000", None),
        ("310", None),
        ("abc", None),
        ("", None),
        ("٥١٠٤", None),  # non-ASCII digits
        ("+510", None),
    ],
)
def test_normalise_error_code(text, expected):
    assert normalise_error_code(text) == expected


def test_normalise_error_code_non_string():
    assert normalise_error_code(5104) is None  # type: ignore[arg-type]
    assert normalise_error_code(None) is None  # type: ignore[arg-type]


def test_known_categories():
    assert KNOWN_CATEGORIES == {10, 20, 30, 31, 32, 33, 40, 41, 42, 43, 44, 50, 51, 52, 53, 54, 60}
