//! The data-key service: creation, races, erasure, KEK rotation.

use std::sync::Arc;

use chartlog_crypto::{
    CryptoError, DataKey, DataKeyId, DataKeys, EventHash, KEK_ROTATION_BATCH_KEYS, KekId, KeyError,
    KeyRing, KeyStore, SignatureVerifier, open, verify_chain,
};
use chartlog_domain::Timestamp;

use crate::support::{MemoryKeyStore, patient_stream, signer, stream_events};

fn kek(id: &str) -> KekId {
    KekId::parse(id).unwrap()
}

fn ring_with(ids: &[&str], active: &str) -> KeyRing {
    let mut ring = KeyRing::generate(kek(ids[0]));
    for id in &ids[1..] {
        ring.add_generated(kek(id)).unwrap();
    }
    ring.set_active(&kek(active)).unwrap();
    ring
}

#[test]
fn wrap_and_unwrap_are_bound_to_owner_and_kek() {
    let ring = KeyRing::generate(kek("kek-1"));
    let key = DataKey::generate();
    let wrapped = ring.wrap(&patient_stream(1), DataKeyId::generate(), &key);
    let stream = patient_stream(1);
    let signer = signer("signer-a");
    let events = stream_events(&signer, &key, wrapped.key_id, &stream, 1);
    let unwrapped = ring.unwrap(&stream, &wrapped).unwrap();
    assert_eq!(
        open(&unwrapped, &events[0].header, &events[0].ciphertext).unwrap(),
        b"event-1"
    );

    assert!(matches!(
        ring.unwrap(&patient_stream(2), &wrapped),
        Err(CryptoError::UnwrapFailed { .. })
    ));
    let other = KeyRing::generate(kek("kek-2"));
    match other.unwrap(&stream, &wrapped) {
        Err(CryptoError::UnknownKek { kek_id }) => assert_eq!(kek_id, kek("kek-1")),
        other => panic!("expected UnknownKek, got {other:?}"),
    }
    // Relabelled to a KEK of the ring that did not wrap it.
    let mut both = KeyRing::generate(kek("kek-1"));
    both.add_generated(kek("kek-2")).unwrap();
    let mut relabelled = both.wrap(&stream, wrapped.key_id, &key);
    relabelled.kek_id = kek("kek-2");
    assert!(both.unwrap(&stream, &relabelled).is_err());
}

#[test]
fn key_rings_manage_their_keks() {
    let mut ring = ring_with(&["kek-1", "kek-2"], "kek-2");
    assert_eq!(ring.active_kek_id(), &kek("kek-2"));
    assert_eq!(ring.kek_ids(), vec![kek("kek-1"), kek("kek-2")]);
    assert!(matches!(
        ring.set_active(&kek("kek-9")),
        Err(CryptoError::UnknownKek { .. })
    ));
    assert!(matches!(
        ring.remove(&kek("kek-2")),
        Err(CryptoError::ActiveKekRemoval { .. })
    ));
    assert!(ring.add_generated(kek("kek-1")).is_err());
    assert!(matches!(
        ring.add(kek("kek-1"), [1; 64]),
        Err(CryptoError::DuplicateKek { .. })
    ));
    ring.add(kek("kek-3"), [3; 64]).unwrap();
    ring.add(kek("kek-3"), [3; 64]).unwrap();
    ring.remove(&kek("kek-1")).unwrap();
    assert_eq!(ring.kek_ids(), vec![kek("kek-2"), kek("kek-3")]);
}

#[tokio::test]
async fn keys_are_created_once_and_read_back() {
    let store = MemoryKeyStore::default();
    let keys = DataKeys::new(Arc::new(KeyRing::generate(kek("kek-1"))), store.clone());
    let owner = patient_stream(1);
    assert!(matches!(
        keys.key_for_read(&owner).await,
        Err(KeyError::NoKey { .. })
    ));
    let (key_id, key) = keys.key_for_append(&owner).await.unwrap();
    let (again_id, again) = keys.key_for_append(&owner).await.unwrap();
    assert_eq!(key_id, again_id);
    assert!(Arc::ptr_eq(&key, &again), "served from the cache");

    // A second process (no shared cache) reads the same key from the table.
    let other = DataKeys::new(keys.ring(), store.clone());
    let (read_id, read) = other.key_for_read(&owner).await.unwrap();
    assert_eq!(read_id, key_id);
    let signer = signer("signer-a");
    let events = stream_events(&signer, &key, key_id, &owner, 1);
    assert_eq!(
        open(&read, &events[0].header, &events[0].ciphertext).unwrap(),
        b"event-1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_creators_share_the_winners_key() {
    let store = MemoryKeyStore::default();
    let ring = Arc::new(KeyRing::generate(kek("kek-1")));
    let owner = patient_stream(1);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let keys = DataKeys::new(ring.clone(), store.clone());
            let owner = owner.clone();
            tokio::spawn(async move { keys.key_for_append(&owner).await.unwrap().0 })
        })
        .collect();
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.unwrap());
    }
    assert!(
        ids.windows(2).all(|pair| pair[0] == pair[1]),
        "one key per owner: {ids:?}"
    );
}

#[tokio::test]
async fn a_destroyed_key_erases_the_events_yet_they_still_verify() {
    let store = MemoryKeyStore::default();
    let keys = DataKeys::new(Arc::new(KeyRing::generate(kek("kek-1"))), store.clone());
    let owner = patient_stream(1);
    let (key_id, key) = keys.key_for_append(&owner).await.unwrap();
    let signer = signer("signer-a");
    let events = stream_events(&signer, &key, key_id, &owner, 5);
    drop(key);
    keys.key_for_read(&owner).await.unwrap();

    let at = Timestamp::from_unix_micros(1_900_000_000_000_000).unwrap();
    assert_eq!(keys.destroy(&owner, at).await.unwrap(), Some(key_id));
    assert_eq!(
        keys.destroy(&owner, at).await.unwrap(),
        Some(key_id),
        "idempotent"
    );
    for result in [
        keys.key_for_read(&owner).await,
        keys.key_for_append(&owner).await,
    ] {
        match result {
            Err(KeyError::Erased {
                key_id: erased,
                destroyed_at,
                ..
            }) => {
                assert_eq!(erased, key_id);
                assert_eq!(destroyed_at, at);
            }
            other => panic!("expected Erased, got {other:?}"),
        }
    }
    // Another process that cached nothing gets the same answer, and no new key.
    let other = DataKeys::new(keys.ring(), store.clone());
    assert!(matches!(
        other.key_for_append(&owner).await,
        Err(KeyError::Erased { .. })
    ));

    let mut verifier = SignatureVerifier::new();
    verifier
        .trust(signer.key_id().clone(), signer.verifying_key_bytes())
        .unwrap();
    verify_chain(EventHash::GENESIS, 1, &events).unwrap();
    verifier.verify_batch(&events).unwrap();
    assert_eq!(keys.destroy(&patient_stream(2), at).await.unwrap(), None);
}

#[tokio::test]
async fn kek_rotation_rewraps_every_key_resumably_and_old_events_still_open() {
    let store = MemoryKeyStore::default();
    let keys = DataKeys::new(Arc::new(KeyRing::generate(kek("kek-old"))), store.clone());
    let signer = signer("signer-a");
    let owners = u128::from(KEK_ROTATION_BATCH_KEYS) * 2 + 7;
    let mut sealed = Vec::new();
    for n in 0..owners {
        let owner = patient_stream(n);
        let (key_id, key) = keys.key_for_append(&owner).await.unwrap();
        sealed.push((
            owner.clone(),
            stream_events(&signer, &key, key_id, &owner, 1).remove(0),
        ));
    }
    let erased = patient_stream(0);
    let at = Timestamp::from_unix_micros(1_900_000_000_000_000).unwrap();
    keys.destroy(&erased, at).await.unwrap();

    // The new ring must still hold the old KEK.
    let missing_old = Arc::new(KeyRing::generate(kek("kek-new")));
    assert!(matches!(
        keys.rotate_kek(missing_old).await,
        Err(KeyError::RotationDropsKek { .. })
    ));

    // Interrupted after some swaps, then resumed.
    let mut ring = ring_from(&keys);
    ring.add_generated(kek("kek-new")).unwrap();
    ring.set_active(&kek("kek-new")).unwrap();
    let ring = Arc::new(ring);
    store.fail_replacements_after(Some(100));
    assert!(matches!(
        keys.rotate_kek(ring.clone()).await,
        Err(KeyError::Store(_))
    ));
    store.fail_replacements_after(None);
    let resumed = keys.rotate_kek(ring.clone()).await.unwrap();
    assert_eq!(
        resumed + 100,
        (owners - 1) as u64,
        "every live key re-wrapped once"
    );
    assert_eq!(
        keys.rotate_kek(ring.clone()).await.unwrap(),
        0,
        "nothing left"
    );
    assert_eq!(store.wrapped_under(&kek("kek-old")), 0);
    assert_eq!(store.wrapped_under(&kek("kek-new")), (owners - 1) as usize);

    // Without the old KEK at all, every old event still opens; the erased one stays erased.
    let mut only_new = ring_from(&keys);
    only_new.remove(&kek("kek-old")).unwrap();
    let fresh = DataKeys::new(Arc::new(only_new), store.clone());
    for (owner, event) in &sealed {
        match fresh.key_for_read(owner).await {
            Ok((key_id, key)) => {
                assert_eq!(key_id, event.header.key_id);
                assert_eq!(
                    open(&key, &event.header, &event.ciphertext).unwrap(),
                    b"event-1"
                );
            }
            Err(KeyError::Erased { .. }) => assert_eq!(owner, &erased),
            Err(other) => panic!("{owner}: {other}"),
        }
    }
    assert!(matches!(
        store.fetch(&erased).await.unwrap(),
        Some(chartlog_crypto::DataKeyRecord::Destroyed { .. })
    ));
}

/// A copy of the service's ring, through its key file format (rings are not `Clone`).
fn ring_from<S: KeyStore>(keys: &DataKeys<S>) -> KeyRing {
    let dir = crate::support::TempDir::new();
    let path = dir.path().join("kek.json");
    keys.ring().save(&path).unwrap();
    KeyRing::load(&path).unwrap()
}

#[tokio::test]
async fn kek_rotation_skips_keys_it_cannot_unwrap_and_rewraps_every_other_key() {
    let store = MemoryKeyStore::default();
    let keys = DataKeys::new(Arc::new(KeyRing::generate(kek("kek-old"))), store.clone());
    // More keys than a batch that no KEK of the ring unwraps (their KEK was lost), listed
    // before every readable key, and one whose wrapped bytes were altered.
    let lost = KeyRing::generate(kek("kek-lost"));
    let lost_owners = u128::from(KEK_ROTATION_BATCH_KEYS) + 44;
    for n in 0..lost_owners {
        let owner = patient_stream(n);
        let wrapped = lost.wrap(&owner, DataKeyId::generate(), &DataKey::generate());
        store.insert(&owner, &wrapped).await.unwrap();
    }
    let tampered = patient_stream(lost_owners);
    let mut wrapped = keys
        .ring()
        .wrap(&tampered, DataKeyId::generate(), &DataKey::generate());
    wrapped.wrapped[0] ^= 1;
    store.insert(&tampered, &wrapped).await.unwrap();
    let readable: Vec<_> = (1_000..1_005).map(patient_stream).collect();
    for owner in &readable {
        keys.key_for_append(owner).await.unwrap();
    }

    let mut ring = ring_from(&keys);
    ring.add_generated(kek("kek-new")).unwrap();
    ring.set_active(&kek("kek-new")).unwrap();
    let ring = Arc::new(ring);
    let Err(KeyError::RotationLeftUnreadable {
        rewrapped,
        unreadable,
    }) = keys.rotate_kek(ring.clone()).await
    else {
        panic!("the unreadable keys are reported");
    };
    assert_eq!(rewrapped, readable.len() as u64);
    assert_eq!(store.wrapped_under(&kek("kek-new")), readable.len());
    assert_eq!(unreadable.len() as u128, lost_owners + 1);
    assert!(
        unreadable[..lost_owners as usize]
            .iter()
            .all(|key| key.kek_missing && key.kek_id == kek("kek-lost"))
    );
    let last = unreadable.last().unwrap();
    assert_eq!(last.owner, tampered);
    assert_eq!(
        (last.kek_id.clone(), last.kek_missing),
        (kek("kek-old"), false)
    );
    for owner in &readable {
        keys.key_for_read(owner).await.unwrap();
    }

    // Run again: nothing more to re-wrap, the same keys reported.
    let Err(KeyError::RotationLeftUnreadable {
        rewrapped,
        unreadable: again,
    }) = keys.rotate_kek(ring).await
    else {
        panic!("reported again");
    };
    assert_eq!(rewrapped, 0);
    assert_eq!(again, unreadable);
}
