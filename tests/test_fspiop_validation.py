"""Request checking for the FSPIOP API: routes, headers and version negotiation, body schemas.

Every expected error asserts the exact FSPIOP code, HTTP status and the element its description names.
"""

from __future__ import annotations

import copy
import hashlib
import time
from datetime import UTC, datetime

import orjson
import pytest

from api.fspiop import routes, schema
from api.fspiop.headers import (
    DEFAULT_VERSIONS,
    HeaderChecker,
    Negotiated,
    check_headers,
    media_type,
    parse_date,
)
from api.fspiop.routes import MethodNotAllowed, Route, match, resolve
from api.fspiop.schema import SpecError, ecma_regex, validate, validate_object
from core.errors import FspiopError

# --------------------------------------------------------------------------------------------------
# The shipped spec


def test_spec_is_shipped_verbatim():
    data = routes.SPEC_FILE.read_bytes()
    assert len(data) == 137188
    assert hashlib.sha256(data).hexdigest()[:16] == "0cb1f3f46f4e3be7"  # MANIFEST.md / NOTICE.md
    assert routes.load_spec()["openapi"] == "3.0.2"


# --------------------------------------------------------------------------------------------------
# Routes

_SAMPLE_PARAMS = {"Type": "MSISDN", "ID": "b51ec534-ee48-4575-b6a9-ead2955b8069", "SubId": "wallet"}


def _concrete(template: str) -> str:
    path = template
    for name, value in _SAMPLE_PARAMS.items():
        path = path.replace("{" + name + "}", value)
    return path


def test_every_spec_operation_matches_itself():
    spec_ops = [
        (method.upper(), template, op["operationId"])
        for template, item in routes.load_spec()["paths"].items()
        for method, op in item.items()
        if method in ("get", "put", "post", "delete", "patch")
    ]
    assert len(spec_ops) == 46  # RULES.md 1: the v1.1 file has 46 operations (on 30 paths)
    assert len({t for _, t, _ in spec_ops}) == 30
    assert sorted(spec_ops) == routes.operations()
    for method, template, operation_id in spec_ops:
        route = match(method, _concrete(template))
        assert isinstance(route, Route), (method, template)
        assert (route.method, route.template, route.operation_id) == (method, template, operation_id)
        assert route.resource == template.split("/")[1]
        assert route.params == {k: v for k, v in _SAMPLE_PARAMS.items() if "{" + k + "}" in template}


@pytest.mark.parametrize(
    ("method", "path", "template", "params"),
    [
        ("POST", "/participants", "/participants", {}),
        ("PUT", "/participants/req-1", "/participants/{ID}", {"ID": "req-1"}),  # bulk result, by segment count
        ("PUT", "/participants/req-1/error", "/participants/{ID}/error", {"ID": "req-1"}),
        ("PUT", "/participants/MSISDN/123", "/participants/{Type}/{ID}", {"Type": "MSISDN", "ID": "123"}),
        ("GET", "/participants/MSISDN/123", "/participants/{Type}/{ID}", {"Type": "MSISDN", "ID": "123"}),
        ("DELETE", "/participants/MSISDN/123", "/participants/{Type}/{ID}", {"Type": "MSISDN", "ID": "123"}),
        ("PUT", "/participants/MSISDN/1/error", "/participants/{Type}/{ID}/error", {"Type": "MSISDN", "ID": "1"}),
        (
            "POST",
            "/participants/BUSINESS/1/sub",
            "/participants/{Type}/{ID}/{SubId}",
            {"Type": "BUSINESS", "ID": "1", "SubId": "sub"},
        ),
        (
            "PUT",
            "/participants/BUSINESS/1/sub/error",
            "/participants/{Type}/{ID}/{SubId}/error",
            {"Type": "BUSINESS", "ID": "1", "SubId": "sub"},
        ),
        # The literal wins over a parameter; with no such method there, the parameter route is used.
        ("GET", "/participants/MSISDN/error", "/participants/{Type}/{ID}", {"Type": "MSISDN", "ID": "error"}),
        ("PUT", "/parties/MSISDN/123/error", "/parties/{Type}/{ID}/error", {"Type": "MSISDN", "ID": "123"}),
        (
            "GET",
            "/parties/MSISDN/123/error",
            "/parties/{Type}/{ID}/{SubId}",
            {"Type": "MSISDN", "ID": "123", "SubId": "error"},
        ),
        (
            "PUT",
            "/parties/MSISDN/123/w/error",
            "/parties/{Type}/{ID}/{SubId}/error",
            {"Type": "MSISDN", "ID": "123", "SubId": "w"},
        ),
        ("PATCH", "/transfers/t1", "/transfers/{ID}", {"ID": "t1"}),
        ("PUT", "/transfers/t1/error", "/transfers/{ID}/error", {"ID": "t1"}),
        ("POST", "/bulkTransfers", "/bulkTransfers", {}),
        ("GET", "/transactions/x", "/transactions/{ID}", {"ID": "x"}),
        ("PUT", "/authorizations/x/error", "/authorizations/{ID}/error", {"ID": "x"}),
        ("GET", "/transfers/with space", "/transfers/{ID}", {"ID": "with space"}),  # decoded %20
    ],
)
def test_route_table(method, path, template, params):
    route = match(method, path)
    assert isinstance(route, Route)
    assert (route.template, route.params) == (template, params)
    assert resolve(method, path) == route


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/",
        "transfers",
        "//transfers",
        "/foo",
        "/Transfers/1",  # paths are case-sensitive
        "/transfers/",  # empty ID
        "/transfers//error",
        "/transfers/1/",
        "/transfers/1/2",
        "/transfers/1/error/x",
        "/parties/MSISDN",
        "/parties/MSISDN//x",
        "/participants/a/b/c/d/e",
        "/fxTransfers",  # v2.0 only
        "/health",  # a Mojaloop extra, not FSPIOP
    ],
)
def test_unknown_path_is_404_3002(path):
    assert match("GET", path) is None
    with pytest.raises(FspiopError) as exc:
        resolve("GET", path)
    assert (exc.value.code, exc.value.http_status) == (3002, 404)
    assert exc.value.description == (f"Unknown URI - {path}" if path else "Unknown URI")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/transfers", ("POST",)),
        ("PUT", "/transfers", ("POST",)),
        ("POST", "/transfers/t1", ("GET", "PATCH", "PUT")),
        ("DELETE", "/transfers/t1", ("GET", "PATCH", "PUT")),
        ("GET", "/transfers/t1/error", ("PUT",)),
        ("PATCH", "/quotes/q1", ("GET", "PUT")),
        ("GET", "/participants", ("POST",)),
        ("DELETE", "/parties/MSISDN/1", ("GET", "PUT")),
        ("POST", "/participants/req-1", ("PUT",)),  # the bulk callback path, not /participants/{Type}/{ID}
        ("get", "/transfers/t1", ("GET", "PATCH", "PUT")),  # methods are case-sensitive
        ("OPTIONS", "/quotes", ("POST",)),
    ],
)
def test_known_path_with_other_method_is_405_3000(method, path, allowed):
    found = match(method, path)
    assert isinstance(found, MethodNotAllowed)
    assert found.allowed == allowed
    with pytest.raises(FspiopError) as exc:
        resolve(method, path)
    assert (exc.value.code, exc.value.http_status) == (3000, 405)
    assert exc.value.description == f"Generic client error - Method Not Allowed - {method} {path}"


# --------------------------------------------------------------------------------------------------
# Headers and version negotiation

_DATE = "Tue, 15 Nov 1994 08:12:31 GMT"


def _mt(resource: str, version: str) -> str:
    return f"application/vnd.interoperability.{resource}+json;version={version}"


def _headers(method: str, resource: str = "transfers", **changes: str | None) -> dict[str, str]:
    headers = {
        "date": _DATE,
        "fspiop-source": "payerfsp",
        "fspiop-destination": "payeefsp",
    }
    if method in ("GET", "POST", "DELETE"):
        headers["accept"] = _mt(resource, "1")
    if method in ("POST", "PUT", "PATCH"):
        headers["content-type"] = _mt(resource, "1.1" if resource not in ("authorizations", "transactions") else "1.0")
    for name, value in changes.items():
        name = name.replace("_", "-")
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    return headers


_POST_TRANSFERS = resolve("POST", "/transfers")
_GET_TRANSFER = resolve("GET", "/transfers/t1")
_PUT_TRANSFER = resolve("PUT", "/transfers/t1")
_PATCH_TRANSFER = resolve("PATCH", "/transfers/t1")
_PUT_TRANSFER_ERROR = resolve("PUT", "/transfers/t1/error")
_DELETE_PARTICIPANT = resolve("DELETE", "/participants/MSISDN/123")
_GET_AUTHORIZATION = resolve("GET", "/authorizations/a1")
_PUT_AUTHORIZATION = resolve("PUT", "/authorizations/a1")


def test_accept_rule_agrees_with_the_spec_parameters():
    # The OpenAPI file declares the Accept header on exactly the GET/POST/DELETE operations.
    for template, item in routes.load_spec()["paths"].items():
        shared = [p["$ref"] for p in item.get("parameters", [])]
        for method, op in item.items():
            if method == "parameters":
                continue
            declared = shared + [p["$ref"] for p in op.get("parameters", [])]
            has_accept = "#/components/parameters/Accept" in declared
            assert has_accept == (method.upper() in ("GET", "POST", "DELETE")), (method, template)


def test_valid_post_negotiates_versions():
    got = check_headers(_POST_TRANSFERS, _headers("POST"))
    assert got == Negotiated(
        resource="transfers",
        content=(1, 1),
        response=(1, 1),
        source="payerfsp",
        destination="payeefsp",
        date=datetime(1994, 11, 15, 8, 12, 31, tzinfo=UTC),
    )
    assert got.response_content_type == "application/vnd.interoperability.transfers+json;version=1.1"


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (_mt("transfers", "1"), (1, 1)),  # version=1 means any 1.x: the highest we support
        (_mt("transfers", "1.0"), (1, 0)),
        (_mt("transfers", "1.1"), (1, 1)),
        ("application/vnd.interoperability.transfers+json", (1, 1)),  # no version: any (as Mojaloop)
        (f"{_mt('transfers', '1.0')},{_mt('transfers', '1.1')}", (1, 1)),
        (f"{_mt('transfers', '1.0')}, {_mt('transfers', '2.0')}", (1, 0)),
        (f"{_mt('transfers', '2')} , {_mt('transfers', '1')}", (1, 1)),
        ("application/vnd.interoperability.transfers+json ; version=1.0", (1, 0)),
        ("Application/VND.Interoperability.Transfers+JSON;Version=1.0", (1, 0)),  # RFC 7231: case-insensitive
    ],
)
def test_accept_lists_and_major_only_versions(accept, expected):
    got = check_headers(_GET_TRANSFER, _headers("GET", accept=accept))
    assert got.response == expected
    assert got.content is None  # a GET without Content-Type


def _assert_error(exc: pytest.ExceptionInfo[FspiopError], code: int, status: int, description: str) -> None:
    assert (exc.value.code, exc.value.http_status, exc.value.description) == (code, status, description)


def test_unsupported_accept_version_is_406_with_the_supported_list():
    with pytest.raises(FspiopError) as exc:
        check_headers(_GET_TRANSFER, _headers("GET", accept=_mt("transfers", "2.0")))
    _assert_error(exc, 3001, 406, "Unacceptable version requested - accept")
    assert exc.value.to_body() == {
        "errorInformation": {
            "errorCode": "3001",
            "errorDescription": "Unacceptable version requested - accept",
            "extensionList": {"extension": [{"key": "1", "value": "0"}, {"key": "1", "value": "1"}]},
        }
    }


@pytest.mark.parametrize("accept", [_mt("transfers", "2"), _mt("transfers", "1.2"), _mt("transfers", "0.9")])
def test_accept_with_no_supported_version_is_406(accept):
    with pytest.raises(FspiopError) as exc:
        check_headers(_POST_TRANSFERS, _headers("POST", accept=accept))
    _assert_error(exc, 3001, 406, "Unacceptable version requested - accept")


def test_unsupported_content_version_is_406_with_the_supported_list():
    with pytest.raises(FspiopError) as exc:
        check_headers(_POST_TRANSFERS, _headers("POST", content_type=_mt("transfers", "2.0")))
    _assert_error(exc, 3001, 406, "Unacceptable version requested - content-type")
    assert exc.value.extensions == [("1", "0"), ("1", "1")]


def test_parsed_header_values_are_remembered_per_resource_and_stay_bounded():
    checker = HeaderChecker()
    first = checker.check(_POST_TRANSFERS, _headers("POST"))
    assert checker.check(_POST_TRANSFERS, _headers("POST")) == first
    # The same media type text for another resource is a different question, answered afresh.
    with pytest.raises(FspiopError) as exc:
        checker.check(resolve("POST", "/quotes"),
                      _headers("POST", accept=_mt("quotes", "1"), content_type=_mt("transfers", "1.1")))
    _assert_error(exc, 3101, 400, "Malformed syntax - content-type")
    # A refused value is refused every time: failures are never remembered as answers.
    for _ in range(2):
        with pytest.raises(FspiopError) as exc:
            checker.check(_POST_TRANSFERS, _headers("POST", accept=_mt("transfers", "2.0")))
        _assert_error(exc, 3001, 406, "Unacceptable version requested - accept")
    # A client sending ever-new values cannot grow the caches without bound.
    for minor in range(1000):
        accept = f"{_mt('transfers', '1.1')}, {_mt('transfers', f'9.{minor}')}"
        assert checker.check(_POST_TRANSFERS, _headers("POST", accept=accept)).response == (1, 1)
    assert len(checker._accepted) <= 256
    checker.cache_clear()
    assert checker.check(_POST_TRANSFERS, _headers("POST")) == first
    assert parse_date(_DATE) is parse_date(_DATE)
    with pytest.raises(ValueError):
        parse_date("Tue, 15 Nov 1994 08:12:31 UTC")


def test_authorizations_and_transactions_are_1_0_only():
    assert DEFAULT_VERSIONS["authorizations"] == ((1, 0),)
    assert DEFAULT_VERSIONS["transactions"] == ((1, 0),)
    assert check_headers(_GET_AUTHORIZATION, _headers("GET", "authorizations")).response == (1, 0)
    with pytest.raises(FspiopError) as exc:
        check_headers(_PUT_AUTHORIZATION, _headers("PUT", "authorizations", content_type=_mt("authorizations", "1.1")))
    _assert_error(exc, 3001, 406, "Unacceptable version requested - content-type")
    assert exc.value.extensions == [("1", "0")]
    with pytest.raises(FspiopError) as exc:
        check_headers(_GET_AUTHORIZATION, _headers("GET", "authorizations", accept=_mt("authorizations", "1.1")))
    _assert_error(exc, 3001, 406, "Unacceptable version requested - accept")


@pytest.mark.parametrize("route", [_GET_TRANSFER, _POST_TRANSFERS, _DELETE_PARTICIPANT])
@pytest.mark.parametrize("accept", [None, "", "   "])
def test_accept_is_required_on_get_post_delete(route, accept):
    headers = _headers(route.method, route.resource, accept=accept)
    with pytest.raises(FspiopError) as exc:
        check_headers(route, headers)
    _assert_error(exc, 3102, 400, "Missing mandatory element - accept")


@pytest.mark.parametrize(
    ("route", "content_type", "response"),
    [
        (_PUT_TRANSFER, _mt("transfers", "1.1"), (1, 1)),
        (_PUT_TRANSFER, _mt("transfers", "1.0"), (1, 0)),  # a callback is answered in its own version
        (_PATCH_TRANSFER, _mt("transfers", "1.1"), (1, 1)),
        (_PUT_TRANSFER_ERROR, _mt("transfers", "1.0"), (1, 0)),
    ],
)
def test_callbacks_need_no_accept(route, content_type, response):
    got = check_headers(route, _headers(route.method, content_type=content_type))
    assert (got.content, got.response) == (response, response)


def test_accept_on_a_callback_is_checked_when_present():
    got = check_headers(_PUT_TRANSFER, _headers("PUT", accept=_mt("transfers", "1.0")))
    assert (got.content, got.response) == ((1, 1), (1, 0))
    with pytest.raises(FspiopError) as exc:
        check_headers(_PUT_TRANSFER, _headers("PUT", accept="application/json"))
    _assert_error(exc, 3101, 400, "Malformed syntax - accept")


@pytest.mark.parametrize(
    "accept",
    [
        "application/json",
        "*/*",
        _mt("quotes", "1"),  # another resource
        f"{_mt('transfers', '1')},{_mt('quotes', '1')}",
        _mt("transfers", "x"),
        _mt("transfers", "1.x"),
        _mt("transfers", "1.1.1"),
        _mt("transfers", ""),
        f"{_mt('transfers', '1')};q=0.5",
        f"{_mt('transfers', '1')},",  # empty list item
        "application/vnd.interoperability.transfers",
        "application/vnd.interoperability.transfers+xml;version=1",
    ],
)
def test_malformed_accept_is_3101(accept):
    with pytest.raises(FspiopError) as exc:
        check_headers(_GET_TRANSFER, _headers("GET", accept=accept))
    _assert_error(exc, 3101, 400, "Malformed syntax - accept")


@pytest.mark.parametrize("route", [_POST_TRANSFERS, _PUT_TRANSFER, _PATCH_TRANSFER, _PUT_TRANSFER_ERROR])
def test_content_type_is_required_with_a_body(route):
    with pytest.raises(FspiopError) as exc:
        check_headers(route, _headers(route.method, content_type=None))
    _assert_error(exc, 3102, 400, "Missing mandatory element - content-type")


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        _mt("quotes", "1.1"),  # the resource in the media type must be the route's
        _mt("transfer", "1.1"),
        _mt("bulkTransfers", "1.1"),
        _mt("transfers", "1"),  # Content-Type must state major.minor
        "application/vnd.interoperability.transfers+json",
        f"{_mt('transfers', '1.1')};charset=utf-8",
        f"{_mt('transfers', '1.1')},{_mt('transfers', '1.0')}",
    ],
)
def test_malformed_content_type_is_3101(content_type):
    with pytest.raises(FspiopError) as exc:
        check_headers(_POST_TRANSFERS, _headers("POST", content_type=content_type))
    _assert_error(exc, 3101, 400, "Malformed syntax - content-type")


def test_content_type_on_get_is_optional_but_checked():
    assert check_headers(_GET_TRANSFER, _headers("GET", content_type=_mt("transfers", "1.0"))).content == (1, 0)
    with pytest.raises(FspiopError) as exc:
        check_headers(_GET_TRANSFER, _headers("GET", content_type=_mt("quotes", "1.0")))
    _assert_error(exc, 3101, 400, "Malformed syntax - content-type")
    strict = HeaderChecker(content_type_required_without_body=True)  # the OpenAPI file's (and Mojaloop's) rule
    with pytest.raises(FspiopError) as exc:
        check_headers(_GET_TRANSFER, _headers("GET"), strict)
    _assert_error(exc, 3102, 400, "Missing mandatory element - content-type")


@pytest.mark.parametrize("date", [None, "", "  "])
def test_missing_date_is_3102(date):
    with pytest.raises(FspiopError) as exc:
        check_headers(_POST_TRANSFERS, _headers("POST", date=date))
    _assert_error(exc, 3102, 400, "Missing mandatory element - date")


@pytest.mark.parametrize(
    "date",
    [
        "1994-11-15T08:12:31Z",
        "1994-11-15T08:12:31.000Z",
        "Tue, 15 Nov 1994 08:12:31 UTC",
        "Tue, 15 Nov 1994 08:12:31 +0000",
        "Tue, 15 Nov 1994 08:12:31",
        "Tue, 15 Nov 94 08:12:31 GMT",
        "Tuesday, 15-Nov-94 08:12:31 GMT",  # RFC 850 (obsolete)
        "Tue Nov 15 08:12:31 1994",  # asctime (obsolete)
        "Tue, 5 Nov 1994 08:12:31 GMT",  # day must be 2 digits
        "tue, 15 nov 1994 08:12:31 GMT",  # names are case-sensitive
        "Tue, 31 Feb 1994 08:12:31 GMT",  # no such day
        "Tue, 15 Nov 1994 24:00:00 GMT",
        "Tue, 15 Nov 1994 08:60:00 GMT",
        "Tue, 15 Nov 1994 08:12:60 GMT",
        "784887151",
    ],
)
def test_bad_date_is_3101(date):
    with pytest.raises(FspiopError) as exc:
        check_headers(_POST_TRANSFERS, _headers("POST", date=date))
    _assert_error(exc, 3101, 400, "Malformed syntax - date")


def test_date_parsing():
    assert parse_date("Sun, 06 Nov 1994 08:49:37 GMT") == datetime(1994, 11, 6, 8, 49, 37, tzinfo=UTC)
    assert parse_date("Thu, 29 Feb 2024 23:59:59 GMT") == datetime(2024, 2, 29, 23, 59, 59, tzinfo=UTC)
    # JavaScript's Date.toUTCString(), what Mojaloop's SDK sends, is an IMF-fixdate:
    check_headers(_POST_TRANSFERS, _headers("POST", date="Wed, 03 Jan 2024 10:00:00 GMT"))


@pytest.mark.parametrize("source", [None, "", " \t"])
def test_missing_fspiop_source_is_3102(source):
    with pytest.raises(FspiopError) as exc:
        check_headers(_PUT_TRANSFER, _headers("PUT", fspiop_source=source))
    _assert_error(exc, 3102, 400, "Missing mandatory element - fspiop-source")


def test_fspiop_ids_are_at_most_32_characters():
    assert check_headers(_POST_TRANSFERS, _headers("POST", fspiop_source="s" * 32)).source == "s" * 32
    with pytest.raises(FspiopError) as exc:
        check_headers(_POST_TRANSFERS, _headers("POST", fspiop_source="s" * 33))
    _assert_error(exc, 3101, 400, "Malformed syntax - fspiop-source")
    with pytest.raises(FspiopError) as exc:
        check_headers(_POST_TRANSFERS, _headers("POST", fspiop_destination="d" * 33))
    _assert_error(exc, 3101, 400, "Malformed syntax - fspiop-destination")


@pytest.mark.parametrize(("destination", "expected"), [(None, None), ("", None), ("payeefsp", "payeefsp")])
def test_fspiop_destination_is_optional(destination, expected):
    route = resolve("GET", "/parties/MSISDN/123")  # the payer does not know the payee's FSP yet
    assert check_headers(route, _headers("GET", "parties", fspiop_destination=destination)).destination == expected


def test_checks_run_in_mojaloop_order():
    # Accept, then Date, then Content-Type, then FSPIOP-Source.
    cases = [
        ({"accept": None, "date": None, "content_type": None, "fspiop_source": None}, "accept"),
        ({"date": None, "content_type": None, "fspiop_source": None}, "date"),
        ({"content_type": None, "fspiop_source": None}, "content-type"),
        ({"fspiop_source": None}, "fspiop-source"),
    ]
    for changes, header in cases:
        with pytest.raises(FspiopError) as exc:
            check_headers(_POST_TRANSFERS, _headers("POST", **changes))
        _assert_error(exc, 3102, 400, f"Missing mandatory element - {header}")


def test_custom_version_table():
    with pytest.raises(ValueError, match="transactions"):
        HeaderChecker({k: v for k, v in DEFAULT_VERSIONS.items() if k != "transactions"})
    only_1_1 = HeaderChecker({**DEFAULT_VERSIONS, "transfers": [(1, 1)]})
    assert only_1_1.supported("transfers") == ((1, 1),)
    with pytest.raises(FspiopError) as exc:
        check_headers(_POST_TRANSFERS, _headers("POST", content_type=_mt("transfers", "1.0")), only_1_1)
    _assert_error(exc, 3001, 406, "Unacceptable version requested - content-type")
    assert exc.value.extensions == [("1", "1")]
    mojaloop_like = HeaderChecker({**DEFAULT_VERSIONS, "authorizations": [(1, 0), (1, 1)]})
    assert check_headers(_GET_AUTHORIZATION, _headers("GET", "authorizations"), mojaloop_like).response == (1, 1)


def test_media_type():
    assert media_type("bulkQuotes", (1, 0)) == "application/vnd.interoperability.bulkQuotes+json;version=1.0"


# --------------------------------------------------------------------------------------------------
# Body schemas

_ILP_PACKET = (
    "AYIBgQAAAAAAAASwNGxldmVsb25lLmRmc3AxLm1lci45T2RTOF81MDdqUUZERmZlakgyOVc4bXFmNEpLMHlGTFGCAUBQU0svMS4wCk5vbmNl"
    "OiB1SXlweUYzY3pYSXBFdzVVc05TYWh3CkVuY3J5cHRpb246IG5vbmUKUGF5bWVudC1JZDogMTMyMzZhM2ItOGZhOC00MTYzLTg0NDctNGMz"
    "ZWQzZGE5OGE3CgpDb250ZW50LUxlbmd0aDogMTM1CkNvbnRlbnQtVHlwZTogYXBwbGljYXRpb24vanNvbgpTZW5kZXItSWRlbnRpZmllcjog"
    "OTI4MDYzOTEKCiJ7XCJmZWVcIjowLFwidHJhbnNmZXJDb2RlXCI6XCJpbnZvaWNlXCIsXCJkZWJpdE5hbWVcIjpcImFsaWNlIGNvb3BlclwiLF"
    "wiY3JlZGl0TmFtZVwiOlwibWVyIGNoYW50XCIsXCJkZWJpdElkZW50aWZpZXJcIjpcIjkyODA2MzkxXCJ9IgA"
)
_CONDITION = "GRzLaTP7DJ9t4P-a_BA0WA9wzzlsugf00-Tn6kESAfM"
_FULFILMENT = "UNlJ98hZTY_dsw0cAqw4i_UN3v4utt7CZFB4yfLbVFA"
_TIMESTAMP = "2016-05-24T08:38:08.699-04:00"

TRANSFER = {
    "transferId": "b51ec534-ee48-4575-b6a9-ead2955b8069",
    "payerFsp": "payerfsp",
    "payeeFsp": "payeefsp",
    "amount": {"currency": "USD", "amount": "123.45"},
    "ilpPacket": _ILP_PACKET,
    "condition": _CONDITION,
    "expiration": _TIMESTAMP,
    "extensionList": {"extension": [{"key": "errorDescription", "value": "This is a more detailed description"}]},
}
FULFIL = {"fulfilment": _FULFILMENT, "completedTimestamp": "2016-05-24T08:38:08.699Z", "transferState": "COMMITTED"}
ERROR = {"errorInformation": {"errorCode": "5100", "errorDescription": "Generic Payee rejection"}}
COMMIT_NOTIFICATION = {"completedTimestamp": "2024-02-29T23:59:59.000+05:30", "transferState": "COMMITTED"}
QUOTE = {
    "quoteId": "7c23e80c-d078-4077-8263-2c047876fcf6",
    "transactionId": "85feac2f-39b2-491b-817e-4a03203d4f14",
    "payee": {"partyIdInfo": {"partyIdType": "MSISDN", "partyIdentifier": "27713803912", "fspId": "payeefsp"}},
    "payer": {
        "partyIdInfo": {"partyIdType": "MSISDN", "partyIdentifier": "27713803913", "fspId": "payerfsp"},
        "personalInfo": {"complexName": {"firstName": "Mats", "lastName": "Hagman"}, "dateOfBirth": "1983-10-25"},
        "name": "Mats Hagman",
    },
    "amountType": "SEND",
    "amount": {"currency": "EUR", "amount": "0.5"},
    "transactionType": {"scenario": "TRANSFER", "initiator": "PAYER", "initiatorType": "CONSUMER"},
    "geoCode": {"latitude": "+45.4215", "longitude": "-75.6972"},
    "note": "From Mats",
    "expiration": "2024-01-01T00:00:00.000Z",
}


def _party(first: str, middle: str | None, last: str) -> dict:
    complex_name = {"firstName": first, "lastName": last}
    if middle is not None:
        complex_name["middleName"] = middle
    return {
        "party": {
            "partyIdInfo": {"partyIdType": "MSISDN", "partyIdentifier": "959123456", "fspId": "yangonfsp"},
            "name": "Test Party",
            "personalInfo": {"complexName": complex_name, "dateOfBirth": "2000-02-29"},
        }
    }


PUT_PARTIES = resolve("PUT", "/parties/MSISDN/959123456")


def test_valid_bodies():
    cases = [
        (_POST_TRANSFERS, TRANSFER),
        (_PUT_TRANSFER, FULFIL),
        (_PUT_TRANSFER, {"transferState": "RESERVED"}),
        (_PUT_TRANSFER_ERROR, ERROR),
        (_PATCH_TRANSFER, COMMIT_NOTIFICATION),
        (resolve("POST", "/quotes"), QUOTE),
        (resolve("PUT", "/participants/MSISDN/123"), {}),  # fspId is optional (empty on DELETE callbacks)
        (
            resolve("POST", "/participants"),
            {"requestId": TRANSFER["transferId"], "partyList": [QUOTE["payee"]["partyIdInfo"]]},
        ),
        (
            resolve("PUT", "/quotes/q1/error"),
            {
                "errorInformation": {
                    **ERROR["errorInformation"],
                    "extensionList": {"extension": [{"key": "k", "value": "v"}]},
                }
            },
        ),
    ]
    for route, body in cases:
        assert validate(route, orjson.dumps(body)) == body, route.template


@pytest.mark.parametrize(
    ("first", "middle", "last"),
    [
        ("မောင်", "မြင့်", "ဦး"),  # Burmese: letters with combining marks
        ("Zoë", None, "Ñandú"),
        ("José-María", "de la", "O'Connor"),
        ("李", None, "小龙"),
        ("محمد", None, "عبد_الله"),
        ("Ελένη", "Μ.", "Παπαδοπούλου"),
        ("Jean\u200dLuc", None, "Test2"),  # Join_Control and digits are allowed
    ],
)
def test_unicode_party_names_pass(first, middle, last):
    body = _party(first, middle, last)
    assert validate(PUT_PARTIES, orjson.dumps(body)) == body


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("   ", "only spaces: (?!\\s*$)"),
        ("\u00a0", "only ECMA whitespace"),
        ("Zoë\n", "$ is the end of the string, not before a final newline"),
        ("Bob<script>", "< is not in the class"),
        ("O\u2019Brien", "the spec's class has '' twice, not the typographic apostrophe"),
        ("x" * 129, "longer than 128"),
        ("", "empty"),
    ],
)
def test_bad_party_names_fail(name, why):
    with pytest.raises(FspiopError) as exc:
        validate(PUT_PARTIES, orjson.dumps(_party(name, None, "Ok")))
    _assert_error(exc, 3101, 400, "Malformed syntax - /body/party/personalInfo/complexName/firstName")


def _with(body: dict, path: str, value) -> dict:
    """A deep copy of ``body`` with the member at ``path`` ('a/b/0/c') set to ``value`` (or removed: _DROP)."""
    out = copy.deepcopy(body)
    *parents, last = path.split("/")
    target = out
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if value is _DROP:
        del target[last]
    else:
        target[int(last) if isinstance(target, list) else last] = value
    return out


_DROP = object()
_EXT17 = {"extension": [{"key": f"k{i}", "value": "v"} for i in range(17)]}
_EXT16 = {"extension": [{"key": f"k{i}", "value": "v"} for i in range(16)]}
_BULK_TRANSFER = {
    "bulkTransferId": "0a3d8f2e-2a5f-4bd8-8f3e-6a1c3c3e5b10",
    "bulkQuoteId": "1b4e9a3f-3b6a-4ce9-9a4f-7b2d4d4f6c21",
    "payerFsp": "payerfsp",
    "payeeFsp": "payeefsp",
    "individualTransfers": [
        {
            "transferId": f"2c5fab4a-4c7b-4dfa-ab5a-8c3e5e5a7d3{i}",
            "transferAmount": {"currency": "USD", "amount": "1"},
            "ilpPacket": "AYIB",
            "condition": _CONDITION,
        }
        for i in range(3)
    ],
    "expiration": _TIMESTAMP,
}
_POST_QUOTES = resolve("POST", "/quotes")
_POST_BULK = resolve("POST", "/bulkTransfers")


@pytest.mark.parametrize(
    ("route", "body", "code", "pointer"),
    [
        # required members: 3102
        (_POST_TRANSFERS, _with(TRANSFER, "transferId", _DROP), 3102, "/body/transferId"),
        (_POST_TRANSFERS, _with(TRANSFER, "expiration", _DROP), 3102, "/body/expiration"),
        (_POST_TRANSFERS, _with(TRANSFER, "amount/currency", _DROP), 3102, "/body/amount/currency"),
        (
            _POST_TRANSFERS,
            _with(TRANSFER, "extensionList/extension/0/value", _DROP),
            3102,
            "/body/extensionList/extension/0/value",
        ),
        (_PUT_TRANSFER, _with(FULFIL, "transferState", _DROP), 3102, "/body/transferState"),
        (_PATCH_TRANSFER, _with(COMMIT_NOTIFICATION, "completedTimestamp", _DROP), 3102, "/body/completedTimestamp"),
        (_PUT_TRANSFER_ERROR, {}, 3102, "/body/errorInformation"),
        (
            _PUT_TRANSFER_ERROR,
            _with(ERROR, "errorInformation/errorDescription", _DROP),
            3102,
            "/body/errorInformation/errorDescription",
        ),
        (
            _POST_QUOTES,
            _with(QUOTE, "payee/partyIdInfo/partyIdType", _DROP),
            3102,
            "/body/payee/partyIdInfo/partyIdType",
        ),
        (_POST_QUOTES, _with(QUOTE, "transactionType/initiator", _DROP), 3102, "/body/transactionType/initiator"),
        # Amount: ^([0]|([1-9][0-9]{0,17}))([.][0-9]{0,3}[1-9])?$
        (_POST_TRANSFERS, _with(TRANSFER, "amount/amount", "5.ABC"), 3101, "/body/amount/amount"),
        (_POST_TRANSFERS, _with(TRANSFER, "amount/amount", "10.50"), 3101, "/body/amount/amount"),  # trailing zero
        (_POST_TRANSFERS, _with(TRANSFER, "amount/amount", "10.0"), 3101, "/body/amount/amount"),
        (_POST_TRANSFERS, _with(TRANSFER, "amount/amount", "10."), 3101, "/body/amount/amount"),
        (_POST_TRANSFERS, _with(TRANSFER, "amount/amount", "1.23456"), 3101, "/body/amount/amount"),
        (_POST_TRANSFERS, _with(TRANSFER, "amount/amount", "-5"), 3101, "/body/amount/amount"),
        (_POST_TRANSFERS, _with(TRANSFER, "amount/amount", "05"), 3101, "/body/amount/amount"),
        (_POST_TRANSFERS, _with(TRANSFER, "amount/amount", "1" * 19), 3101, "/body/amount/amount"),
        (_POST_TRANSFERS, _with(TRANSFER, "amount/amount", "10\n"), 3101, "/body/amount/amount"),
        (_POST_TRANSFERS, _with(TRANSFER, "amount/amount", "١٠"), 3101, "/body/amount/amount"),  # not ASCII digits
        (_POST_TRANSFERS, _with(TRANSFER, "amount/amount", 10), 3101, "/body/amount/amount"),  # a number, not a string
        (_POST_TRANSFERS, _with(TRANSFER, "amount/currency", "XYZ"), 3101, "/body/amount/currency"),
        (_POST_TRANSFERS, _with(TRANSFER, "amount/currency", "usd"), 3101, "/body/amount/currency"),
        (_POST_TRANSFERS, _with(TRANSFER, "amount", "123.45"), 3101, "/body/amount"),
        (_POST_TRANSFERS, _with(TRANSFER, "amount", None), 3101, "/body/amount"),
        # identifiers, ILP, dates
        (
            _POST_TRANSFERS,
            _with(TRANSFER, "transferId", "B51EC534-EE48-4575-B6A9-EAD2955B8069"),
            3101,
            "/body/transferId",
        ),
        (
            _POST_TRANSFERS,
            _with(TRANSFER, "transferId", "b51ec534-ee48-7575-b6a9-ead2955b8069"),
            3101,
            "/body/transferId",
        ),
        (_POST_TRANSFERS, _with(TRANSFER, "condition", _CONDITION[:-1]), 3101, "/body/condition"),
        (_POST_TRANSFERS, _with(TRANSFER, "condition", _CONDITION + "A"), 3101, "/body/condition"),
        (_POST_TRANSFERS, _with(TRANSFER, "condition", _CONDITION + "="), 3101, "/body/condition"),
        (_POST_TRANSFERS, _with(TRANSFER, "ilpPacket", ""), 3101, "/body/ilpPacket"),
        (_POST_TRANSFERS, _with(TRANSFER, "ilpPacket", "AYIB==="), 3101, "/body/ilpPacket"),
        (_POST_TRANSFERS, _with(TRANSFER, "ilpPacket", "A" * 32769), 3101, "/body/ilpPacket"),
        (_POST_TRANSFERS, _with(TRANSFER, "expiration", "2016-05-24T08:38:08-04:00"), 3101, "/body/expiration"),
        (_POST_TRANSFERS, _with(TRANSFER, "expiration", "2016-05-24T08:38:08.69Z"), 3101, "/body/expiration"),
        (_POST_TRANSFERS, _with(TRANSFER, "expiration", "2016-05-24T08:38:08.699"), 3101, "/body/expiration"),
        (_POST_TRANSFERS, _with(TRANSFER, "expiration", "2023-02-29T08:38:08.699Z"), 3101, "/body/expiration"),
        (_POST_TRANSFERS, _with(TRANSFER, "expiration", "2016-05-24 08:38:08.699Z"), 3101, "/body/expiration"),
        (_POST_TRANSFERS, _with(TRANSFER, "payerFsp", ""), 3101, "/body/payerFsp"),
        (_POST_TRANSFERS, _with(TRANSFER, "payerFsp", "p" * 33), 3101, "/body/payerFsp"),
        (_PUT_TRANSFER, _with(FULFIL, "transferState", "DONE"), 3101, "/body/transferState"),
        (_PUT_TRANSFER, _with(FULFIL, "fulfilment", "short"), 3101, "/body/fulfilment"),
        (
            _PUT_TRANSFER_ERROR,
            _with(ERROR, "errorInformation/errorCode", "0100"),
            3101,
            "/body/errorInformation/errorCode",
        ),
        (
            _PUT_TRANSFER_ERROR,
            _with(ERROR, "errorInformation/errorCode", 5100),
            3101,
            "/body/errorInformation/errorCode",
        ),
        (
            _PUT_TRANSFER_ERROR,
            _with(ERROR, "errorInformation/errorDescription", "d" * 129),
            3101,
            "/body/errorInformation/errorDescription",
        ),
        (_POST_QUOTES, _with(QUOTE, "amountType", "BOTH"), 3101, "/body/amountType"),
        (
            _POST_QUOTES,
            _with(QUOTE, "payer/personalInfo/dateOfBirth", "1983-02-30"),
            3101,
            "/body/payer/personalInfo/dateOfBirth",
        ),
        (_POST_QUOTES, _with(QUOTE, "geoCode/latitude", "91"), 3101, "/body/geoCode/latitude"),
        (_POST_QUOTES, _with(QUOTE, "transactionType/subScenario", "p2p"), 3101, "/body/transactionType/subScenario"),
        (_POST_QUOTES, _with(QUOTE, "payer/name", ""), 3101, "/body/payer/name"),
        (
            _POST_BULK,
            _with(_BULK_TRANSFER, "individualTransfers/1/transferId", "nope"),
            3101,
            "/body/individualTransfers/1/transferId",
        ),
        # extension lists: 1..16 extensions, key 1..32, value 1..128
        (_POST_TRANSFERS, _with(TRANSFER, "extensionList", _EXT17), 3103, "/body/extensionList/extension"),
        (
            _PUT_TRANSFER_ERROR,
            _with(ERROR, "errorInformation/extensionList", _EXT17),
            3103,
            "/body/errorInformation/extensionList/extension",
        ),
        (_POST_TRANSFERS, _with(TRANSFER, "extensionList", {"extension": []}), 3100, "/body/extensionList/extension"),
        (_POST_TRANSFERS, _with(TRANSFER, "extensionList", {}), 3102, "/body/extensionList/extension"),
        (
            _POST_TRANSFERS,
            _with(TRANSFER, "extensionList/extension/0/key", "k" * 33),
            3101,
            "/body/extensionList/extension/0/key",
        ),
        (
            _POST_TRANSFERS,
            _with(TRANSFER, "extensionList/extension/0/value", ""),
            3101,
            "/body/extensionList/extension/0/value",
        ),
        (
            _POST_TRANSFERS,
            _with(TRANSFER, "extensionList/extension", {"key": "k", "value": "v"}),
            3101,
            "/body/extensionList/extension",
        ),
        (_POST_BULK, _with(_BULK_TRANSFER, "individualTransfers", []), 3100, "/body/individualTransfers"),
        (
            _POST_BULK,
            _with(_BULK_TRANSFER, "individualTransfers", _BULK_TRANSFER["individualTransfers"] * 334),
            3103,
            "/body/individualTransfers",
        ),
    ],
)
def test_invalid_bodies(route, body, code, pointer):
    names = {
        3100: "Generic validation error",
        3101: "Malformed syntax",
        3102: "Missing mandatory element",
        3103: "Too many elements",
    }
    with pytest.raises(FspiopError) as exc:
        validate(route, orjson.dumps(body))
    _assert_error(exc, code, 400, f"{names[code]} - {pointer}")


def test_sixteen_extensions_are_fine():
    body = _with(TRANSFER, "extensionList", _EXT16)
    assert validate(_POST_TRANSFERS, orjson.dumps(body)) == body


def test_unknown_members_are_accepted_as_the_spec_does_not_forbid_them():
    # The v1.1 file never sets additionalProperties, so JSON Schema (and Mojaloop's validator) accept
    # extra members; they are returned unchanged.
    body = {**TRANSFER, "unexpected": {"anything": [1, 2]}, "amount": {**TRANSFER["amount"], "extra": True}}
    assert validate(_POST_TRANSFERS, orjson.dumps(body)) == body


@pytest.mark.parametrize(
    ("raw", "code", "description"),
    [
        (b"", 3102, "Missing mandatory element - /body"),
        (b"{", 3101, "Malformed syntax - /body"),
        (b"{'a': 1}", 3101, "Malformed syntax - /body"),
        (b'{"transferId": "\xff"}', 3101, "Malformed syntax - /body"),  # not UTF-8
        (b"[]", 3101, "Malformed syntax - /body"),
        (b'"transfer"', 3101, "Malformed syntax - /body"),
        (b"null", 3101, "Malformed syntax - /body"),
        (b"42", 3101, "Malformed syntax - /body"),
        (b"{}", 3102, "Missing mandatory element - /body/transferId"),
    ],
)
def test_body_must_be_a_json_object(raw, code, description):
    with pytest.raises(FspiopError) as exc:
        validate(_POST_TRANSFERS, raw)
    _assert_error(exc, code, 400, description)


def test_too_large_body_is_3104():
    with pytest.raises(FspiopError) as exc:
        validate(_POST_TRANSFERS, b" " * (schema.MAX_BODY_BYTES + 1))
    _assert_error(exc, 3104, 400, "Too large payload - /body")


def test_operations_without_a_body():
    assert not schema.has_body(_GET_TRANSFER)
    assert schema.has_body(_PATCH_TRANSFER)
    assert validate(_GET_TRANSFER, b"") == {}
    assert validate(_GET_TRANSFER, b"ignored") == {}


def test_validate_object_checks_parsed_bodies():
    validate_object(_PUT_TRANSFER, FULFIL)
    with pytest.raises(FspiopError) as exc:
        validate_object(_PUT_TRANSFER, {"transferState": "COMMITTED", "completedTimestamp": "yesterday"})
    _assert_error(exc, 3101, 400, "Malformed syntax - /body/completedTimestamp")


_PUT_AUTHORIZATION_BODY = {
    "responseType": "ENTERED",
    "authenticationInfo": {"authentication": "OTP", "authenticationValue": "1234"},
}


@pytest.mark.parametrize(
    ("value", "code", "pointer"),
    [
        ("1234", None, None),  # OtpValue
        ("QR-code-text", None, None),  # QRCODE
        ({"pinValue": "xyz", "counter": "1"}, None, None),  # U2FPinValue (implementation file only)
        ({"pinValue": "xyz"}, 3102, "/body/authenticationInfo/authenticationValue/counter"),
        ({"pinValue": "xyz", "counter": "0"}, 3101, "/body/authenticationInfo/authenticationValue/counter"),
        (1234, 3101, "/body/authenticationInfo/authenticationValue"),  # no branch takes a number
        ("two words", 3101, "/body/authenticationInfo/authenticationValue"),  # the sibling pattern ^\S{1,64}$
        ("x" * 65, 3101, "/body/authenticationInfo/authenticationValue"),
    ],
)
def test_authentication_value_any_of(value, code, pointer):
    body = _with(_PUT_AUTHORIZATION_BODY, "authenticationInfo/authenticationValue", value)
    if code is None:
        assert validate(_PUT_AUTHORIZATION, orjson.dumps(body)) == body
        return
    with pytest.raises(FspiopError) as exc:
        validate(_PUT_AUTHORIZATION, orjson.dumps(body))
    assert (exc.value.code, exc.value.description.rpartition(" - ")[2]) == (code, pointer)


# --------------------------------------------------------------------------------------------------
# ECMA pattern semantics and the compiler's guard rails


def test_ecma_pattern_semantics():
    assert ecma_regex(r"^\d+$").search("123") and not ecma_regex(r"^\d+$").search("١٢٣")  # \d is ASCII
    assert not ecma_regex(r"^[\d]{1,4}$").search("١")
    assert not ecma_regex(r"^\w$").search("é")  # \w is ASCII
    assert ecma_regex(r"^\s$").search("\u00a0") and ecma_regex(r"^\s$").search("\ufeff")  # ECMA whitespace
    assert not ecma_regex(r"^\S$").search("\u2028")
    assert not ecma_regex(r"^a$").search("a\n")  # $ is the end of input
    assert not ecma_regex(r"^.$").search("\u2028") and ecma_regex(r"^.$").search("é")
    assert ecma_regex(r"^[A-Za-z0-9-_]{2}$").search("-_")  # '-' after a range is literal
    assert ecma_regex(r"^[\p{L}]+$").search("Zoë")
    assert ecma_regex(r"b").search("abc")  # searched, not full-matched: anchors are the spec's business
    with pytest.raises(SpecError):
        ecma_regex(r"\bword")


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "integer", "minimum": 1},
        {"type": "string", "patternProperties": {}},
        {"$ref": "other.yaml#/Foo"},
        {"$ref": "#/components/schemas/Nope"},
        {"type": ["string", "null"]},
        {"type": "array", "items": [{"type": "string"}]},
    ],
)
def test_compiler_refuses_what_it_does_not_support(bad):
    with pytest.raises(SpecError):
        schema._Compiler({"components": {"schemas": {}}}).compile(bad, "test")


def test_compiler_handles_recursive_refs_and_scalars():
    document = {
        "components": {
            "schemas": {
                "Node": {
                    "type": "object",
                    "required": ["n"],
                    "properties": {
                        "n": {"type": "integer"},
                        "next": {"$ref": "#/components/schemas/Node"},
                        "ok": {"type": "boolean"},
                        "x": {"type": "number", "enum": [1, 2.5]},
                    },
                    "additionalProperties": False,
                }
            }
        }
    }
    check = schema._Compiler(document).ref("#/components/schemas/Node")
    check({"n": 1, "next": {"n": 2.0, "next": {"n": 3}}, "ok": False, "x": 2.5})
    for bad, code, path in [
        ({"n": True}, 3101, ["n"]),
        ({"n": 1.5}, 3101, ["n"]),
        ({"n": 1, "next": {"n": 2, "next": {}}}, 3102, ["next", "next", "n"]),
        ({"n": 1, "ok": 1}, 3101, ["ok"]),
        ({"n": 1, "x": 3}, 3101, ["x"]),
        ({"n": 1, "x": True}, 3101, ["x"]),
        ({"n": 1, "zzz": 1}, 3103, ["zzz"]),
    ]:
        with pytest.raises(schema._Invalid) as exc:
            check(bad)
        assert (exc.value.code, list(reversed(exc.value.path))) == (code, path)


def test_transfer_validation_cost():
    """Prints the cost of validate() on a typical POST /transfers body (not a timed assertion).

    Measured on the development machine (AMD EPYC, Python 3.11): about 4.6 us per body, of which
    about 0.8 us is orjson parsing.
    """
    raw = orjson.dumps(TRANSFER)
    rounds = 20_000
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(rounds):
            validate(_POST_TRANSFERS, raw)
        best = min(best, (time.perf_counter() - start) / rounds)
    print(f"\nvalidate(POST /transfers, {len(raw)} bytes): {best * 1e6:.1f} us per body")
    assert validate(_POST_TRANSFERS, raw) == TRANSFER


def test_fspiop_datetimes_convert_to_epoch_ms_exactly():
    from api.fspiop.transfers import iso_ms, parse_datetime_ms

    # Through a float this one came out at ...271 ms, so an echoed completedTimestamp changed.
    assert parse_datetime_ms("1987-01-31T20:45:10.272Z") == 539_124_310_272
    assert iso_ms(539_124_310_272) == "1987-01-31T20:45:10.272Z"
    for epoch_ms in range(1_795_000_000_000, 1_795_000_000_000 + 5_000, 7):
        assert parse_datetime_ms(iso_ms(epoch_ms)) == epoch_ms
    assert parse_datetime_ms("2026-11-25T10:00:00.500+02:00") == parse_datetime_ms("2026-11-25T08:00:00.500Z")
    assert parse_datetime_ms("2026-11-25T08:00:00.500") == parse_datetime_ms("2026-11-25T08:00:00.500Z")
    assert parse_datetime_ms("1969-12-31T23:59:59.999Z") == -1


def test_header_bench_reports_both_ways(capsys):
    from loadtests import header_bench

    header_bench.main(["--transfers", "50", "--rounds", "1"])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[1].split(" (")[0].strip() for row in rows] == ["remembered", "never seen"]
    assert all(float(row[2]) > 0 for row in rows)
