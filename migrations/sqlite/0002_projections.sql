-- Projection checkpoints, and the chart and record-history read models (SQLite dialect).
--
-- A projection's rows and its checkpoint are written in one transaction, so each event takes
-- effect exactly once. Every read model that holds PHI holds it sealed under the patient's data
-- key (the `sealed` columns), so destroying the key reaches these rows at once; lookups by
-- identifier go through keyed blind indexes (HMAC digests), never plaintext. Every table that
-- holds a patient's rows is keyed by patient_id first, so erasure drops them through the
-- primary key, without a scan. Ids are 16-byte UUID blobs, as in chartlog_events.

CREATE TABLE chartlog_projection_checkpoints (
    name           TEXT    PRIMARY KEY NOT NULL,
    version        INTEGER NOT NULL CHECK (version > 0),
    position       INTEGER NOT NULL CHECK (position >= 0),
    updated_at_us  INTEGER NOT NULL
) STRICT;

CREATE TABLE chartlog_chart_patients (
    patient_id      BLOB    PRIMARY KEY NOT NULL CHECK (length(patient_id) = 16),
    stream_version  INTEGER NOT NULL CHECK (stream_version > 0),
    erased_at_us    INTEGER
) STRICT;

CREATE TABLE chartlog_chart_entries (
    patient_id      BLOB    NOT NULL CHECK (length(patient_id) = 16),
    kind            TEXT    NOT NULL,
    entry_id        BLOB    NOT NULL CHECK (length(entry_id) = 16),
    stream_version  INTEGER NOT NULL CHECK (stream_version > 0),
    sealed          BLOB    NOT NULL,
    PRIMARY KEY (patient_id, kind, entry_id)
) STRICT, WITHOUT ROWID;

CREATE TABLE chartlog_chart_lookups (
    patient_id  BLOB NOT NULL CHECK (length(patient_id) = 16),
    kind        TEXT NOT NULL,
    digest      BLOB NOT NULL CHECK (length(digest) = 32),
    PRIMARY KEY (patient_id, kind)
) STRICT, WITHOUT ROWID;
CREATE INDEX chartlog_chart_lookups_by_digest ON chartlog_chart_lookups (kind, digest);

CREATE TABLE chartlog_history (
    patient_id      BLOB    NOT NULL CHECK (length(patient_id) = 16),
    stream_version  INTEGER NOT NULL CHECK (stream_version > 0),
    recorded_at_us  INTEGER NOT NULL,
    actor_user_id   BLOB    NOT NULL CHECK (length(actor_user_id) = 16),
    actor_role      TEXT    NOT NULL,
    purpose_of_use  TEXT    NOT NULL,
    break_glass     INTEGER NOT NULL CHECK (break_glass IN (0, 1)),
    event_type      TEXT    NOT NULL,
    sealed          BLOB    NOT NULL,
    PRIMARY KEY (patient_id, stream_version)
) STRICT, WITHOUT ROWID;

CREATE TABLE chartlog_history_entries (
    patient_id  BLOB NOT NULL CHECK (length(patient_id) = 16),
    kind        TEXT NOT NULL,
    entry_id    BLOB NOT NULL CHECK (length(entry_id) = 16),
    sealed      BLOB NOT NULL,
    PRIMARY KEY (patient_id, kind, entry_id)
) STRICT, WITHOUT ROWID;
