-- The audit trail is read in the order it was recorded (PostgreSQL).
--
-- Pages used to be ordered by (occurred_at_us, audit_id). Rows do not reach the table in that
-- order: a request's row is stamped when the request is decided, then waits for its process's
-- audit writer to append it to the log, and for the projection runner to fold it, while other
-- processes' rows go their own way. A row stamped before the last row of a page an auditor
-- had already read could land after it, and the next page, which starts after that row's time,
-- never showed it. trail_position is handed out in the order rows are inserted, one writer at
-- a time (insert_audit_rows takes an advisory lock), so a page boundary is
-- final: every row inserted later has a higher position and shows on a later page.
--
-- Rows already in the table are numbered in their old order, so an old trail reads as before.
--
-- occurred_at_max_us is the latest occurred_at_us of the row and of every row recorded before
-- it. It never falls as trail_position rises, so the rows that occurred at or after a time T
-- all lie at or after the first position whose occurred_at_max_us reaches T: a page of a time
-- range starts there, found through its index, instead of walking every older row.
ALTER TABLE chartlog_audit_trail ADD COLUMN trail_position bigint;
ALTER TABLE chartlog_audit_trail ADD COLUMN occurred_at_max_us bigint;

-- The table refuses UPDATE; this one numbering of existing rows is the only rewrite it gets.
ALTER TABLE chartlog_audit_trail DISABLE TRIGGER chartlog_audit_trail_append_only;
UPDATE chartlog_audit_trail AS trail
SET trail_position = numbered.n, occurred_at_max_us = numbered.occurred_at_us
FROM (SELECT audit_id, occurred_at_us,
             row_number() OVER (ORDER BY occurred_at_us, audit_id) AS n
      FROM chartlog_audit_trail) AS numbered
WHERE trail.audit_id = numbered.audit_id;
ALTER TABLE chartlog_audit_trail ENABLE TRIGGER chartlog_audit_trail_append_only;

ALTER TABLE chartlog_audit_trail ALTER COLUMN trail_position SET NOT NULL;
ALTER TABLE chartlog_audit_trail ALTER COLUMN occurred_at_max_us SET NOT NULL;
ALTER TABLE chartlog_audit_trail ADD CONSTRAINT chartlog_audit_trail_position_unique
    UNIQUE (trail_position);

CREATE INDEX chartlog_audit_trail_by_latest_before
    ON chartlog_audit_trail (occurred_at_max_us, trail_position);

-- Each filter's index ends in the sort key, so a filtered page is one index range scan. The
-- time index stays for time ranges.
DROP INDEX chartlog_audit_trail_by_user;
CREATE INDEX chartlog_audit_trail_by_user ON chartlog_audit_trail (user_id, trail_position);

DROP INDEX chartlog_audit_trail_by_patient;
CREATE INDEX chartlog_audit_trail_by_patient ON chartlog_audit_trail (patient_id, trail_position)
    WHERE patient_id IS NOT NULL;

DROP INDEX chartlog_audit_trail_by_action;
CREATE INDEX chartlog_audit_trail_by_action ON chartlog_audit_trail (action, trail_position);
