#!/usr/bin/env python3
"""Generate ``core/fspiop_errors.py`` from the FSPIOP API Definition v1.1 error-code tables.

The source is the markdown rendering of the API Definition (section 7.6, Tables 110-117).  Only the
code, name, description and per-resource applicability ("X" columns) are extracted; HTTP statuses are
derived the way the Mojaloop reference switch does it (central-services-error-handling).

Usage (from the repository root)::

    .venv/bin/python tools/gen_fspiop_errors.py [SPEC_MD] [--output core/fspiop_errors.py] [--check]

``--check`` regenerates in memory and exits with status 1 if the output file is stale.

The markdown is hand-converted from a Word document and is irregular; the parser copes with:
empty applicability cells written as ``||`` with no spaces, missing spaces next to pipes, trailing
whitespace after the closing pipe, rows without leading/trailing pipes, escaped pipes (``\\|``),
bold/italic/code markup and HTML entities inside cells, header cells with stray spaces
(``/quotes  ``, `` /transfers``) and rows with fewer cells than the header (padded, as GFM does).
Columns are located by their header text, not by position.  Anything it cannot interpret (a code
that is not four digits, an applicability mark other than X, extra non-empty cells, duplicate codes,
a category without its generic ``xx00`` code) is an error, never silently skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SPEC = Path("../shared/spec/docs/API-Definition_v1.1.md")
DEFAULT_OUTPUT = Path("core/fspiop_errors.py")
LINE_LENGTH = 110

# Mojaloop (central-services-error-handling) category -> HTTP status, by leading digit.
CATEGORY_HTTP_STATUS = {1: 503, 2: 500, 3: 400, 4: 400, 5: 400, 6: 400}
# Per-code HTTP status overrides, as in central-services-error-handling ``src/errors.js``.
HTTP_STATUS_OVERRIDES = {2002: 501, 2003: 503, 2006: 503, 3001: 406, 3002: 404}

# Constant names are derived mechanically from the spec name (upper snake case); these few are
# shortened to the names the Mojaloop reference implementation uses.
CONSTANT_NAME_OVERRIDES = {3001: "UNACCEPTABLE_VERSION"}

# Known defects in the v1.1 table text (RULES.md section 17 item 9): (code, field, wrong, right).
# Applied only while the wrong text is still present, so a corrected source passes through unchanged.
ERRATA = [
    (5000, "description", "due to the Payer or Payer FSP", "due to the Payee or Payee FSP"),
]


@dataclass(frozen=True)
class ImplOnlyCode:
    code: int
    const: str
    name: str
    description: str


# Codes used by the Mojaloop reference switch that are not in the v1.1 API Definition (RULES.md section
# 12; central-services-error-handling ``src/errors.js`` / ``src/enums.ts``).  Their applicability is not
# defined by the API, so ``resources`` is empty for them.
IMPL_ONLY_CODES = [
    ImplOnlyCode(
        2006,
        "TEMPORARY_PARTY_RESOLUTION_FAILED",
        "Temporary party resolution failed, try again",
        "Party resolution failed temporarily (Mojaloop account-lookup-service); the request may be retried.",
    ),
    ImplOnlyCode(
        3040,
        "DELETE_PARTY_INFORMATION_ERROR",
        "Delete Party information error",
        "Error occurred while deleting information regarding a Party (Mojaloop account-lookup-service).",
    ),
    ImplOnlyCode(
        5107,
        "PAYEE_IDENTIFIER_NOT_VALID",
        "Payee identifier no-longer valid",
        "The Payee identifier is no longer valid.",
    ),
    ImplOnlyCode(
        6000,
        "GENERIC_SETTLEMENT_ERROR",
        "Generic Settlement Error",
        "Generic settlement-related error (Mojaloop settlement category 60xx).",
    ),
]

APPLICABLE_MARKS = {"x", "✓", "✔", "yes", "y"}


class SpecParseError(ValueError):
    pass


@dataclass(frozen=True)
class ParsedError:
    code: int
    name: str
    description: str
    resources: tuple[str, ...]
    line: int


# ---------------------------------------------------------------------------------------------------
# markdown helpers


_MD_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|<>~])")


def clean_cell(text: str) -> str:
    """Strip inline markdown/HTML from one table cell and normalise whitespace."""
    # Backslash escapes first, parked in private-use characters so they are not read as markup.
    text = _MD_ESCAPE.sub(lambda m: chr(0xE000 + ord(m.group(1))), text)
    text = re.sub(r"<br\s*/?>", " ", text, flags=re.IGNORECASE)
    text = re.sub(r"</?[A-Za-z][^>]*>", "", text)  # other inline HTML tags (<sup>, <span> ...)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # [text](link) -> text
    text = re.sub(r"`([^`]*)`", r"\1", text)
    text = re.sub(r"(\*\*|__)(.+?)\1", r"\2", text)
    text = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"\1", text)
    text = re.sub(r"(?<![\w_])_(?!\s)(.+?)(?<!\s)_(?![\w_])", r"\1", text)
    text = html.unescape(text).replace("\u00a0", " ")
    text = re.sub("[\ue000-\ue07f]", lambda m: chr(ord(m.group(0)) - 0xE000), text)
    return " ".join(text.split())


def split_row(line: str) -> list[str] | None:
    """Split a markdown table row into raw cells; None if the line is not a table row."""
    s = line.strip()
    if "|" not in s:
        return None
    # protect escaped pipes
    s = s.replace("\\|", "\x00")
    if s.startswith("|"):
        s = s[1:]
    if s.endswith("|"):
        s = s[:-1]
    return [c.replace("\x00", "\\|") for c in s.split("|")]


def is_separator_row(cells: list[str]) -> bool:
    return bool(cells) and all(re.fullmatch(r"\s*:?-{1,}:?\s*", c) for c in cells)


def find_section(lines: list[str], number: str) -> tuple[int, int]:
    """Return [start, end) line indexes of the section whose heading starts with ``number``."""
    heading = re.compile(r"^\s*(#{1,6})\s*(?:\*\*)?\s*" + re.escape(number) + r"(?:\s|\*|$)")
    # Some headings in this document are bold paragraphs rather than '#' lines; only '#' are used here.
    for i, line in enumerate(lines):
        m = heading.match(line)
        if m:
            level = len(m.group(1))
            for j in range(i + 1, len(lines)):
                n = re.match(r"^\s*(#{1,6})\s+\S", lines[j])
                if n and len(n.group(1)) <= level:
                    return i, j
            return i, len(lines)
    raise SpecParseError(f"section {number} not found")


# ---------------------------------------------------------------------------------------------------
# parsing


def parse_error_tables(text: str, section: str = "7.6") -> list[ParsedError]:
    lines = text.splitlines()
    start, end = find_section(lines, section)
    out: list[ParsedError] = []
    seen: dict[int, ParsedError] = {}
    i = start
    tables = 0
    while i < end:
        header = split_row(lines[i])
        sep = split_row(lines[i + 1]) if i + 1 < end else None
        if header is None or sep is None or not is_separator_row(sep):
            i += 1
            continue
        cols = [clean_cell(c) for c in header]
        i += 2
        lower = [c.lower() for c in cols]
        if not lower or lower[0] not in ("error code", "code"):
            # some other table inside the section; skip its body
            while i < end and split_row(lines[i]) is not None:
                i += 1
            continue
        tables += 1
        try:
            code_ix = 0
            name_ix = lower.index("name")
            desc_ix = lower.index("description")
        except ValueError as exc:
            raise SpecParseError(f"line {i - 1}: error table header lacks a column: {cols}") from exc
        res_cols = {ix: c.lstrip("/").strip() for ix, c in enumerate(cols) if c.startswith("/")}
        if not res_cols:
            raise SpecParseError(f"line {i - 1}: error table has no resource columns: {cols}")
        while i < end:
            raw = split_row(lines[i])
            if raw is None:
                break
            lineno = i + 1
            i += 1
            cells = [clean_cell(c) for c in raw]
            if len(cells) > len(cols):
                if any(cells[len(cols) :]):
                    raise SpecParseError(f"line {lineno}: {len(cells)} cells for {len(cols)} columns")
                cells = cells[: len(cols)]
            cells += [""] * (len(cols) - len(cells))
            code_text = cells[code_ix]
            if not re.fullmatch(r"[1-9][0-9]{3}", code_text):
                raise SpecParseError(f"line {lineno}: not a four-digit error code: {code_text!r}")
            code = int(code_text)
            resources = []
            for ix, res in res_cols.items():
                mark = cells[ix].strip().lower()
                if not mark:
                    continue
                if mark not in APPLICABLE_MARKS:
                    raise SpecParseError(f"line {lineno}: unexpected applicability mark {cells[ix]!r}")
                resources.append(res)
            name, description = cells[name_ix], cells[desc_ix]
            if not name or not description:
                raise SpecParseError(f"line {lineno}: code {code} has an empty name or description")
            entry = ParsedError(code, name, description, tuple(resources), lineno)
            if code in seen:
                first = seen[code].line
                raise SpecParseError(f"line {lineno}: duplicate code {code} (first at line {first})")
            seen[code] = entry
            out.append(entry)
    if not tables:
        raise SpecParseError(f"no error-code tables found in section {section}")
    return out


def apply_errata(entries: list[ParsedError]) -> list[ParsedError]:
    fixed = []
    for e in entries:
        for code, field, wrong, right in ERRATA:
            if e.code == code and wrong in getattr(e, field):
                e = ParsedError(**{**e.__dict__, field: getattr(e, field).replace(wrong, right)})
        fixed.append(e)
    return fixed


def resource_order(entries: list[ParsedError]) -> tuple[str, ...]:
    order: list[str] = []
    for e in entries:
        for r in e.resources:
            if r not in order:
                order.append(r)
    return tuple(order)


def http_status(code: int) -> int:
    return HTTP_STATUS_OVERRIDES.get(code, CATEGORY_HTTP_STATUS[code // 1000])


def constant_name(code: int, name: str) -> str:
    if code in CONSTANT_NAME_OVERRIDES:
        return CONSTANT_NAME_OVERRIDES[code]
    const = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").upper()
    if not const or const[0].isdigit():
        const = f"ERROR_{const}"
    return const


def validate(entries: list[ParsedError]) -> None:
    codes = {e.code for e in entries}
    for e in entries:
        if e.code // 1000 not in CATEGORY_HTTP_STATUS:
            raise SpecParseError(f"line {e.line}: code {e.code} is outside the known high-level categories")
        category = e.code // 100
        if category * 100 not in codes:
            raise SpecParseError(f"line {e.line}: category {category}xx has no generic {category}00 code")
        if e.code % 100 >= 40:
            raise SpecParseError(f"line {e.line}: code {e.code} lies in the scheme-specific range xx40-xx99")


# ---------------------------------------------------------------------------------------------------
# rendering


def py_str(s: str) -> str:
    """A double-quoted Python string literal (ruff-format style)."""
    r = repr(s)
    if r.startswith("'") and '"' not in s:
        r = '"' + r[1:-1].replace("\\'", "'") + '"'
    return r


def render_field(name: str, value: str, indent: str) -> list[str]:
    return [f"{indent}{name}={value},"]


def render_str_field(name: str, text: str, indent: str) -> list[str]:
    """``name="text",`` on one line, or a parenthesised implicitly-concatenated string if too long."""
    literal = py_str(text)
    line = f"{indent}{name}={literal},"
    if len(line) <= LINE_LENGTH:
        return [line]
    inner = indent + "    "
    if len(inner) + len(literal) <= LINE_LENGTH:
        return [f"{indent}{name}=(", f"{inner}{literal}", f"{indent}),"]
    width = LINE_LENGTH - len(inner)
    chunks: list[str] = []
    cur = ""
    for word in re.findall(r"\S+\s*", text):
        if cur and len(py_str(cur + word)) > width:
            chunks.append(cur)
            cur = word
        else:
            cur += word
    if cur:
        chunks.append(cur)
    return [f"{indent}{name}=("] + [f"{inner}{py_str(c)}" for c in chunks] + [f"{indent}),"]


def render_resources(resources: tuple[str, ...], all_resources: tuple[str, ...], indent: str) -> list[str]:
    if not resources:
        return [f"{indent}resources=frozenset(),"]
    if set(resources) == set(all_resources):
        return [f"{indent}resources=_ALL_RESOURCES,"]
    ordered = [r for r in all_resources if r in resources]
    body = ", ".join(py_str(r) for r in ordered)
    line = f"{indent}resources=frozenset({{{body}}}),"
    if len(line) <= LINE_LENGTH:
        return [line]
    inner = indent + "    "
    return (
        [f"{indent}resources=frozenset(", f"{inner}{{"]
        + [f"{inner}    {py_str(r)}," for r in ordered]
        + [f"{inner}}}", f"{indent}),"]
    )


def render(entries: list[ParsedError], source_label: str, source_sha256: str) -> str:
    all_resources = resource_order(entries)
    rows: list[tuple[int, str, str, str, tuple[str, ...], bool]] = [
        (e.code, constant_name(e.code, e.name), e.name, e.description, e.resources, True) for e in entries
    ]
    spec_codes = {e.code for e in entries}
    for imp in IMPL_ONLY_CODES:
        if imp.code in spec_codes:
            raise SpecParseError(f"implementation-only code {imp.code} now appears in the spec table")
        rows.append((imp.code, imp.const, imp.name, imp.description, (), False))
    rows.sort(key=lambda r: r[0])
    consts = [r[1] for r in rows]
    dupes = {c for c in consts if consts.count(c) > 1}
    if dupes:
        raise SpecParseError(f"constant name collision: {sorted(dupes)}")

    out: list[str] = []
    w = out.append
    w("# GENERATED FILE - DO NOT EDIT BY HAND.")
    w("#")
    w("# Generated by tools/gen_fspiop_errors.py from the error-code tables (section 7.6, Tables 110-117) of")
    w(f"#   {source_label}")
    w(f"#   (sha256 {source_sha256})")
    w("# Regenerate from the repository root with:")
    w("#   .venv/bin/python tools/gen_fspiop_errors.py [path/to/API-Definition_v1.1.md]")
    w('"""FSPIOP v1.1 error codes (API Definition section 7.6) plus Mojaloop implementation-only codes.')
    w("")
    w("``ERRORS`` maps every code to an ``ErrorDef``.  ``resources`` names the API resources (without")
    w("the leading slash) for which the API Definition lists the code as applicable; implementation-only")
    w("codes (``spec=False``) have no applicability defined and an empty set.  ``http_status`` follows the")
    w("Mojaloop reference switch: 1xxx -> 503, 2xxx -> 500, 3xxx-6xxx -> 400, with per-code overrides")
    overrides = ", ".join(f"{c} -> {s}" for c, s in sorted(HTTP_STATUS_OVERRIDES.items()))
    w(f"{overrides}.")
    w('"""')
    w("")
    w("from __future__ import annotations")
    w("")
    w("from dataclasses import dataclass")
    w("")
    w("")
    w("@dataclass(frozen=True, slots=True)")
    w("class ErrorDef:")
    w("    code: int")
    w("    name: str")
    w("    description: str")
    w("    http_status: int")
    w("    resources: frozenset[str]")
    w("    spec: bool = True")
    w("")
    w("")
    w("RESOURCES: tuple[str, ...] = (")
    for r in all_resources:
        w(f"    {py_str(r)},")
    w(")")
    w("_ALL_RESOURCES: frozenset[str] = frozenset(RESOURCES)")
    w("")
    for code, const, *_ in rows:
        w(f"{const} = {code}")
    w("")
    w("ERRORS: dict[int, ErrorDef] = {")
    for code, const, name, description, resources, spec in rows:
        w(f"    {const}: ErrorDef(")
        ind = "        "
        out.extend(render_field("code", str(code), ind))
        out.extend(render_str_field("name", name, ind))
        out.extend(render_str_field("description", description, ind))
        out.extend(render_field("http_status", str(http_status(code)), ind))
        out.extend(render_resources(resources, all_resources, ind))
        if not spec:
            out.extend(render_field("spec", "False", ind))
        w("    ),")
    w("}")
    w("")
    w("__all__ = [")
    for name in ["ERRORS", "RESOURCES", "ErrorDef", *consts]:
        w(f"    {py_str(name)},")
    w("]")
    return "\n".join(out) + "\n"


def source_label_for(spec_path: Path) -> str:
    """Path of the source as written in the header: relative to the repository root when possible."""
    try:
        # abspath, not resolve(): a symlinked shared/ must not change the header.
        return Path(os.path.relpath(os.path.abspath(spec_path), REPO_ROOT)).as_posix()
    except ValueError:  # different drive (Windows)
        return spec_path.as_posix()


def generate(spec_path: Path) -> str:
    data = spec_path.read_bytes()
    entries = apply_errata(parse_error_tables(data.decode("utf-8")))
    validate(entries)
    return render(entries, source_label_for(spec_path), hashlib.sha256(data).hexdigest())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "spec",
        nargs="?",
        type=Path,
        default=None,
        help=f"API Definition markdown (default: {DEFAULT_SPEC}, relative to the repository root)",
    )
    ap.add_argument("--output", "-o", type=Path, default=None, help=f"default: {DEFAULT_OUTPUT}")
    ap.add_argument("--check", action="store_true", help="exit 1 if the output file is not up to date")
    args = ap.parse_args(argv)
    spec_path = args.spec if args.spec is not None else REPO_ROOT / DEFAULT_SPEC
    output = args.output if args.output is not None else REPO_ROOT / DEFAULT_OUTPUT
    try:
        content = generate(spec_path)
    except (OSError, SpecParseError) as exc:
        print(f"gen_fspiop_errors: {exc}", file=sys.stderr)
        return 2
    if args.check:
        current = output.read_text(encoding="utf-8") if output.exists() else None
        if current != content:
            print(f"{output} is out of date; run tools/gen_fspiop_errors.py", file=sys.stderr)
            return 1
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(content, encoding="utf-8")
    print(f"wrote {output} ({content.count('ErrorDef(')} codes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
