-- OAuth lifecycle: refresh rotation, revocation, expiry and cleanup.

-- Every token belongs to a family: one authorization and every token rotated
-- from it. Revoking a family revokes all of them, even those still queued.
-- NULL only for rows written before this migration.
ALTER TABLE tokens
    ADD COLUMN family_id          bytea CHECK (length(family_id) = 16),
    ADD COLUMN refresh_expires_at timestamptz;

CREATE INDEX tokens_family ON tokens (family_id) WHERE family_id IS NOT NULL;

-- The cleanup job finds rows whose every credential has expired through
-- this index, in bounded batches, without scanning the table. The refresh
-- token outlives its access token, so it decides when present.
CREATE INDEX tokens_purge ON tokens ((coalesce(refresh_expires_at, expires_at)));

-- Families revoked by a refresh-token revocation, by refresh-token reuse, or
-- by a grant revocation. Writers of token rows consult this table, under the
-- revocation fence, so a queued member of the family is written REVOKED.
CREATE TABLE revoked_families (
    family_id   bytea       PRIMARY KEY CHECK (length(family_id) = 16),
    reason      text        NOT NULL,
    revoked_at  timestamptz NOT NULL DEFAULT now()
);

-- "All tokens of this user for this client" (subject '' : of every user of
-- the client) up to a stream sequence: every token whose event JetStream had
-- accepted when the revocation began. A later grant is a new authorization
-- and is not affected.
CREATE TABLE revoked_grants (
    client_id   text        NOT NULL,
    subject     text        NOT NULL,
    up_to_seq   bigint      NOT NULL,
    revoked_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (client_id, subject)
);

-- First redemption of each refresh token. Concurrent refreshes race on the
-- primary key; whoever loses reads the winner's time and derives the same
-- new pair. A redemption after the grace window is reuse.
CREATE TABLE refresh_rotations (
    refresh_digest bytea       PRIMARY KEY CHECK (length(refresh_digest) = 32),
    rotated_at     timestamptz NOT NULL,
    -- when the redeemed refresh token itself expires: the row is useless after
    expires_at     timestamptz NOT NULL
);
CREATE INDEX refresh_rotations_expiry ON refresh_rotations (expires_at);

-- "Which applications has this user authorized?" reads the user's live rows.
CREATE INDEX tokens_active_subject ON tokens (subject) WHERE state = 'ACTIVE';
