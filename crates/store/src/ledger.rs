//! The command path for patient records: load a patient's stream, decide, seal, sign, append.
//!
//! This is where the pure domain meets keys and storage. Every event is sealed under the
//! patient's own data key and signed before it reaches a backend; every event read back is
//! verified (hash, signature, chain) before it is opened. A signature is checked right after
//! signing too, so a broken signer fails the write, not some later read.

use std::sync::Arc;

use chartlog_crypto::{
    CryptoError, DataKey, DataKeyId, DataKeys, EventHash, EventHeader, EventSigner, IntegrityError,
    KeyError, KeyStore, SealedEvent, SignatureVerifier, event_hash, open, open_record, seal_event,
    seal_record, verify_chain,
};
use chartlog_domain::patient::{DECISION_STATE_SCHEMA_VERSION, RetentionPolicy};
use chartlog_domain::{
    Actor, EventId, Patient, PatientCommand, PatientEvent, PatientId, Rejection, StreamId,
    Timestamp, codec, decide, evolve,
};
use uuid::Uuid;

use crate::{EventStore, SnapshotStore, StoreError, StoredSnapshot, StreamHead};

/// How many times a command is re-decided after losing a race to another writer.
pub const CONFLICT_RETRIES_MAX: u32 = 5;
/// Events read per page while loading a stream.
const LOAD_PAGE_EVENTS: u32 = 1_000;
/// A patient's decision state is snapshotted each time the stream passes a multiple of this
/// many events, so a load folds at most this many events after the snapshot. Small enough
/// that the tail costs little next to the command itself; large enough that writing
/// snapshots costs little next to writing events.
pub const SNAPSHOT_EVERY_EVENTS: u64 = 100;
/// Binds a sealed snapshot to what it is, so no other sealed record opens as one.
const SNAPSHOT_RECORD_KIND: &[u8] = b"chartlog.decision-state";

/// Why a command or a load did not go through. `Rejected` is the clinician's to act on (4xx);
/// `Erased` is a clear answer, never an opaque decryption error; the rest are faults (5xx).
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    Rejected(#[from] Rejection),

    #[error("patient {patient} was erased at {erased_at}")]
    Erased {
        patient: PatientId,
        erased_at: Timestamp,
    },

    #[error("patient {patient} has no record")]
    NotFound { patient: PatientId },

    /// The caller's precondition (HTTP If-Match) names another version than the stream's.
    #[error("patient {patient}'s record is at version {current}, not the expected {expected}")]
    VersionMismatch {
        patient: PatientId,
        expected: u64,
        current: u64,
    },

    #[error("stream {stream} changed under {retries} attempts in a row")]
    Contended { stream: StreamId, retries: u32 },

    #[error("integrity check failed")]
    Integrity(#[from] IntegrityError),

    #[error("event {event_id} of stream {stream} is unreadable")]
    Unreadable {
        stream: StreamId,
        event_id: EventId,
        #[source]
        source: UnreadableEvent,
    },

    #[error("data key unavailable")]
    Key(#[source] KeyError),

    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a stored patient event could not be turned back into a domain event.
#[derive(Debug, thiserror::Error)]
pub enum UnreadableEvent {
    #[error("does not open under its data key")]
    Unopenable(#[source] CryptoError),
    #[error("does not decode")]
    Undecodable(#[source] codec::DecodeError),
}

/// Opens a verified patient event with its data key and decodes it, upcasting old schema
/// versions: the one way every reader turns stored bytes back into the clinic's event.
pub fn open_patient_event(
    key: &chartlog_crypto::DataKey,
    event: &SealedEvent,
) -> Result<PatientEvent, UnreadableEvent> {
    let plaintext =
        open(key, &event.header, &event.ciphertext).map_err(UnreadableEvent::Unopenable)?;
    codec::decode(
        &event.header.event_type,
        event.header.schema_version,
        &plaintext,
    )
    .map_err(UnreadableEvent::Undecodable)
}

/// [`open_patient_event`] for the ledger's readers: a failure names the event and its stream.
fn open_in_stream(
    stream: &StreamId,
    key: &DataKey,
    event: &SealedEvent,
) -> Result<PatientEvent, LedgerError> {
    open_patient_event(key, event).map_err(|source| LedgerError::Unreadable {
        stream: stream.clone(),
        event_id: event.header.event_id,
        source,
    })
}

/// Where a command's events landed: the new stream version (for If-Match) and the global
/// position of the last event (for read-your-writes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutcome {
    pub stream_version: u64,
    pub position: u64,
    pub events: usize,
    /// The record as the command left it: the state it decided on, folded with the events it
    /// stored, at their head. A caller that keeps records between commands keeps this one, so
    /// the next load need not read back, verify and open what was just written. `None` after
    /// an erasure, which leaves nothing to keep.
    pub record: Option<LoadedPatient>,
}

/// What a caller may add to a command.
#[derive(Debug, Clone, Default)]
pub struct ExecuteOptions {
    /// Refuse with [`LedgerError::VersionMismatch`] unless the stream is at this version
    /// (0: not yet registered), and never re-decide after a lost race.
    pub expected_version: Option<u64>,
    /// The record as the caller just loaded it; used for the first attempt only.
    pub loaded: Option<LoadedPatient>,
}

/// A patient's decision state with the head it was folded up to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedPatient {
    pub patient: Patient,
    pub head: Option<StreamHead>,
}

/// Where a ledger keeps snapshots, and how often it takes one.
struct Snapshots {
    store: Arc<dyn SnapshotStore>,
    every_events: u64,
}

/// Executes patient commands against an [`EventStore`].
pub struct PatientLedger<S: EventStore + ?Sized, K: KeyStore> {
    store: Arc<S>,
    keys: Arc<DataKeys<K>>,
    signer: Arc<EventSigner>,
    verifier: Arc<SignatureVerifier>,
    snapshots: Option<Arc<Snapshots>>,
    retention: Option<RetentionPolicy>,
}

impl<S: EventStore + ?Sized, K: KeyStore> Clone for PatientLedger<S, K> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            keys: self.keys.clone(),
            signer: self.signer.clone(),
            verifier: self.verifier.clone(),
            snapshots: self.snapshots.clone(),
            retention: self.retention,
        }
    }
}

impl<S: EventStore + ?Sized, K: KeyStore> PatientLedger<S, K> {
    /// `verifier` must trust `signer`'s public key (asserted on the first write).
    pub fn new(
        store: Arc<S>,
        keys: Arc<DataKeys<K>>,
        signer: Arc<EventSigner>,
        verifier: Arc<SignatureVerifier>,
    ) -> Self {
        Self {
            store,
            keys,
            signer,
            verifier,
            snapshots: None,
            retention: None,
        }
    }

    /// Keeps a sealed snapshot of each patient's decision state in `store`, taken each time
    /// a stream passes a multiple of `every_events` events (see [`SNAPSHOT_EVERY_EVENTS`]), so
    /// loading a patient costs the same however long their history is.
    pub fn with_snapshots(mut self, store: Arc<dyn SnapshotStore>, every_events: u64) -> Self {
        assert!(every_events > 0, "a snapshot needs at least one event");
        self.snapshots = Some(Arc::new(Snapshots {
            store,
            every_events,
        }));
        self
    }

    /// Refuses an erasure for [`ErasureReason::RetentionPeriodElapsed`] while the record is
    /// within `policy`'s retention period, counted from the last event stored on it. Without
    /// a policy the requester's statement is taken as it is.
    ///
    /// [`ErasureReason::RetentionPeriodElapsed`]: chartlog_domain::patient::ErasureReason::RetentionPeriodElapsed
    pub fn with_retention(mut self, policy: RetentionPolicy) -> Self {
        self.retention = Some(policy);
        self
    }

    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    pub fn keys(&self) -> &Arc<DataKeys<K>> {
        &self.keys
    }

    /// Decides `command` against the patient's current record and appends what it decides.
    /// Retries on a lost race, re-deciding against the new state each time.
    pub async fn execute(
        &self,
        patient: PatientId,
        command: PatientCommand,
        actor: Actor,
        now: Timestamp,
    ) -> Result<CommandOutcome, LedgerError> {
        self.execute_with(patient, command, actor, now, ExecuteOptions::default())
            .await
    }

    /// [`PatientLedger::execute`] with a caller's precondition and the record it already
    /// loaded (the HTTP layer loads it to check access, and need not fold it twice).
    #[tracing::instrument(skip_all, fields(patient = %patient, command = command.kind()))]
    pub async fn execute_with(
        &self,
        patient: PatientId,
        command: PatientCommand,
        actor: Actor,
        now: Timestamp,
        options: ExecuteOptions,
    ) -> Result<CommandOutcome, LedgerError> {
        let stream = StreamId::patient(patient);
        let mut attempt = 0;
        let mut preloaded = options.loaded;
        loop {
            attempt += 1;
            let loaded = match preloaded.take() {
                Some(loaded) => Ok(loaded),
                None => self.load(patient).await,
            };
            let loaded = match loaded {
                Ok(loaded) => loaded,
                Err(LedgerError::NotFound { .. }) => LoadedPatient {
                    patient: Patient::default(),
                    head: None,
                },
                Err(other) => return Err(other),
            };
            let loaded_version = loaded.head.map_or(0, |h| h.version);
            if let Some(expected) = options.expected_version
                && expected != loaded_version
            {
                return Err(LedgerError::VersionMismatch {
                    patient,
                    expected,
                    current: loaded_version,
                });
            }
            let events = decide(&loaded.patient, command.clone(), now)?;
            assert!(
                !events.is_empty(),
                "decide accepts a command only with events"
            );
            let erasure = events.iter().find_map(|e| match e {
                PatientEvent::PatientErased { reason, .. } => Some(*reason),
                _ => None,
            });
            if let (Some(reason), Some(policy), Some(head)) = (erasure, self.retention, loaded.head)
            {
                let last_entry_at = self.recorded_at(&stream, head).await?;
                policy.check_erasure(&loaded.patient, reason, last_entry_at, now)?;
            }
            let erases = erasure.is_some();
            if erases {
                // The tombstone goes in before the key is destroyed: a destruction the key
                // table would refuse (an erasure ledger that cannot be written) must refuse
                // the erasure now, not leave a stored tombstone over a live key.
                self.keys
                    .prepare_destroy(&stream)
                    .await
                    .map_err(LedgerError::Key)?;
            }

            let (key_id, key) = self
                .keys
                .key_for_append(&stream)
                .await
                .map_err(|e| self.key_error(patient, e))?;
            let sealed = self.seal(&stream, loaded.head, &events, actor, now, key_id, &key)?;
            match self.store.append(&stream, loaded_version, &sealed).await {
                Ok(outcome) => {
                    let record = if erases {
                        // The tombstone is stored; destroying the key is what makes the
                        // erasure real. A crash before this line is finished by the next load.
                        self.destroy_key(&stream, now).await?;
                        None
                    } else {
                        let record = LoadedPatient {
                            patient: events.iter().fold(loaded.patient, evolve),
                            head: sealed.last().map(|last| StreamHead {
                                version: last.header.stream_version,
                                hash: last.hash,
                            }),
                        };
                        if let (Some(snapshots), Some(head)) = (&self.snapshots, record.head)
                            && outcome.stream_version / snapshots.every_events
                                != loaded_version / snapshots.every_events
                        {
                            self.save_snapshot(&stream, &record.patient, head, key_id, &key)
                                .await;
                        }
                        Some(record)
                    };
                    return Ok(CommandOutcome {
                        stream_version: outcome.stream_version,
                        position: outcome.last_position,
                        events: sealed.len(),
                        record,
                    });
                }
                // A caller who named the version it decided on must see the race, not a
                // silent re-decision against a record it has not read.
                Err(StoreError::Conflict { .. }) if options.expected_version.is_some() => {
                    let current = self
                        .store
                        .stream_head(&stream)
                        .await?
                        .map_or(0, |h| h.version);
                    return Err(LedgerError::VersionMismatch {
                        patient,
                        expected: loaded_version,
                        current,
                    });
                }
                Err(StoreError::Conflict { .. }) if attempt < CONFLICT_RETRIES_MAX => {
                    tracing::debug!(attempt, "lost a race on the stream; deciding again");
                }
                Err(StoreError::Conflict { .. }) => {
                    return Err(LedgerError::Contended {
                        stream,
                        retries: attempt,
                    });
                }
                Err(other) => return Err(other.into()),
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn seal(
        &self,
        stream: &StreamId,
        head: Option<StreamHead>,
        events: &[chartlog_domain::PatientEvent],
        actor: Actor,
        now: Timestamp,
        key_id: DataKeyId,
        key: &chartlog_crypto::DataKey,
    ) -> Result<Vec<SealedEvent>, LedgerError> {
        let (mut version, mut prev_hash) =
            head.map_or((0, EventHash::GENESIS), |h| (h.version, h.hash));
        let mut sealed = Vec::with_capacity(events.len());
        for event in events {
            let encoded = codec::encode(event);
            version += 1;
            let header = EventHeader {
                stream_id: stream.clone(),
                stream_version: version,
                event_id: EventId::from_uuid(Uuid::now_v7()),
                event_type: encoded.event_type.to_owned(),
                schema_version: encoded.schema_version,
                recorded_at: now,
                actor,
                key_id,
                prev_hash,
                signer_key_id: self.signer.key_id().clone(),
            };
            let event = seal_event(&self.signer, key, header, &encoded.payload);
            // Pair the signature with a check before anything is stored.
            self.verifier.verify(&event)?;
            prev_hash = event.hash;
            sealed.push(event);
        }
        Ok(sealed)
    }

    /// When the event at `head` was stored, from its clear header, which must hash to the
    /// verified head: a header altered in the database cannot move the retention period.
    async fn recorded_at(
        &self,
        stream: &StreamId,
        head: StreamHead,
    ) -> Result<Timestamp, LedgerError> {
        let recorded = self.store.read_stream(stream, head.version, 1).await?;
        match recorded.first() {
            Some(recorded)
                if event_hash(&recorded.event.header, &recorded.event.ciphertext) == head.hash =>
            {
                Ok(recorded.event.header.recorded_at)
            }
            _ => Err(LedgerError::Integrity(IntegrityError::HashMismatch {
                stream_id: stream.clone(),
                stream_version: head.version,
            })),
        }
    }

    /// Reads, verifies, opens and folds the patient's stream.
    pub async fn load(&self, patient: PatientId) -> Result<LoadedPatient, LedgerError> {
        self.catch_up(patient, None).await
    }

    /// Brings a record this ledger loaded earlier up to the stream's head: only the events
    /// after `earlier`'s head are read, checked to continue its hash chain, verified, opened
    /// and folded. With `None`, the whole stream (as [`PatientLedger::load`]).
    pub async fn catch_up(
        &self,
        patient: PatientId,
        earlier: Option<LoadedPatient>,
    ) -> Result<LoadedPatient, LedgerError> {
        let stream = StreamId::patient(patient);
        let earlier = match earlier {
            Some(earlier) => Some(earlier),
            None => self.read_snapshot(patient, &stream).await?,
        };
        let from_snapshot = earlier.as_ref().and_then(|e| e.head).map(|h| h.version);
        let (mut state, mut head) = match earlier {
            Some(earlier) => (earlier.patient, earlier.head),
            None => (Patient::default(), None),
        };
        let mut key: Option<(DataKeyId, Arc<DataKey>)> = None;
        loop {
            let from = head.map_or(1, |h| h.version + 1);
            let page = self
                .store
                .read_stream(&stream, from, LOAD_PAGE_EVENTS)
                .await?;
            let Some(last) = page.last() else { break };
            let last = StreamHead {
                version: last.event.header.stream_version,
                hash: last.event.hash,
            };
            // A short page is the end of the stream as read: asking again would be one more
            // round trip per load (most loads bring a cached record up by an event or two).
            let at_end = page.len() < LOAD_PAGE_EVENTS as usize;
            let events: Vec<SealedEvent> = page.into_iter().map(|r| r.event).collect();
            let prev = head.map_or(EventHash::GENESIS, |h| h.hash);
            verify_chain(prev, from, &events)?;
            self.verifier.verify_batch(&events)?;
            let key = match &key {
                Some((_, key)) => key.clone(),
                None => {
                    let (key_id, fetched) = self
                        .keys
                        .key_for_read(&stream)
                        .await
                        .map_err(|e| self.key_error(patient, e))?;
                    key = Some((key_id, fetched.clone()));
                    fetched
                }
            };
            for event in &events {
                state = evolve(state, &open_in_stream(&stream, &key, event)?);
            }
            head = Some(last);
            if at_end {
                break;
            }
        }
        if head.is_none() {
            return Err(LedgerError::NotFound { patient });
        }
        if let Some(erased_at) = state.erased_at() {
            // The tombstone is stored but the key may have survived (a crash mid-erasure).
            self.destroy_key(&stream, erased_at).await?;
            return Err(LedgerError::Erased { patient, erased_at });
        }
        // No snapshot, an unusable one, or one left far behind (a snapshot write that failed):
        // take one now, so the next load of a long stream does not fold it all again.
        if let (Some(snapshots), Some(head), Some((key_id, key))) = (&self.snapshots, head, &key)
            && head.version - from_snapshot.unwrap_or(0) >= snapshots.every_events
        {
            self.save_snapshot(&stream, &state, head, *key_id, key)
                .await;
        }
        Ok(LoadedPatient {
            patient: state,
            head,
        })
    }

    /// The patient's events after version `after`, up to and including `verified_head`,
    /// opened, oldest first: for a reader whose read model trails the stream and folds the
    /// rest itself. With `after_hash`, the first event must continue the event of that hash
    /// (the reader's own copy is at a head it was given earlier).
    ///
    /// `verified_head` must be a head this ledger verified: a [`LoadedPatient`]'s from
    /// [`PatientLedger::load`] or [`PatientLedger::catch_up`], or a command's outcome, never
    /// one a caller sent. Its hash then authenticates every event before it: the events are
    /// checked to chain one to the next (each hash recomputed) and to end at that hash exactly,
    /// which is all a signature check would add, so the signatures are not checked again.
    pub async fn events_between(
        &self,
        patient: PatientId,
        after: u64,
        after_hash: Option<EventHash>,
        verified_head: StreamHead,
    ) -> Result<Vec<PatientEvent>, LedgerError> {
        let head = verified_head;
        let stream = StreamId::patient(patient);
        let mut events: Vec<SealedEvent> = Vec::new();
        while after + (events.len() as u64) < head.version {
            let from = after + events.len() as u64 + 1;
            let wanted = u32::try_from(head.version - from + 1)
                .unwrap_or(u32::MAX)
                .min(LOAD_PAGE_EVENTS);
            let page = self.store.read_stream(&stream, from, wanted).await?;
            if page.is_empty() {
                // The store holds less than a head this ledger verified: the log lost events.
                return Err(IntegrityError::VersionGap {
                    stream_id: stream,
                    expected_version: from,
                    found_version: from - 1,
                }
                .into());
            }
            events.extend(page.into_iter().map(|r| r.event));
        }
        let Some(first) = events.first() else {
            return Ok(Vec::new());
        };
        let prev = after_hash.unwrap_or(first.header.prev_hash);
        let last = verify_chain(prev, after + 1, &events)?;
        if last != head.hash {
            return Err(IntegrityError::ChainBroken {
                stream_id: stream,
                stream_version: head.version,
            }
            .into());
        }
        let (_, key) = self
            .keys
            .key_for_read(&stream)
            .await
            .map_err(|e| self.key_error(patient, e))?;
        events
            .iter()
            .map(|event| open_in_stream(&stream, &key, event))
            .collect()
    }

    /// The patient's latest snapshot, if there is one this ledger can trust: of the current
    /// state schema, sealed under the patient's current data key with the stream, version and
    /// head hash it claims, and taken at an event the log still holds. Anything else is
    /// ignored (and replaced by the load that follows); only an erased key is an answer.
    async fn read_snapshot(
        &self,
        patient: PatientId,
        stream: &StreamId,
    ) -> Result<Option<LoadedPatient>, LedgerError> {
        let Some(snapshots) = &self.snapshots else {
            return Ok(None);
        };
        let stored = match snapshots.store.latest(stream).await {
            Ok(Some(stored)) => stored,
            Ok(None) => return Ok(None),
            Err(error) => {
                tracing::warn!(%stream, %error, "snapshot unreadable; folding the whole stream");
                return Ok(None);
            }
        };
        if stored.schema_version != DECISION_STATE_SCHEMA_VERSION {
            tracing::debug!(%stream, "snapshot of another state schema; folding the whole stream");
            return Ok(None);
        }
        let (key_id, key) = self
            .keys
            .key_for_read(stream)
            .await
            .map_err(|e| self.key_error(patient, e))?;
        let head = StreamHead {
            version: stored.stream_version,
            hash: stored.head_hash,
        };
        let state = (key_id == stored.data_key_id)
            .then(|| {
                let binding = snapshot_binding(stream, head, stored.schema_version, key_id);
                open_record(&key, &binding.each_ref().map(Vec::as_slice), &stored.sealed).ok()
            })
            .flatten()
            .and_then(|plaintext| serde_json::from_slice::<Patient>(&plaintext).ok())
            .filter(|state| state.version() == head.version);
        let Some(state) = state else {
            tracing::warn!(%stream, "snapshot does not open as this stream's state; dropping it");
            self.discard_snapshot(snapshots, stream).await;
            return Ok(None);
        };
        // Bound to the log as it is now: the event the snapshot was taken at must still be
        // there, so a snapshot from a restored or rewritten history is never folded onto.
        let anchor = self.store.read_stream(stream, head.version, 1).await?;
        match anchor.first() {
            Some(event)
                if event.event.header.stream_version == head.version
                    && event.event.hash == head.hash => {}
            _ => {
                tracing::warn!(%stream, "snapshot is not of the stored history; dropping it");
                self.discard_snapshot(snapshots, stream).await;
                return Ok(None);
            }
        }
        Ok(Some(LoadedPatient {
            patient: state,
            head: Some(head),
        }))
    }

    /// Drops a snapshot that cannot be used, so the load that follows can put a good one in
    /// its place (a save never replaces a snapshot of the same version).
    async fn discard_snapshot(&self, snapshots: &Snapshots, stream: &StreamId) {
        if let Err(error) = snapshots.store.discard(stream).await {
            tracing::warn!(%stream, %error, "unusable snapshot not dropped");
        }
    }

    /// Seals and keeps a snapshot. Best effort: the events are stored already, and a missing
    /// snapshot only costs the next load a longer fold.
    async fn save_snapshot(
        &self,
        stream: &StreamId,
        state: &Patient,
        head: StreamHead,
        key_id: DataKeyId,
        key: &DataKey,
    ) {
        let Some(snapshots) = &self.snapshots else {
            return;
        };
        let plaintext = match serde_json::to_vec(state) {
            Ok(plaintext) => plaintext,
            Err(error) => {
                tracing::warn!(%stream, %error, "decision state does not serialize; no snapshot");
                return;
            }
        };
        let binding = snapshot_binding(stream, head, DECISION_STATE_SCHEMA_VERSION, key_id);
        let snapshot = StoredSnapshot {
            stream_version: head.version,
            head_hash: head.hash,
            schema_version: DECISION_STATE_SCHEMA_VERSION,
            data_key_id: key_id,
            sealed: seal_record(key, &binding.each_ref().map(Vec::as_slice), &plaintext),
        };
        if let Err(error) = snapshots.store.save(stream, &snapshot).await {
            tracing::warn!(%stream, %error, "snapshot not saved; the next load folds more events");
        }
    }

    async fn destroy_key(&self, stream: &StreamId, at: Timestamp) -> Result<(), LedgerError> {
        self.keys
            .destroy(stream, at)
            .await
            .map_err(LedgerError::Key)?;
        // Unreadable already with the key gone; dropping the row leaves nothing behind.
        if let Some(snapshots) = &self.snapshots {
            snapshots.store.discard(stream).await?;
        }
        Ok(())
    }

    fn key_error(&self, patient: PatientId, error: KeyError) -> LedgerError {
        match error {
            KeyError::Erased { destroyed_at, .. } => LedgerError::Erased {
                patient,
                erased_at: destroyed_at,
            },
            other => LedgerError::Key(other),
        }
    }
}

/// What a sealed snapshot is bound to: opening it under any other stream, version, head,
/// schema or key fails.
fn snapshot_binding(
    stream: &StreamId,
    head: StreamHead,
    schema_version: u32,
    key_id: DataKeyId,
) -> [Vec<u8>; 6] {
    [
        SNAPSHOT_RECORD_KIND.to_vec(),
        stream.as_str().as_bytes().to_vec(),
        head.version.to_be_bytes().to_vec(),
        head.hash.as_bytes().to_vec(),
        schema_version.to_be_bytes().to_vec(),
        key_id.as_uuid().as_bytes().to_vec(),
    ]
}
