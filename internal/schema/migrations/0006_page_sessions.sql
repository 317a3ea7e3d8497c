-- Sign-in sessions of the account and admin pages. The issuer runs as many
-- stateless replicas, so a session lives here, where every replica sees it,
-- sign-out and expiry take effect everywhere at once, and nothing but a
-- digest of the cookie's random value is stored (as for tokens).
--
-- pw_fingerprint is a digest of the user's password hash when the session
-- began: a password reset (a new hash) ends every session of the user, and
-- removing the user ends them too (no users row to join).
CREATE TABLE page_sessions (
    id_digest      bytea       PRIMARY KEY CHECK (length(id_digest) = 32),
    kind           text        NOT NULL CHECK (kind IN ('account', 'admin')),
    username       text        NOT NULL,
    pw_fingerprint bytea       NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    -- idle expiry, moved forward on each request, never past absolute_at
    expires_at     timestamptz NOT NULL,
    absolute_at    timestamptz NOT NULL
);

CREATE INDEX page_sessions_expires ON page_sessions (expires_at);
