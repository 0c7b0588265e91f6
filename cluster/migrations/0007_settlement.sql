-- Settlement windows, settlements and interchange fees (RULES.md section 15; docs/SETTLEMENT.md).
-- Nothing here holds money: balances stay in `account`, changed only by the position shards. These rows
-- say which committed transfers belong to which window, what each settlement owes, and how far it got.

CREATE TABLE settlement_window (
    settlement_window_id  serial PRIMARY KEY,
    state                 text        NOT NULL CHECK (state IN
                              ('OPEN', 'PROCESSING', 'CLOSED', 'PENDING_SETTLEMENT', 'SETTLED', 'ABORTED', 'FAILED')),
    reason                text,
    created_at            timestamptz NOT NULL DEFAULT now(),
    changed_at            timestamptz NOT NULL DEFAULT now()
);
-- Exactly one OPEN window at any time (closing one and opening the next is one transaction).
CREATE UNIQUE INDEX settlement_window_one_open ON settlement_window ((true)) WHERE state = 'OPEN';
INSERT INTO settlement_window (state, reason) VALUES ('OPEN', 'first window');

-- Membership by journal sequence: window W holds the transfers whose COMMIT row on shard S has
-- from_seq < seq <= to_seq. to_seq is the shard's durable sequence when W was closed, so the rows are
-- already in Postgres and a transfer committed later lands in the next window. Nothing is written per
-- transfer.
CREATE TABLE settlement_window_boundary (
    settlement_window_id  integer NOT NULL REFERENCES settlement_window (settlement_window_id),
    shard_id              integer NOT NULL,
    from_seq              bigint  NOT NULL,
    to_seq                bigint  NOT NULL CHECK (to_seq >= from_seq),
    PRIMARY KEY (settlement_window_id, shard_id)
);

-- One row per window, currency and ledger account type, with the model that settles it.
CREATE TABLE settlement_window_content (
    content_id            serial PRIMARY KEY,
    settlement_window_id  integer     NOT NULL REFERENCES settlement_window (settlement_window_id),
    currency              char(3)     NOT NULL,
    ledger_account_type   text        NOT NULL REFERENCES ledger_account_type (name),
    settlement_model_id   integer     REFERENCES settlement_model (settlement_model_id),
    state                 text        NOT NULL CHECK (state IN
                              ('CLOSED', 'PENDING_SETTLEMENT', 'SETTLED', 'ABORTED', 'FAILED')),
    settlement_id         integer,
    created_at            timestamptz NOT NULL DEFAULT now(),
    changed_at            timestamptz NOT NULL DEFAULT now(),
    UNIQUE (settlement_window_id, currency, ledger_account_type)
);

-- Per content and participant account: what it sent and received, and its multilateral net
-- (above zero: it owes). The nets of one content row sum to zero.
CREATE TABLE settlement_content_account (
    content_id      integer       NOT NULL REFERENCES settlement_window_content (content_id),
    participant_id  integer       NOT NULL REFERENCES participant (participant_id),
    account_id      integer       NOT NULL REFERENCES account (account_id),
    sent            numeric(40,4) NOT NULL,
    received        numeric(40,4) NOT NULL,
    sent_count      integer       NOT NULL,
    received_count  integer       NOT NULL,
    net             numeric(40,4) NOT NULL,
    PRIMARY KEY (content_id, account_id)
);

-- Per content and pair of participants (a < b by name): what a owes b net (below zero: b owes a).
CREATE TABLE settlement_content_bilateral (
    content_id  integer       NOT NULL REFERENCES settlement_window_content (content_id),
    party_a     text          NOT NULL,
    party_b     text          NOT NULL,
    net         numeric(40,4) NOT NULL,
    PRIMARY KEY (content_id, party_a, party_b)
);

CREATE TABLE settlement (
    settlement_id        serial PRIMARY KEY,
    settlement_model_id  integer     NOT NULL REFERENCES settlement_model (settlement_model_id),
    state                text        NOT NULL CHECK (state IN ('PENDING_SETTLEMENT', 'PS_TRANSFERS_RECORDED',
                             'PS_TRANSFERS_RESERVED', 'PS_TRANSFERS_COMMITTED', 'SETTLING', 'SETTLED', 'ABORTED')),
    reason               text        NOT NULL DEFAULT '',
    created_at           timestamptz NOT NULL DEFAULT now(),
    changed_at           timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE settlement_window_content
    ADD CONSTRAINT settlement_window_content_settlement FOREIGN KEY (settlement_id) REFERENCES settlement (settlement_id);

-- Which window content each settlement settled (content keeps only its latest settlement).
CREATE TABLE settlement_content_link (
    settlement_id  integer NOT NULL REFERENCES settlement (settlement_id),
    content_id     integer NOT NULL REFERENCES settlement_window_content (content_id),
    PRIMARY KEY (settlement_id, content_id)
);

CREATE TABLE settlement_settlement_window (
    settlement_id         integer NOT NULL REFERENCES settlement (settlement_id),
    settlement_window_id  integer NOT NULL REFERENCES settlement_window (settlement_window_id),
    PRIMARY KEY (settlement_id, settlement_window_id)
);

-- Per settlement and participant account: the net to settle and the account's acknowledgement state.
CREATE TABLE settlement_participant_account (
    settlement_id       integer       NOT NULL REFERENCES settlement (settlement_id),
    participant_id      integer       NOT NULL REFERENCES participant (participant_id),
    account_id          integer       NOT NULL REFERENCES account (account_id),
    currency            char(3)       NOT NULL,
    net                 numeric(40,4) NOT NULL,
    state               text          NOT NULL,
    reason              text          NOT NULL DEFAULT '',
    external_reference  text          NOT NULL DEFAULT '',
    changed_at          timestamptz   NOT NULL DEFAULT now(),
    PRIMARY KEY (settlement_id, account_id)
);

-- Every state an account or a settlement passed through, for audit.
CREATE TABLE settlement_state_change (
    settlement_state_change_id  bigserial PRIMARY KEY,
    settlement_id               integer     NOT NULL REFERENCES settlement (settlement_id),
    account_id                  integer,
    state                       text        NOT NULL,
    reason                      text        NOT NULL DEFAULT '',
    created_at                  timestamptz NOT NULL DEFAULT now()
);

-- Interchange fee per currency: basis points of each committed transfer, and which side pays.
CREATE TABLE interchange_fee_rule (
    currency      char(3)     PRIMARY KEY CHECK (currency ~ '^[A-Z]{3}$'),
    basis_points  integer     NOT NULL CHECK (basis_points BETWEEN 0 AND 10000),
    paid_by       text        NOT NULL CHECK (paid_by IN ('PAYER', 'PAYEE')),
    changed_at    timestamptz NOT NULL DEFAULT now()
);

-- The fee each committed transfer carried, written once its ledger move is durable.
CREATE TABLE transfer_fee (
    transfer_id  text PRIMARY KEY,
    currency     char(3)       NOT NULL,
    debtor       text          NOT NULL,
    creditor     text          NOT NULL,
    fee          numeric(40,4) NOT NULL CHECK (fee > 0)
);

-- How far the post-commit processor (continuous gross settlement, interchange fees) has read each
-- shard's journal. A window's content is aggregated only once every cursor passed its boundary.
CREATE TABLE settlement_cursor (
    shard_id  integer PRIMARY KEY,
    seq       bigint  NOT NULL DEFAULT 0
);
-- On a database that already has a journal, the processor starts at the present: configuring continuous
-- gross settlement or a fee later never reaches back to transfers committed before this migration.
INSERT INTO settlement_cursor (shard_id, seq) SELECT shard_id, last_durable_seq FROM shard;
