"""The pure decisions of the agreement phase (core/agreement.py): tables in the order the checks run."""

from __future__ import annotations

import pytest

from core.agreement import (
    AnswerVerdict,
    QuoteCheckMode,
    QuoteTerms,
    RequestState,
    RequestVerdict,
    StoredRequest,
    TransferTerms,
    check_quote_link,
    on_answer,
    on_request,
)

NOW_MS = 1_700_000_000_000


def stored(state=RequestState.PENDING, *, expires_at_ms=None, answer_hash=None) -> StoredRequest:
    return StoredRequest("q1", "payer", "payee", "h-request", expires_at_ms, state, answer_hash)


@pytest.mark.parametrize(
    ("existing", "request_hash", "verdict"),
    [
        (None, "h-request", RequestVerdict.NEW),
        (stored(), "h-other", RequestVerdict.MODIFIED),
        (stored(RequestState.ANSWERED), "h-other", RequestVerdict.MODIFIED),
        (stored(), "h-request", RequestVerdict.IGNORE),
        (stored(RequestState.ANSWERED), "h-request", RequestVerdict.RESEND),
        (stored(RequestState.REJECTED), "h-request", RequestVerdict.RESEND),
        (stored(RequestState.EXPIRED), "h-request", RequestVerdict.RESEND),
    ],
)
def test_duplicate_requests_follow_rules_section_5(existing, request_hash, verdict):
    assert on_request(existing, request_hash) is verdict


def answer(existing, *, source="payee", destination="payer", answer_hash="h-answer", now_ms=NOW_MS,
           single_answer=True, error=False):
    return on_answer(existing, source=source, destination=destination, answer_hash=answer_hash, now_ms=now_ms,
                     not_found_code=3205, single_answer=single_answer, error=error)


@pytest.mark.parametrize(
    ("existing", "changes", "verdict", "code"),
    [
        # In the order of the checks: existence, sender, destination, duplicate, finality, expiry.
        (None, {}, AnswerVerdict.UNKNOWN, 3205),
        (stored(), {"source": "payer"}, AnswerVerdict.WRONG_SENDER, 3100),
        (stored(), {"destination": "someone"}, AnswerVerdict.WRONG_DESTINATION, 3100),
        (stored(RequestState.ANSWERED, answer_hash="h-answer"), {}, AnswerVerdict.DUPLICATE, 0),
        (stored(RequestState.EXPIRED, answer_hash="h-late"), {}, AnswerVerdict.EXPIRED, 3300),
        (stored(RequestState.ANSWERED, answer_hash="h-first"), {}, AnswerVerdict.MODIFIED, 3106),
        (stored(RequestState.REJECTED, answer_hash="h-first"), {"single_answer": False}, AnswerVerdict.MODIFIED, 3106),
        (stored(expires_at_ms=NOW_MS - 1), {}, AnswerVerdict.EXPIRED, 3300),
        (stored(expires_at_ms=NOW_MS), {}, AnswerVerdict.ACCEPT, 0),
        (stored(), {"destination": None}, AnswerVerdict.ACCEPT, 0),
        (stored(), {"error": True}, AnswerVerdict.ACCEPT, 0),
        # A transaction request's state moves on: RECEIVED, then REJECTED or ACCEPTED.
        (stored(RequestState.ANSWERED, answer_hash="h-first"), {"single_answer": False}, AnswerVerdict.ACCEPT, 0),
    ],
)
def test_answers_are_checked_in_order(existing, changes, verdict, code):
    decision = answer(existing, **changes)
    assert decision.verdict is verdict
    assert decision.code == code
    if code:
        assert decision.description.split(" - ")[0]  # the error's name leads the description


def test_an_expiry_check_never_hides_a_wrong_sender():
    decision = answer(stored(expires_at_ms=NOW_MS - 1), source="intruder")
    assert decision.verdict is AnswerVerdict.WRONG_SENDER


QUOTE = QuoteTerms("q1", "payer", "payee", "XTS", 1_000_000, NOW_MS + 60_000, "packet", "cond")
TRANSFER = TransferTerms("payer", "payee", "XTS", 1_000_000, "packet", "cond")


@pytest.mark.parametrize(
    ("mode", "quote", "transfer", "now_ms", "code"),
    [
        (QuoteCheckMode.OFF, None, TRANSFER, NOW_MS, None),
        (QuoteCheckMode.KNOWN, None, TRANSFER, NOW_MS, 3205),
        (QuoteCheckMode.KNOWN, QUOTE, TransferTerms("payer", "payee", "XTS", 1_000_000, "other", "cond"), NOW_MS,
         3100),
        # known: an expired quote or other terms still pass; valid refuses them.
        (QuoteCheckMode.KNOWN, QUOTE, TRANSFER, NOW_MS + 60_000, None),
        (QuoteCheckMode.VALID, QUOTE, TRANSFER, NOW_MS + 60_000, 3302),
        (QuoteCheckMode.VALID, QUOTE, TransferTerms("payer", "third", "XTS", 1_000_000, "packet", "cond"), NOW_MS,
         3100),
        (QuoteCheckMode.VALID, QUOTE, TransferTerms("payer", "payee", "XTS", 1_000_001, "packet", "cond"), NOW_MS,
         3100),
        (QuoteCheckMode.VALID, QUOTE, TransferTerms("payer", "payee", "USD", 1_000_000, "packet", "cond"), NOW_MS,
         3100),
        (QuoteCheckMode.VALID, QUOTE, TRANSFER, NOW_MS + 59_999, None),
    ],
)
def test_quote_link(mode, quote, transfer, now_ms, code):
    result = check_quote_link(mode, quote, transfer, now_ms)
    assert (result[0] if result else None) == code
