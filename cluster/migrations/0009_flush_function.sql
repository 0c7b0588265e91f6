-- One round trip for a shard's ordinary write-behind flush (actors/store.py, ShardStore.flush).
-- Statement by statement a flush took nine round trips (BEGIN, the fence, two for each COPY, the
-- account and transfer updates, COMMIT) plus the pool's reset query; each is a wakeup of the shard's
-- event loop and of a Postgres backend. This function does the same writes in the one transaction
-- its calling statement runs in. Flushes that carry a checkpoint or participant changes (about one
-- a second) still go statement by statement.
CREATE FUNCTION rayloop_flush(
    p_shard integer, p_last_seq bigint, p_previous_seq bigint,
    -- journal rows
    j_seq bigint[], j_kind smallint[], j_transfer_id text[], j_account_id integer[], j_amount numeric[],
    j_reason text[], j_at_ms bigint[], j_counter_account_id integer[], j_expires_at_ms bigint[],
    -- snapshots of the accounts touched
    a_account_id integer[], a_value numeric[], a_reserved numeric[], a_cap numeric[], a_active boolean[],
    -- transfers new in this flush
    i_transfer_id text[], i_payer text[], i_payee text[], i_currency text[], i_amount numeric[],
    i_condition text[], i_expires_at_ms bigint[], i_prepare_hash text[], i_payer_account_id integer[],
    i_payee_account_id integer[], i_state text[], i_fulfilment text[], i_fulfil_hash text[],
    i_completed_at_ms bigint[], i_reserved_mode boolean[], i_error_code integer[], i_error_description text[],
    i_version text[], i_created_at_ms bigint[], i_prepare_request_id text[], i_fulfil_request_id text[],
    -- transfers changed in this flush
    u_transfer_id text[], u_state text[], u_fulfilment text[], u_fulfil_hash text[], u_completed_at_ms bigint[],
    u_reserved_mode boolean[], u_error_code integer[], u_error_description text[], u_fulfil_request_id text[]
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    -- The fence: the row must still say what this incarnation last wrote.
    UPDATE shard SET last_durable_seq = p_last_seq, updated_at = now()
     WHERE shard_id = p_shard AND last_durable_seq = p_previous_seq;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'shard %: durable sequence moved under us (expected %)', p_shard, p_previous_seq
            USING ERRCODE = 'RLF01';
    END IF;
    IF cardinality(j_seq) > 0 THEN
        INSERT INTO journal (shard_id, seq, kind, transfer_id, account_id, amount, reason, at_ms,
                             counter_account_id, expires_at_ms)
        SELECT p_shard, u.* FROM unnest(j_seq, j_kind, j_transfer_id, j_account_id, j_amount, j_reason, j_at_ms,
                                        j_counter_account_id, j_expires_at_ms) AS u;
    END IF;
    IF cardinality(a_account_id) > 0 THEN
        UPDATE account AS a SET value = u.value, reserved_value = u.reserved, net_debit_cap = u.cap,
               is_active = u.active, last_seq = p_last_seq, changed_at = now()
          FROM unnest(a_account_id, a_value, a_reserved, a_cap, a_active) AS u(account_id, value, reserved, cap, active)
         WHERE a.account_id = u.account_id;
    END IF;
    IF cardinality(i_transfer_id) > 0 THEN
        INSERT INTO transfer (transfer_id, shard_id, payer, payee, currency, amount, condition, expires_at_ms,
                              prepare_hash, payer_account_id, payee_account_id, state, fulfilment, fulfil_hash,
                              completed_at_ms, reserved_mode, error_code, error_description, version,
                              created_at_ms, prepare_request_id, fulfil_request_id)
        SELECT u.transfer_id, p_shard, u.payer, u.payee, u.currency, u.amount, u.condition, u.expires_at_ms,
               u.prepare_hash, u.payer_account_id, u.payee_account_id, u.state, u.fulfilment, u.fulfil_hash,
               u.completed_at_ms, u.reserved_mode, u.error_code, u.error_description, u.version,
               u.created_at_ms, u.prepare_request_id, u.fulfil_request_id
          FROM unnest(i_transfer_id, i_payer, i_payee, i_currency, i_amount, i_condition, i_expires_at_ms,
                      i_prepare_hash, i_payer_account_id, i_payee_account_id, i_state, i_fulfilment, i_fulfil_hash,
                      i_completed_at_ms, i_reserved_mode, i_error_code, i_error_description, i_version,
                      i_created_at_ms, i_prepare_request_id, i_fulfil_request_id)
            AS u(transfer_id, payer, payee, currency, amount, condition, expires_at_ms, prepare_hash,
                 payer_account_id, payee_account_id, state, fulfilment, fulfil_hash, completed_at_ms,
                 reserved_mode, error_code, error_description, version, created_at_ms, prepare_request_id,
                 fulfil_request_id);
    END IF;
    IF cardinality(u_transfer_id) > 0 THEN
        UPDATE transfer AS t SET state = u.state, fulfilment = u.fulfilment, fulfil_hash = u.fulfil_hash,
               completed_at_ms = u.completed, reserved_mode = u.reserved_mode, error_code = u.error_code,
               error_description = u.error_description, fulfil_request_id = u.fulfil_request_id
          FROM unnest(u_transfer_id, u_state, u_fulfilment, u_fulfil_hash, u_completed_at_ms, u_reserved_mode,
                      u_error_code, u_error_description, u_fulfil_request_id)
            AS u(transfer_id, state, fulfilment, fulfil_hash, completed, reserved_mode, error_code,
                 error_description, fulfil_request_id)
         WHERE t.transfer_id = u.transfer_id;
    END IF;
END
$$;
