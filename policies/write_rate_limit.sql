-- Row-level security for write_rate_limit: a row is visible and writable only
-- while app.user_id (bound per transaction by the app) names its user. An
-- unset or empty setting names nobody. FORCE binds the table owner too.
ALTER TABLE write_rate_limit ENABLE ROW LEVEL SECURITY;
ALTER TABLE write_rate_limit FORCE ROW LEVEL SECURITY;

DROP POLICY IF EXISTS write_rate_limit_isolation ON write_rate_limit;
CREATE POLICY write_rate_limit_isolation ON write_rate_limit
    USING (user_id = (SELECT nullif(current_setting('app.user_id', true), '')))
    WITH CHECK (user_id = (SELECT nullif(current_setting('app.user_id', true), '')));

-- The app role (chat.app_role, set by the migration from APP_DB_ROLE).
DO $grant$
BEGIN
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON write_rate_limit TO %I', current_setting('chat.app_role'));
END
$grant$;
