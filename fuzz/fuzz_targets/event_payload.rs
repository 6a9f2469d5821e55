//! An event payload as the codec reads it after opening: `<event type>\n<schema version>\n`
//! then the payload's JSON. Decoding, upcasting an old schema included, must refuse bad input
//! with an error, and whatever it accepts must encode and decode back to the same event.
#![no_main]

use chartlog_domain::codec::upcast;
use chartlog_domain::{decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |byte| *byte == b'\n');
    let (Some(event_type), Some(version), Some(payload)) =
        (parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    let Ok(event_type) = std::str::from_utf8(event_type) else {
        return;
    };
    let Some(schema_version) = std::str::from_utf8(version)
        .ok()
        .and_then(|version| version.parse::<u32>().ok())
    else {
        return;
    };

    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(payload) {
        let _ = upcast(event_type, schema_version, json);
    }
    let Ok(event) = decode(event_type, schema_version, payload) else {
        return;
    };
    let encoded = encode(&event);
    assert_eq!(encoded.event_type, event_type);
    let again = decode(encoded.event_type, encoded.schema_version, &encoded.payload);
    assert_eq!(
        again.as_ref(),
        Ok(&event),
        "a decoded event re-encodes to itself"
    );
});
