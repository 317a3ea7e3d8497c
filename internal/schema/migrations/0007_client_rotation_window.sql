-- Per-request rotation: a client's own batch window. NULL: the issuers'
-- TOKENPIPE_ROTATION_WINDOW applies; 0: the presented token ends when its
-- exchange is answered. Bounded as the variable is (5 minutes).
ALTER TABLE clients
    ADD COLUMN rotation_window interval
        CHECK (rotation_window >= interval '0' AND rotation_window <= interval '5 minutes');
