-- The one-ACTIVE-token-per-key index leads with subject, and the separate
-- index of a user's live rows goes: one index now serves both the rule
-- (recovery's per-key lookups) and "which applications has this user
-- authorized?", and every token insert maintains one index fewer.
--
-- Why now: with the old pair, a key lookup on a table whose statistics lag
-- its growth (a new deployment's first minutes, a load test) could be
-- planned on the subject-only index, which for client_credentials (subject
-- = client) holds every live token of the client: recovery's lock took
-- 0.8 ms per key instead of a few µs, and held the conflict-heavy mix near
-- 1,000 tokens/s.
--
-- CREATE UNIQUE INDEX blocks writes to tokens while it builds (this
-- migration runs in a transaction). On a large table, build the index first
-- by hand with CREATE UNIQUE INDEX CONCURRENTLY tokens_one_active_per_key_new
-- ...; this migration then only swaps names (IF NOT EXISTS below).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
               WHERE c.relname = 'tokens_one_active_per_key_new'
                 AND (NOT i.indisvalid OR pg_get_indexdef(i.indexrelid) NOT LIKE
                      '%UNIQUE INDEX tokens_one_active_per_key_new ON %tokens USING btree (subject, client_id, scope) WHERE (state = ''ACTIVE''::text)%')) THEN
        RAISE EXCEPTION 'tokens_one_active_per_key_new exists but is invalid (a failed CREATE INDEX CONCURRENTLY) or not the index this migration builds: drop it and run again';
    END IF;
END $$;
CREATE UNIQUE INDEX IF NOT EXISTS tokens_one_active_per_key_new
    ON tokens (subject, client_id, scope) WHERE state = 'ACTIVE';
DROP INDEX tokens_one_active_per_key;
ALTER INDEX tokens_one_active_per_key_new RENAME TO tokens_one_active_per_key;
DROP INDEX IF EXISTS tokens_active_subject;
