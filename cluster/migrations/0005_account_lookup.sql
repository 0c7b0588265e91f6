-- Account lookup (RULES.md section 9): the oracle registry of the ALS admin API and the hub's built-in oracle.

-- Registered oracles (ALS admin API `/oracles`). `endpoint` is an absolute http:// base URL of a service
-- speaking the oracle API (api/spec/als-oracle-api.yaml), or the literal 'builtin' for the table below.
-- A party id type with no default oracle registered uses the built-in oracle.
CREATE TABLE oracle (
    oracle_id      serial      PRIMARY KEY,
    party_id_type  text        NOT NULL CHECK (party_id_type ~ '^[A-Z_]{2,32}$'),
    endpoint       text        NOT NULL CHECK (length(endpoint) BETWEEN 1 AND 512),
    endpoint_type  text        NOT NULL DEFAULT 'URL' CHECK (endpoint_type = 'URL'),
    -- NULL: for every currency (chosen as the type's default, or when no currency is known).
    currency       char(3)     CHECK (currency ~ '^[A-Z]{3}$'),
    is_default     boolean     NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL DEFAULT now(),
    changed_at     timestamptz NOT NULL DEFAULT now()
);

-- One oracle per (type, currency), and one default per type: a lookup must name exactly one oracle.
CREATE UNIQUE INDEX oracle_type_currency ON oracle (party_id_type, currency) WHERE currency IS NOT NULL;
CREATE UNIQUE INDEX oracle_type_default ON oracle (party_id_type) WHERE is_default;

-- The built-in oracle: which FSP holds a party, per currency. '' stands for "no sub-id" and "any currency"
-- (primary key columns cannot be NULL, and the lookup is then one index range scan on the key prefix).
CREATE TABLE party_registration (
    party_id_type     text        NOT NULL,
    party_identifier  text        NOT NULL CHECK (length(party_identifier) BETWEEN 1 AND 128),
    party_sub_id      text        NOT NULL DEFAULT '' CHECK (length(party_sub_id) <= 128),
    currency          text        NOT NULL DEFAULT '' CHECK (currency = '' OR currency ~ '^[A-Z]{3}$'),
    fsp_id            text        NOT NULL CHECK (length(fsp_id) BETWEEN 1 AND 32),
    created_at        timestamptz NOT NULL DEFAULT now(),
    changed_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (party_id_type, party_identifier, party_sub_id, currency)
);
