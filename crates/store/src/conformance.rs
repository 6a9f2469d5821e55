//! The promises of [`EventStore`], as checks every backend runs.
//!
//! Each backend's test file calls each check against a fresh database. A check panics (with
//! a message naming the broken promise) when the backend breaks it. The events are real: sealed
//! under a data key and signed, chained as the command path chains them.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chartlog_crypto::{
    DataKey, DataKeyId, EventHash, EventHeader, EventSigner, SealedEvent, SignerKeyId, seal_event,
};
use chartlog_domain::{Actor, EventId, PurposeOfUse, Role, StreamId, Timestamp, UserId};
use uuid::Uuid;

use crate::{EventStore, StoreError, StreamHead, Subscription};

/// How long a check waits for something that should happen promptly before it fails.
pub const PROMPT_WAIT: Duration = Duration::from_secs(10);

/// Builds sealed, signed, chained events for the checks.
pub struct EventFactory {
    signer: EventSigner,
    key: DataKey,
    key_id: DataKeyId,
    actor: Actor,
}

impl Default for EventFactory {
    fn default() -> Self {
        Self::new()
    }
}

impl EventFactory {
    pub fn new() -> Self {
        let signer_id = SignerKeyId::parse("conformance-signer").expect("a valid signer id");
        Self {
            signer: EventSigner::generate(signer_id),
            key: DataKey::generate(),
            key_id: DataKeyId::generate(),
            actor: Actor {
                user_id: UserId::from_uuid(Uuid::now_v7()),
                role: Role::Physician,
                purpose_of_use: PurposeOfUse::Treatment,
                break_glass: false,
            },
        }
    }

    pub fn signer(&self) -> &EventSigner {
        &self.signer
    }

    /// `count` events continuing `stream` from `head`, each with a distinct payload.
    pub fn batch(
        &self,
        stream: &StreamId,
        head: Option<StreamHead>,
        count: usize,
    ) -> Vec<SealedEvent> {
        let (mut version, mut prev_hash) =
            head.map_or((0, EventHash::GENESIS), |h| (h.version, h.hash));
        (0..count)
            .map(|_| {
                version += 1;
                let event = self.event(stream, version, prev_hash, &Uuid::new_v4().into_bytes());
                prev_hash = event.hash;
                event
            })
            .collect()
    }

    /// One event at `version` chained to `prev_hash`, sealing `payload`.
    pub fn event(
        &self,
        stream: &StreamId,
        version: u64,
        prev_hash: EventHash,
        payload: &[u8],
    ) -> SealedEvent {
        let header = EventHeader {
            stream_id: stream.clone(),
            stream_version: version,
            event_id: EventId::from_uuid(Uuid::now_v7()),
            event_type: "conformance_checked".to_owned(),
            schema_version: 1,
            recorded_at: Timestamp::from_unix_micros(1_800_000_000_000_000).expect("in range"),
            actor: self.actor,
            key_id: self.key_id,
            prev_hash,
            signer_key_id: self.signer.key_id().clone(),
        };
        seal_event(&self.signer, &self.key, header, payload)
    }
}

fn stream(name: &str) -> StreamId {
    StreamId::parse(&format!("conformance-{name}-{}", Uuid::new_v4())).expect("a valid stream id")
}

async fn read_whole_stream<S: EventStore + ?Sized>(
    store: &S,
    stream: &StreamId,
) -> Vec<SealedEvent> {
    store
        .read_stream(stream, 1, crate::READ_BATCH_MAX)
        .await
        .expect("read_stream")
        .into_iter()
        .map(|r| r.event)
        .collect()
}

/// Reads the global log from the start until it holds `expected` events, or `PROMPT_WAIT`
/// passes. On PostgreSQL an acknowledged event becomes readable once every older transaction
/// in the cluster has finished (another test's, say), so one read right after an append may
/// come up short without anything being lost.
async fn read_whole_log<S: EventStore + ?Sized>(
    store: &S,
    page: u32,
    expected: usize,
) -> Vec<crate::RecordedEvent> {
    let deadline = tokio::time::Instant::now() + PROMPT_WAIT;
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let events = store.read_all(after, page).await.expect("read_all");
        match events.last() {
            Some(last) => {
                after = last.position;
                all.extend(events);
            }
            None if all.len() >= expected || tokio::time::Instant::now() > deadline => {
                return all;
            }
            None => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Appends in several batches; the stream reads back in version order, gapless, byte for byte,
/// and the head names the last event.
pub async fn appends_and_reads_in_version_order<S: EventStore>(store: &S) {
    let factory = EventFactory::new();
    let stream = stream("order");
    assert_eq!(
        store.stream_head(&stream).await.expect("head"),
        None,
        "a new stream has no head"
    );

    let mut written = Vec::new();
    let mut head = None;
    for count in [1, 3, 5] {
        let batch = factory.batch(&stream, head, count);
        let expected_version = head.map_or(0, |h: StreamHead| h.version);
        let outcome = store
            .append(&stream, expected_version, &batch)
            .await
            .expect("append");
        assert_eq!(outcome.stream_version, expected_version + count as u64);
        assert_eq!(
            outcome.last_position - outcome.first_position,
            count as u64 - 1,
            "one append takes consecutive positions"
        );
        head = Some(StreamHead {
            version: outcome.stream_version,
            hash: batch[batch.len() - 1].hash,
        });
        written.extend(batch);
        // Other tests may append to the same database meanwhile, so only a lower bound here;
        // the backends' own tests check it exactly on a log of their own.
        let log_head = store.log_head_position().await.expect("log head");
        assert!(
            log_head >= outcome.last_position,
            "the log's head {log_head} is below the append's last position {}",
            outcome.last_position
        );
    }

    let read = read_whole_stream(store, &stream).await;
    assert_eq!(
        read, written,
        "the stream reads back as written, in version order"
    );
    for (expected, event) in (1u64..).zip(&read) {
        assert_eq!(
            event.header.stream_version, expected,
            "versions are gapless"
        );
    }
    assert_eq!(store.stream_head(&stream).await.expect("head"), head);

    let tail = store
        .read_stream(&stream, 4, 2)
        .await
        .expect("read from version");
    let versions: Vec<u64> = tail.iter().map(|r| r.event.header.stream_version).collect();
    assert_eq!(
        versions,
        [4, 5],
        "read_stream honours from_version and limit"
    );
}

/// Malformed batches are refused before anything is written.
pub async fn refuses_malformed_batches<S: EventStore>(store: &S) {
    let factory = EventFactory::new();
    let stream = stream("malformed");
    let other = self::stream("other");

    let refused = |result: Result<_, StoreError>, what: &str| match result {
        Err(StoreError::InvalidAppend { .. }) => {}
        other => panic!("{what}: expected InvalidAppend, got {other:?}"),
    };

    refused(store.append(&stream, 0, &[]).await, "an empty batch");
    refused(
        store
            .append(&stream, 0, &factory.batch(&other, None, 1))
            .await,
        "an event of another stream",
    );
    let mut gapped = factory.batch(&stream, None, 3);
    gapped.remove(1);
    refused(store.append(&stream, 0, &gapped).await, "a version gap");
    let unchained = vec![
        factory.event(&stream, 1, EventHash::GENESIS, b"a"),
        factory.event(&stream, 2, EventHash::GENESIS, b"b"),
    ];
    refused(
        store.append(&stream, 0, &unchained).await,
        "a broken internal chain",
    );
    let not_genesis = vec![factory.event(&stream, 1, EventHash::from_bytes([7; 32]), b"a")];
    refused(
        store.append(&stream, 0, &not_genesis).await,
        "a first event not chained to genesis",
    );
    let too_many = factory.batch(&stream, None, crate::EVENTS_PER_APPEND_MAX + 1);
    refused(
        store.append(&stream, 0, &too_many).await,
        "an oversized batch",
    );

    assert_eq!(
        store.stream_head(&stream).await.expect("head"),
        None,
        "nothing was written"
    );
    assert!(
        read_whole_log(store, 100, 0).await.is_empty(),
        "the global log is still empty"
    );
}

/// Of `writers` racing at the same expected version, exactly one wins; every other gets a
/// conflict naming the stream, the version it expected and the version it found.
pub async fn racing_writers_have_one_winner<S: EventStore + Clone>(store: &S, writers: usize) {
    assert!(writers >= 2, "a race needs two writers");
    let factory = Arc::new(EventFactory::new());
    let stream = stream("race");
    let first = factory.batch(&stream, None, 1);
    store
        .append(&stream, 0, &first)
        .await
        .expect("seed the stream");
    let head = StreamHead {
        version: 1,
        hash: first[0].hash,
    };

    let start = Arc::new(tokio::sync::Barrier::new(writers));
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (store, factory, stream, start) = (
            store.clone(),
            factory.clone(),
            stream.clone(),
            start.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let batch = factory.batch(&stream, Some(head), 2);
            start.wait().await;
            store.append(&stream, 1, &batch).await
        }));
    }
    let mut winners = 0;
    for task in tasks {
        match task.await.expect("writer task") {
            Ok(outcome) => {
                winners += 1;
                assert_eq!(outcome.stream_version, 3);
            }
            Err(StoreError::Conflict {
                stream: named,
                expected,
                actual,
            }) => {
                assert_eq!(named, stream, "the conflict names the stream");
                assert_eq!(
                    (expected, actual),
                    (1, 3),
                    "the conflict names both versions"
                );
            }
            Err(other) => panic!("a losing writer must get Conflict, got {other:?}"),
        }
    }
    assert_eq!(winners, 1, "exactly one writer wins");
    assert_eq!(
        read_whole_stream(store, &stream).await.len(),
        3,
        "only the winner's events are stored"
    );
}

/// Appending a stored batch again returns the original positions and stores nothing new.
pub async fn retried_append_returns_the_original_outcome<S: EventStore>(store: &S) {
    let factory = EventFactory::new();
    let stream = stream("retry");
    let batch = factory.batch(&stream, None, 3);
    let original = store.append(&stream, 0, &batch).await.expect("append");
    let more = factory.batch(
        &stream,
        Some(StreamHead {
            version: 3,
            hash: batch[2].hash,
        }),
        1,
    );
    store
        .append(&stream, 3, &more)
        .await
        .expect("a later append");

    let retried = store
        .append(&stream, 0, &batch)
        .await
        .expect("an idempotent retry");
    assert_eq!(retried, original, "a retry gets the original outcome");
    assert_eq!(
        read_whole_stream(store, &stream).await.len(),
        4,
        "a retry stores no duplicate"
    );
    assert_eq!(read_whole_log(store, 100, 4).await.len(), 4);
}

/// An event id stored already, sent with another body, is a conflict, not a silent success.
pub async fn reused_event_id_with_another_body_is_refused<S: EventStore>(store: &S) {
    let factory = EventFactory::new();
    let stream = stream("reuse");
    let batch = factory.batch(&stream, None, 1);
    store.append(&stream, 0, &batch).await.expect("append");

    let mut header = batch[0].header.clone();
    header.recorded_at = Timestamp::from_unix_micros(1_800_000_000_000_001).expect("in range");
    let forged = seal_event(&factory.signer, &factory.key, header, b"another body");
    match store
        .append(&stream, 0, std::slice::from_ref(&forged))
        .await
    {
        Err(StoreError::IdempotencyConflict { event_id }) => {
            assert_eq!(event_id, batch[0].header.event_id);
        }
        other => panic!("expected IdempotencyConflict at the same version, got {other:?}"),
    }

    // The same id on another stream is refused too: ids are unique across the log.
    let elsewhere = self::stream("elsewhere");
    let mut header = batch[0].header.clone();
    header.stream_id = elsewhere.clone();
    let moved = seal_event(&factory.signer, &factory.key, header, b"moved");
    match store.append(&elsewhere, 0, &[moved]).await {
        Err(StoreError::IdempotencyConflict { .. }) => {}
        other => panic!("expected IdempotencyConflict across streams, got {other:?}"),
    }
    assert_eq!(store.stream_head(&elsewhere).await.expect("head"), None);
    assert_eq!(read_whole_log(store, 100, 1).await.len(), 1);
}

/// A batch at the right version that chains to a different head than the stored one is
/// refused: a writer cannot fork the history.
pub async fn batch_chained_to_another_head_is_refused<S: EventStore>(store: &S) {
    let factory = EventFactory::new();
    let stream = stream("fork");
    let batch = factory.batch(&stream, None, 2);
    store.append(&stream, 0, &batch).await.expect("append");
    let fork = factory.batch(
        &stream,
        Some(StreamHead {
            version: 2,
            hash: EventHash::from_bytes([9; 32]),
        }),
        1,
    );
    match store.append(&stream, 2, &fork).await {
        Err(StoreError::ChainMismatch {
            stream: named,
            version,
        }) => {
            assert_eq!((named, version), (stream.clone(), 2));
        }
        other => panic!("expected ChainMismatch, got {other:?}"),
    }
    assert_eq!(read_whole_stream(store, &stream).await.len(), 2);
}

/// With many writers appending to distinct streams while a reader tails the global log in
/// small pages, the reader sees every acknowledged event exactly once, in increasing position
/// order; a full read afterwards agrees.
pub async fn global_log_yields_every_event_once_in_order<S: EventStore + Clone>(
    store: &S,
    writers: usize,
    appends_per_writer: usize,
) {
    let factory = Arc::new(EventFactory::new());
    // Writers publish how many events they have had acknowledged; the tailer stops once it
    // has seen that many after the writers are done. An acknowledged event may become readable
    // a moment after its commit (PostgreSQL readers wait for every older transaction in the
    // cluster to finish), so "done and one empty read" would not mean "all read".
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acknowledged_count = Arc::new(std::sync::atomic::AtomicUsize::new(0));

    let tailer = {
        let (store, done, acknowledged_count) =
            (store.clone(), done.clone(), acknowledged_count.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut after = 0;
            let mut deadline = None;
            loop {
                let finished = done.load(std::sync::atomic::Ordering::Acquire);
                let events = store
                    .read_all(after, 7)
                    .await
                    .expect("read_all while writing");
                if let Some(last) = events.last() {
                    after = last.position;
                    seen.extend(events);
                    continue;
                }
                if finished {
                    let expected = acknowledged_count.load(std::sync::atomic::Ordering::Acquire);
                    let deadline =
                        *deadline.get_or_insert_with(|| tokio::time::Instant::now() + PROMPT_WAIT);
                    if seen.len() >= expected || tokio::time::Instant::now() > deadline {
                        return seen;
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };

    let mut tasks = Vec::new();
    for writer in 0..writers {
        let (store, factory, acknowledged_count) =
            (store.clone(), factory.clone(), acknowledged_count.clone());
        tasks.push(tokio::spawn(async move {
            let stream = stream(&format!("log-{writer}"));
            let mut head = None;
            let mut acknowledged = Vec::new();
            for append in 0..appends_per_writer {
                let batch = factory.batch(&stream, head, 1 + append % 3);
                let expected = head.map_or(0, |h: StreamHead| h.version);
                let outcome = store
                    .append(&stream, expected, &batch)
                    .await
                    .expect("append");
                head = Some(StreamHead {
                    version: outcome.stream_version,
                    hash: batch[batch.len() - 1].hash,
                });
                acknowledged_count.fetch_add(batch.len(), std::sync::atomic::Ordering::AcqRel);
                acknowledged.extend(batch.into_iter().map(|e| e.header.event_id));
            }
            acknowledged
        }));
    }
    let mut acknowledged = HashSet::new();
    for task in tasks {
        acknowledged.extend(task.await.expect("writer task"));
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    let tailed = tailer.await.expect("tailer task");

    for (what, events) in [
        ("the tailing reader", tailed),
        (
            "a full read",
            read_whole_log(store, 50, acknowledged.len()).await,
        ),
    ] {
        let positions: Vec<u64> = events.iter().map(|r| r.position).collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "{what}: positions strictly increase"
        );
        let ids: Vec<EventId> = events.iter().map(|r| r.event.header.event_id).collect();
        let distinct: HashSet<EventId> = ids.iter().copied().collect();
        assert_eq!(distinct.len(), ids.len(), "{what}: no event twice");
        assert_eq!(
            distinct, acknowledged,
            "{what}: every acknowledged event, nothing else"
        );

        let mut versions: BTreeMap<&StreamId, u64> = BTreeMap::new();
        for event in &events {
            let last = versions.entry(&event.event.header.stream_id).or_insert(0);
            assert_eq!(
                event.event.header.stream_version,
                *last + 1,
                "{what}: each stream in version order"
            );
            *last += 1;
        }
    }
}

/// A subscription delivers each event once; resumed from its last checkpoint it delivers only
/// what came after, with nothing lost and nothing repeated. A waiting subscriber wakes on an
/// append.
pub async fn subscription_resumes_from_its_checkpoint<S: EventStore>(store: Arc<S>) {
    let factory = EventFactory::new();
    let stream = stream("subscription");
    let first = factory.batch(&stream, None, 5);
    store.append(&stream, 0, &first).await.expect("append");

    let mut subscription = Subscription::new(store.clone(), 0, 3);
    let mut delivered = Vec::new();
    while delivered.len() < 5 {
        let batch = tokio::time::timeout(PROMPT_WAIT, subscription.next_batch())
            .await
            .expect("stored events are delivered promptly")
            .expect("next_batch");
        assert!(batch.len() <= 3, "batches respect the batch size");
        delivered.extend(batch.into_iter().map(|r| r.event.header.event_id));
    }
    let checkpoint = subscription.checkpoint();
    drop(subscription);

    let head = StreamHead {
        version: 5,
        hash: first[4].hash,
    };
    let second = factory.batch(&stream, Some(head), 4);
    store
        .append(&stream, 5, &second)
        .await
        .expect("append while nobody listens");

    let mut resumed = Subscription::new(store.clone(), checkpoint, 100);
    let mut after_resume = Vec::new();
    while after_resume.len() < 4 {
        let batch = tokio::time::timeout(PROMPT_WAIT, resumed.next_batch())
            .await
            .expect("events appended while away are delivered")
            .expect("next_batch");
        after_resume.extend(batch.into_iter().map(|r| r.event.header.event_id));
    }
    let expected: Vec<EventId> = second.iter().map(|e| e.header.event_id).collect();
    assert_eq!(
        after_resume, expected,
        "resuming delivers exactly what came after the checkpoint"
    );

    // A subscriber already waiting is woken by a new append.
    let waiting =
        tokio::spawn(async move { tokio::time::timeout(PROMPT_WAIT, resumed.next_batch()).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let head = StreamHead {
        version: 9,
        hash: second[3].hash,
    };
    let third = factory.batch(&stream, Some(head), 1);
    store
        .append(&stream, 9, &third)
        .await
        .expect("append while subscribed");
    let woken = waiting
        .await
        .expect("subscriber task")
        .expect("a waiting subscriber wakes on append")
        .expect("next_batch");
    let woken: Vec<EventId> = woken.iter().map(|r| r.event.header.event_id).collect();
    assert_eq!(woken, [third[0].header.event_id]);
    assert!(
        !delivered.iter().any(|id| after_resume.contains(id)),
        "no event delivered twice"
    );
}

/// The data-key table: one key per owner (a racing creator gets the winner's), re-wrapping by
/// compare-and-swap, and destruction that is final.
pub async fn key_store_lifecycle<K: chartlog_crypto::KeyStore>(keys: &K) {
    use chartlog_crypto::{DataKeyRecord, KekId, KeyInsert, KeyRing};

    let old_kek = KekId::parse("kek-old").expect("kek id");
    let new_kek = KekId::parse("kek-new").expect("kek id");
    let mut ring = KeyRing::generate(old_kek.clone());
    let owner = stream("keys");
    let key_id = DataKeyId::generate();
    let wrapped = ring.wrap(&owner, key_id, &DataKey::generate());

    assert!(matches!(
        keys.insert(&owner, &wrapped).await.expect("insert"),
        KeyInsert::Inserted
    ));
    let rival = ring.wrap(&owner, DataKeyId::generate(), &DataKey::generate());
    match keys.insert(&owner, &rival).await.expect("second insert") {
        KeyInsert::Existing(DataKeyRecord::Active(existing)) => {
            assert_eq!(
                existing, wrapped,
                "the first key stays; an owner never has two"
            )
        }
        other => panic!("expected the existing active key, got {other:?}"),
    }
    assert_eq!(
        keys.fetch(&owner).await.expect("fetch"),
        Some(DataKeyRecord::Active(wrapped.clone()))
    );
    assert_eq!(keys.fetch(&stream("nobody")).await.expect("fetch"), None);

    // Rotation: list what the new KEK does not wrap yet, swap, and a stale swap loses.
    ring.add(new_kek.clone(), random_kek_bytes())
        .expect("add KEK");
    ring.set_active(&new_kek).expect("activate KEK");
    let pending = keys.list_for_rewrap(&new_kek, 100).await.expect("list");
    assert_eq!(pending, vec![(owner.clone(), wrapped.clone())]);
    let key = ring
        .unwrap(&owner, &wrapped)
        .expect("unwrap under the old KEK");
    let rewrapped = ring.wrap(&owner, key_id, &key);
    assert_eq!(rewrapped.kek_id, new_kek);
    assert!(
        keys.replace_wrapping(&owner, &wrapped, &rewrapped)
            .await
            .expect("swap")
    );
    assert!(
        !keys
            .replace_wrapping(&owner, &wrapped, &rewrapped)
            .await
            .expect("stale swap"),
        "a swap against a stale wrapping is refused"
    );
    assert!(
        keys.list_for_rewrap(&new_kek, 100)
            .await
            .expect("list")
            .is_empty()
    );

    // Destruction is final and idempotent.
    let at = Timestamp::from_unix_micros(1_800_000_000_000_000).expect("in range");
    assert_eq!(
        keys.destroy(&owner, at).await.expect("destroy"),
        Some(key_id)
    );
    let destroyed = DataKeyRecord::Destroyed {
        key_id,
        destroyed_at: at,
    };
    assert_eq!(
        keys.fetch(&owner).await.expect("fetch"),
        Some(destroyed.clone())
    );
    assert_eq!(
        keys.destroy(&owner, at).await.expect("destroy again"),
        Some(key_id)
    );
    match keys
        .insert(&owner, &rival)
        .await
        .expect("insert after destroy")
    {
        KeyInsert::Existing(record) => {
            assert_eq!(record, destroyed, "an erased owner gets no new key")
        }
        KeyInsert::Inserted => panic!("an erased owner must never get a new key"),
    }
    assert!(
        !keys
            .replace_wrapping(&owner, &rewrapped, &rewrapped)
            .await
            .expect("swap")
    );
    assert!(
        keys.list_for_rewrap(&old_kek, 100)
            .await
            .expect("list")
            .is_empty()
    );
    assert_eq!(
        keys.destroy(&stream("nobody"), at)
            .await
            .expect("destroy unknown"),
        None
    );
}

/// 64 random bytes for a test KEK (four v4 UUIDs: 488 random bits, plenty for a test).
fn random_kek_bytes() -> [u8; 64] {
    let mut bytes = [0; 64];
    for chunk in bytes.chunks_mut(16) {
        chunk.copy_from_slice(&Uuid::new_v4().into_bytes());
    }
    bytes
}
