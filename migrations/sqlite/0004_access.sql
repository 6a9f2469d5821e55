-- Access control (SQLite): user accounts, password history, sessions, recovery codes, failed
-- logins, break-glass grants and idempotency records, written by chartlog-access.
--
-- No secret is stored in the clear: passwords are argon2id PHC strings, session tokens and
-- recovery codes SHA-256 digests, and TOTP secrets, break-glass reasons and idempotent
-- response bodies are sealed (AES-256-SIV) under the access data key kept in the key
-- directory (access-key.json), never in the database. Times are unix microseconds (`_us`);
-- ids are 16-byte UUID blobs.

CREATE TABLE chartlog_access_users (
    user_id                 BLOB    PRIMARY KEY NOT NULL CHECK (length(user_id) = 16),
    username                TEXT    NOT NULL UNIQUE CHECK (length(username) BETWEEN 3 AND 64),
    role                    TEXT    NOT NULL CHECK (role IN ('physician', 'nurse', 'radiologist',
                                        'lab_technician', 'administrator', 'auditor', 'analyst',
                                        'patient')),
    -- The patient a patient account reads as; set exactly for the patient role.
    patient_id              BLOB    CHECK (length(patient_id) = 16),
    password_hash           TEXT    NOT NULL CHECK (password_hash LIKE '$argon2id$%'),
    must_change_password    INTEGER NOT NULL CHECK (must_change_password IN (0, 1)),
    disabled                INTEGER NOT NULL CHECK (disabled IN (0, 1)),
    -- The enrolled TOTP secret, sealed; NULL when no second factor is enrolled.
    totp_sealed             BLOB,
    -- A secret handed out for enrollment and not yet confirmed with a code, sealed.
    totp_pending_sealed     BLOB,
    -- The last TOTP time step accepted: a code is accepted once only.
    totp_last_step          INTEGER,
    created_at_us           INTEGER NOT NULL,
    password_changed_at_us  INTEGER NOT NULL,
    last_login_at_us        INTEGER,
    disabled_at_us          INTEGER,
    CHECK ((role = 'patient') = (patient_id IS NOT NULL)),
    CHECK (disabled = (disabled_at_us IS NOT NULL))
) STRICT;

-- The last few password hashes of each account (the current one included), to refuse reuse.
CREATE TABLE chartlog_access_password_history (
    user_id        BLOB    NOT NULL REFERENCES chartlog_access_users (user_id),
    generation     INTEGER NOT NULL CHECK (generation > 0),
    password_hash  TEXT    NOT NULL CHECK (password_hash LIKE '$argon2id$%'),
    set_at_us      INTEGER NOT NULL,
    PRIMARY KEY (user_id, generation)
) STRICT, WITHOUT ROWID;

CREATE TABLE chartlog_access_sessions (
    session_id       BLOB    PRIMARY KEY NOT NULL CHECK (length(session_id) = 16),
    -- SHA-256 of the bearer token: the token itself is shown to the client once.
    token_hash       BLOB    NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    user_id          BLOB    NOT NULL REFERENCES chartlog_access_users (user_id),
    created_at_us    INTEGER NOT NULL,
    last_seen_at_us  INTEGER NOT NULL,
    ended_at_us      INTEGER,
    end_reason       TEXT    CHECK (end_reason IN ('logout', 'expired', 'revoked')),
    CHECK ((ended_at_us IS NULL) = (end_reason IS NULL))
) STRICT;
CREATE INDEX chartlog_access_sessions_open_by_user
    ON chartlog_access_sessions (user_id) WHERE ended_at_us IS NULL;

CREATE TABLE chartlog_access_recovery_codes (
    user_id        BLOB    NOT NULL REFERENCES chartlog_access_users (user_id),
    code_hash      BLOB    NOT NULL CHECK (length(code_hash) = 32),
    created_at_us  INTEGER NOT NULL,
    used_at_us     INTEGER,
    PRIMARY KEY (user_id, code_hash)
) STRICT, WITHOUT ROWID;

-- Failed logins, for throttling per account name and per client address (IPv6 by /64).
-- A wrong current password at a password change has no address.
CREATE TABLE chartlog_access_login_failures (
    username        TEXT,
    client_address  TEXT,
    failed_at_us    INTEGER NOT NULL,
    CHECK (username IS NOT NULL OR client_address IS NOT NULL)
) STRICT;
CREATE INDEX chartlog_access_login_failures_by_username
    ON chartlog_access_login_failures (username, failed_at_us);
CREATE INDEX chartlog_access_login_failures_by_address
    ON chartlog_access_login_failures (client_address, failed_at_us);

-- Emergency access outside the care relationship. A grant is evidence for its review: it is
-- never deleted, and only its review columns may be set, once.
CREATE TABLE chartlog_access_break_glass_grants (
    grant_id        BLOB    PRIMARY KEY NOT NULL CHECK (length(grant_id) = 16),
    user_id         BLOB    NOT NULL REFERENCES chartlog_access_users (user_id),
    role            TEXT    NOT NULL,
    patient_id      BLOB    NOT NULL CHECK (length(patient_id) = 16),
    opened_at_us    INTEGER NOT NULL,
    expires_at_us   INTEGER NOT NULL CHECK (expires_at_us > opened_at_us),
    reason_sealed   BLOB    NOT NULL,
    verdict         TEXT    CHECK (verdict IN ('justified', 'unjustified')),
    reviewed_by     BLOB    REFERENCES chartlog_access_users (user_id),
    reviewed_at_us  INTEGER,
    CHECK ((verdict IS NULL) = (reviewed_by IS NULL)),
    CHECK ((verdict IS NULL) = (reviewed_at_us IS NULL))
) STRICT;
CREATE INDEX chartlog_access_break_glass_by_user_patient
    ON chartlog_access_break_glass_grants (user_id, patient_id, expires_at_us);
CREATE INDEX chartlog_access_break_glass_pending
    ON chartlog_access_break_glass_grants (opened_at_us) WHERE verdict IS NULL;

CREATE TRIGGER chartlog_access_break_glass_no_delete
    BEFORE DELETE ON chartlog_access_break_glass_grants
BEGIN
    SELECT RAISE(ABORT, 'break-glass grants are kept for review: DELETE refused');
END;

CREATE TRIGGER chartlog_access_break_glass_review_once
    BEFORE UPDATE ON chartlog_access_break_glass_grants
    WHEN OLD.verdict IS NOT NULL
      OR NEW.grant_id IS NOT OLD.grant_id
      OR NEW.user_id IS NOT OLD.user_id
      OR NEW.role IS NOT OLD.role
      OR NEW.patient_id IS NOT OLD.patient_id
      OR NEW.opened_at_us IS NOT OLD.opened_at_us
      OR NEW.expires_at_us IS NOT OLD.expires_at_us
      OR NEW.reason_sealed IS NOT OLD.reason_sealed
BEGIN
    SELECT RAISE(ABORT, 'a break-glass grant is reviewed once and never rewritten');
END;

-- Responses kept for replay of a request sent again with the same Idempotency-Key.
CREATE TABLE chartlog_access_idempotency_records (
    user_id        BLOB    NOT NULL CHECK (length(user_id) = 16),
    -- SHA-256 of the client's key: the key is the client's text, not stored as sent.
    key_hash       BLOB    NOT NULL CHECK (length(key_hash) = 32),
    fingerprint    BLOB    NOT NULL CHECK (length(fingerprint) = 32),
    status         INTEGER NOT NULL CHECK (status BETWEEN 100 AND 599),
    body_sealed    BLOB    NOT NULL,
    created_at_us  INTEGER NOT NULL,
    expires_at_us  INTEGER NOT NULL,
    PRIMARY KEY (user_id, key_hash)
) STRICT, WITHOUT ROWID;
CREATE INDEX chartlog_access_idempotency_by_expiry
    ON chartlog_access_idempotency_records (expires_at_us);
