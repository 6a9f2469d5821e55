-- The event log, the stream heads and the data-key table (SQLite dialect).
--
-- SQLite has a single writer, so positions commit in order and the global log has no
-- late-commit gaps to guard against. chartlog_events is append-only: triggers refuse rewrites.

CREATE TABLE chartlog_streams (
    stream_id  TEXT    PRIMARY KEY NOT NULL,
    version    INTEGER NOT NULL CHECK (version > 0),
    head_hash  BLOB    NOT NULL CHECK (length(head_hash) = 32)
) STRICT;

CREATE TABLE chartlog_events (
    position         INTEGER PRIMARY KEY AUTOINCREMENT,
    stream_id        TEXT    NOT NULL,
    stream_version   INTEGER NOT NULL CHECK (stream_version > 0),
    event_id         BLOB    NOT NULL UNIQUE CHECK (length(event_id) = 16),
    event_type       TEXT    NOT NULL,
    schema_version   INTEGER NOT NULL CHECK (schema_version > 0),
    recorded_at_us   INTEGER NOT NULL,
    actor_user_id    BLOB    NOT NULL CHECK (length(actor_user_id) = 16),
    actor_role       TEXT    NOT NULL,
    purpose_of_use   TEXT    NOT NULL,
    break_glass      INTEGER NOT NULL CHECK (break_glass IN (0, 1)),
    data_key_id      BLOB    NOT NULL CHECK (length(data_key_id) = 16),
    signer_key_id    TEXT    NOT NULL,
    prev_hash        BLOB    NOT NULL CHECK (length(prev_hash) = 32),
    hash             BLOB    NOT NULL CHECK (length(hash) = 32),
    signature        BLOB    NOT NULL CHECK (length(signature) = 64),
    ciphertext       BLOB    NOT NULL,
    UNIQUE (stream_id, stream_version)
) STRICT;

CREATE TRIGGER chartlog_events_no_update BEFORE UPDATE ON chartlog_events
BEGIN
    SELECT RAISE(ABORT, 'chartlog_events is append-only: UPDATE refused');
END;

CREATE TRIGGER chartlog_events_no_delete BEFORE DELETE ON chartlog_events
BEGIN
    SELECT RAISE(ABORT, 'chartlog_events is append-only: DELETE refused');
END;

CREATE TABLE chartlog_data_keys (
    owner_stream_id  TEXT    PRIMARY KEY NOT NULL,
    key_id           BLOB    NOT NULL UNIQUE CHECK (length(key_id) = 16),
    kek_id           TEXT,
    wrapped_key      BLOB,
    created_at_us    INTEGER NOT NULL,
    destroyed_at_us  INTEGER,
    CHECK ((destroyed_at_us IS NULL) = (wrapped_key IS NOT NULL)),
    CHECK ((kek_id IS NULL) = (wrapped_key IS NULL))
) STRICT;

CREATE INDEX chartlog_data_keys_by_kek ON chartlog_data_keys (kek_id) WHERE wrapped_key IS NOT NULL;
