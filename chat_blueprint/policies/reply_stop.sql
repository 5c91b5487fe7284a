-- Row-level security for reply_stop: a stop asked for a reply being produced,
-- by the reply's ui_id (a random id the server gave it), kept until its
-- producer has ended the reply. Like every table, a row is visible and
-- writable only while app.user_id names its user; FORCE binds the owner too.
ALTER TABLE reply_stop ENABLE ROW LEVEL SECURITY;
ALTER TABLE reply_stop FORCE ROW LEVEL SECURITY;

DROP POLICY IF EXISTS reply_stop_isolation ON reply_stop;
CREATE POLICY reply_stop_isolation ON reply_stop
    USING (user_id = (SELECT nullif(current_setting('app.user_id', true), '')))
    WITH CHECK (user_id = (SELECT nullif(current_setting('app.user_id', true), '')));

-- A producer learns of a stop from any instance without a query per reply:
-- stopped_replies(ui_ids) answers which of the given replies were stopped, for
-- every user at once, so a process asks once per interval for all the replies
-- it produces. It runs as the owner (SECURITY DEFINER, like the prune
-- functions), which sees rows through the owner-only policy below only while
-- chat.stop_lookup is 'on', set by the function for its own duration. What it
-- reveals is whether a reply whose random ui_id the caller already holds was
-- stopped: nothing a caller could not learn from the reply itself.
DROP POLICY IF EXISTS reply_stop_lookup ON reply_stop;
CREATE POLICY reply_stop_lookup ON reply_stop FOR SELECT TO CURRENT_USER
    USING ((SELECT current_setting('chat.stop_lookup', true)) = 'on');

CREATE OR REPLACE FUNCTION stopped_replies(ui_ids text[])
RETURNS SETOF text
LANGUAGE plpgsql
SECURITY DEFINER
AS $body$
BEGIN
    PERFORM set_config('chat.stop_lookup', 'on', true);
    RETURN QUERY SELECT stop.ui_id FROM reply_stop AS stop WHERE stop.ui_id = ANY (ui_ids);
    PERFORM set_config('chat.stop_lookup', 'off', true);
END
$body$;

DO $grant$
BEGIN
    EXECUTE format('ALTER FUNCTION stopped_replies(text[]) SET search_path = %I, pg_temp', current_schema());
    EXECUTE format('GRANT SELECT, INSERT, DELETE ON reply_stop TO %I', current_setting('chat.app_role'));
    EXECUTE format('GRANT EXECUTE ON FUNCTION stopped_replies(text[]) TO %I', current_setting('chat.app_role'));
END
$grant$;
REVOKE EXECUTE ON FUNCTION stopped_replies(text[]) FROM PUBLIC;
