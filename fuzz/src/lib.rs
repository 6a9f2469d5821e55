//! Fixed keys and states the fuzz targets share, and the seed corpus's writer
//! (`examples/seed_corpus.rs`) with them: a seed sealed or signed here opens and verifies in the
//! targets, so the fuzzer starts from inputs that reach the deep end of each decoder.
//!
//! Every key here is a published test key. None of it is ever used outside fuzzing.

use std::sync::OnceLock;

use chartlog_crypto::{
    DataKey, DataKeyId, EventHash, EventHeader, EventSigner, KEK_BYTES, KekId, KeyRing,
    SignatureVerifier, SignerKeyId, WrappedDataKey,
};
use chartlog_domain::synthetic;
use chartlog_domain::{
    Actor, EventId, Patient, PatientId, PurposeOfUse, Role, StreamId, Timestamp, UserId, decide,
    evolve,
};
use uuid::Uuid;

/// The signer id every seed event and manifest names.
pub const SIGNER_ID: &str = "fuzz-signer-1";
const SIGNER_SECRET: [u8; 32] = [0x5a; 32];
const KEK_ID: &str = "fuzz-kek-1";
const KEK: [u8; KEK_BYTES] = [0x4b; KEK_BYTES];
/// The fixed data key, wrapped under [`KEK`] for [`owner`] (AES-SIV key wrap is deterministic,
/// so this unwraps to the same key in every run). Written once by `KeyRing::wrap`.
const WRAPPED_DATA_KEY: &str = "1d0a002e1f995c4e1ccebfe8c518b229cf12c666f56761fa36a0978b71ea35b7\
95719096c7c4397f60f097eba6160cd2add09180ac75b18fb4ed969366decbdccfc0562805617fed0b6732339fe690d7";

/// The synthetic patient the seeds and the command target use.
pub const PATIENT_SEED: u64 = 7;
/// Clinical commands applied to the command target's patient, so updates find records.
pub const CLINICAL_COMMANDS: u64 = 40;

/// 2026-11-27T09:00:00Z: the `now` of every decision, so runs repeat.
pub fn now() -> Timestamp {
    Timestamp::from_unix_micros(1_795_770_000_000_000).expect("a fixed time in range")
}

/// The owner of the fixed data key.
pub fn owner() -> StreamId {
    StreamId::patient(synthetic::patient_id(PATIENT_SEED))
}

/// The id of the fixed data key.
pub fn data_key_id() -> DataKeyId {
    DataKeyId::from_uuid(Uuid::from_u128(2))
}

/// The signer of every seed event and manifest.
pub fn signer() -> &'static EventSigner {
    static SIGNER: OnceLock<EventSigner> = OnceLock::new();
    SIGNER.get_or_init(|| {
        EventSigner::from_secret_bytes(
            SignerKeyId::parse(SIGNER_ID).expect("a valid signer id"),
            SIGNER_SECRET,
        )
    })
}

/// A verifier that trusts [`signer`].
pub fn verifier() -> &'static SignatureVerifier {
    static VERIFIER: OnceLock<SignatureVerifier> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        let mut verifier = SignatureVerifier::new();
        verifier
            .trust(signer().key_id().clone(), signer().verifying_key_bytes())
            .expect("the fixed signer's key is valid");
        verifier
    })
}

/// The fixed data key every seed payload is sealed under.
pub fn data_key() -> &'static DataKey {
    static KEY: OnceLock<DataKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let kek_id = KekId::parse(KEK_ID).expect("a valid KEK id");
        let ring = KeyRing::with_key(kek_id.clone(), KEK);
        let wrapped = WrappedDataKey {
            key_id: data_key_id(),
            kek_id,
            wrapped: chartlog::backup_format::hex_decode(WRAPPED_DATA_KEY)
                .expect("the wrapped key is hex"),
        };
        ring.unwrap(&owner(), &wrapped)
            .expect("the fixed wrapped key unwraps under the fixed KEK")
    })
}

/// The clinician recorded as actor, and the signer of notes.
pub fn clinician() -> UserId {
    UserId::from_uuid(Uuid::from_u128(0x0c11_7c1a_0000_0000_0000_0000_0000_0001))
}

/// A header of the fixed owner's stream at `version`, chained to `prev_hash`.
pub fn header(
    version: u64,
    event_type: &str,
    schema_version: u32,
    prev_hash: EventHash,
) -> EventHeader {
    EventHeader {
        stream_id: owner(),
        stream_version: version,
        event_id: EventId::from_uuid(Uuid::from_u128(0x1000 + u128::from(version))),
        event_type: event_type.to_owned(),
        schema_version,
        recorded_at: now(),
        actor: Actor {
            user_id: clinician(),
            role: Role::Physician,
            purpose_of_use: PurposeOfUse::Treatment,
            break_glass: false,
        },
        key_id: data_key_id(),
        prev_hash,
        signer_key_id: signer().key_id().clone(),
    }
}

/// The synthetic patient, registered and with [`CLINICAL_COMMANDS`] commands applied, and the
/// events that made it, in order.
pub fn chart() -> &'static (Patient, Vec<chartlog_domain::PatientEvent>) {
    static CHART: OnceLock<(Patient, Vec<chartlog_domain::PatientEvent>)> = OnceLock::new();
    CHART.get_or_init(|| {
        let mut patient = Patient::default();
        let mut history = Vec::new();
        let commands = std::iter::once(synthetic::registration(PATIENT_SEED)).chain(
            (0..CLINICAL_COMMANDS).map(|n| synthetic::clinical_command(PATIENT_SEED, n, now())),
        );
        for command in commands {
            let events = decide(&patient, command, now()).expect("synthetic commands are valid");
            for event in events {
                patient = evolve(patient, &event);
                history.push(event);
            }
        }
        (patient, history)
    })
}

/// The registered patient's id.
pub fn patient_id() -> PatientId {
    synthetic::patient_id(PATIENT_SEED)
}
