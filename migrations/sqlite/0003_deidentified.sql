-- De-identified views (HIPAA Safe Harbor, 45 CFR 164.514(b)(2)) and the audit trail (SQLite).
--
-- SQLite has no roles or schemas to fence analysts with: these plain `deid_` tables are
-- exported (NDJSON, CSV), never opened by analysts directly. The export re-applies the 90+
-- rule with the release year. No column holds a name, address line, city, contact, record
-- number, identifier, free text, a full date or a raw chartlog id.

CREATE TABLE deid_patients (
    pseudonym        TEXT     PRIMARY KEY NOT NULL CHECK (length(pseudonym) = 64),
    -- NULL exactly when the patient is grouped as 90 or older.
    birth_year       INTEGER  CHECK (birth_year BETWEEN 1800 AND 9999),
    aged_90_or_over  INTEGER  NOT NULL CHECK (aged_90_or_over IN (0, 1)),
    sex              TEXT     NOT NULL,
    state            TEXT     CHECK (length(state) = 2),
    zip3             TEXT     CHECK (length(zip3) = 3),
    CHECK ((birth_year IS NULL) = aged_90_or_over),
    CHECK ((state IS NULL) = (zip3 IS NULL))
) STRICT;

CREATE TABLE deid_observations (
    row_key            TEXT     PRIMARY KEY NOT NULL CHECK (length(row_key) = 64),
    pseudonym          TEXT     NOT NULL,
    year               INTEGER  NOT NULL,
    code_system        TEXT     NOT NULL,
    code               TEXT     NOT NULL,
    value_kind         TEXT     NOT NULL CHECK (value_kind IN ('quantity', 'coded', 'text_removed')),
    -- Decimal text as written: SQLite's REAL would turn "1.50" into 1.5.
    value              TEXT,
    unit               TEXT,
    value_code_system  TEXT,
    value_code         TEXT,
    CHECK ((value_kind = 'quantity') = (value IS NOT NULL AND unit IS NOT NULL)),
    CHECK ((value_kind = 'coded') = (value_code IS NOT NULL AND value_code_system IS NOT NULL))
) STRICT;
CREATE INDEX deid_observations_by_pseudonym ON deid_observations (pseudonym);

CREATE TABLE deid_conditions (
    row_key        TEXT     PRIMARY KEY NOT NULL CHECK (length(row_key) = 64),
    pseudonym      TEXT     NOT NULL,
    code_system    TEXT     NOT NULL,
    code           TEXT     NOT NULL,
    onset_year     INTEGER,
    resolved_year  INTEGER
) STRICT;
CREATE INDEX deid_conditions_by_pseudonym ON deid_conditions (pseudonym);

CREATE TABLE deid_medication_orders (
    row_key            TEXT     PRIMARY KEY NOT NULL CHECK (length(row_key) = 64),
    pseudonym          TEXT     NOT NULL,
    year               INTEGER  NOT NULL,
    code_system        TEXT     NOT NULL,
    code               TEXT     NOT NULL,
    dose_value         TEXT     NOT NULL,
    dose_unit          TEXT     NOT NULL,
    route              TEXT     NOT NULL,
    frequency          TEXT     NOT NULL,
    discontinued_year  INTEGER
) STRICT;
CREATE INDEX deid_medication_orders_by_pseudonym ON deid_medication_orders (pseudonym);

CREATE TABLE deid_allergies (
    row_key           TEXT  PRIMARY KEY NOT NULL CHECK (length(row_key) = 64),
    pseudonym         TEXT  NOT NULL,
    substance_system  TEXT  NOT NULL,
    substance_code    TEXT  NOT NULL,
    criticality       TEXT  NOT NULL,
    reaction          TEXT
) STRICT;
CREATE INDEX deid_allergies_by_pseudonym ON deid_allergies (pseudonym);

-- The audit trail: ids, codes, times and client addresses only; kept when a patient is erased
-- (HIPAA retention), and append-only.
CREATE TABLE chartlog_audit_trail (
    audit_id         BLOB     PRIMARY KEY NOT NULL CHECK (length(audit_id) = 16),
    source_position  INTEGER  UNIQUE,
    occurred_at_us   INTEGER  NOT NULL,
    -- NULL only for a failed login under a user name that matches no account.
    user_id          BLOB     CHECK (length(user_id) = 16),
    role             TEXT,
    purpose_of_use   TEXT,
    break_glass      INTEGER  NOT NULL CHECK (break_glass IN (0, 1)),
    patient_id       BLOB     CHECK (length(patient_id) = 16),
    entity           TEXT,
    record_id        BLOB     CHECK (length(record_id) = 16),
    action           TEXT     NOT NULL,
    outcome          TEXT     NOT NULL CHECK (outcome IN ('success', 'failure', 'denied')),
    client_address   TEXT,
    event_type       TEXT,
    CHECK ((user_id IS NULL) = (role IS NULL)),
    CHECK ((user_id IS NULL) = (purpose_of_use IS NULL))
) STRICT;

CREATE INDEX chartlog_audit_trail_by_time ON chartlog_audit_trail (occurred_at_us);
CREATE INDEX chartlog_audit_trail_by_user ON chartlog_audit_trail (user_id, occurred_at_us);
CREATE INDEX chartlog_audit_trail_by_patient ON chartlog_audit_trail (patient_id, occurred_at_us)
    WHERE patient_id IS NOT NULL;
CREATE INDEX chartlog_audit_trail_by_action ON chartlog_audit_trail (action, occurred_at_us);
CREATE INDEX chartlog_audit_trail_break_glass ON chartlog_audit_trail (occurred_at_us)
    WHERE break_glass = 1;

CREATE TRIGGER chartlog_audit_trail_no_update BEFORE UPDATE ON chartlog_audit_trail
BEGIN
    SELECT RAISE(ABORT, 'chartlog_audit_trail is append-only: UPDATE refused');
END;

CREATE TRIGGER chartlog_audit_trail_no_delete BEFORE DELETE ON chartlog_audit_trail
BEGIN
    SELECT RAISE(ABORT, 'chartlog_audit_trail is append-only: DELETE refused');
END;
