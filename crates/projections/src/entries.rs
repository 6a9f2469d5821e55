//! The parts of a chart ("entries": demographics, a condition, an allergy, ...) and how each
//! patient event changes one of them, as JSON objects. Shared by the chart (which stores each
//! entry's current value) and the record history (which diffs an entry before and after each
//! change). Pure: no I/O, no clock.
//!
//! The JSON is PHI: it is only ever sealed ([`chartlog_crypto::seal_record`]) or returned to an
//! authorised reader, never logged.

use std::collections::BTreeSet;

use chartlog_domain::{PatientEvent, PatientId};
use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

/// A JSON object: one entry's fields.
pub(crate) type Fields = Map<String, Value>;

/// The kind of a chart entry. The name is stored in the clear (it is not PHI) as part of the
/// row key and of the sealed record's associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    Demographics,
    Observation,
    Condition,
    Allergy,
    MedicationOrder,
    Note,
    ConsentRestriction,
    CareRelationship,
    LegalHold,
}

impl EntryKind {
    pub const ALL: [EntryKind; 9] = [
        EntryKind::Demographics,
        EntryKind::Observation,
        EntryKind::Condition,
        EntryKind::Allergy,
        EntryKind::MedicationOrder,
        EntryKind::Note,
        EntryKind::ConsentRestriction,
        EntryKind::CareRelationship,
        EntryKind::LegalHold,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            EntryKind::Demographics => "demographics",
            EntryKind::Observation => "observation",
            EntryKind::Condition => "condition",
            EntryKind::Allergy => "allergy",
            EntryKind::MedicationOrder => "medication_order",
            EntryKind::Note => "note",
            EntryKind::ConsentRestriction => "consent_restriction",
            EntryKind::CareRelationship => "care_relationship",
            EntryKind::LegalHold => "legal_hold",
        }
    }

    pub fn parse(raw: &str) -> Option<EntryKind> {
        EntryKind::ALL.into_iter().find(|kind| kind.as_str() == raw)
    }

    /// Whether a later event can change an entry of this kind. Observations are recorded once
    /// and never changed, so nothing needs their current value to derive a change.
    pub const fn is_mutable(self) -> bool {
        !matches!(self, EntryKind::Observation)
    }
}

/// Where an entry is kept: patient, kind, entry id.
pub(crate) type EntrySlot = (PatientId, EntryKind, Uuid);

/// The entry an event changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Touch {
    pub kind: EntryKind,
    /// The entry's id: the patient's own id for demographics, the clinician's user id for a
    /// care relationship, the item's id otherwise.
    pub id: Uuid,
    /// Whether the event creates the entry (its id is new), so its value before is known to be
    /// absent without a look-up.
    pub creates: bool,
}

/// The entry `event` changes; `None` for the erasure tombstone, which removes them all.
pub(crate) fn touched(patient_id: PatientId, event: &PatientEvent) -> Option<Touch> {
    use EntryKind as K;
    use PatientEvent as E;
    let (kind, id, creates) = match event {
        E::PatientRegistered { .. } => (K::Demographics, patient_id.as_uuid(), true),
        E::DemographicsCorrected { .. } => (K::Demographics, patient_id.as_uuid(), false),
        E::ObservationRecorded { observation_id, .. } => {
            (K::Observation, observation_id.as_uuid(), true)
        }
        E::ConditionRecorded { condition_id, .. } => (K::Condition, condition_id.as_uuid(), true),
        E::ConditionResolved { condition_id, .. } => (K::Condition, condition_id.as_uuid(), false),
        E::AllergyRecorded { allergy_id, .. } => (K::Allergy, allergy_id.as_uuid(), true),
        E::AllergyRefuted { allergy_id } => (K::Allergy, allergy_id.as_uuid(), false),
        E::MedicationPrescribed {
            medication_order_id,
            ..
        } => (K::MedicationOrder, medication_order_id.as_uuid(), true),
        E::MedicationDiscontinued {
            medication_order_id,
            ..
        } => (K::MedicationOrder, medication_order_id.as_uuid(), false),
        E::NoteWritten { note_id, .. } => (K::Note, note_id.as_uuid(), true),
        E::NoteAmended { note_id, .. }
        | E::NoteSigned { note_id, .. }
        | E::NoteAddendumAdded { note_id, .. } => (K::Note, note_id.as_uuid(), false),
        E::ConsentRestrictionGranted { restriction_id, .. } => {
            (K::ConsentRestriction, restriction_id.as_uuid(), true)
        }
        E::ConsentRestrictionRevoked { restriction_id } => {
            (K::ConsentRestriction, restriction_id.as_uuid(), false)
        }
        // A clinician can be assigned again after the relationship ended.
        E::CareRelationshipAssigned { clinician } | E::CareRelationshipEnded { clinician } => {
            (K::CareRelationship, clinician.as_uuid(), false)
        }
        E::LegalHoldPlaced { hold_id, .. } => (K::LegalHold, hold_id.as_uuid(), true),
        E::LegalHoldReleased { hold_id, .. } => (K::LegalHold, hold_id.as_uuid(), false),
        E::PatientErased { .. } => return None,
    };
    Some(Touch { kind, id, creates })
}

fn json<T: Serialize + ?Sized>(value: &T) -> Value {
    // Domain types serialize to JSON without fail (string keys, no floats): a failure is a bug.
    serde_json::to_value(value).expect("domain values serialize to JSON")
}

fn object(value: Value) -> Fields {
    match value {
        Value::Object(fields) => fields,
        _ => unreachable!("structs serialize to JSON objects"),
    }
}

/// The entry's fields after `event`, from its fields before (`None`: not yet recorded).
///
/// # Panics
/// On the erasure tombstone, which changes no entry (see [`touched`]).
pub(crate) fn evolve_entry(before: Option<Fields>, event: &PatientEvent) -> Fields {
    use PatientEvent as E;
    let mut fields = before.unwrap_or_default();
    let mut set = |name: &str, value: Value| {
        fields.insert(name.to_owned(), value);
    };
    match event {
        E::PatientRegistered { demographics, .. } => {
            for (name, value) in object(json(demographics)) {
                set(&name, value);
            }
        }
        E::DemographicsCorrected { correction } => {
            // Only the corrected fields are serialized (a removal as null).
            for (name, value) in object(json(correction)) {
                set(&name, value);
            }
        }
        E::ObservationRecorded {
            code,
            value,
            effective_at,
            ..
        } => {
            set("code", json(code));
            set("value", json(value));
            set("effective_at", json(effective_at));
        }
        E::ConditionRecorded { code, onset_at, .. } => {
            set("code", json(code));
            set("onset_at", json(onset_at));
            set("resolved_at", Value::Null);
        }
        E::ConditionResolved { resolved_at, .. } => set("resolved_at", json(resolved_at)),
        E::AllergyRecorded {
            substance,
            criticality,
            reaction,
            ..
        } => {
            set("substance", json(substance));
            set("criticality", json(criticality));
            set("reaction", json(reaction));
            set("refuted", Value::Bool(false));
        }
        E::AllergyRefuted { .. } => set("refuted", Value::Bool(true)),
        E::MedicationPrescribed {
            medication,
            dose,
            route,
            frequency,
            prescribed_at,
            ..
        } => {
            set("medication", json(medication));
            set("dose", json(dose));
            set("route", json(route));
            set("frequency", json(frequency));
            set("prescribed_at", json(prescribed_at));
            set("discontinuation_reason", Value::Null);
            set("discontinued_at", Value::Null);
        }
        E::MedicationDiscontinued {
            reason,
            discontinued_at,
            ..
        } => {
            set("discontinuation_reason", json(reason));
            set("discontinued_at", json(discontinued_at));
        }
        E::NoteWritten {
            text, written_at, ..
        } => {
            set("text", json(text));
            set("written_at", json(written_at));
            set("amended_at", Value::Null);
            set("signed_by", Value::Null);
            set("signed_at", Value::Null);
            set("addenda", Value::Array(Vec::new()));
        }
        E::NoteAmended {
            text, amended_at, ..
        } => {
            set("text", json(text));
            set("amended_at", json(amended_at));
        }
        E::NoteSigned {
            signer, signed_at, ..
        } => {
            set("signed_by", json(signer));
            set("signed_at", json(signed_at));
        }
        E::NoteAddendumAdded { text, added_at, .. } => {
            let mut addenda = match fields.remove("addenda") {
                Some(Value::Array(addenda)) => addenda,
                _ => Vec::new(),
            };
            let mut addendum = Fields::new();
            addendum.insert("text".to_owned(), json(text));
            addendum.insert("added_at".to_owned(), json(added_at));
            addenda.push(Value::Object(addendum));
            fields.insert("addenda".to_owned(), Value::Array(addenda));
        }
        E::ConsentRestrictionGranted { kind, .. } => {
            set("kind", json(kind));
            set("revoked", Value::Bool(false));
        }
        E::ConsentRestrictionRevoked { .. } => set("revoked", Value::Bool(true)),
        E::CareRelationshipAssigned { .. } => set("active", Value::Bool(true)),
        E::CareRelationshipEnded { .. } => set("active", Value::Bool(false)),
        E::LegalHoldPlaced {
            reason, placed_at, ..
        } => {
            set("reason", json(reason));
            set("placed_at", json(placed_at));
            set("released_at", Value::Null);
        }
        E::LegalHoldReleased { released_at, .. } => set("released_at", json(released_at)),
        E::PatientErased { .. } => panic!("the erasure tombstone changes no entry"),
    }
    fields
}

/// One field's change: absent before (`None`) for a new entry.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Change {
    pub field: String,
    pub before: Option<Value>,
    pub after: Option<Value>,
}

/// The fields that differ between `before` and `after`, by field name.
pub(crate) fn diff(before: Option<&Fields>, after: &Fields) -> Vec<Change> {
    let empty = Fields::new();
    let before = before.unwrap_or(&empty);
    let names: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    names
        .into_iter()
        .filter(|name| before.get(*name) != after.get(*name))
        .map(|name| Change {
            field: name.clone(),
            before: before.get(name).cloned(),
            after: after.get(name).cloned(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use chartlog_domain::{NoteId, Timestamp, UserId, synthetic};

    use super::*;

    #[test]
    fn every_kind_round_trips_its_name() {
        for kind in EntryKind::ALL {
            assert_eq!(EntryKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(EntryKind::parse("record"), None);
    }

    #[test]
    fn a_signature_changes_only_the_signature_fields() {
        let at = Timestamp::from_unix_micros(1_700_000_000_000_000).unwrap();
        let note_id = NoteId::from_uuid(Uuid::from_u128(9));
        let written = PatientEvent::NoteWritten {
            note_id,
            text: chartlog_domain::phi::NoteText::parse("note").unwrap(),
            written_at: at,
        };
        let signed = PatientEvent::NoteSigned {
            note_id,
            signer: UserId::from_uuid(Uuid::from_u128(3)),
            signed_at: at,
        };
        let patient = synthetic::patient_id(1);
        assert!(touched(patient, &written).unwrap().creates);
        assert!(!touched(patient, &signed).unwrap().creates);
        let before = evolve_entry(None, &written);
        let after = evolve_entry(Some(before.clone()), &signed);
        let fields: Vec<String> = diff(Some(&before), &after)
            .into_iter()
            .map(|change| change.field)
            .collect();
        assert_eq!(fields, ["signed_at", "signed_by"]);
        assert_eq!(diff(None, &before).len(), before.len());
    }
}
