-- Per-request rotation (RFC 8693 token exchange): the first exchange of each
-- access token. Concurrent exchanges race on the primary key; whoever loses
-- reads the winner's time and derives the same successor, so every exchange
-- of one token inside its batch window gets the same successor on every
-- issuer instance.
--
-- The one-ACTIVE rule is unchanged: the successor has the higher stream
-- sequence, so it becomes the key's ACTIVE row and the presented token's row
-- INACTIVE, whatever order the pipeline writes them in. This table is what
-- keeps the presented token valid meanwhile: a token with a row here is
-- ROTATED (live while its family still holds the key) until valid_until,
-- then dead whatever its row says.
CREATE TABLE token_exchanges (
    subject_digest bytea       PRIMARY KEY CHECK (length(subject_digest) = 32),
    -- the first exchange, by the database's clock: the successor derives
    -- from it
    exchanged_at   timestamptz NOT NULL,
    -- when the successor was handed out to a caller still waiting for it;
    -- NULL while no exchange has been answered (503, or the caller went
    -- away): the presented token then lives on as if never exchanged, and a
    -- retry gets the same successor
    answered_at    timestamptz,
    -- the presented token's validity ends here: the batch window after the
    -- first answer; NULL while unanswered
    valid_until    timestamptz,
    -- when the presented token itself expires: the row is useless after
    expires_at     timestamptz NOT NULL
);
CREATE INDEX token_exchanges_expiry ON token_exchanges (expires_at);
