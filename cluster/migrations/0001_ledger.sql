-- rayloop ledger schema, version 1.
-- Amounts are NUMERIC(40,4) of major units: exact, and readable by an operator in psql.
-- The position actors own every column that changes with money (account.value, reserved_value,
-- net_debit_cap, is_active; participant.is_active; journal; open_reservation; pending_credit) and
-- write them behind in batches, one transaction per batch. The admin layer owns creation rows.

CREATE TABLE shard (
    shard_id          integer PRIMARY KEY,
    last_durable_seq  bigint      NOT NULL DEFAULT 0,
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE participant (
    participant_id  serial PRIMARY KEY,
    name            text        NOT NULL UNIQUE,
    is_active       boolean     NOT NULL DEFAULT true,
    is_hub          boolean     NOT NULL DEFAULT false,
    is_proxy        boolean     NOT NULL DEFAULT false,
    shard_id        integer     NOT NULL REFERENCES shard (shard_id),
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ledger_account_type (
    name           text PRIMARY KEY,
    description    text        NOT NULL DEFAULT '',
    is_active      boolean     NOT NULL DEFAULT true,
    is_settleable  boolean     NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL DEFAULT now()
);

INSERT INTO ledger_account_type (name, description, is_settleable) VALUES
    ('POSITION', 'Typical accounts from which a DFSP provisions transfers', true),
    ('SETTLEMENT', 'Reflects the individual DFSP Settlement Accounts, as held at the Settlement Bank', false),
    ('HUB_RECONCILIATION', 'A single account for each currency with which the hub operates', false),
    ('HUB_MULTILATERAL_SETTLEMENT', 'Multilateral net settlement account for each currency', false),
    ('HUB_FEE', 'Hub fees', false),
    ('INTERCHANGE_FEE', 'Interchange fees between DFSPs', true),
    ('INTERCHANGE_FEE_SETTLEMENT', 'Settlement account for interchange fees', false);

CREATE TABLE account (
    account_id           serial PRIMARY KEY,
    participant_id       integer       NOT NULL REFERENCES participant (participant_id),
    currency             char(3)       NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    ledger_account_type  text          NOT NULL REFERENCES ledger_account_type (name),
    is_active            boolean       NOT NULL DEFAULT false,
    value                numeric(40,4) NOT NULL DEFAULT 0,
    reserved_value       numeric(40,4) NOT NULL DEFAULT 0 CHECK (reserved_value >= 0),
    net_debit_cap        numeric(40,4) CHECK (net_debit_cap >= 0),
    alarm_percentage     numeric(6,2),
    last_seq             bigint        NOT NULL DEFAULT 0,
    created_at           timestamptz   NOT NULL DEFAULT now(),
    changed_at           timestamptz   NOT NULL DEFAULT now(),
    UNIQUE (participant_id, currency, ledger_account_type),
    -- A deposited settlement balance is negative (a hub liability); it can never be positive.
    CHECK (ledger_account_type <> 'SETTLEMENT' OR value <= 0)
);

-- Append-only history of every change each shard made, in sequence order.
CREATE TABLE journal (
    shard_id     integer       NOT NULL,
    seq          bigint        NOT NULL,
    kind         smallint      NOT NULL,
    transfer_id  text,
    account_id   integer,
    amount       numeric(40,4) NOT NULL,
    reason       text          NOT NULL DEFAULT '',
    at_ms        bigint        NOT NULL,
    PRIMARY KEY (shard_id, seq)
);
-- Credits (kind 5) are looked up by transfer id when checking that nothing is in flight twice.
CREATE INDEX journal_credit_transfer ON journal (transfer_id) WHERE kind = 5;

CREATE TABLE open_reservation (
    transfer_id        text PRIMARY KEY,
    shard_id           integer       NOT NULL,
    debit_account_id   integer       NOT NULL REFERENCES account (account_id),
    credit_account_id  integer       NOT NULL REFERENCES account (account_id),
    amount             numeric(40,4) NOT NULL CHECK (amount > 0),
    expires_at_ms      bigint,
    reserved_seq       bigint        NOT NULL
);
CREATE INDEX open_reservation_shard ON open_reservation (shard_id);

-- Credit legs of committed transfers owed by one shard to an account of another (the outbox).
CREATE TABLE pending_credit (
    transfer_id        text PRIMARY KEY,
    shard_id           integer       NOT NULL,
    credit_account_id  integer       NOT NULL REFERENCES account (account_id),
    amount             numeric(40,4) NOT NULL CHECK (amount > 0),
    currency           char(3)       NOT NULL
);
CREATE INDEX pending_credit_shard ON pending_credit (shard_id);

CREATE TABLE participant_endpoint (
    participant_id  integer     NOT NULL REFERENCES participant (participant_id),
    endpoint_type   text        NOT NULL,
    value           text        NOT NULL,
    changed_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (participant_id, endpoint_type)
);

-- Funds in and out recorded through the admin API (their ledger effect is in the journal).
CREATE TABLE funds_transfer (
    transfer_id         text PRIMARY KEY,
    participant_id      integer       NOT NULL REFERENCES participant (participant_id),
    account_id          integer       NOT NULL REFERENCES account (account_id),
    action              text          NOT NULL,
    amount              numeric(40,4) NOT NULL,
    currency            char(3)       NOT NULL,
    external_reference  text          NOT NULL DEFAULT '',
    reason              text          NOT NULL DEFAULT '',
    state               text          NOT NULL,
    created_at          timestamptz   NOT NULL DEFAULT now(),
    changed_at          timestamptz   NOT NULL DEFAULT now()
);

-- Per currency: account values minus what is legitimately in flight. Always zero when the money
-- is conserved, at any committed snapshot (each shard's flush is one transaction).
CREATE VIEW currency_conservation AS
WITH
    balances AS (
        SELECT currency, sum(value) AS total FROM account GROUP BY currency
    ),
    reserved AS (
        SELECT a.currency, sum(r.amount) AS total
        FROM open_reservation r JOIN account a ON a.account_id = r.debit_account_id
        GROUP BY a.currency
    ),
    in_flight AS (
        SELECT c.currency, sum(c.amount) AS total
        FROM pending_credit c
        WHERE NOT EXISTS (SELECT 1 FROM journal j WHERE j.kind = 5 AND j.transfer_id = c.transfer_id)
        GROUP BY c.currency
    )
SELECT b.currency,
       b.total AS account_total,
       coalesce(r.total, 0) AS reserved_total,
       coalesce(f.total, 0) AS credits_in_flight,
       b.total - coalesce(r.total, 0) - coalesce(f.total, 0) AS imbalance
FROM balances b
LEFT JOIN reserved r USING (currency)
LEFT JOIN in_flight f USING (currency);
