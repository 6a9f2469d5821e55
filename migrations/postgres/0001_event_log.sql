-- The event log, the stream heads and the data-key table.
--
-- chartlog_events is append-only: a trigger refuses UPDATE, DELETE and TRUNCATE, because the
-- log is the only source of truth and crypto-erasure never needs to touch it.

CREATE TABLE chartlog_streams (
    stream_id  text   PRIMARY KEY,
    version    bigint NOT NULL CHECK (version > 0),
    head_hash  bytea  NOT NULL CHECK (octet_length(head_hash) = 32)
);

CREATE TABLE chartlog_events (
    -- The appending transaction's id times 1024, plus the event's place in that
    -- transaction (see chartlog_append): positions sort as transactions began.
    position         bigint  PRIMARY KEY,
    stream_id        text    NOT NULL,
    stream_version   bigint  NOT NULL CHECK (stream_version > 0),
    event_id         uuid    NOT NULL UNIQUE,
    event_type       text    NOT NULL,
    schema_version   integer NOT NULL CHECK (schema_version > 0),
    recorded_at_us   bigint  NOT NULL,
    actor_user_id    uuid    NOT NULL,
    actor_role       text    NOT NULL,
    purpose_of_use   text    NOT NULL,
    break_glass      boolean NOT NULL,
    data_key_id      uuid    NOT NULL,
    signer_key_id    text    NOT NULL,
    prev_hash        bytea   NOT NULL CHECK (octet_length(prev_hash) = 32),
    hash             bytea   NOT NULL CHECK (octet_length(hash) = 32),
    signature        bytea   NOT NULL CHECK (octet_length(signature) = 64),
    ciphertext       bytea   NOT NULL,
    UNIQUE (stream_id, stream_version)
);

CREATE FUNCTION chartlog_refuse_rewrite() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'chartlog_events is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER chartlog_events_append_only
    BEFORE UPDATE OR DELETE ON chartlog_events
    FOR EACH ROW EXECUTE FUNCTION chartlog_refuse_rewrite();

CREATE TRIGGER chartlog_events_no_truncate
    BEFORE TRUNCATE ON chartlog_events
    FOR EACH STATEMENT EXECUTE FUNCTION chartlog_refuse_rewrite();

-- Appends one batch to one stream in one statement (one round trip, then the commit).
--
-- Ordering: an event's position is its transaction's id (xid8) times 1024 plus its place
-- among the events that transaction appends (at most 1023). So positions sort in the order
-- transactions took their ids, and a reader that returns only positions below
-- pg_snapshot_xmin(pg_current_snapshot()) * 1024 returns a prefix of the log: every
-- transaction below that bound has finished, and any event that becomes visible later
-- belongs to a transaction at or above it, so it sorts after everything already returned.
-- No lock and no sequence: concurrent appends never wait on each other (except on the same
-- stream's row). Positions have gaps, which readers expect.
--
-- It does not NOTIFY: a transaction that notifies holds a cluster-wide lock on the
-- notification queue through its commit, which would queue every append's commit behind the
-- last. Each process announces its appends from a connection of its own instead.
--
-- Returns outcome 'appended' with the first position, or 'conflict' with the stream's actual
-- version and head hash (the caller reports the conflict or checks for an idempotent retry).
CREATE FUNCTION chartlog_append(
    p_stream_id        text,
    p_expected_version bigint,
    p_event_ids        uuid[],
    p_event_types      text[],
    p_schema_versions  integer[],
    p_recorded_at_us   bigint[],
    p_actor_user_ids   uuid[],
    p_actor_roles      text[],
    p_purposes         text[],
    p_break_glass      boolean[],
    p_data_key_ids     uuid[],
    p_signer_key_ids   text[],
    p_prev_hashes      bytea[],
    p_hashes           bytea[],
    p_signatures       bytea[],
    p_ciphertexts      bytea[]
) RETURNS TABLE (outcome text, first_position bigint, actual_version bigint, actual_head_hash bytea)
LANGUAGE plpgsql AS $$
DECLARE
    v_count      integer := cardinality(p_event_ids);
    v_base       bigint;
    v_first      bigint;
    v_new_head   bytea;
    v_rows       integer;
BEGIN
    IF v_count IS NULL OR v_count = 0 THEN
        RAISE EXCEPTION 'chartlog_append needs at least one event';
    END IF;

    v_new_head := p_hashes[v_count];
    IF p_expected_version = 0 THEN
        INSERT INTO chartlog_streams (stream_id, version, head_hash)
        VALUES (p_stream_id, v_count, v_new_head)
        ON CONFLICT (stream_id) DO NOTHING;
    ELSE
        UPDATE chartlog_streams
           SET version = p_expected_version + v_count, head_hash = v_new_head
         WHERE stream_id = p_stream_id
           AND version = p_expected_version
           AND head_hash = p_prev_hashes[1];
    END IF;
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    IF v_rows = 0 THEN
        RETURN QUERY
            SELECT 'conflict'::text, NULL::bigint, s.version, s.head_hash
              FROM (SELECT 1) AS one
              LEFT JOIN chartlog_streams s ON s.stream_id = p_stream_id;
        RETURN;
    END IF;

    -- The stream row written above gave this transaction its id.
    v_base := pg_current_xact_id()::text::bigint * 1024;
    -- A transaction may append more than once (to several streams): continue after its
    -- last position, found through the primary key.
    SELECT COALESCE(max(position), v_base) INTO v_first
      FROM chartlog_events
     WHERE position > v_base AND position < v_base + 1024;
    v_first := v_first + 1;
    IF v_first + v_count - 1 >= v_base + 1024 THEN
        RAISE EXCEPTION 'one transaction may append at most 1023 events'
            USING ERRCODE = 'program_limit_exceeded';
    END IF;

    IF v_count = 1 THEN
        INSERT INTO chartlog_events (
            position, stream_id, stream_version, event_id, event_type, schema_version,
            recorded_at_us, actor_user_id, actor_role, purpose_of_use, break_glass,
            data_key_id, signer_key_id, prev_hash, hash, signature, ciphertext)
        VALUES (v_first, p_stream_id, p_expected_version + 1, p_event_ids[1], p_event_types[1],
                p_schema_versions[1], p_recorded_at_us[1], p_actor_user_ids[1], p_actor_roles[1],
                p_purposes[1], p_break_glass[1], p_data_key_ids[1], p_signer_key_ids[1],
                p_prev_hashes[1], p_hashes[1], p_signatures[1], p_ciphertexts[1]);
    ELSE
        INSERT INTO chartlog_events (
            position, stream_id, stream_version, event_id, event_type, schema_version,
            recorded_at_us, actor_user_id, actor_role, purpose_of_use, break_glass,
            data_key_id, signer_key_id, prev_hash, hash, signature, ciphertext)
        SELECT v_first + e.ord - 1, p_stream_id, p_expected_version + e.ord, e.event_id,
               e.event_type, e.schema_version, e.recorded_at_us, e.actor_user_id, e.actor_role,
               e.purpose_of_use, e.break_glass, e.data_key_id, e.signer_key_id, e.prev_hash,
               e.hash, e.signature, e.ciphertext
          FROM unnest(p_event_ids, p_event_types, p_schema_versions, p_recorded_at_us,
                      p_actor_user_ids, p_actor_roles, p_purposes, p_break_glass,
                      p_data_key_ids, p_signer_key_ids, p_prev_hashes, p_hashes, p_signatures,
                      p_ciphertexts)
               WITH ORDINALITY AS e(event_id, event_type, schema_version, recorded_at_us,
                      actor_user_id, actor_role, purpose_of_use, break_glass, data_key_id,
                      signer_key_id, prev_hash, hash, signature, ciphertext, ord);
    END IF;

    RETURN QUERY SELECT 'appended'::text, v_first, p_expected_version + v_count, v_new_head;
END
$$;

-- Per-patient data keys, wrapped by a key-encryption key, kept apart from the events. A
-- destroyed key keeps its row as a tombstone (key id and time) so the owner can never be
-- given a new key that would make old ciphertext look fresh.
CREATE TABLE chartlog_data_keys (
    owner_stream_id  text   PRIMARY KEY,
    key_id           uuid   NOT NULL UNIQUE,
    kek_id           text,
    wrapped_key      bytea,
    created_at_us    bigint NOT NULL,
    destroyed_at_us  bigint,
    CHECK ((destroyed_at_us IS NULL) = (wrapped_key IS NOT NULL)),
    CHECK ((kek_id IS NULL) = (wrapped_key IS NULL))
);

CREATE INDEX chartlog_data_keys_by_kek ON chartlog_data_keys (kek_id) WHERE wrapped_key IS NOT NULL;
