//! How events are stored: a stable type name, a schema version, and the JSON of the
//! variant's data as the payload (which the store seals; it is PHI in plaintext here).
//!
//! Old events are never rewritten. Reading an event stored under an older schema version
//! runs its JSON through the upcaster chain, one version step at a time, up to the current
//! version, then deserializes (which re-validates every PHI newtype and code).

use std::fmt;

use serde_json::{Map, Value, json};

use crate::patient::PatientEvent;
use crate::quantity::Decimal;

/// Bytes in one event payload. The largest legitimate payload is a note
/// ([`crate::phi::NOTE_TEXT_LENGTH_MAX`]) with JSON escaping; anything far beyond is not ours.
pub const PAYLOAD_BYTES_MAX: usize = 1024 * 1024;
const _: () = assert!(PAYLOAD_BYTES_MAX >= 8 * crate::phi::NOTE_TEXT_LENGTH_MAX);

/// Event types echoed in errors are cut to this many bytes: the header is not PHI, but an
/// error message is not the place for arbitrary input.
const EVENT_TYPE_ECHO_LENGTH_MAX: usize = 64;

/// One event ready for sealing.
#[derive(Clone, PartialEq, Eq)]
pub struct EncodedEvent {
    pub event_type: &'static str,
    pub schema_version: u32,
    /// JSON of the event's data. PHI: seal it, never log it.
    pub payload: Vec<u8>,
}

impl fmt::Debug for EncodedEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncodedEvent")
            .field("event_type", &self.event_type)
            .field("schema_version", &self.schema_version)
            .field("payload_bytes", &self.payload.len())
            .finish()
    }
}

/// A stored event that does not decode. Names the type and version, never payload content
/// (serde's own messages may quote values, so they are dropped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown event type {event_type:?}")]
    UnknownEventType { event_type: String },
    #[error(
        "event type {event_type} has no schema version {schema_version}; versions 1 to {current} are known"
    )]
    UnsupportedSchemaVersion {
        event_type: &'static str,
        schema_version: u32,
        current: u32,
    },
    #[error(
        "payload of {event_type} v{schema_version} is {payload_bytes} bytes, more than {payload_bytes_max}"
    )]
    PayloadTooLarge {
        event_type: &'static str,
        schema_version: u32,
        payload_bytes: usize,
        payload_bytes_max: usize,
    },
    #[error("payload of {event_type} v{schema_version} does not match its schema")]
    MalformedPayload {
        event_type: &'static str,
        schema_version: u32,
    },
    #[error("no upcaster from {event_type} v{from_version}")]
    NoUpcaster {
        event_type: &'static str,
        from_version: u32,
    },
}

/// The schema version new events of `event_type` are written with, or `None` for a type
/// this build does not know.
pub fn current_schema_version(event_type: &str) -> Option<u32> {
    let event_type = known_event_type(event_type)?;
    Some(match event_type {
        // v2: `value` became the tagged ObservationValue (quantity, coded or text); v1 held a
        // bare number with a sibling `unit`.
        "observation_recorded" => 2,
        _ => 1,
    })
}

fn known_event_type(event_type: &str) -> Option<&'static str> {
    PatientEvent::EVENT_TYPES
        .into_iter()
        .find(|known| *known == event_type)
}

impl PatientEvent {
    /// The schema version this event is written with.
    pub fn schema_version(&self) -> u32 {
        // Every variant's type is in EVENT_TYPES (tested), so the fallback is unreachable.
        current_schema_version(self.event_type()).unwrap_or(1)
    }
}

/// Encodes an event at its current schema version.
pub fn encode(event: &PatientEvent) -> EncodedEvent {
    let event_type = event.event_type();
    // Serialization of our own types cannot fail (string keys, no floats): a failure is a bug.
    let tagged = serde_json::to_value(event).expect("PatientEvent serializes to JSON");
    let data = match tagged {
        Value::Object(mut fields) => fields.remove("data"),
        _ => None,
    }
    .expect("PatientEvent serializes as {type, data}");
    let payload = serde_json::to_vec(&data).expect("a JSON value serializes");
    EncodedEvent {
        event_type,
        schema_version: event.schema_version(),
        payload,
    }
}

/// Decodes a stored event, upcasting it first if it was written under an older schema.
pub fn decode(
    event_type: &str,
    schema_version: u32,
    payload: &[u8],
) -> Result<PatientEvent, DecodeError> {
    let Some(known) = known_event_type(event_type) else {
        return Err(DecodeError::UnknownEventType {
            event_type: echo(event_type),
        });
    };
    let current = current_schema_version(known).unwrap_or(1);
    if schema_version == 0 || schema_version > current {
        return Err(DecodeError::UnsupportedSchemaVersion {
            event_type: known,
            schema_version,
            current,
        });
    }
    if payload.len() > PAYLOAD_BYTES_MAX {
        return Err(DecodeError::PayloadTooLarge {
            event_type: known,
            schema_version,
            payload_bytes: payload.len(),
            payload_bytes_max: PAYLOAD_BYTES_MAX,
        });
    }
    let malformed = DecodeError::MalformedPayload {
        event_type: known,
        schema_version,
    };
    let mut data: Value = serde_json::from_slice(payload).map_err(|_| malformed.clone())?;
    for from_version in schema_version..current {
        data = upcast(known, from_version, data)?;
    }
    let event: PatientEvent =
        serde_json::from_value(json!({ "type": known, "data": data })).map_err(|_| malformed)?;
    debug_assert_eq!(event.event_type(), known);
    Ok(event)
}

/// Rewrites the JSON data of `event_type` from `from_version` to `from_version + 1`.
/// Each step is a pure function of the old JSON, so a stored event reads the same forever.
pub fn upcast(event_type: &str, from_version: u32, payload: Value) -> Result<Value, DecodeError> {
    let Some(known) = known_event_type(event_type) else {
        return Err(DecodeError::UnknownEventType {
            event_type: echo(event_type),
        });
    };
    match (known, from_version) {
        ("observation_recorded", 1) => observation_recorded_v1_to_v2(payload),
        _ => Err(DecodeError::NoUpcaster {
            event_type: known,
            from_version,
        }),
    }
}

/// v1: `{"value": 98.6, "unit": "[degF]", ...}`, numeric values only.
/// v2: `{"value": {"quantity": {"value": "98.6", "unit": "[degF]"}}, ...}`.
fn observation_recorded_v1_to_v2(payload: Value) -> Result<Value, DecodeError> {
    let malformed = DecodeError::MalformedPayload {
        event_type: "observation_recorded",
        schema_version: 1,
    };
    let Value::Object(mut fields) = payload else {
        return Err(malformed);
    };
    let (Some(Value::Number(number)), Some(Value::String(unit))) =
        (fields.remove("value"), fields.remove("unit"))
    else {
        return Err(malformed);
    };
    let decimal = if number.is_f64() {
        // f64's Display never uses an exponent, which decimal text must not have.
        let value = number.as_f64().ok_or_else(|| malformed.clone())?;
        Decimal::from_f64(value)
            .map_err(|_| malformed.clone())?
            .expose_phi()
            .to_owned()
    } else {
        number.to_string()
    };
    let mut quantity = Map::new();
    quantity.insert("value".to_owned(), Value::String(decimal));
    quantity.insert("unit".to_owned(), Value::String(unit));
    fields.insert("value".to_owned(), json!({ "quantity": quantity }));
    Ok(Value::Object(fields))
}

fn echo(event_type: &str) -> String {
    let mut end = event_type.len().min(EVENT_TYPE_ECHO_LENGTH_MAX);
    while !event_type.is_char_boundary(end) {
        end -= 1;
    }
    event_type[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codes::{Code, CodeSystem};
    use crate::ids::ObservationId;
    use crate::patient::ObservationValue;
    use crate::quantity::{Quantity, Unit};
    use crate::time::Timestamp;

    const OBSERVATION_V1: &str = r#"{
        "observation_id": "00000000-0000-0000-0000-000000000007",
        "code": {"system": "http://loinc.org", "code": "8310-5", "display": "Body temperature"},
        "value": 98.6,
        "unit": "[degF]",
        "effective_at": 1700000000000000
    }"#;

    #[test]
    fn observation_recorded_v1_upcasts_to_a_quantity() {
        let event = decode("observation_recorded", 1, OBSERVATION_V1.as_bytes()).unwrap();
        let expected = PatientEvent::ObservationRecorded {
            observation_id: ObservationId::from_uuid(uuid::Uuid::from_u128(7)),
            code: Code::parse(CodeSystem::Loinc, "8310-5", Some("Body temperature")).unwrap(),
            value: ObservationValue::Quantity(Quantity {
                value: Decimal::parse("98.6").unwrap(),
                unit: Unit::parse("[degF]").unwrap(),
            }),
            effective_at: Timestamp::from_unix_micros(1_700_000_000_000_000).unwrap(),
        };
        assert_eq!(event, expected);
        // Re-encoding writes the current version; the stored v1 bytes are never touched.
        let encoded = encode(&event);
        assert_eq!(encoded.schema_version, 2);
        assert_eq!(
            decode(encoded.event_type, 2, &encoded.payload).unwrap(),
            event
        );
    }

    #[test]
    fn integer_v1_values_upcast_too() {
        let payload = OBSERVATION_V1.replace("98.6", "72");
        let event = decode("observation_recorded", 1, payload.as_bytes()).unwrap();
        let PatientEvent::ObservationRecorded {
            value: ObservationValue::Quantity(quantity),
            ..
        } = event
        else {
            panic!("decoded to another shape");
        };
        assert_eq!(quantity.value.expose_phi(), "72");
    }

    #[test]
    fn malformed_v1_payloads_are_rejected_without_content() {
        for payload in [
            OBSERVATION_V1.replace("\"unit\": \"[degF]\",", ""),
            OBSERVATION_V1.replace("98.6", "\"Zqxmarker\""),
            "[1, 2]".to_owned(),
            "not json".to_owned(),
        ] {
            let error = decode("observation_recorded", 1, payload.as_bytes()).unwrap_err();
            assert_eq!(
                error,
                DecodeError::MalformedPayload {
                    event_type: "observation_recorded",
                    schema_version: 1
                }
            );
            assert!(!error.to_string().contains("Zqxmarker"));
        }
    }

    #[test]
    fn v2_payload_is_not_read_as_v1_or_the_reverse() {
        assert!(decode("observation_recorded", 2, OBSERVATION_V1.as_bytes()).is_err());
    }

    #[test]
    fn unknown_types_and_versions_are_clear_errors() {
        assert_eq!(
            decode("patient_teleported", 1, b"{}"),
            Err(DecodeError::UnknownEventType {
                event_type: "patient_teleported".to_owned()
            })
        );
        assert_eq!(
            decode("patient_erased", 2, b"{}"),
            Err(DecodeError::UnsupportedSchemaVersion {
                event_type: "patient_erased",
                schema_version: 2,
                current: 1
            })
        );
        assert!(matches!(
            decode("patient_erased", 0, b"{}"),
            Err(DecodeError::UnsupportedSchemaVersion { .. })
        ));
        assert_eq!(
            upcast("patient_erased", 1, Value::Null),
            Err(DecodeError::NoUpcaster {
                event_type: "patient_erased",
                from_version: 1
            })
        );
        let long = "x".repeat(1000);
        let DecodeError::UnknownEventType { event_type } = decode(&long, 1, b"{}").unwrap_err()
        else {
            panic!("expected an unknown type");
        };
        assert_eq!(event_type.len(), EVENT_TYPE_ECHO_LENGTH_MAX);
        assert!(matches!(
            decode("patient_erased", 1, &vec![b' '; PAYLOAD_BYTES_MAX + 1]),
            Err(DecodeError::PayloadTooLarge { .. })
        ));
    }

    #[test]
    fn decoding_revalidates_phi() {
        let payload = br#"{"note_id": "00000000-0000-0000-0000-000000000001", "text": "   ", "written_at": 0}"#;
        assert!(matches!(
            decode("note_written", 1, payload),
            Err(DecodeError::MalformedPayload { .. })
        ));
    }

    #[test]
    fn every_event_type_has_a_version() {
        for event_type in PatientEvent::EVENT_TYPES {
            assert!(current_schema_version(event_type).is_some_and(|v| v >= 1));
        }
        assert_eq!(current_schema_version("observation_recorded"), Some(2));
        assert_eq!(current_schema_version("nope"), None);
    }
}
