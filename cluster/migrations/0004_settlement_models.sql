-- Settlement models (central-ledger `settlementModel`; RULES.md sections 14 and 15). Stored and validated
-- by the admin API; settlement itself (windows, settlements) comes later and reads these rows.
CREATE TABLE settlement_model (
    settlement_model_id      serial PRIMARY KEY,
    name                     text        NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9]{2,30}$'),
    is_active                boolean     NOT NULL DEFAULT true,
    settlement_granularity   text        NOT NULL CHECK (settlement_granularity IN ('GROSS', 'NET')),
    settlement_interchange   text        NOT NULL CHECK (settlement_interchange IN ('BILATERAL', 'MULTILATERAL')),
    settlement_delay         text        NOT NULL CHECK (settlement_delay IN ('IMMEDIATE', 'DEFERRED')),
    -- NULL: the default model, for every currency that has no model of its own for the account type.
    currency                 char(3)     CHECK (currency ~ '^[A-Z]{3}$'),
    require_liquidity_check  boolean     NOT NULL,
    ledger_account_type      text        NOT NULL REFERENCES ledger_account_type (name),
    settlement_account_type  text        NOT NULL REFERENCES ledger_account_type (name),
    auto_position_reset      boolean     NOT NULL,
    created_at               timestamptz NOT NULL DEFAULT now(),
    -- The combinations central-services-shared accepts (ValidSettlementModels).
    CONSTRAINT settlement_model_valid_combination CHECK (
        (settlement_delay, settlement_granularity, settlement_interchange) IN (
            ('IMMEDIATE', 'GROSS', 'BILATERAL'),
            ('DEFERRED', 'GROSS', 'BILATERAL'),
            ('DEFERRED', 'NET', 'BILATERAL'),
            ('DEFERRED', 'NET', 'MULTILATERAL')
        )
    )
);

-- At most one model per (currency, ledger account type), and one default (NULL currency) per account type:
-- a transfer's account must map to exactly one model.
CREATE UNIQUE INDEX settlement_model_currency_account_type
    ON settlement_model ((coalesce(currency, '')), ledger_account_type);
