-- Tokens are stored by the SHA-256 digest of their plaintext; the plaintext
-- never reaches the database.
CREATE TABLE tokens (
    token_digest   bytea       PRIMARY KEY CHECK (length(token_digest) = 32),
    refresh_digest bytea       CHECK (length(refresh_digest) = 32),
    client_id      text        NOT NULL,
    subject        text        NOT NULL,
    scope          text        NOT NULL, -- canonical: sorted, space-joined
    state          text        NOT NULL CHECK (state IN ('ACTIVE', 'INACTIVE', 'REVOKED', 'EXPIRED')),
    grant_type     text        NOT NULL,
    issued_at      timestamptz NOT NULL,
    expires_at     timestamptz NOT NULL,
    persisted_at   timestamptz NOT NULL DEFAULT now(),
    state_changed_at timestamptz NOT NULL DEFAULT now(),
    -- JetStream sequence of the TokenIssued event: the order in which
    -- JetStream accepted the tokens, and so the order in which clients could
    -- have received them. Recovery keeps the highest one ACTIVE. NULL only for
    -- rows written by the synchronous mode, which orders by commit.
    stream_seq     bigint,
    instance       text        NOT NULL DEFAULT ''
);

-- The one-ACTIVE-token-per-key rule (WSO2's CON_APP_KEY), stated directly.
-- Recovery looks rows up with exactly these three columns.
CREATE UNIQUE INDEX tokens_one_active_per_key
    ON tokens (client_id, subject, scope) WHERE state = 'ACTIVE';

-- "Is there a newer token for this key?" without scanning the key's history.
CREATE INDEX tokens_key_seq ON tokens (client_id, subject, scope, stream_seq);

CREATE UNIQUE INDEX tokens_refresh_digest
    ON tokens (refresh_digest) WHERE refresh_digest IS NOT NULL;

CREATE TABLE clients (
    client_id      text        PRIMARY KEY,
    -- Client secrets are 256-bit random values we generate, so a SHA-256
    -- digest is enough: there is nothing to brute-force.
    secret_digest  bytea       NOT NULL CHECK (length(secret_digest) = 32),
    scopes         text[]      NOT NULL DEFAULT '{}',
    grants         text[]      NOT NULL DEFAULT '{client_credentials}',
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    username       text        PRIMARY KEY,
    -- bcrypt: user passwords are low-entropy and need a slow hash.
    password_hash  text        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
