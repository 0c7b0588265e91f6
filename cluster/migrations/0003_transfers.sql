-- FSPIOP transfers, written behind by the payer's shard in the same transaction as their journal rows.
CREATE TABLE transfer (
    transfer_id        text PRIMARY KEY,
    shard_id           integer       NOT NULL,
    payer              text          NOT NULL,
    payee              text          NOT NULL,
    currency           char(3)       NOT NULL,
    amount             numeric(40,4) NOT NULL CHECK (amount > 0),
    condition          text          NOT NULL,
    expires_at_ms      bigint        NOT NULL,
    prepare_hash       text          NOT NULL,
    payer_account_id   integer,
    payee_account_id   integer,
    state              text          NOT NULL CHECK (state IN ('RESERVED', 'COMMITTED', 'ABORTED')),
    fulfilment         text,
    fulfil_hash        text,
    completed_at_ms    bigint,
    reserved_mode      boolean       NOT NULL DEFAULT false,
    error_code         integer,
    error_description  text,
    version            text          NOT NULL DEFAULT '1.1',
    created_at_ms      bigint        NOT NULL
);
CREATE INDEX transfer_shard_created ON transfer (shard_id, created_at_ms);
