-- The ingress's id for the prepare and the fulfil that decided a transfer. When a shard dies after a
-- change was durable but before its reply arrived, the ingress repeats the call to the restarted shard;
-- with these ids the shard knows it is the same request and answers the decision it made (the payer then
-- gets its COMMITTED callback), not a duplicate from a DFSP (which would be answered to the sender).
ALTER TABLE transfer ADD COLUMN prepare_request_id text NOT NULL DEFAULT '';
ALTER TABLE transfer ADD COLUMN fulfil_request_id text NOT NULL DEFAULT '';
