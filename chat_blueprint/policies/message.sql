-- Row-level security for message: a row is visible and writable only while
-- app.user_id (bound per transaction by the app) names its user. An unset or
-- empty setting names nobody. FORCE binds the table owner too.
ALTER TABLE message ENABLE ROW LEVEL SECURITY;
ALTER TABLE message FORCE ROW LEVEL SECURITY;

DROP POLICY IF EXISTS message_isolation ON message;
CREATE POLICY message_isolation ON message
    USING (user_id = (SELECT nullif(current_setting('app.user_id', true), '')))
    WITH CHECK (user_id = (SELECT nullif(current_setting('app.user_id', true), '')));

-- The app role (chat.app_role, set by the migration from APP_DB_ROLE). It
-- updates only what a reply's progress, end and supersession change, of the
-- columns the revision that runs this has (this file is applied again by the
-- revisions that add them).
DO $grant$
BEGIN
    EXECUTE format('GRANT SELECT, INSERT, DELETE ON message TO %I', current_setting('chat.app_role'));
    EXECUTE (
        SELECT format('GRANT UPDATE (%s) ON message TO %I', string_agg(quote_ident(column_name), ', '),
                      current_setting('chat.app_role'))
        FROM information_schema.columns
        WHERE table_schema = current_schema() AND table_name = 'message'
          AND column_name IN ('content', 'tool_calls', 'status', 'stale_at', 'superseded_at', 'model',
                              'finish_reason', 'usage')
    );
END
$grant$;
