//! A clinical command's HTTP body: `<command>\n` (the route's last segment, e.g.
//! `record-observation`, or `register-patient`) then the JSON body. Parsed as the endpoint
//! parses it, turned into the domain command, and decided on a registered patient with a
//! chart. Whatever is accepted must be storable: every event it yields encodes and decodes
//! back to itself, and applies to the state.
#![no_main]

use chartlog_api::fuzzing::decide_body;
use chartlog_domain::{Patient, decode, encode, evolve};
use chartlog_fuzz::{chart, clinician, now};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(newline) = data.iter().position(|byte| *byte == b'\n') else {
        return;
    };
    let Ok(command) = std::str::from_utf8(&data[..newline]) else {
        return;
    };
    let body = &data[newline + 1..];
    let (patient, _) = chart();
    let Ok(events) = decide_body(command, body, patient, clinician(), now()) else {
        return;
    };
    assert!(!events.is_empty(), "an accepted command yields events");
    // A registration is decided on an empty stream, as the endpoint does for a new patient.
    let mut state = if command == "register-patient" {
        Patient::default()
    } else {
        patient.clone()
    };
    for event in &events {
        let encoded = encode(event);
        let decoded = decode(encoded.event_type, encoded.schema_version, &encoded.payload);
        assert_eq!(
            decoded.as_ref(),
            Ok(event),
            "an accepted event decodes to itself"
        );
        state = evolve(state, event);
    }
});
