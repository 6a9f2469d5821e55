-- Access control: user accounts, password history, sessions, recovery codes, failed logins,
-- break-glass grants and idempotency records, written by chartlog-access.
--
-- No secret is stored in the clear: passwords are argon2id PHC strings, session tokens and
-- recovery codes SHA-256 digests, and TOTP secrets, break-glass reasons and idempotent
-- response bodies are sealed (AES-256-SIV) under the access data key kept in the key
-- directory (access-key.json), never in the database. Times are unix microseconds (`_us`).
-- chartlog_analyst is granted nothing here.

CREATE TABLE chartlog_access_users (
    user_id                 uuid     PRIMARY KEY,
    username                text     NOT NULL UNIQUE CHECK (username ~ '^[a-z0-9._-]{3,64}$'),
    role                    text     NOT NULL CHECK (role IN ('physician', 'nurse', 'radiologist',
                                         'lab_technician', 'administrator', 'auditor', 'analyst',
                                         'patient')),
    -- The patient a patient account reads as; set exactly for the patient role.
    patient_id              uuid,
    password_hash           text     NOT NULL CHECK (password_hash LIKE '$argon2id$%'),
    must_change_password    boolean  NOT NULL,
    disabled                boolean  NOT NULL,
    -- The enrolled TOTP secret, sealed; NULL when no second factor is enrolled.
    totp_sealed             bytea,
    -- A secret handed out for enrollment and not yet confirmed with a code, sealed.
    totp_pending_sealed     bytea,
    -- The last TOTP time step accepted: a code is accepted once only.
    totp_last_step          bigint,
    created_at_us           bigint   NOT NULL,
    password_changed_at_us  bigint   NOT NULL,
    last_login_at_us        bigint,
    disabled_at_us          bigint,
    CHECK ((role = 'patient') = (patient_id IS NOT NULL)),
    CHECK (disabled = (disabled_at_us IS NOT NULL))
);

-- The last few password hashes of each account (the current one included), to refuse reuse.
CREATE TABLE chartlog_access_password_history (
    user_id        uuid    NOT NULL REFERENCES chartlog_access_users (user_id),
    generation     bigint  NOT NULL CHECK (generation > 0),
    password_hash  text    NOT NULL CHECK (password_hash LIKE '$argon2id$%'),
    set_at_us      bigint  NOT NULL,
    PRIMARY KEY (user_id, generation)
);

CREATE TABLE chartlog_access_sessions (
    session_id       uuid    PRIMARY KEY,
    -- SHA-256 of the bearer token: the token itself is shown to the client once.
    token_hash       bytea   NOT NULL UNIQUE CHECK (octet_length(token_hash) = 32),
    user_id          uuid    NOT NULL REFERENCES chartlog_access_users (user_id),
    created_at_us    bigint  NOT NULL,
    last_seen_at_us  bigint  NOT NULL,
    ended_at_us      bigint,
    end_reason       text    CHECK (end_reason IN ('logout', 'expired', 'revoked')),
    CHECK ((ended_at_us IS NULL) = (end_reason IS NULL))
);
CREATE INDEX chartlog_access_sessions_open_by_user
    ON chartlog_access_sessions (user_id) WHERE ended_at_us IS NULL;

CREATE TABLE chartlog_access_recovery_codes (
    user_id        uuid    NOT NULL REFERENCES chartlog_access_users (user_id),
    code_hash      bytea   NOT NULL CHECK (octet_length(code_hash) = 32),
    created_at_us  bigint  NOT NULL,
    used_at_us     bigint,
    PRIMARY KEY (user_id, code_hash)
);

-- Failed logins, for throttling per account name and per client address (IPv6 by /64).
-- A wrong current password at a password change has no address.
CREATE TABLE chartlog_access_login_failures (
    username        text,
    client_address  text,
    failed_at_us    bigint  NOT NULL,
    CHECK (username IS NOT NULL OR client_address IS NOT NULL)
);
CREATE INDEX chartlog_access_login_failures_by_username
    ON chartlog_access_login_failures (username, failed_at_us);
CREATE INDEX chartlog_access_login_failures_by_address
    ON chartlog_access_login_failures (client_address, failed_at_us);

-- Emergency access outside the care relationship. A grant is evidence for its review: it is
-- never deleted, and only its review columns may be set, once.
CREATE TABLE chartlog_access_break_glass_grants (
    grant_id        uuid    PRIMARY KEY,
    user_id         uuid    NOT NULL REFERENCES chartlog_access_users (user_id),
    role            text    NOT NULL,
    patient_id      uuid    NOT NULL,
    opened_at_us    bigint  NOT NULL,
    expires_at_us   bigint  NOT NULL CHECK (expires_at_us > opened_at_us),
    reason_sealed   bytea   NOT NULL,
    verdict         text    CHECK (verdict IN ('justified', 'unjustified')),
    reviewed_by     uuid    REFERENCES chartlog_access_users (user_id),
    reviewed_at_us  bigint,
    CHECK ((verdict IS NULL) = (reviewed_by IS NULL)),
    CHECK ((verdict IS NULL) = (reviewed_at_us IS NULL))
);
CREATE INDEX chartlog_access_break_glass_by_user_patient
    ON chartlog_access_break_glass_grants (user_id, patient_id, expires_at_us);
CREATE INDEX chartlog_access_break_glass_pending
    ON chartlog_access_break_glass_grants (opened_at_us) WHERE verdict IS NULL;

CREATE FUNCTION chartlog_access_guard_break_glass() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'UPDATE' THEN
        RAISE EXCEPTION 'break-glass grants are kept for review: % refused', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF OLD.verdict IS NOT NULL
       OR (NEW.grant_id, NEW.user_id, NEW.role, NEW.patient_id, NEW.opened_at_us,
           NEW.expires_at_us, NEW.reason_sealed)
          IS DISTINCT FROM
          (OLD.grant_id, OLD.user_id, OLD.role, OLD.patient_id, OLD.opened_at_us,
           OLD.expires_at_us, OLD.reason_sealed) THEN
        RAISE EXCEPTION 'a break-glass grant is reviewed once and never rewritten'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER chartlog_access_break_glass_guard
    BEFORE UPDATE OR DELETE ON chartlog_access_break_glass_grants
    FOR EACH ROW EXECUTE FUNCTION chartlog_access_guard_break_glass();

CREATE TRIGGER chartlog_access_break_glass_no_truncate
    BEFORE TRUNCATE ON chartlog_access_break_glass_grants
    FOR EACH STATEMENT EXECUTE FUNCTION chartlog_access_guard_break_glass();

-- Responses kept for replay of a request sent again with the same Idempotency-Key.
CREATE TABLE chartlog_access_idempotency_records (
    user_id        uuid    NOT NULL,
    -- SHA-256 of the client's key: the key is the client's text, not stored as sent.
    key_hash       bytea   NOT NULL CHECK (octet_length(key_hash) = 32),
    fingerprint    bytea   NOT NULL CHECK (octet_length(fingerprint) = 32),
    status         bigint  NOT NULL CHECK (status BETWEEN 100 AND 599),
    body_sealed    bytea   NOT NULL,
    created_at_us  bigint  NOT NULL,
    expires_at_us  bigint  NOT NULL,
    PRIMARY KEY (user_id, key_hash)
);
CREATE INDEX chartlog_access_idempotency_by_expiry
    ON chartlog_access_idempotency_records (expires_at_us);
