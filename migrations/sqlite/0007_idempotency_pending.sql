-- Idempotency reservations (SQLite): a request with an Idempotency-Key first claims its key
-- with a row that has no answer yet (status and body NULL), then runs, then stores its answer
-- in that row. Two requests with one key can no longer both run: only one INSERT claims the
-- key. A claim's expires_at_us is short (the in-progress bound, not the retention): the claim
-- of a server that crashed mid-request expires, and the key may then be claimed again.
--
-- SQLite cannot relax NOT NULL in place: the table is rebuilt with the same rows.

CREATE TABLE chartlog_access_idempotency_records_0007 (
    user_id        BLOB    NOT NULL CHECK (length(user_id) = 16),
    -- SHA-256 of the client's key: the key is the client's text, not stored as sent.
    key_hash       BLOB    NOT NULL CHECK (length(key_hash) = 32),
    fingerprint    BLOB    NOT NULL CHECK (length(fingerprint) = 32),
    -- NULL while the request that claimed the key is in progress.
    status         INTEGER CHECK (status BETWEEN 100 AND 599),
    body_sealed    BLOB,
    created_at_us  INTEGER NOT NULL,
    expires_at_us  INTEGER NOT NULL,
    PRIMARY KEY (user_id, key_hash),
    CHECK ((status IS NULL) = (body_sealed IS NULL))
) STRICT, WITHOUT ROWID;

INSERT INTO chartlog_access_idempotency_records_0007
    (user_id, key_hash, fingerprint, status, body_sealed, created_at_us, expires_at_us)
SELECT user_id, key_hash, fingerprint, status, body_sealed, created_at_us, expires_at_us
FROM chartlog_access_idempotency_records;

DROP TABLE chartlog_access_idempotency_records;
ALTER TABLE chartlog_access_idempotency_records_0007
    RENAME TO chartlog_access_idempotency_records;
CREATE INDEX chartlog_access_idempotency_by_expiry
    ON chartlog_access_idempotency_records (expires_at_us);
