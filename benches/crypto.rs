//! Sealing and verifying one 1 KiB event: the per-event cost of every write and every read.
//!
//! cargo bench --bench crypto

use chartlog_crypto::{
    DataKey, DataKeyId, EventHash, EventHeader, EventSigner, SignatureVerifier, SignerKeyId, open,
    seal_event,
};
use chartlog_domain::{Actor, EventId, PurposeOfUse, Role, StreamId, Timestamp, UserId};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use uuid::Uuid;

const PAYLOAD_BYTES: usize = 1024;

fn header(signer: &EventSigner, key_id: DataKeyId) -> EventHeader {
    EventHeader {
        stream_id: StreamId::patient(chartlog_domain::PatientId::from_uuid(Uuid::new_v4())),
        stream_version: 42,
        event_id: EventId::from_uuid(Uuid::now_v7()),
        event_type: "observation_recorded".to_owned(),
        schema_version: 2,
        recorded_at: Timestamp::from_unix_micros(1_800_000_000_000_000).expect("in range"),
        actor: Actor {
            user_id: UserId::from_uuid(Uuid::new_v4()),
            role: Role::Nurse,
            purpose_of_use: PurposeOfUse::Treatment,
            break_glass: false,
        },
        key_id,
        prev_hash: EventHash::from_bytes([3; 32]),
        signer_key_id: signer.key_id().clone(),
    }
}

fn event_crypto(c: &mut Criterion) {
    let signer = EventSigner::generate(SignerKeyId::parse("bench-signer").expect("signer id"));
    let mut verifier = SignatureVerifier::new();
    verifier
        .trust(signer.key_id().clone(), signer.verifying_key_bytes())
        .expect("trust the signer");
    let key = DataKey::generate();
    let key_id = DataKeyId::generate();
    let payload = vec![0x5a; PAYLOAD_BYTES];
    let header = header(&signer, key_id);

    let mut group = c.benchmark_group("event_1KiB");
    group.throughput(Throughput::Elements(1));
    group.bench_function("seal_and_sign", |b| {
        b.iter(|| seal_event(&signer, &key, header.clone(), &payload))
    });
    let sealed = seal_event(&signer, &key, header.clone(), &payload);
    group.bench_function("verify_and_open", |b| {
        b.iter(|| {
            verifier.verify(&sealed).expect("verifies");
            open(&key, &sealed.header, &sealed.ciphertext).expect("opens")
        })
    });
    let batch: Vec<_> = (0..64)
        .map(|_| seal_event(&signer, &key, header.clone(), &payload))
        .collect();
    group.throughput(Throughput::Elements(batch.len() as u64));
    group.bench_function("verify_batch_64_and_open", |b| {
        b.iter(|| {
            verifier.verify_batch(&batch).expect("verifies");
            for event in &batch {
                open(&key, &event.header, &event.ciphertext).expect("opens");
            }
        })
    });
    group.finish();
}

criterion_group!(benches, event_crypto);
criterion_main!(benches);
