-- Open reservations and owed credits are written to their tables at checkpoints, not at every
-- flush; between checkpoints the journal tail is the record. Recovery loads the tables and
-- replays the journal rows after shard.checkpoint_seq.

ALTER TABLE shard ADD COLUMN checkpoint_seq bigint NOT NULL DEFAULT 0;
ALTER TABLE journal ADD COLUMN counter_account_id integer;
ALTER TABLE journal ADD COLUMN expires_at_ms bigint;

-- The conservation view now reads in-flight money from the tables plus the journal tail.
DROP VIEW currency_conservation;
CREATE VIEW currency_conservation AS
WITH
    tail AS (
        SELECT j.* FROM journal j JOIN shard s ON s.shard_id = j.shard_id AND j.seq > s.checkpoint_seq
    ),
    closed AS (
        SELECT shard_id, transfer_id FROM tail WHERE kind IN (2, 3, 4)
    ),
    reservations AS (
        SELECT r.shard_id, r.transfer_id, r.debit_account_id AS account_id, r.amount FROM open_reservation r
        UNION ALL
        SELECT t.shard_id, t.transfer_id, t.account_id, t.amount FROM tail t WHERE t.kind = 1
    ),
    open_now AS (
        SELECT r.* FROM reservations r
        WHERE NOT EXISTS (SELECT 1 FROM closed c WHERE c.shard_id = r.shard_id AND c.transfer_id = r.transfer_id)
    ),
    owed AS (
        SELECT c.transfer_id, c.currency, c.amount FROM pending_credit c
        UNION ALL
        SELECT t.transfer_id, a.currency, t.amount
        FROM tail t
        JOIN account a ON a.account_id = t.counter_account_id
        WHERE t.kind = 2
    ),
    owed_now AS (
        SELECT o.* FROM owed o
        WHERE NOT EXISTS (SELECT 1 FROM journal j WHERE j.kind = 5 AND j.transfer_id = o.transfer_id)
    ),
    balances AS (
        SELECT currency, sum(value) AS total FROM account GROUP BY currency
    ),
    reserved AS (
        SELECT a.currency, sum(o.amount) AS total
        FROM open_now o JOIN account a ON a.account_id = o.account_id
        GROUP BY a.currency
    ),
    in_flight AS (
        SELECT currency, sum(amount) AS total FROM owed_now GROUP BY currency
    )
SELECT b.currency,
       b.total AS account_total,
       coalesce(r.total, 0) AS reserved_total,
       coalesce(f.total, 0) AS credits_in_flight,
       b.total - coalesce(r.total, 0) - coalesce(f.total, 0) AS imbalance
FROM balances b
LEFT JOIN reserved r USING (currency)
LEFT JOIN in_flight f USING (currency);
