-- Retention of reply_stop (`flask --app wsgi prune`, migration 0012): a
-- producer deletes the stop of its reply when it ends the reply, but one that
-- died (kill -9, a lost instance) leaves it. A stop older than the app's stale
-- bound (ASSISTANT_TIMEOUT_S + 30 s, which prune passes) belongs to a reply
-- whose producer has ended or died, since no call outlives its deadline; it
-- stops nothing any more. As in prune.sql: a SECURITY DEFINER function, and a
-- SELECT and a DELETE policy to the owner alone, in force only while
-- chat.pruning is 'on', which the function sets for its own duration.

DROP POLICY IF EXISTS reply_stop_prune_read ON reply_stop;
CREATE POLICY reply_stop_prune_read ON reply_stop FOR SELECT TO CURRENT_USER
    USING ((SELECT current_setting('chat.pruning', true)) = 'on');
DROP POLICY IF EXISTS reply_stop_prune ON reply_stop;
CREATE POLICY reply_stop_prune ON reply_stop FOR DELETE TO CURRENT_USER
    USING ((SELECT current_setting('chat.pruning', true)) = 'on');

CREATE OR REPLACE FUNCTION prune_reply_stops(older_than_s double precision, batch_size integer)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
AS $body$
DECLARE
    deleted integer;
BEGIN
    PERFORM set_config('chat.pruning', 'on', true);
    WITH batch AS (
        SELECT user_id, ui_id FROM reply_stop
        WHERE stopped_at < now() - make_interval(secs => older_than_s)
        LIMIT batch_size
    )
    DELETE FROM reply_stop AS ended USING batch
    WHERE ended.user_id = batch.user_id AND ended.ui_id = batch.ui_id;
    GET DIAGNOSTICS deleted = ROW_COUNT;
    PERFORM set_config('chat.pruning', 'off', true);
    RETURN deleted;
END
$body$;

DO $search_path$
BEGIN
    EXECUTE format('ALTER FUNCTION prune_reply_stops(double precision, integer) SET search_path = %I, pg_temp',
                   current_schema());
END
$search_path$;
REVOKE ALL ON FUNCTION prune_reply_stops(double precision, integer) FROM PUBLIC;
