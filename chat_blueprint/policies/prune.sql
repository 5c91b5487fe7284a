-- Retention (`flask --app wsgi prune`): expired idempotency keys and idle
-- chat rate-limit rows go, across users, without weakening isolation.
--
-- The two functions below are SECURITY DEFINER: they run as the role that
-- applies this file (the owner, who runs the migrations). Row-level security
-- is forced, so the owner too sees no row without app.user_id; the *_prune
-- policies let it see and delete rows of these two tables only while
-- chat.pruning is 'on', which each function sets (transaction-locally) for its
-- own duration and nothing else does. The policies name the owner alone: the app
-- role gains nothing from them, whatever it sets. EXECUTE is revoked from
-- PUBLIC, so only the owner (or a role it grants EXECUTE to) can prune.
-- Each call deletes one bounded batch; the caller loops, one transaction a batch.

DROP POLICY IF EXISTS idempotency_key_prune_read ON idempotency_key;
CREATE POLICY idempotency_key_prune_read ON idempotency_key FOR SELECT TO CURRENT_USER
    USING ((SELECT current_setting('chat.pruning', true)) = 'on');
DROP POLICY IF EXISTS idempotency_key_prune ON idempotency_key;
CREATE POLICY idempotency_key_prune ON idempotency_key FOR DELETE TO CURRENT_USER
    USING ((SELECT current_setting('chat.pruning', true)) = 'on');

DROP POLICY IF EXISTS chat_rate_limit_prune_read ON chat_rate_limit;
CREATE POLICY chat_rate_limit_prune_read ON chat_rate_limit FOR SELECT TO CURRENT_USER
    USING ((SELECT current_setting('chat.pruning', true)) = 'on');
DROP POLICY IF EXISTS chat_rate_limit_prune ON chat_rate_limit;
CREATE POLICY chat_rate_limit_prune ON chat_rate_limit FOR DELETE TO CURRENT_USER
    USING ((SELECT current_setting('chat.pruning', true)) = 'on');

-- Keys created more than ttl_s seconds ago: the app treats them as unknown
-- already (a reuse renews the row), so deleting them changes no answer. The
-- age is checked again on the row being deleted, so a key renewed meanwhile stays.
-- A key still 'running' (its first request, or a retry that took it over, is
-- answering now) goes only once it too has not moved for ttl_s seconds: deleting
-- it would let a repeat run the turn a second time. `prune` refuses a ttl_s
-- shorter than the app's stale bound (ASSISTANT_TIMEOUT_S + 30 s), so such a
-- key's request is dead by then.
CREATE OR REPLACE FUNCTION prune_idempotency_keys(ttl_s double precision, batch_size integer)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
AS $body$
DECLARE
    deleted integer;
BEGIN
    PERFORM set_config('chat.pruning', 'on', true);
    WITH batch AS (
        SELECT user_id, key FROM idempotency_key
        WHERE created_at < now() - make_interval(secs => ttl_s)
          AND (status <> 'running' OR updated_at < now() - make_interval(secs => ttl_s))
        LIMIT batch_size
    )
    DELETE FROM idempotency_key AS expired USING batch
    WHERE expired.user_id = batch.user_id AND expired.key = batch.key
      AND expired.created_at < now() - make_interval(secs => ttl_s)
      AND (expired.status <> 'running' OR expired.updated_at < now() - make_interval(secs => ttl_s));
    GET DIAGNOSTICS deleted = ROW_COUNT;
    PERFORM set_config('chat.pruning', 'off', true);
    RETURN deleted;
END
$body$;

-- Rows whose theoretical arrival time has passed limit nothing: the next turn
-- computes greatest(tat, now()), exactly as for a user without a row. The scan
-- walks the primary key from after_user_id (a keyset), so a run reads the
-- table once however many batches it takes; last_user_id is NULL at the end.
CREATE OR REPLACE FUNCTION prune_chat_rate_limits(after_user_id text, batch_size integer,
                                                  OUT deleted integer, OUT last_user_id text)
LANGUAGE plpgsql
SECURITY DEFINER
AS $body$
BEGIN
    PERFORM set_config('chat.pruning', 'on', true);
    WITH batch AS (
        SELECT user_id FROM chat_rate_limit
        WHERE user_id > after_user_id
        ORDER BY user_id
        LIMIT batch_size
    ), idle AS (
        DELETE FROM chat_rate_limit AS state USING batch
        WHERE state.user_id = batch.user_id AND state.tat < now()
        RETURNING 1
    )
    SELECT (SELECT count(*)::integer FROM idle), (SELECT max(batch.user_id) FROM batch)
    INTO deleted, last_user_id;
    PERFORM set_config('chat.pruning', 'off', true);
END
$body$;

-- A SECURITY DEFINER function resolves names in this schema only, never in a
-- caller's temporary schema.
DO $search_path$
BEGIN
    EXECUTE format('ALTER FUNCTION prune_idempotency_keys(double precision, integer) SET search_path = %I, pg_temp',
                   current_schema());
    EXECUTE format('ALTER FUNCTION prune_chat_rate_limits(text, integer) SET search_path = %I, pg_temp',
                   current_schema());
END
$search_path$;

REVOKE ALL ON FUNCTION prune_idempotency_keys(double precision, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION prune_chat_rate_limits(text, integer) FROM PUBLIC;
