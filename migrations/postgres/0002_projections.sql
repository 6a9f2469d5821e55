-- Projection checkpoints, and the chart and record-history read models.
--
-- A projection's rows and its checkpoint are written in one transaction, so each event takes
-- effect exactly once. Every read model that holds PHI holds it sealed under the patient's data
-- key (the `sealed` columns), so destroying the key reaches these rows at once; lookups by
-- identifier go through keyed blind indexes (HMAC digests), never plaintext. Every table that
-- holds a patient's rows is keyed by patient_id first, so erasure drops them through the
-- primary key, without a scan.

CREATE TABLE chartlog_projection_checkpoints (
    name           text    PRIMARY KEY,
    version        integer NOT NULL CHECK (version > 0),
    position       bigint  NOT NULL CHECK (position >= 0),
    updated_at_us  bigint  NOT NULL
);

-- One row per patient the chart has seen: the stream version folded so far and, after an
-- erasure, when it happened. No PHI: a random id, a version, the tombstone's time.
CREATE TABLE chartlog_chart_patients (
    patient_id      uuid   PRIMARY KEY,
    stream_version  bigint NOT NULL CHECK (stream_version > 0),
    erased_at_us    bigint
);

-- The current state of each part of a chart (demographics, a condition, an allergy, ...):
-- a JSON object sealed under the patient's key, with patient id, kind and entry id as
-- associated data.
CREATE TABLE chartlog_chart_entries (
    patient_id      uuid   NOT NULL,
    kind            text   NOT NULL,
    entry_id        uuid   NOT NULL,
    stream_version  bigint NOT NULL CHECK (stream_version > 0),
    sealed          bytea  NOT NULL,
    PRIMARY KEY (patient_id, kind, entry_id)
);

-- Blind indexes: HMAC-SHA-256 of the normalised MRN, and of family name + birth date, under
-- an index key kept in the key files (never in the database).
CREATE TABLE chartlog_chart_lookups (
    patient_id  uuid  NOT NULL,
    kind        text  NOT NULL,
    digest      bytea NOT NULL CHECK (octet_length(digest) = 32),
    PRIMARY KEY (patient_id, kind)
);
CREATE INDEX chartlog_chart_lookups_by_digest ON chartlog_chart_lookups (kind, digest);

-- Record history: one row per change of a patient's record. Who and when come from the clear
-- event header (never PHI); what changed (the before and after of each field) is sealed.
CREATE TABLE chartlog_history (
    patient_id      uuid    NOT NULL,
    stream_version  bigint  NOT NULL CHECK (stream_version > 0),
    recorded_at_us  bigint  NOT NULL,
    actor_user_id   uuid    NOT NULL,
    actor_role      text    NOT NULL,
    purpose_of_use  text    NOT NULL,
    break_glass     boolean NOT NULL,
    event_type      text    NOT NULL,
    sealed          bytea   NOT NULL,
    PRIMARY KEY (patient_id, stream_version)
);

-- The history projection's own copy of each mutable entry's current value (sealed), from
-- which it derives the "before" of the next change.
CREATE TABLE chartlog_history_entries (
    patient_id  uuid  NOT NULL,
    kind        text  NOT NULL,
    entry_id    uuid  NOT NULL,
    sealed      bytea NOT NULL,
    PRIMARY KEY (patient_id, kind, entry_id)
);
