-- Row-level security for idempotency_key: a row is visible and writable only while
-- app.user_id (bound per transaction by the app) names its user. An unset or
-- empty setting names nobody. FORCE binds the table owner too.
ALTER TABLE idempotency_key ENABLE ROW LEVEL SECURITY;
ALTER TABLE idempotency_key FORCE ROW LEVEL SECURITY;

DROP POLICY IF EXISTS idempotency_key_isolation ON idempotency_key;
CREATE POLICY idempotency_key_isolation ON idempotency_key
    USING (user_id = (SELECT nullif(current_setting('app.user_id', true), '')))
    WITH CHECK (user_id = (SELECT nullif(current_setting('app.user_id', true), '')));

-- The app role (chat.app_role, set by the migration from APP_DB_ROLE).
DO $grant$
BEGIN
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON idempotency_key TO %I', current_setting('chat.app_role'));
END
$grant$;
