-- Row-level security for export_rate_limit: a row is visible and writable only
-- while app.user_id (bound per transaction by the app) names its user. An
-- unset or empty setting names nobody. FORCE binds the table owner too.
ALTER TABLE export_rate_limit ENABLE ROW LEVEL SECURITY;
ALTER TABLE export_rate_limit FORCE ROW LEVEL SECURITY;

DROP POLICY IF EXISTS export_rate_limit_isolation ON export_rate_limit;
CREATE POLICY export_rate_limit_isolation ON export_rate_limit
    USING (user_id = (SELECT nullif(current_setting('app.user_id', true), '')))
    WITH CHECK (user_id = (SELECT nullif(current_setting('app.user_id', true), '')));

-- The app role (chat.app_role, set by the migration from APP_DB_ROLE). DELETE
-- is for erasing a user's data (DELETE /api/{user_id}/data), under the policy.
DO $grant$
BEGIN
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON export_rate_limit TO %I', current_setting('chat.app_role'));
END
$grant$;

-- Retention, as policies/prune.sql does for chat_rate_limit: the owner (who
-- applies this file) sees and deletes rows only while chat.pruning is 'on',
-- which only the SECURITY DEFINER function below sets, for its own duration.
DROP POLICY IF EXISTS export_rate_limit_prune_read ON export_rate_limit;
CREATE POLICY export_rate_limit_prune_read ON export_rate_limit FOR SELECT TO CURRENT_USER
    USING ((SELECT current_setting('chat.pruning', true)) = 'on');
DROP POLICY IF EXISTS export_rate_limit_prune ON export_rate_limit;
CREATE POLICY export_rate_limit_prune ON export_rate_limit FOR DELETE TO CURRENT_USER
    USING ((SELECT current_setting('chat.pruning', true)) = 'on');

-- Rows whose theoretical arrival time has passed limit nothing; one bounded
-- batch per call along the primary key from after_user_id (NULL at the end).
CREATE OR REPLACE FUNCTION prune_export_rate_limits(after_user_id text, batch_size integer,
                                                    OUT deleted integer, OUT last_user_id text)
LANGUAGE plpgsql
SECURITY DEFINER
AS $body$
BEGIN
    PERFORM set_config('chat.pruning', 'on', true);
    WITH batch AS (
        SELECT user_id FROM export_rate_limit
        WHERE user_id > after_user_id
        ORDER BY user_id
        LIMIT batch_size
    ), idle AS (
        DELETE FROM export_rate_limit AS state USING batch
        WHERE state.user_id = batch.user_id AND state.tat < now()
        RETURNING 1
    )
    SELECT (SELECT count(*)::integer FROM idle), (SELECT max(batch.user_id) FROM batch)
    INTO deleted, last_user_id;
    PERFORM set_config('chat.pruning', 'off', true);
END
$body$;

DO $search_path$
BEGIN
    EXECUTE format('ALTER FUNCTION prune_export_rate_limits(text, integer) SET search_path = %I, pg_temp',
                   current_schema());
END
$search_path$;

REVOKE ALL ON FUNCTION prune_export_rate_limits(text, integer) FROM PUBLIC;
