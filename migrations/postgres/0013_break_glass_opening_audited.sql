-- A break-glass grant gives access only once its opening is on the audit trail (PostgreSQL).
-- The grant is inserted first and the audit row, which goes to the signed audit log, is
-- written after: the two cannot share a transaction. Until the audit row is durable the
-- grant is pending: it gives no access, and the next opening by the same user for the same
-- patient resumes it (writes its audit row, sends its notice, then sets this column) rather
-- than being refused as overlapping it. So no grant gives access without a success row on
-- the trail, and a failed audit write never leaves an open grant that blocks its own retry.
--
-- Grants opened before this migration have none: whether their opening was audited is not
-- known here, so they give no access until their holder opens break-glass again, which
-- resumes them. A grant restored from a backup (which does not carry the column) likewise.
ALTER TABLE chartlog_access_break_glass_grants ADD COLUMN opening_audited_at_us bigint;

-- A grant is evidence for its review: it is never deleted; its review columns are set once,
-- and so is the time its opening was audited (also after a review: the auditor may have
-- judged a grant whose holder completes its opening later).
CREATE OR REPLACE FUNCTION chartlog_access_guard_break_glass() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'UPDATE' THEN
        RAISE EXCEPTION 'break-glass grants are kept for review: % refused', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF (NEW.grant_id, NEW.user_id, NEW.role, NEW.patient_id, NEW.opened_at_us,
        NEW.expires_at_us, NEW.reason_sealed)
          IS DISTINCT FROM
       (OLD.grant_id, OLD.user_id, OLD.role, OLD.patient_id, OLD.opened_at_us,
        OLD.expires_at_us, OLD.reason_sealed)
       OR (OLD.verdict IS NOT NULL
           AND (NEW.verdict, NEW.reviewed_by, NEW.reviewed_at_us)
               IS DISTINCT FROM (OLD.verdict, OLD.reviewed_by, OLD.reviewed_at_us))
       OR (OLD.opening_audited_at_us IS NOT NULL
           AND NEW.opening_audited_at_us IS DISTINCT FROM OLD.opening_audited_at_us) THEN
        RAISE EXCEPTION 'a break-glass grant is reviewed once and never rewritten'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;
