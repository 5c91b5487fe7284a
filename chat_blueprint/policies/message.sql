-- Row-level security for message: a row is visible and writable only while
-- app.user_id (bound per transaction by the app) names its user. An unset or
-- empty setting names nobody. FORCE binds the table owner too.
ALTER TABLE message ENABLE ROW LEVEL SECURITY;
ALTER TABLE message FORCE ROW LEVEL SECURITY;

DROP POLICY IF EXISTS message_isolation ON message;
CREATE POLICY message_isolation ON message
    USING (user_id = (SELECT nullif(current_setting('app.user_id', true), '')))
    WITH CHECK (user_id = (SELECT nullif(current_setting('app.user_id', true), '')));

-- The app role (chat.app_role, set by the migration from APP_DB_ROLE).
DO $grant$
BEGIN
    EXECUTE format('GRANT SELECT, INSERT, DELETE ON message TO %I', current_setting('chat.app_role'));
END
$grant$;
