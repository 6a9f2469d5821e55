-- Reading the audit trail back (SQLite): pages ordered by (occurred_at_us, audit_id), read by
-- keyset. Each filter's index ends in the full sort key, so a page is one index range scan
-- with no sort, however many rows share a microsecond.
--
-- Entity and action codes are not constrained by CHECK (0003): new codes (user, session,
-- search, ...) need no change of the table.

DROP INDEX chartlog_audit_trail_by_time;
CREATE INDEX chartlog_audit_trail_by_time ON chartlog_audit_trail (occurred_at_us, audit_id);

DROP INDEX chartlog_audit_trail_by_user;
CREATE INDEX chartlog_audit_trail_by_user
    ON chartlog_audit_trail (user_id, occurred_at_us, audit_id);

-- Also the accounting of disclosures: one patient's rows, in time order.
DROP INDEX chartlog_audit_trail_by_patient;
CREATE INDEX chartlog_audit_trail_by_patient
    ON chartlog_audit_trail (patient_id, occurred_at_us, audit_id)
    WHERE patient_id IS NOT NULL;

DROP INDEX chartlog_audit_trail_by_action;
CREATE INDEX chartlog_audit_trail_by_action
    ON chartlog_audit_trail (action, occurred_at_us, audit_id);
