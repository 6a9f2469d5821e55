-- Group commit: several appends, to any streams, in one statement and so in one transaction.
--
-- Each append is its own chartlog_append call, so a group changes nothing about one append's
-- checks or rows; what it saves is the per-transaction cost that dominates a single-event
-- append (the commit's WAL flush, the round trip, the transaction id, the statement's start),
-- paid once per group instead of once per append. The store's committer tasks gather the
-- appends waiting at that moment into a group (crates/store/src/postgres.rs and
-- group_commit.rs). There is no timer: an append with no other under way, or too large to
-- share a group, or alone in its group, is sent as a plain chartlog_append call.
--
-- Positions: the group is one transaction, so its appends share one transaction id and take
-- consecutive places after it (chartlog_append continues after the transaction's last
-- position). A transaction has 1023 places, so the caller keeps a group's events at or under
-- 1023 (chartlog_append raises program_limit_exceeded beyond that, failing the whole group).
-- Readers are unaffected: a group is one transaction like any other.
--
-- Outcomes: a wrong expected version or head hash is a 'conflict' row for that append, not an
-- error, so one refused append leaves the others in the group appended. Anything that raises
-- (a unique violation on event_id from a client reusing an id, a limit, a lost connection)
-- aborts the whole group; the caller then appends each member alone, as it would without
-- groups, which also recognises idempotent retries.
--
-- Lock order: each append locks its stream's row. The caller sorts a group by stream id, so two
-- groups committing at once lock shared streams in the same order and cannot deadlock with
-- each other. (A caller's own transaction appending to several streams in another order can
-- still deadlock with a group; PostgreSQL then aborts one of them, and an aborted group falls
-- back as above.)
--
-- Arguments: per append, its stream id, expected version and number of events (all >= 1);
-- then the events of every append, flattened in append order, as chartlog_append takes them.
-- Returns one row per append, in order: its ordinal (1-based), then chartlog_append's
-- outcome, first position and actual version.
CREATE FUNCTION chartlog_append_group(
    p_stream_ids        text[],
    p_expected_versions bigint[],
    p_event_counts      integer[],
    p_event_ids         uuid[],
    p_event_types       text[],
    p_schema_versions   integer[],
    p_recorded_at_us    bigint[],
    p_actor_user_ids    uuid[],
    p_actor_roles       text[],
    p_purposes          text[],
    p_break_glass       boolean[],
    p_data_key_ids      uuid[],
    p_signer_key_ids    text[],
    p_prev_hashes       bytea[],
    p_hashes            bytea[],
    p_signatures        bytea[],
    p_ciphertexts       bytea[]
) RETURNS TABLE (ordinal integer, outcome text, first_position bigint, actual_version bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_appends  integer := cardinality(p_stream_ids);
    v_from     integer := 1;
    v_to       integer;
    v_answer   record;
BEGIN
    IF v_appends IS NULL OR v_appends = 0 THEN
        RAISE EXCEPTION 'chartlog_append_group needs at least one append';
    END IF;
    IF cardinality(p_expected_versions) IS DISTINCT FROM v_appends
       OR cardinality(p_event_counts) IS DISTINCT FROM v_appends
       OR (SELECT sum(c) FROM unnest(p_event_counts) AS c) IS DISTINCT FROM
          cardinality(p_event_ids)::bigint
       OR EXISTS (SELECT 1 FROM unnest(p_event_counts) AS c WHERE c IS NULL OR c < 1) THEN
        RAISE EXCEPTION 'chartlog_append_group: the per-append and per-event arrays disagree';
    END IF;

    FOR i IN 1 .. v_appends LOOP
        v_to := v_from + p_event_counts[i] - 1;
        SELECT a.outcome, a.first_position, a.actual_version INTO v_answer
          FROM chartlog_append(
                   p_stream_ids[i], p_expected_versions[i],
                   p_event_ids[v_from:v_to], p_event_types[v_from:v_to],
                   p_schema_versions[v_from:v_to], p_recorded_at_us[v_from:v_to],
                   p_actor_user_ids[v_from:v_to], p_actor_roles[v_from:v_to],
                   p_purposes[v_from:v_to], p_break_glass[v_from:v_to],
                   p_data_key_ids[v_from:v_to], p_signer_key_ids[v_from:v_to],
                   p_prev_hashes[v_from:v_to], p_hashes[v_from:v_to],
                   p_signatures[v_from:v_to], p_ciphertexts[v_from:v_to]) AS a;
        ordinal := i;
        outcome := v_answer.outcome;
        first_position := v_answer.first_position;
        actual_version := v_answer.actual_version;
        RETURN NEXT;
        v_from := v_to + 1;
    END LOOP;
END
$$;
