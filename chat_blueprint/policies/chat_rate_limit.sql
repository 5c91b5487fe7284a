-- Row-level security for chat_rate_limit: a row is visible and writable only
-- while app.user_id (bound per transaction by the app) names its user. An
-- unset or empty setting names nobody. FORCE binds the table owner too.
ALTER TABLE chat_rate_limit ENABLE ROW LEVEL SECURITY;
ALTER TABLE chat_rate_limit FORCE ROW LEVEL SECURITY;

DROP POLICY IF EXISTS chat_rate_limit_isolation ON chat_rate_limit;
CREATE POLICY chat_rate_limit_isolation ON chat_rate_limit
    USING (user_id = (SELECT nullif(current_setting('app.user_id', true), '')))
    WITH CHECK (user_id = (SELECT nullif(current_setting('app.user_id', true), '')));

-- The app role (chat.app_role, set by the migration from APP_DB_ROLE). DELETE
-- is for erasing a user's data (DELETE /api/{user_id}/data), under the policy.
DO $grant$
BEGIN
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON chat_rate_limit TO %I', current_setting('chat.app_role'));
END
$grant$;
