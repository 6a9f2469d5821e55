-- Decision-state snapshots (SQLite dialect): the latest fold of a patient's stream, so that a
-- command reads one snapshot and the few events after it, not the whole history.
--
-- A snapshot is a cache beside the log, never part of it: it is sealed under the patient's data
-- key (so erasure reaches it), bound to the stream version and head hash it was taken at, and
-- replaced as the stream grows. Losing the table loses nothing; backups leave it out.

CREATE TABLE chartlog_snapshots (
    stream_id       TEXT    PRIMARY KEY NOT NULL,
    stream_version  INTEGER NOT NULL CHECK (stream_version > 0),
    head_hash       BLOB    NOT NULL CHECK (length(head_hash) = 32),
    schema_version  INTEGER NOT NULL CHECK (schema_version > 0),
    data_key_id     BLOB    NOT NULL CHECK (length(data_key_id) = 16),
    sealed          BLOB    NOT NULL,
    taken_at_us     INTEGER NOT NULL
) STRICT;
