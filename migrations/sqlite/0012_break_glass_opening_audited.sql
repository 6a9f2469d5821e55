-- A break-glass grant gives access only once its opening is on the audit trail. The grant is
-- inserted first and the audit row, which goes to the signed audit log, is written after: the
-- two cannot share a transaction. Until the audit row is durable the grant is pending: it
-- gives no access, and the next opening by the same user for the same patient resumes it
-- (writes its audit row, sends its notice, then sets this column) rather than being refused
-- as overlapping it. So no grant gives access without a success row on the trail, and a
-- failed audit write never leaves an open grant that blocks its own retry.
--
-- Grants opened before this migration have none: whether their opening was audited is not
-- known here, so they give no access until their holder opens break-glass again, which
-- resumes them. A grant restored from a backup (which does not carry the column) likewise.
ALTER TABLE chartlog_access_break_glass_grants ADD COLUMN opening_audited_at_us INTEGER;

-- A grant is evidence for its review: it is never deleted; its review columns are set once,
-- and so is the time its opening was audited (also after a review: the auditor may have
-- judged a grant whose holder completes its opening later).
DROP TRIGGER chartlog_access_break_glass_review_once;

CREATE TRIGGER chartlog_access_break_glass_review_once
    BEFORE UPDATE ON chartlog_access_break_glass_grants
    WHEN NEW.grant_id IS NOT OLD.grant_id
      OR NEW.user_id IS NOT OLD.user_id
      OR NEW.role IS NOT OLD.role
      OR NEW.patient_id IS NOT OLD.patient_id
      OR NEW.opened_at_us IS NOT OLD.opened_at_us
      OR NEW.expires_at_us IS NOT OLD.expires_at_us
      OR NEW.reason_sealed IS NOT OLD.reason_sealed
      OR (OLD.verdict IS NOT NULL
          AND (NEW.verdict IS NOT OLD.verdict
               OR NEW.reviewed_by IS NOT OLD.reviewed_by
               OR NEW.reviewed_at_us IS NOT OLD.reviewed_at_us))
      OR (OLD.opening_audited_at_us IS NOT NULL
          AND NEW.opening_audited_at_us IS NOT OLD.opening_audited_at_us)
BEGIN
    SELECT RAISE(ABORT, 'a break-glass grant is reviewed once and never rewritten');
END;
