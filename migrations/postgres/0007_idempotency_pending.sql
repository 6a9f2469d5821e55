-- Idempotency reservations: a request with an Idempotency-Key first claims its key with a row
-- that has no answer yet (status and body NULL), then runs, then stores its answer in that
-- row. Two requests with one key can no longer both run: only one INSERT claims the key. A
-- claim's expires_at_us is short (the in-progress bound, not the retention): the claim of a
-- server that crashed mid-request expires, and the key may then be claimed again.

ALTER TABLE chartlog_access_idempotency_records
    ALTER COLUMN status DROP NOT NULL,
    ALTER COLUMN body_sealed DROP NOT NULL,
    ADD CONSTRAINT chartlog_access_idempotency_pending_has_no_body
        CHECK ((status IS NULL) = (body_sealed IS NULL));
