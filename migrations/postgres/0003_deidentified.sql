-- De-identified views (HIPAA Safe Harbor, 45 CFR 164.514(b)(2)) and the audit trail.
--
-- Analysts connect as a login role granted chartlog_analyst. That role may use the schema
-- `deidentified` and SELECT what is in it, and nothing else: not the event log, not the key
-- table, not the chart, history or audit read models.
--
-- Rows are written by the de-identified projection (crates/projections/src/deid). No column
-- holds a name, address line, city, contact, record number, identifier, free text, a full date
-- or a raw chartlog id: patients and rows are keyed by HMAC pseudonyms.

CREATE SCHEMA deidentified;
COMMENT ON SCHEMA deidentified IS
    'HIPAA Safe Harbor de-identified views of chartlog; read-only for chartlog_analyst';

-- The patient table lives outside the analyst schema: analysts read it through the view
-- deidentified.patients, which re-applies the 90+ rule with today's year. A patient ages
-- between their last event and the day an analyst looks; a birth year stored as allowed then
-- may read as 90 or more now.
CREATE TABLE chartlog_deid_patients (
    pseudonym        text     PRIMARY KEY CHECK (pseudonym ~ '^[0-9a-f]{64}$'),
    -- NULL exactly when the patient is grouped as 90 or older.
    birth_year       integer  CHECK (birth_year BETWEEN 1800 AND 9999),
    aged_90_or_over  boolean  NOT NULL,
    sex              text     NOT NULL,
    state            text     CHECK (state ~ '^[A-Z]{2}$'),
    zip3             text     CHECK (zip3 ~ '^[0-9]{3}$'),
    CHECK ((birth_year IS NULL) = aged_90_or_over),
    CHECK ((state IS NULL) = (zip3 IS NULL))
);

CREATE VIEW deidentified.patients AS
SELECT pseudonym,
       CASE WHEN aged_90_or_over OR EXTRACT(YEAR FROM CURRENT_DATE)::integer - birth_year >= 90
            THEN NULL ELSE birth_year END AS birth_year,
       (aged_90_or_over OR EXTRACT(YEAR FROM CURRENT_DATE)::integer - birth_year >= 90)
           AS aged_90_or_over,
       sex,
       state,
       zip3
  FROM public.chartlog_deid_patients;

CREATE TABLE deidentified.observations (
    row_key            text     PRIMARY KEY CHECK (row_key ~ '^[0-9a-f]{64}$'),
    pseudonym          text     NOT NULL,
    year               integer  NOT NULL,
    code_system        text     NOT NULL,
    code               text     NOT NULL,
    value_kind         text     NOT NULL CHECK (value_kind IN ('quantity', 'coded', 'text_removed')),
    -- numeric keeps the precision as written ("1.50").
    value              numeric,
    unit               text,
    value_code_system  text,
    value_code         text,
    CHECK ((value_kind = 'quantity') = (value IS NOT NULL AND unit IS NOT NULL)),
    CHECK ((value_kind = 'coded') = (value_code IS NOT NULL AND value_code_system IS NOT NULL))
);
CREATE INDEX observations_by_pseudonym ON deidentified.observations (pseudonym);
CREATE INDEX observations_by_code ON deidentified.observations (code_system, code, year);

CREATE TABLE deidentified.conditions (
    row_key        text     PRIMARY KEY CHECK (row_key ~ '^[0-9a-f]{64}$'),
    pseudonym      text     NOT NULL,
    code_system    text     NOT NULL,
    code           text     NOT NULL,
    onset_year     integer,
    resolved_year  integer
);
CREATE INDEX conditions_by_pseudonym ON deidentified.conditions (pseudonym);
CREATE INDEX conditions_by_code ON deidentified.conditions (code_system, code);

CREATE TABLE deidentified.medication_orders (
    row_key            text     PRIMARY KEY CHECK (row_key ~ '^[0-9a-f]{64}$'),
    pseudonym          text     NOT NULL,
    year               integer  NOT NULL,
    code_system        text     NOT NULL,
    code               text     NOT NULL,
    dose_value         numeric  NOT NULL,
    dose_unit          text     NOT NULL,
    route              text     NOT NULL,
    frequency          text     NOT NULL,
    discontinued_year  integer
);
CREATE INDEX medication_orders_by_pseudonym ON deidentified.medication_orders (pseudonym);
CREATE INDEX medication_orders_by_code ON deidentified.medication_orders (code_system, code);

CREATE TABLE deidentified.allergies (
    row_key           text  PRIMARY KEY CHECK (row_key ~ '^[0-9a-f]{64}$'),
    pseudonym         text  NOT NULL,
    substance_system  text  NOT NULL,
    substance_code    text  NOT NULL,
    criticality       text  NOT NULL,
    reaction          text
);
CREATE INDEX allergies_by_pseudonym ON deidentified.allergies (pseudonym);

-- The analyst role. Roles are cluster-wide, so another database of the cluster may have made
-- it already (or be making it right now: parallel test databases migrate concurrently).
-- NOLOGIN: deployments grant it to their own login roles.
DO $$
BEGIN
    CREATE ROLE chartlog_analyst NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

-- Nothing in public: the event log, keys, chart, history and audit trail. Tables there carry
-- no grant to PUBLIC; these revokes make the intent explicit and hold if one is ever granted.
REVOKE ALL ON SCHEMA public FROM chartlog_analyst;
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM chartlog_analyst;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM chartlog_analyst;
-- The PostgreSQL 15 default, stated for older servers: nobody but the owner creates objects
-- in public, so an analyst cannot plant a table or function there.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;

-- Read-only on the de-identified schema, now and for tables later migrations add.
REVOKE ALL ON SCHEMA deidentified FROM PUBLIC;
GRANT USAGE ON SCHEMA deidentified TO chartlog_analyst;
GRANT SELECT ON ALL TABLES IN SCHEMA deidentified TO chartlog_analyst;
ALTER DEFAULT PRIVILEGES IN SCHEMA deidentified GRANT SELECT ON TABLES TO chartlog_analyst;

-- The audit trail: every PHI create, read, update and delete, every login, logout, session
-- expiry, access denial, break-glass opening, export and erasure. Ids, codes, times and client
-- addresses only; never a PHI payload. Kept when a patient is erased (HIPAA retention), and
-- append-only: an audit row that could be edited would prove nothing.
CREATE TABLE chartlog_audit_trail (
    audit_id         uuid     PRIMARY KEY,
    -- The global log position of the event the row comes from, when it comes from one.
    source_position  bigint   UNIQUE,
    occurred_at_us   bigint   NOT NULL,
    -- NULL only for a failed login under a user name that matches no account.
    user_id          uuid,
    role             text,
    purpose_of_use   text,
    break_glass      boolean  NOT NULL,
    patient_id       uuid,
    entity           text,
    record_id        uuid,
    action           text     NOT NULL,
    outcome          text     NOT NULL CHECK (outcome IN ('success', 'failure', 'denied')),
    client_address   inet,
    event_type       text,
    CHECK ((user_id IS NULL) = (role IS NULL)),
    CHECK ((user_id IS NULL) = (purpose_of_use IS NULL))
);

-- Filters auditors use: by user, by patient (the accounting of disclosures), by action, by
-- time range, and the break-glass review queue.
CREATE INDEX chartlog_audit_trail_by_time ON chartlog_audit_trail (occurred_at_us);
CREATE INDEX chartlog_audit_trail_by_user ON chartlog_audit_trail (user_id, occurred_at_us);
CREATE INDEX chartlog_audit_trail_by_patient ON chartlog_audit_trail (patient_id, occurred_at_us)
    WHERE patient_id IS NOT NULL;
CREATE INDEX chartlog_audit_trail_by_action ON chartlog_audit_trail (action, occurred_at_us);
CREATE INDEX chartlog_audit_trail_break_glass ON chartlog_audit_trail (occurred_at_us)
    WHERE break_glass;

CREATE FUNCTION chartlog_audit_refuse_rewrite() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'chartlog_audit_trail is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER chartlog_audit_trail_append_only
    BEFORE UPDATE OR DELETE ON chartlog_audit_trail
    FOR EACH ROW EXECUTE FUNCTION chartlog_audit_refuse_rewrite();

CREATE TRIGGER chartlog_audit_trail_no_truncate
    BEFORE TRUNCATE ON chartlog_audit_trail
    FOR EACH STATEMENT EXECUTE FUNCTION chartlog_audit_refuse_rewrite();
