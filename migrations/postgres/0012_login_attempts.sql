-- Login attempts are counted before the password is verified (PostgreSQL): each attempt
-- inserts its failure row first, then counts the window including it, so a burst of
-- simultaneous attempts cannot all pass the check before any of them is recorded. The id
-- lets an attempt that succeeds (or is refused by the throttle unchecked) delete exactly its
-- own row. Rows written before this migration have none.
ALTER TABLE chartlog_access_login_failures ADD COLUMN attempt_id uuid;

CREATE UNIQUE INDEX chartlog_access_login_failures_by_attempt
    ON chartlog_access_login_failures (attempt_id) WHERE attempt_id IS NOT NULL;
