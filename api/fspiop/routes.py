"""Route matching for the FSPIOP v1.1 API, built from the shipped OpenAPI document.

The route table is the ``paths`` section of ``api/spec/fspiop-v1.1-openapi3-implementation.yaml``
(30 paths, 46 operations), read once at import. ``match(method, path)`` answers:

- a ``Route`` (resource, spec template, method, path parameters, operationId);
- ``MethodNotAllowed`` when the path is an FSPIOP path but the spec has no such method on it
  (Mojaloop answers 405 with errorCode 3000 "Generic client error - Method Not Allowed - ...");
- ``None`` for an unknown path (404 with errorCode 3002 "Unknown URI").

``resolve(method, path)`` does the same but raises those errors as ``FspiopError``.

Matching is by segment count and literals: ``PUT /participants/{ID}`` (bulk, 2 segments) and
``PUT /participants/{Type}/{ID}`` (3 segments) never compete. Where two templates of the same length
both fit, the one with a literal in the leftmost differing position wins, so
``/participants/{ID}/error`` beats ``/participants/{Type}/{ID}`` and ``/parties/{Type}/{ID}/error`` beats
``/parties/{Type}/{ID}/{SubId}`` (a SubId or ID literally named "error" cannot be addressed; the spec
has that ambiguity). If the most specific template lacks the method, a less specific one that has it
is used (``GET /participants/MSISDN/error`` is a lookup of ID "error"). Path parameters are non-empty
and, the path being split on ``/`` after percent-decoding, never contain ``/`` [AD 5.2.1]. The query
string is not part of ``path``. Methods are matched case-sensitively (``GET``, not ``get``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.errors import FspiopError
from core.fspiop_errors import GENERIC_CLIENT_ERROR, UNKNOWN_URI

__all__ = [
    "SPEC_FILE",
    "MethodNotAllowed",
    "Route",
    "load_spec",
    "match",
    "operations",
    "resolve",
]

SPEC_FILE = Path(__file__).resolve().parent.parent / "spec" / "fspiop-v1.1-openapi3-implementation.yaml"

_HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


@functools.cache
def load_spec() -> Mapping[str, Any]:
    """The parsed OpenAPI document (parsed once, ~20 ms with libyaml; callers must not mutate it)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with SPEC_FILE.open("rb") as f:
        return yaml.load(f, Loader=loader)


@dataclass(frozen=True, slots=True)
class Route:
    resource: str  # media-type resource name: "transfers", "bulkQuotes", ...
    template: str  # the spec's path, e.g. "/transfers/{ID}/error"
    method: str  # "GET", "PUT", ...
    params: dict[str, str]  # path parameters by the spec's names: "Type", "ID", "SubId"
    operation_id: str  # the spec's operationId, e.g. "TransfersByIDAndErrorPut"


@dataclass(frozen=True, slots=True)
class MethodNotAllowed:
    method: str
    path: str
    template: str  # the most specific template the path matched
    allowed: tuple[str, ...]  # methods the spec has on the templates the path matched, sorted

    def error(self) -> FspiopError:
        return FspiopError(GENERIC_CLIENT_ERROR, f"Method Not Allowed - {self.method} {self.path}", http_status=405)


@dataclass(frozen=True, slots=True)
class _Template:
    template: str
    resource: str
    segments: tuple[str | None, ...]  # literal, or None for a parameter (segment 0 is always a literal)
    names: tuple[str, ...]  # parameter names, in order
    operations: Mapping[str, str]  # "GET" -> operationId

    def bind(self, parts: list[str]) -> dict[str, str] | None:
        values = []
        for part, literal in zip(parts, self.segments, strict=True):
            if literal is None:
                if not part:
                    return None
                values.append(part)
            elif part != literal:
                return None
        return dict(zip(self.names, values, strict=True))


def _build_index() -> dict[tuple[str, int], tuple[_Template, ...]]:
    index: dict[tuple[str, int], list[_Template]] = {}
    for template, item in load_spec()["paths"].items():
        segments: list[str | None] = []
        names: list[str] = []
        for seg in template.strip("/").split("/"):
            if seg.startswith("{") and seg.endswith("}"):
                segments.append(None)
                names.append(seg[1:-1])
            else:
                segments.append(seg)
        if segments[0] is None:
            raise ValueError(f"spec path {template!r} starts with a parameter")
        operations = {m.upper(): op["operationId"] for m, op in item.items() if m in _HTTP_METHODS}
        entry = _Template(template, segments[0], tuple(segments), tuple(names), operations)
        index.setdefault((segments[0], len(segments)), []).append(entry)
    # Most specific first: a literal beats a parameter at the leftmost position where they differ.
    return {
        key: tuple(sorted(entries, key=lambda t: tuple(seg is None for seg in t.segments)))
        for key, entries in index.items()
    }


_INDEX = _build_index()
# The resources (first path segments) the spec defines: a bounded set, e.g. for metric labels.
RESOURCES = frozenset(resource for resource, _ in _INDEX)


def operations() -> list[tuple[str, str, str]]:
    """Every (METHOD, template, operationId) of the spec, for tests and docs."""
    return sorted((method, t.template, op) for ts in _INDEX.values() for t in ts for method, op in t.operations.items())


def match(method: str, path: str) -> Route | MethodNotAllowed | None:
    """Match a percent-decoded path (no query string) against the spec's paths; see the module doc."""
    if not path.startswith("/"):
        return None
    parts = path[1:].split("/")
    candidates = _INDEX.get((parts[0], len(parts)))
    if candidates is None:
        return None
    first: _Template | None = None
    allowed: set[str] = set()
    for t in candidates:
        params = t.bind(parts)
        if params is None:
            continue
        op = t.operations.get(method)
        if op is not None:
            return Route(t.resource, t.template, method, params, op)
        if first is None:
            first = t
        allowed.update(t.operations)
    if first is None:
        return None
    return MethodNotAllowed(method, path, first.template, tuple(sorted(allowed)))


def resolve(method: str, path: str) -> Route:
    """``match``, raising 3002/404 for an unknown path and 3000/405 for a method the path lacks."""
    found = match(method, path)
    if isinstance(found, Route):
        return found
    if found is None:
        raise FspiopError(UNKNOWN_URI, path)
    raise found.error()
