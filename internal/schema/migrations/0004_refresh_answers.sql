-- Refresh rotation counts a use only once its answer was recorded.
--
-- scope: the scope of the first redemption's new access token. Every
-- redemption inside the grace window receives that same pair, whatever scope
-- it asks for, so one refresh token has exactly one successor.
--
-- answered_at: when the new pair was recorded (published to JetStream, or
-- written in sync mode) and so could be handed out. A redemption whose pair
-- could not be recorded (503) leaves it NULL: the client's retry derives the
-- same pair again and is not reuse. Reuse is a redemption more than the grace
-- window after answered_at.
ALTER TABLE refresh_rotations
    ADD COLUMN scope       text,
    ADD COLUMN answered_at timestamptz;

-- Rotations recorded before this migration were answered before they were
-- recorded as now; treat them as answered when they were first redeemed.
UPDATE refresh_rotations SET answered_at = rotated_at WHERE answered_at IS NULL;
