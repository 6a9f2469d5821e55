//! The signed audit log: reads, logins, logouts, session expiries, denials, break-glass
//! openings and exports, appended as events to an audit stream, so they are as tamper-evident
//! as the record itself (hash-chained, signed, checked by `verify` like every stream).
//!
//! Each server process writes its own stream, `audit-<process id>`, through one writer task
//! that commits whatever rows are waiting as one event (group commit): a burst of concurrent
//! reads costs one append, and every caller waits only until its rows are durable. The audit
//! projection folds these events into `chartlog_audit_trail`.
//!
//! **Invariant:** the payload is [`AuditRow`]s and nothing else: ids, closed-vocabulary codes,
//! times and client addresses, never PHI. It is still sealed (under the audit stream's own
//! data key, which no erasure destroys), as every payload in the log is.

use std::net::IpAddr;
use std::sync::Arc;

use chartlog_crypto::{
    DataKeys, EventHash, EventHeader, EventSigner, KeyStore, SealedEvent, seal_event,
};
use chartlog_domain::{Actor, EventId, PatientId, PurposeOfUse, Role, StreamId, Timestamp, UserId};
use chartlog_store::{EventStore, StoreError, StreamHead};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::audit::{AuditAction, AuditEntity, AuditOutcome, AuditRow, known_event_type};

/// The event type of a batch of audit rows.
pub const AUDIT_RECORDED_EVENT_TYPE: &str = "audit_recorded";
/// The payload's schema version.
pub const AUDIT_RECORDED_SCHEMA_VERSION: u32 = 1;
/// Stream ids of audit streams start with this.
pub const AUDIT_STREAM_PREFIX: &str = "audit-";
/// Most rows one event carries; a larger backlog is split over several appends.
pub const AUDIT_ROWS_PER_EVENT_MAX: usize = 512;
/// Requests waiting for the writer; more wait for room (back-pressure, never loss).
const AUDIT_QUEUE_DEPTH: usize = 4_096;

/// The user id in the header of audit events: chartlog itself wrote them. The people the
/// rows are about are in the rows.
pub const AUDIT_WRITER_USER_ID: UserId = UserId::from_uuid(Uuid::from_u128(0xa0d17));

/// A fresh audit stream for this process.
pub fn new_audit_stream() -> StreamId {
    StreamId::parse(&format!("{AUDIT_STREAM_PREFIX}{}", Uuid::now_v7()))
        .expect("an audit stream id is a valid stream id")
}

/// Whether `stream` is an audit stream.
pub fn is_audit_stream(stream: &StreamId) -> bool {
    stream.as_str().starts_with(AUDIT_STREAM_PREFIX)
}

/// The rows could not be made durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditLogError {
    #[error("the audit log writer has stopped")]
    WriterGone,
    #[error("the audit stream's data key is unavailable: {0}")]
    Key(String),
    #[error("the audit append failed: {0}")]
    Store(String),
}

/// One audit row as it is stored in an audit event's payload.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditRowWire {
    audit_id: Uuid,
    occurred_at_us: i64,
    actor: Option<Actor>,
    patient_id: Option<PatientId>,
    entity: Option<String>,
    record_id: Option<Uuid>,
    action: String,
    outcome: String,
    client_address: Option<IpAddr>,
    event_type: Option<String>,
}

impl AuditRowWire {
    fn of(row: &AuditRow) -> Self {
        Self {
            audit_id: row.audit_id,
            occurred_at_us: row.occurred_at.unix_micros(),
            actor: row.actor,
            patient_id: row.patient_id,
            entity: row.entity.map(|entity| entity.as_str().to_owned()),
            record_id: row.record_id,
            action: row.action.as_str().to_owned(),
            outcome: row.outcome.as_str().to_owned(),
            client_address: row.client_address,
            event_type: row.event_type.map(str::to_owned),
        }
    }

    fn into_row(self) -> Option<AuditRow> {
        Some(AuditRow {
            audit_id: self.audit_id,
            occurred_at: Timestamp::from_unix_micros(self.occurred_at_us).ok()?,
            actor: self.actor,
            patient_id: self.patient_id,
            entity: match self.entity {
                Some(raw) => Some(AuditEntity::parse(&raw)?),
                None => None,
            },
            record_id: self.record_id,
            action: AuditAction::parse(&self.action)?,
            outcome: AuditOutcome::parse(&self.outcome)?,
            client_address: self.client_address,
            event_type: match self.event_type {
                Some(raw) => Some(known_event_type(&raw)?),
                None => None,
            },
        })
    }
}

/// The rows an audit event's opened payload holds; `None` when it is not a payload this
/// build wrote (a newer schema, or corruption that got past the signature).
pub fn decode_audit_rows(schema_version: u32, payload: &[u8]) -> Option<Vec<AuditRow>> {
    if schema_version != AUDIT_RECORDED_SCHEMA_VERSION {
        return None;
    }
    let wire: Vec<AuditRowWire> = serde_json::from_slice(payload).ok()?;
    wire.into_iter().map(AuditRowWire::into_row).collect()
}

struct Pending {
    rows: Vec<AuditRow>,
    done: oneshot::Sender<Result<(), AuditLogError>>,
}

/// The handle requests record through; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    queue: mpsc::Sender<Pending>,
}

impl AuditLog {
    /// Starts the writer task for `stream` (see [`new_audit_stream`]) on the current runtime.
    pub fn spawn<S: EventStore + ?Sized, K: KeyStore + 'static>(
        store: Arc<S>,
        keys: Arc<DataKeys<K>>,
        signer: Arc<EventSigner>,
        stream: StreamId,
    ) -> AuditLog {
        let (queue, waiting) = mpsc::channel(AUDIT_QUEUE_DEPTH);
        let writer = Writer {
            store,
            keys,
            signer,
            stream,
            head: None,
        };
        tokio::spawn(writer.run(waiting));
        AuditLog { queue }
    }

    /// Returns once `rows` are durable in the audit stream.
    pub async fn record(&self, rows: Vec<AuditRow>) -> Result<(), AuditLogError> {
        if rows.is_empty() {
            return Ok(());
        }
        let (done, outcome) = oneshot::channel();
        self.queue
            .send(Pending { rows, done })
            .await
            .map_err(|_| AuditLogError::WriterGone)?;
        outcome.await.map_err(|_| AuditLogError::WriterGone)?
    }
}

struct Writer<S: EventStore + ?Sized, K: KeyStore> {
    store: Arc<S>,
    keys: Arc<DataKeys<K>>,
    signer: Arc<EventSigner>,
    stream: StreamId,
    /// The stream's head as this writer last appended it; read from the store when unknown.
    head: Option<StreamHead>,
}

impl<S: EventStore + ?Sized, K: KeyStore + 'static> Writer<S, K> {
    async fn run(mut self, mut waiting: mpsc::Receiver<Pending>) {
        while let Some(first) = waiting.recv().await {
            let mut batch = vec![first];
            let mut rows = batch[0].rows.len();
            while rows < AUDIT_ROWS_PER_EVENT_MAX {
                match waiting.try_recv() {
                    Ok(next) => {
                        rows += next.rows.len();
                        batch.push(next);
                    }
                    Err(_) => break,
                }
            }
            let all: Vec<AuditRow> = batch.iter().flat_map(|p| p.rows.iter().cloned()).collect();
            let mut outcome = Ok(());
            for event_rows in all.chunks(AUDIT_ROWS_PER_EVENT_MAX) {
                if let Err(error) = self.append(event_rows).await {
                    tracing::error!(%error, rows = event_rows.len(), "audit rows not recorded");
                    // The head may have moved under a failed commit; read it again next time.
                    self.head = None;
                    outcome = Err(error);
                    break;
                }
            }
            for pending in batch {
                let _ = pending.done.send(outcome.clone());
            }
        }
    }

    async fn append(&mut self, rows: &[AuditRow]) -> Result<(), AuditLogError> {
        let head = match self.head {
            Some(head) => Some(head),
            None => self
                .store
                .stream_head(&self.stream)
                .await
                .map_err(|error| AuditLogError::Store(error.to_string()))?,
        };
        let (key_id, key) = self
            .keys
            .key_for_append(&self.stream)
            .await
            .map_err(|error| AuditLogError::Key(error.to_string()))?;
        let payload = serde_json::to_vec(&rows.iter().map(AuditRowWire::of).collect::<Vec<_>>())
            .map_err(|error| AuditLogError::Store(error.to_string()))?;
        let (version, prev_hash) = head.map_or((0, EventHash::GENESIS), |h| (h.version, h.hash));
        let recorded_at = rows
            .iter()
            .map(|row| row.occurred_at)
            .max()
            .expect("an audit event holds at least one row");
        let header = EventHeader {
            stream_id: self.stream.clone(),
            stream_version: version + 1,
            event_id: EventId::from_uuid(Uuid::now_v7()),
            event_type: AUDIT_RECORDED_EVENT_TYPE.to_owned(),
            schema_version: AUDIT_RECORDED_SCHEMA_VERSION,
            recorded_at,
            actor: Actor {
                user_id: AUDIT_WRITER_USER_ID,
                role: Role::System,
                purpose_of_use: PurposeOfUse::Oversight,
                break_glass: false,
            },
            key_id,
            prev_hash,
            signer_key_id: self.signer.key_id().clone(),
        };
        let event: SealedEvent = seal_event(&self.signer, &key, header, &payload);
        let hash = event.hash;
        match self.store.append(&self.stream, version, &[event]).await {
            Ok(outcome) => {
                self.head = Some(StreamHead {
                    version: outcome.stream_version,
                    hash,
                });
                Ok(())
            }
            Err(StoreError::Conflict { .. }) => Err(AuditLogError::Store(
                "another writer appended to this process's audit stream".to_owned(),
            )),
            Err(error) => Err(AuditLogError::Store(error.to_string())),
        }
    }
}
