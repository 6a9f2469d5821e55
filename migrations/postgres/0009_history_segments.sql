-- Record history in segments: one row holds up to 16 consecutive changes of one patient's
-- record (versions first_version .. first_version + 15), instead of one row per change. A
-- rebuild wrote a row and sealed a record for every event, and those inserts were the largest
-- share of a rebuild's database work. Segment bounds depend on stream versions only, never on
-- how events were batched, so a rebuild and a live run still write the same rows.
--
-- Who and when stay in the clear (`headers`, a JSON array, one object per change, never PHI;
-- text, not jsonb, because the projection appends to it byte for byte and seals against
-- those bytes); what changed is sealed (`sealed`, a JSON array in the same order, under the
-- patient's key, with the headers as associated data). The old rows are dropped: the history
-- projection's version goes up with this change, so the runner rebuilds it from the log.

DROP TABLE chartlog_history;

CREATE TABLE chartlog_history (
    patient_id     uuid   NOT NULL,
    first_version  bigint NOT NULL CHECK (first_version > 0),
    last_version   bigint NOT NULL CHECK (last_version >= first_version),
    headers        text   NOT NULL,
    sealed         bytea  NOT NULL,
    PRIMARY KEY (patient_id, first_version)
);
