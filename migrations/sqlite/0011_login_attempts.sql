-- Login attempts are counted before the password is verified: each attempt inserts its
-- failure row first, then counts the window including it, so a burst of simultaneous
-- attempts cannot all pass the check before any of them is recorded. The id (a 16-byte UUID
-- blob) lets an attempt that succeeds (or is refused by the throttle unchecked) delete exactly
-- its own row. Rows written before this migration have none.
ALTER TABLE chartlog_access_login_failures
    ADD COLUMN attempt_id BLOB CHECK (length(attempt_id) = 16);

CREATE UNIQUE INDEX chartlog_access_login_failures_by_attempt
    ON chartlog_access_login_failures (attempt_id) WHERE attempt_id IS NOT NULL;
