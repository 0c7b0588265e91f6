"""FSPIOP error objects and error bodies (hand-written; the code table lives in ``core.fspiop_errors``).

Wire format (API Definition section 7.4.2 ErrorInformation)::

    {"errorInformation": {"errorCode": "3100",
                          "errorDescription": "Generic validation error - <detail>",
                          "extensionList": {"extension": [{"key": "...", "value": "..."}]}}}

``errorDescription`` follows the Mojaloop reference switch: the error's name from the table, suffixed
with `` - <detail>`` when a detail is given.  It is cut to 128 characters (ErrorDescription is
String(1..128)); extension keys/values are cut to 32/128 characters and at most 16 extensions are sent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from core.fspiop_errors import ERRORS, ErrorDef

__all__ = [
    "ERRORS",
    "ErrorDef",
    "FspiopError",
    "KNOWN_CATEGORIES",
    "error_body",
    "error_def",
    "is_scheme_specific",
    "normalise_error_code",
]

MAX_DESCRIPTION_LEN = 128
MAX_EXTENSION_KEY_LEN = 32
MAX_EXTENSION_VALUE_LEN = 128
MAX_EXTENSIONS = 16

# High+low level categories (the "CL" of CLxx) that have a generic CL00 code in the table:
# 10, 20, 30-33, 40-44, 50-54 from the spec and 60 (Mojaloop settlement errors).
KNOWN_CATEGORIES: frozenset[int] = frozenset(code // 100 for code in ERRORS if code % 100 == 0)

# ErrorCode pattern from the spec: ^[1-9]\d{3}$ (ASCII digits only).
_ERROR_CODE_RE = re.compile(r"[1-9][0-9]{3}")

Extension = tuple[str, str]


def is_scheme_specific(code: int) -> bool:
    """True for an xx40-xx99 code of a known category that is not itself in the table."""
    return code not in ERRORS and code % 100 >= 40 and code // 100 in KNOWN_CATEGORIES


def normalise_error_code(code_text: str) -> int | None:
    """Validate an errorCode received from a DFSP.

    Returns the code as an int when it is a known code (spec or Mojaloop implementation-only) or a
    scheme-specific code (xx40-xx99) of a known category; those are passed on unchanged, and a receiver
    that does not know a scheme-specific code treats it as the category's generic xx00 (API Definition
    section 7.6).  Anything else (malformed text, unknown category, undefined code in the API-reserved
    xx01-xx39 range) returns None; the caller then answers 3100 Generic validation error.
    """
    if not isinstance(code_text, str) or not _ERROR_CODE_RE.fullmatch(code_text):
        return None
    code = int(code_text)
    if code in ERRORS or is_scheme_specific(code):
        return code
    return None


def error_def(code: int) -> ErrorDef:
    """Table entry for ``code``; a scheme-specific code gets its category's generic definition.

    Raises ValueError for codes that are neither known nor valid scheme-specific codes.
    """
    if isinstance(code, bool) or not isinstance(code, int):
        raise TypeError(f"FSPIOP error code must be an int, not {type(code).__name__}")
    known = ERRORS.get(code)
    if known is not None:
        return known
    if is_scheme_specific(code):
        generic = ERRORS[(code // 100) * 100]
        return ErrorDef(
            code=code,
            name=generic.name,
            description=generic.description,
            http_status=generic.http_status,
            resources=generic.resources,
            spec=False,
        )
    raise ValueError(f"unknown FSPIOP error code {code}")


def _normalise_extensions(extensions: Iterable[Any] | Mapping[str, Any] | None) -> list[Extension]:
    """Accept (key, value) pairs, {"key":..., "value":...} dicts, a key->value mapping or an
    ``{"extension": [...]}`` ExtensionList."""
    if not extensions:
        return []
    if isinstance(extensions, Mapping):
        if "extension" in extensions and isinstance(extensions["extension"], list):
            extensions = extensions["extension"]
        else:
            extensions = extensions.items()
    out: list[Extension] = []
    for item in extensions:
        if isinstance(item, Mapping):
            key, value = item["key"], item["value"]
        else:
            key, value = item
        out.append((str(key), str(value)))
    return out


class FspiopError(Exception):
    """An FSPIOP error to be sent as a synchronous error response or an error callback.

    ``FspiopError(3100, "amount: too many decimals")`` -> errorDescription
    ``"Generic validation error - amount: too many decimals"``.  ``description=`` sets the
    errorDescription verbatim (e.g. when forwarding a DFSP's error unchanged); ``http_status=``
    overrides the table's status (e.g. 405 for a 3000 "method not allowed").
    """

    code: int
    detail: str | None
    description: str
    extensions: list[Extension]
    http_status: int
    definition: ErrorDef

    def __init__(
        self,
        code: int,
        detail: str | None = None,
        extensions: Iterable[Any] | Mapping[str, Any] | None = (),
        *,
        description: str | None = None,
        http_status: int | None = None,
    ) -> None:
        self.definition = error_def(code)
        self.code = code
        self.detail = detail or None
        if description is None or not description.strip():
            description = self.definition.name
            if self.detail:
                description = f"{description} - {self.detail}"
        self.description = description
        self.extensions = _normalise_extensions(extensions)
        self.http_status = http_status if http_status is not None else self.definition.http_status
        super().__init__(f"{code} {description}")

    @property
    def name(self) -> str:
        return self.definition.name

    def to_body(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "errorCode": str(self.code),
            "errorDescription": self.description[:MAX_DESCRIPTION_LEN],
        }
        if self.extensions:
            info["extensionList"] = {
                "extension": [
                    {"key": key[:MAX_EXTENSION_KEY_LEN], "value": value[:MAX_EXTENSION_VALUE_LEN]}
                    for key, value in self.extensions[:MAX_EXTENSIONS]
                ]
            }
        return {"errorInformation": info}

    def __repr__(self) -> str:
        return f"FspiopError({self.code}, {self.description!r})"


def error_body(
    code: int,
    detail: str | None = None,
    extensions: Iterable[Any] | Mapping[str, Any] | None = (),
) -> dict[str, Any]:
    """Shortcut for ``FspiopError(code, detail, extensions).to_body()``."""
    return FspiopError(code, detail, extensions).to_body()
