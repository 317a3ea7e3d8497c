-- Which clients may introspect other clients' tokens (RFC 7662 section 4
-- leaves it to the server): resource servers. Every client may introspect
-- its own tokens.
ALTER TABLE clients ADD COLUMN introspect boolean NOT NULL DEFAULT false;

-- Users and clients share one subject namespace: a token's subject is a
-- user name or, for client_credentials, the client's own id. So one name may
-- not be both, or a user named like a client would act on that client's own
-- tokens, and resource servers could not tell the two apart by sub.
--
-- Each insert takes one transaction-level advisory lock and then looks in
-- the other table. A second registration of the same name waits for the
-- first to commit; in READ COMMITTED the check's query takes a new snapshot
-- after the wait and sees it. Under REPEATABLE READ the snapshot predates the
-- wait, so the check refuses to run there rather than miss a name.
-- Existing names that already collide are left as they are; the account API
-- never acts on a client's own tokens in any case.
CREATE OR REPLACE FUNCTION tokenpipe_principal_unique() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    name  text;
    taken boolean;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'register clients and users in READ COMMITTED transactions (the name check needs a fresh snapshot)';
    END IF;
    PERFORM pg_advisory_xact_lock(7460301120);
    IF TG_TABLE_NAME = 'clients' THEN
        name := NEW.client_id;
        SELECT EXISTS (SELECT 1 FROM users WHERE username = name) INTO taken;
    ELSE
        name := NEW.username;
        SELECT EXISTS (SELECT 1 FROM clients WHERE client_id = name) INTO taken;
    END IF;
    IF taken THEN
        RAISE EXCEPTION '% is already the name of a %', name,
            CASE TG_TABLE_NAME WHEN 'clients' THEN 'user' ELSE 'client' END
            USING ERRCODE = 'unique_violation', CONSTRAINT = 'principal_names';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER clients_principal_unique BEFORE INSERT OR UPDATE OF client_id ON clients
    FOR EACH ROW EXECUTE FUNCTION tokenpipe_principal_unique();
CREATE TRIGGER users_principal_unique BEFORE INSERT OR UPDATE OF username ON users
    FOR EACH ROW EXECUTE FUNCTION tokenpipe_principal_unique();
