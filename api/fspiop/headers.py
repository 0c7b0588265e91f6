"""FSPIOP request header checks and version negotiation (RULES.md 2.1/2.2, API Definition 3.2-3.3).

``check_headers(route, headers) -> Negotiated`` validates the headers of a request that ``routes``
matched (``headers`` has lower-cased names, as ``api.http.Request`` gives them) and raises
``FspiopError`` on the first failure. Checks run in the Mojaloop reference switch's order
(central-services-shared ``headerValidation`` plugin, then the OpenAPI header parameters):

1. ``Accept`` - required on GET/POST/DELETE (missing 3102); optional on the PUT/PATCH callbacks,
   checked when present. Comma-separated list of
   ``application/vnd.interoperability.{resource}+json[;version=X[.Y]]``; ``version=1`` means any 1.x and
   an item without ``version`` means any version (as Mojaloop accepts). Malformed or naming another
   resource: 3101. No supported version acceptable: 406 / 3001 with the resource's supported versions in
   ``extensionList`` as ``{key: major, value: minor}``.
2. ``Date`` - required (3102), RFC 7231 IMF-fixdate ``Tue, 15 Nov 1994 08:12:31 GMT`` only (3101). The
   weekday is not cross-checked against the date (Mojaloop's parser does not either).
3. ``Content-Type`` - required on POST/PUT/PATCH (3102); on GET/DELETE only checked when present (the
   OpenAPI file declares it required everywhere and Mojaloop enforces that; pass
   ``content_type_required_without_body=True`` for that behaviour). Exactly
   ``application/vnd.interoperability.{resource}+json;version=X.Y`` (major.minor, as the spec and
   Mojaloop require); malformed, missing ``.minor`` or another resource: 3101; unsupported: 406 / 3001.
4. ``FSPIOP-Source`` - required (3102); at most 32 characters (FspId, String(1..32)) else 3101.
5. ``FSPIOP-Destination`` - optional (RULES 17.14: none on ALS-served ``/participants`` requests, none on
   ``GET /parties`` when the payee FSP is unknown); at most 32 characters else 3101.

A header whose value is empty or only whitespace counts as absent. Media type names and parameter names
are compared case-insensitively (RFC 7231 3.1.1.1); whitespace around ``;`` and ``,`` is allowed.
Descriptions name the header in lower case: ``"Missing mandatory element - fspiop-source"``,
``"Malformed syntax - date"``, ``"Unacceptable version requested - accept"``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType

from api.fspiop.routes import Route
from core.errors import FspiopError
from core.fspiop_errors import MALFORMED_SYNTAX, MISSING_MANDATORY_ELEMENT, RESOURCES, UNACCEPTABLE_VERSION

__all__ = [
    "DEFAULT_VERSIONS",
    "HeaderChecker",
    "Negotiated",
    "Version",
    "check_headers",
    "media_type",
    "parse_date",
]

Version = tuple[int, int]  # (major, minor)

_V1_0: Version = (1, 0)
_V1_1: Version = (1, 1)

# Versions the hub speaks per resource, for both Content-Type and Accept. The API Definition v1.1
# (Table 6, RULES 2.2) puts every resource at 1.1 except /authorizations and /transactions, which stayed
# at 1.0: no 1.1 of those two resources exists, so a media type claiming one is not a version this hub
# can honour. That is the default here (a 1.1 for them gets 406/3001 with the supported list, and the
# client retries with 1.0; Mojaloop's SDK sends 1.0 for authorizations). Mojaloop's switch uses one
# global list ["1.0", "1.1"] for every resource; a scheme that wants that passes its own mapping.
# 1.0 stays supported everywhere: v1.1 is backwards compatible with 1.0 (minor versions only add).
DEFAULT_VERSIONS: Mapping[str, tuple[Version, ...]] = MappingProxyType(
    {
        "participants": (_V1_0, _V1_1),
        "parties": (_V1_0, _V1_1),
        "transactionRequests": (_V1_0, _V1_1),
        "quotes": (_V1_0, _V1_1),
        "authorizations": (_V1_0,),
        "transfers": (_V1_0, _V1_1),
        "transactions": (_V1_0,),
        "bulkQuotes": (_V1_0, _V1_1),
        "bulkTransfers": (_V1_0, _V1_1),
    }
)

_METHODS_REQUIRING_ACCEPT = frozenset({"GET", "POST", "DELETE"})
_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
_FSP_ID_MAX_LEN = 32

_OWS = r"[ \t]*"
_PREFIX = r"application/vnd\.interoperability\.([A-Za-z]+)\+json"
_ACCEPT_ITEM_RE = re.compile(rf"{_PREFIX}(?:{_OWS};{_OWS}version=([0-9]+)(?:\.([0-9]+))?)?", re.IGNORECASE)
_CONTENT_TYPE_RE = re.compile(rf"{_PREFIX}{_OWS};{_OWS}version=([0-9]+)\.([0-9]+)", re.IGNORECASE)
_IMF_FIXDATE_RE = re.compile(
    r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), ([0-9]{2}) (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) ([0-9]{4}) "
    r"([0-9]{2}):([0-9]{2}):([0-9]{2}) GMT"
)
_MONTHS = {m: i for i, m in enumerate("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), start=1)}


def media_type(resource: str, version: Version) -> str:
    """The Content-Type for a body of ``resource`` at ``version``: always major.minor."""
    return f"application/vnd.interoperability.{resource}+json;version={version[0]}.{version[1]}"


@dataclass(frozen=True, slots=True)
class Negotiated:
    resource: str
    content: Version | None  # version of the request body (None: a GET/DELETE without Content-Type)
    response: Version  # version for responses and callbacks to this requester
    source: str  # FSPIOP-Source
    destination: str | None  # FSPIOP-Destination, None when absent or empty
    date: datetime  # the Date header, UTC

    @property
    def response_content_type(self) -> str:
        return media_type(self.resource, self.response)


def _missing(header: str) -> FspiopError:
    return FspiopError(MISSING_MANDATORY_ELEMENT, header)


def _malformed(header: str) -> FspiopError:
    return FspiopError(MALFORMED_SYNTAX, header)


def _present(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        return None
    value = value.strip()
    return value or None


@functools.lru_cache(maxsize=256)
def parse_date(value: str) -> datetime:
    """An IMF-fixdate (RFC 7231 7.1.1.1) as an aware UTC datetime; ValueError if it is not one.

    Cached: DFSPs stamp every request of the same second with the same Date, so a busy hub parses each
    value once rather than on every request (an invalid one raises and is not cached)."""
    m = _IMF_FIXDATE_RE.fullmatch(value)
    if m is None:
        raise ValueError(f"not an IMF-fixdate: {value!r}")
    day, month, year, hour, minute, second = m.groups()
    return datetime(int(year), _MONTHS[month], int(day), int(hour), int(minute), int(second), tzinfo=UTC)


_PARSED_HEADERS_MAX = 256


def _remember(cache: dict, key, value):
    if len(cache) >= _PARSED_HEADERS_MAX:
        cache.clear()  # only a client sending ever-new values gets here; it just parses every time
    cache[key] = value
    return value


class HeaderChecker:
    """Header validation with a per-resource supported-version table (see ``DEFAULT_VERSIONS``)."""

    def __init__(
        self,
        versions: Mapping[str, Iterable[Version]] = DEFAULT_VERSIONS,
        *,
        content_type_required_without_body: bool = False,
    ) -> None:
        missing = set(RESOURCES) - set(versions)
        if missing:
            raise ValueError(f"no supported versions for resources {sorted(missing)}")
        self._supported: dict[str, tuple[Version, ...]] = {}
        self._extensions: dict[str, list[tuple[str, str]]] = {}
        for resource, listed in versions.items():
            ordered = tuple(sorted(set(listed)))
            if not ordered or any(len(v) != 2 or min(v) < 0 for v in ordered):
                raise ValueError(f"bad version list for {resource}: {listed!r}")
            self._supported[resource] = ordered
            self._extensions[resource] = [(str(major), str(minor)) for major, minor in ordered]
        self._content_type_required_without_body = content_type_required_without_body
        # (resource, header value) -> negotiated version. A DFSP sends the same few Accept and Content-Type
        # values on every request, so each is parsed once; bounded, and only successes are kept.
        self._accepted: dict[tuple[str, str], Version] = {}
        self._contents: dict[tuple[str, str], Version] = {}

    def cache_clear(self) -> None:
        """Forget the remembered Accept and Content-Type values (as ``parse_date.cache_clear()`` for Dates)."""
        self._accepted.clear()
        self._contents.clear()

    def supported(self, resource: str) -> tuple[Version, ...]:
        return self._supported[resource]

    def _unsupported(self, resource: str, header: str) -> FspiopError:
        return FspiopError(UNACCEPTABLE_VERSION, header, self._extensions[resource])

    def _negotiate_accept(self, resource: str, value: str) -> Version:
        wanted: list[tuple[int | None, int | None]] = []
        for item in value.split(","):
            m = _ACCEPT_ITEM_RE.fullmatch(item.strip())
            if m is None or m[1].lower() != resource.lower():
                raise _malformed("accept")
            major, minor = m[2], m[3]
            wanted.append((None if major is None else int(major), None if minor is None else int(minor)))
        for version in reversed(self._supported[resource]):  # highest first
            for major, minor in wanted:
                if (major is None or major == version[0]) and (minor is None or minor == version[1]):
                    return version
        raise self._unsupported(resource, "accept")

    def _content_version(self, resource: str, value: str) -> Version:
        m = _CONTENT_TYPE_RE.fullmatch(value)
        if m is None or m[1].lower() != resource.lower():
            raise _malformed("content-type")
        version = (int(m[2]), int(m[3]))
        if version not in self._supported[resource]:
            raise self._unsupported(resource, "content-type")
        return version

    def check(self, route: Route, headers: Mapping[str, str]) -> Negotiated:
        """Validate the headers of a matched request; raises ``FspiopError`` (see the module doc)."""
        resource = route.resource
        method = route.method

        accept = _present(headers, "accept")
        response: Version | None = None
        if accept is not None:
            response = self._accepted.get((resource, accept))
            if response is None:
                response = _remember(self._accepted, (resource, accept), self._negotiate_accept(resource, accept))
        elif method in _METHODS_REQUIRING_ACCEPT:
            raise _missing("accept")

        date_text = _present(headers, "date")
        if date_text is None:
            raise _missing("date")
        try:
            date = parse_date(date_text)
        except ValueError:
            raise _malformed("date") from None

        content_type = _present(headers, "content-type")
        content: Version | None = None
        if content_type is not None:
            content = self._contents.get((resource, content_type))
            if content is None:
                content = _remember(self._contents, (resource, content_type),
                                    self._content_version(resource, content_type))
        elif method in _METHODS_WITH_BODY or self._content_type_required_without_body:
            raise _missing("content-type")

        source = _present(headers, "fspiop-source")
        if source is None:
            raise _missing("fspiop-source")
        if len(source) > _FSP_ID_MAX_LEN:
            raise _malformed("fspiop-source")
        destination = _present(headers, "fspiop-destination")
        if destination is not None and len(destination) > _FSP_ID_MAX_LEN:
            raise _malformed("fspiop-destination")

        if response is None:
            # A callback without Accept is answered in the version it was sent in. (A GET/DELETE can only
            # get here with an Accept, so content is set whenever response is still None.)
            response = content if content is not None else self._supported[resource][-1]
        return Negotiated(resource, content, response, source, destination, date)


_DEFAULT_CHECKER = HeaderChecker()


def check_headers(route: Route, headers: Mapping[str, str], checker: HeaderChecker | None = None) -> Negotiated:
    """``HeaderChecker.check`` with the default version table unless ``checker`` is given."""
    return (checker or _DEFAULT_CHECKER).check(route, headers)
