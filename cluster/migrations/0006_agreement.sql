-- The agreement phase (docs/AGREEMENT.md): quotes and transaction requests the hub forwarded, so that
-- duplicates are recognised (RULES.md 5) and a transfer can be linked to the quote it pays.

-- One row per forwarded POST /quotes or POST /transactionRequests, written before it is forwarded.
CREATE TABLE agreement_request (
    resource         text    NOT NULL CHECK (resource IN ('quotes', 'transactionRequests')),
    request_id       text    NOT NULL,
    sender           text    NOT NULL,  -- FSPIOP-Source of the POST: where answers go
    receiver         text    NOT NULL,  -- the DFSP it was forwarded to: who may answer
    request_hash     text    NOT NULL,  -- SHA-256 of the canonical body, for duplicate checks
    expires_at_ms    bigint,            -- the request's own expiration, when it has one
    transaction_id   text,              -- quotes: the POST's transactionId (and transactionRequestId)
    transaction_request_id text,
    state            text    NOT NULL CHECK (state IN ('PENDING', 'ANSWERED', 'REJECTED', 'EXPIRED')),
    -- The last answer, as forwarded (headers and raw body, so a resend still verifies), and its hash.
    answer_hash      text,
    answer_error     boolean NOT NULL DEFAULT false,  -- the answer was a PUT .../error
    answer_headers   jsonb,
    answer_body      bytea,
    version          text    NOT NULL,  -- resource version of the POST, for hub-originated errors
    created_at_ms    bigint  NOT NULL,
    answered_at_ms   bigint,
    PRIMARY KEY (resource, request_id)
);

-- The terms a payee fixed in PUT /quotes/{ID}, for the transfer-to-quote check
-- (RAYLOOP_TRANSFER_QUOTE_CHECK). Written in the same transaction that marks the quote ANSWERED.
CREATE TABLE quote_terms (
    quote_id                text          PRIMARY KEY,
    transaction_id          text          NOT NULL,
    transaction_request_id  text,
    payer                   text          NOT NULL,
    payee                   text          NOT NULL,
    currency                char(3)       NOT NULL,
    transfer_amount         numeric(40,4) NOT NULL CHECK (transfer_amount >= 0),
    payee_receive_amount    numeric(40,4),
    expires_at_ms           bigint        NOT NULL,
    ilp_packet              text          NOT NULL,
    condition               text          NOT NULL,
    created_at_ms           bigint        NOT NULL
);
-- A prepare names its quote only through the condition (and the ILP packet): look it up by that.
CREATE INDEX quote_terms_condition ON quote_terms (condition);
