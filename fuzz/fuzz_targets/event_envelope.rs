//! A stored event row: the 17 columns of `chartlog_events`, as a JSON array in the backup's
//! spelling (integers, strings, UUIDs, lower-case hex bytes). Decoded by both readers of a row,
//! the store's (`EventRow::into_recorded`) and the backup's (`sealed_event`), which must agree;
//! then hashed, chain-checked and signature-checked; then opened with the fixed data key and,
//! when it opens, its payload decoded (upcasting included) as the ledger does on a read.
#![no_main]

use chartlog::backup_format::{EVENTS, Kind, TABLES, Value, sealed_event};
use chartlog_crypto::{EventHash, open, verify_chain};
use chartlog_fuzz::{data_key, verifier};
use chartlog_store::fuzzing::{RawEventRow, recorded_event};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(serde_json::Value::Array(json)) = serde_json::from_slice::<serde_json::Value>(data)
    else {
        return;
    };
    let columns = TABLES[EVENTS].columns;
    if json.len() != columns.len() {
        return;
    }
    let Some(values) = json
        .into_iter()
        .zip(columns)
        .map(|(json, (_, kind))| Value::from_json(json, *kind))
        .collect::<Option<Vec<Value>>>()
    else {
        return;
    };

    let from_backup = sealed_event(&values);
    let from_store = raw_row(&values).map(recorded_event);
    if let (Ok((position, backup_event)), Some(Ok(stored))) = (&from_backup, &from_store) {
        assert_eq!(*position, stored.position, "the two row readers disagree");
        assert_eq!(*backup_event, stored.event, "the two row readers disagree");
    }
    let event = match (from_backup, from_store) {
        (Ok((_, event)), _) => event,
        (_, Some(Ok(stored))) => stored.event,
        _ => return,
    };

    let _ = verifier().verify(&event);
    let _ = verifier().verify_batch(&[event.clone(), event.clone()]);
    let first_version = event.header.stream_version.max(1);
    let _ = verify_chain(
        EventHash::GENESIS,
        first_version,
        std::slice::from_ref(&event),
    );
    let Ok(plaintext) = open(data_key(), &event.header, &event.ciphertext) else {
        return;
    };
    if let Ok(decoded) = chartlog_domain::decode(
        &event.header.event_type,
        event.header.schema_version,
        &plaintext,
    ) {
        let encoded = chartlog_domain::encode(&decoded);
        let again =
            chartlog_domain::decode(encoded.event_type, encoded.schema_version, &encoded.payload);
        assert_eq!(
            again.as_ref(),
            Ok(&decoded),
            "a decoded event re-encodes to itself"
        );
    }
});

/// The row as a backend returns it; `None` where a value could not be in a column (a NULL, or
/// an integer too large for the `integer` schema version column).
fn raw_row(values: &[Value]) -> Option<RawEventRow> {
    debug_assert!(values.len() == 17 && TABLES[EVENTS].columns[5].1 == Kind::Int4);
    Some(RawEventRow {
        position: values[0].int()?,
        stream_id: values[1].text()?.to_owned(),
        stream_version: values[2].int()?,
        event_id: values[3].uuid()?,
        event_type: values[4].text()?.to_owned(),
        schema_version: i32::try_from(values[5].int()?).ok()?,
        recorded_at_us: values[6].int()?,
        actor_user_id: values[7].uuid()?,
        actor_role: values[8].text()?.to_owned(),
        purpose_of_use: values[9].text()?.to_owned(),
        break_glass: values[10].boolean()?,
        data_key_id: values[11].uuid()?,
        signer_key_id: values[12].text()?.to_owned(),
        prev_hash: values[13].bytes()?.to_vec(),
        hash: values[14].bytes()?.to_vec(),
        signature: values[15].bytes()?.to_vec(),
        ciphertext: values[16].bytes()?.to_vec(),
    })
}
