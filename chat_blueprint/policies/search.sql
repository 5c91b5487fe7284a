-- Full-text search of a user's conversations (GET /conversations?q=), through
-- the GIN indexes ix_message_search and ix_conversation_search, under the
-- same row-level security as every other query.
--
-- Why a function: PostgreSQL evaluates a policy's condition before any
-- condition of the query that is not LEAKPROOF, and no text-search operator
-- is (only a superuser can mark one so). An ordinary query's `@@` therefore
-- never reaches a text-search index on a table with row-level security: it is
-- a filter that recomputes to_tsvector on every row of the user. A condition
-- that is itself a policy has no such restriction. So search_hits runs as the
-- owner (SECURITY DEFINER, like the prune functions) and the owner-only
-- *_search policies below carry the match, for one query at a time
-- (chat.search_query, which only search_hits sets, for its own duration):
-- the index scan then takes both the user's id and the words.
--
-- Nothing is admitted beyond what the *_isolation policies admit: they bind
-- the owner too (FORCE), with the caller's app.user_id, and these policies
-- are RESTRICTIVE, so they only take rows away. Outside a search the owner
-- sees no conversation and no message (without app.user_id it saw none before
-- either). The app role gains nothing from chat.search_query, whatever it sets.

DROP POLICY IF EXISTS message_search ON message;
CREATE POLICY message_search ON message AS RESTRICTIVE FOR SELECT TO CURRENT_USER
    USING (to_tsvector('simple'::regconfig, search_text(content))
           @@ (SELECT current_setting('chat.search_query', true)::tsquery));

DROP POLICY IF EXISTS conversation_search ON conversation;
CREATE POLICY conversation_search ON conversation AS RESTRICTIVE FOR SELECT TO CURRENT_USER
    USING (to_tsvector('simple'::regconfig, search_text(title))
           @@ (SELECT current_setting('chat.search_query', true)::tsquery));

-- Where `query` (the lexemes of one word) occurs among the caller's
-- conversations: a row (conversation, message) per message that holds it,
-- and (conversation, NULL) when the title does. Matching is done by the
-- policies above, so the statements name no condition of their own. The
-- messages searched are the current ones whose text is final (from migration
-- 0009 on, which applies this file again: the conditions of ix_message_search).
-- Owned by a superuser or a BYPASSRLS role, no policy would apply and every
-- row would be a hit: it refuses to run so.
CREATE OR REPLACE FUNCTION search_hits(query tsquery)
RETURNS TABLE (conversation_id uuid, message_id bigint)
LANGUAGE plpgsql
SECURITY DEFINER
AS $body$
BEGIN
    IF NOT (row_security_active('message') AND row_security_active('conversation')) THEN
        RAISE EXCEPTION 'search_hits must be owned by a role bound by row-level security (the owner)';
    END IF;
    PERFORM set_config('chat.search_query', query::text, true);
    RETURN QUERY SELECT found.conversation_id, found.id FROM message AS found
        WHERE found.superseded_at IS NULL AND found.status <> 'streaming';
    RETURN QUERY SELECT found.id, NULL::bigint FROM conversation AS found;
    PERFORM set_config('chat.search_query', '', true);
END
$body$;

-- A SECURITY DEFINER function resolves names through a path the caller
-- cannot extend: the schema of the tables, then pg_temp (last, so a
-- temporary table cannot stand in for `message`).
DO $path$
BEGIN
    EXECUTE format('ALTER FUNCTION search_hits(tsquery) SET search_path = %I, pg_temp', current_schema());
    EXECUTE format('GRANT EXECUTE ON FUNCTION search_hits(tsquery) TO %I', current_setting('chat.app_role'));
END
$path$;
REVOKE EXECUTE ON FUNCTION search_hits(tsquery) FROM PUBLIC;
