-- Row-level security for task: a row is visible and writable only while
-- app.user_id (bound per transaction by the app) names its user. An unset or
-- empty setting names nobody. FORCE binds the table owner too.
ALTER TABLE task ENABLE ROW LEVEL SECURITY;
ALTER TABLE task FORCE ROW LEVEL SECURITY;

DROP POLICY IF EXISTS task_isolation ON task;
CREATE POLICY task_isolation ON task
    USING (user_id = (SELECT nullif(current_setting('app.user_id', true), '')))
    WITH CHECK (user_id = (SELECT nullif(current_setting('app.user_id', true), '')));

-- The app role (chat.app_role, set by the migration from APP_DB_ROLE).
DO $grant$
BEGIN
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON task TO %I', current_setting('chat.app_role'));
END
$grant$;
