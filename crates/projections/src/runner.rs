//! The projection runner: folds the global log into read models, with a checkpoint per
//! projection committed in the same transaction as its rows.
//!
//! Pipeline (bounded at every stage):
//! 1. a reader task reads pages of the global log ([`RunnerOptions::read_page_events`]), looks
//!    up the data key of each patient stream in the page (an erased key is a fact, not an error),
//!    and cuts the page into chunks;
//! 2. each chunk is verified (hash and signature, [`SignatureVerifier::verify_batch`]), opened and
//!    decoded on a blocking thread, so catch-up uses every core; at most
//!    [`RunnerOptions::chunks_in_flight`] chunks are queued, in log order;
//! 3. the applier takes chunks in order, gathers up to [`RunnerOptions::apply_batch_events`]
//!    events, and applies them to every projection behind that position in ONE transaction that
//!    also compare-and-swaps each projection's checkpoint. A crash anywhere leaves the
//!    checkpoint and the rows consistent: each event takes effect exactly once.
//!
//! Chains cannot be checked from a page of the global log (they run per stream), so the runner
//! checks hashes and signatures; `chartlog verify` checks chains.
//!
//! On PostgreSQL each projection runs in one process at a time: the runner holds a session
//! advisory lock per projection on a dedicated connection. Others stand by and retry; when the
//! holder dies its session ends, the lock is released, and a standby takes over from the stored
//! checkpoint. The checkpoint compare-and-swap fences a runner that lost its lock without
//! noticing yet: its next commit fails instead of applying a batch twice.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chartlog_crypto::{
    DataKey, DataKeys, EventHeader, KeyError, KeyStore, SealedEvent, SignatureVerifier,
    VERIFY_BATCH_EVENTS_MAX,
};
use chartlog_domain::{PatientEvent, PatientId, StreamId};
use chartlog_store::{EventStore, READ_BATCH_MAX, RecordedEvent, Subscription, open_patient_event};
use sha2::{Digest as _, Sha256};
use sqlx::postgres::PgConnection;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::db::{ProjectionDb, ProjectionTx, SqlArg, to_i64};
use crate::error::ProjectionError;

/// How often a standby runner retries the locks of projections another process runs, and how
/// often a runner checks that its lock connection is alive.
pub const STANDBY_RETRY_INTERVAL: Duration = Duration::from_secs(2);
/// Longest [`wait_for_position`] waits, whatever the caller asks: a read waits for its own
/// write briefly, or fails clearly.
pub const WAIT_FOR_POSITION_MAX: Duration = Duration::from_secs(10);
/// Pause before a runner that hit a transient fault (database down, lock lost) starts over.
const RETRY_AFTER_FAULT: Duration = Duration::from_secs(1);

/// A read model folded from the global log.
///
/// The runner calls [`Projection::apply`] with batches in position order, each event exactly
/// once, inside the transaction that also moves the projection's checkpoint; `apply` must write
/// only through that transaction and must not commit it. Bump [`Projection::version`] when the
/// fold changes: the runner then calls [`Projection::reset`] and rebuilds from position 0.
/// A rebuild and a live run must give the same rows: `apply` may depend only on the events
/// (and on what it wrote before), never on the clock or on batch boundaries.
#[async_trait]
pub trait Projection: Send + Sync + 'static {
    /// Stable name: the checkpoint's key and the advisory lock's.
    fn name(&self) -> &'static str;
    /// The fold's version; a change rebuilds the read model.
    fn version(&self) -> u32;
    /// Applies `events` (non-empty, ascending positions, all above the checkpoint).
    async fn apply(
        &self,
        tx: &mut ProjectionTx,
        events: &[ProjectedEvent],
    ) -> Result<(), ProjectionError>;
    /// Deletes every row of this read model (not the checkpoint; the runner owns that).
    async fn reset(&self, tx: &mut ProjectionTx) -> Result<(), ProjectionError>;
}

/// An event as projections see it: the clear header and, when it can be opened, the decoded
/// patient event with the key its read-model rows are sealed under.
#[derive(Debug, Clone)]
pub struct ProjectedEvent {
    pub position: u64,
    pub header: EventHeader,
    pub body: EventBody,
}

/// What the runner could open of an event.
// Nearly every event is a patient's: boxing the large variant would allocate for the common
// case to shrink the rare ones.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum EventBody {
    /// A patient's event, verified, opened and decoded. `key` is the patient's data key: seal
    /// read-model rows holding PHI under it ([`chartlog_crypto::seal_record`]).
    Patient {
        patient_id: PatientId,
        event: PatientEvent,
        key: Arc<DataKey>,
    },
    /// A patient's event whose data key is destroyed (crypto-erased): header only. The
    /// tombstone itself arrives like this once its key is gone; `header.event_type` still
    /// names it ([`PATIENT_ERASED_EVENT_TYPE`]).
    Erased { patient_id: PatientId },
    /// A batch of audit rows from an audit stream (`crate::audit_log`), opened.
    Audit { rows: Vec<crate::audit::AuditRow> },
    /// An event of another stream that holds no PHI: header only.
    NotPatient,
}

/// The tombstone's event type, readable in the clear header after the key is destroyed.
pub const PATIENT_ERASED_EVENT_TYPE: &str = "patient_erased";

impl ProjectedEvent {
    /// The patient this event belongs to, if it is a patient stream's event.
    pub fn patient_id(&self) -> Option<PatientId> {
        match &self.body {
            EventBody::Patient { patient_id, .. } | EventBody::Erased { patient_id } => {
                Some(*patient_id)
            }
            EventBody::Audit { .. } | EventBody::NotPatient => None,
        }
    }

    /// Whether this is a patient's erasure tombstone, opened or not.
    pub fn is_erasure(&self) -> bool {
        self.patient_id().is_some() && self.header.event_type == PATIENT_ERASED_EVENT_TYPE
    }
}

/// Pipeline sizes. Memory held by a runner is about
/// `read_page_events + (chunks_in_flight + 2) * chunk_events + apply_batch_events` events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunnerOptions {
    /// Events read from the log per query.
    pub read_page_events: u32,
    /// Events verified and opened per blocking task.
    pub chunk_events: usize,
    /// Chunks queued between the reader and the applier: at least two apply batches' worth,
    /// so the cores verify and open the next batch while the applier writes this one (with
    /// fewer, each batch is cut to what was queued, and commits multiply).
    pub chunks_in_flight: usize,
    /// Most events applied in one transaction.
    pub apply_batch_events: usize,
}

impl Default for RunnerOptions {
    fn default() -> Self {
        Self {
            read_page_events: 1_024,
            chunk_events: VERIFY_BATCH_EVENTS_MAX,
            chunks_in_flight: 64,
            apply_batch_events: 2_048,
        }
    }
}

impl RunnerOptions {
    fn checked(self) -> Self {
        assert!(self.read_page_events >= 1 && self.read_page_events <= READ_BATCH_MAX);
        assert!(self.chunk_events >= 1 && self.chunk_events <= 4 * VERIFY_BATCH_EVENTS_MAX);
        assert!(self.chunks_in_flight >= 1 && self.chunks_in_flight <= 256);
        assert!(self.apply_batch_events >= 1 && self.apply_batch_events <= 100_000);
        self
    }
}

/// Runs a set of projections over one event store.
pub struct ProjectionRunner<S: EventStore + ?Sized, K: KeyStore + 'static> {
    store: Arc<S>,
    keys: Arc<DataKeys<K>>,
    verifier: Arc<SignatureVerifier>,
    db: ProjectionDb,
    projections: Vec<Arc<dyn Projection>>,
    options: RunnerOptions,
    applied: watch::Sender<u64>,
}

/// Where a reader starts, and (in catch-up) the committed position it must reach.
struct Span {
    after: u64,
    catch_up_target: u64,
}

/// How long catch-up waits for committed events held back behind an open transaction.
const CATCH_UP_SETTLE_MAX: Duration = Duration::from_secs(10);
const CATCH_UP_SETTLE_POLL: Duration = Duration::from_millis(5);

/// How far a session goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Up to the end of the log as read, then return.
    CatchUp,
    /// Catch up, then follow the subscription until shut down.
    Follow,
}

/// Why a follow session ended without an error.
enum SessionEnd {
    Shutdown,
    /// A standby lock was acquired: start again with the larger set.
    MoreProjections,
    /// Catch-up reached the end of the log.
    Caught,
}

type KeysByStream = HashMap<StreamId, Option<Arc<DataKey>>>;
type Chunk = Result<JoinHandle<Result<Vec<ProjectedEvent>, ProjectionError>>, ProjectionError>;

impl<S: EventStore + ?Sized, K: KeyStore + 'static> ProjectionRunner<S, K> {
    /// # Panics
    /// If two projections share a name (a wiring bug).
    pub fn new(
        store: Arc<S>,
        keys: Arc<DataKeys<K>>,
        verifier: Arc<SignatureVerifier>,
        db: ProjectionDb,
        projections: Vec<Arc<dyn Projection>>,
    ) -> Self {
        let mut names = HashSet::new();
        for projection in &projections {
            assert!(
                names.insert(projection.name()),
                "projection names are unique"
            );
            assert!(projection.version() > 0, "projection versions start at 1");
        }
        let (applied, _) = watch::channel(0);
        Self {
            store,
            keys,
            verifier,
            db,
            projections,
            options: RunnerOptions::default(),
            applied,
        }
    }

    pub fn with_options(mut self, options: RunnerOptions) -> Self {
        self.options = options.checked();
        self
    }

    pub fn db(&self) -> &ProjectionDb {
        &self.db
    }

    /// The position every projection this runner is running has reached (for progress bars).
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// The names of the projections this runner runs.
    pub fn names(&self) -> Vec<&'static str> {
        self.projections.iter().map(|p| p.name()).collect()
    }

    /// Runs every projection up to the end of the log as read now, then returns the position
    /// reached. On PostgreSQL, a projection another process runs is skipped: advancing it is
    /// that process's job.
    #[tracing::instrument(skip_all)]
    pub async fn catch_up(&self) -> Result<u64, ProjectionError> {
        self.one_shot(false).await
    }

    /// Resets every projection of this runner and rebuilds it from position 0, then returns
    /// the position reached. Readers see the read model empty, then filling, until it is done.
    /// On PostgreSQL, refuses with [`ProjectionError::RunningElsewhere`] while another process
    /// runs one of the projections (stop it, or bump the projection's version and let the
    /// running process rebuild it).
    #[tracing::instrument(skip_all)]
    pub async fn rebuild(&self) -> Result<u64, ProjectionError> {
        self.one_shot(true).await
    }

    async fn one_shot(&self, reset: bool) -> Result<u64, ProjectionError> {
        let mut lease = Lease::open(&self.db).await?;
        let mut active = Vec::new();
        for projection in &self.projections {
            if lease.try_acquire(projection.name()).await? {
                active.push(projection.clone());
            } else if reset {
                lease.close().await;
                return Err(ProjectionError::RunningElsewhere {
                    name: projection.name(),
                });
            } else {
                tracing::info!(
                    projection = projection.name(),
                    "another process runs this projection; skipped"
                );
            }
        }
        let result = async {
            let mut checkpoints = self.prepare(&active, reset).await?;
            self.session(
                &active,
                &mut checkpoints,
                &mut lease,
                Mode::CatchUp,
                std::future::pending(),
            )
            .await?;
            Ok(checkpoints.values().copied().min().unwrap_or(0))
        }
        .await;
        lease.close().await;
        result
    }

    /// Runs the projections until `shutdown` completes: takes the locks it can, catches up,
    /// follows the log; stands by for the rest and takes them over when their holder dies.
    /// Transient faults (database unreachable, lock lost, checkpoint moved) restart the loop
    /// after a pause; a verification or decoding failure stops it with the error.
    #[tracing::instrument(skip_all)]
    pub async fn run(
        &self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ProjectionError> {
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let attempt = async {
                let mut lease = Lease::open(&self.db).await?;
                let mut active = Vec::new();
                for projection in &self.projections {
                    if lease.try_acquire(projection.name()).await? {
                        active.push(projection.clone());
                    }
                }
                if active.is_empty() {
                    lease.close().await;
                    return Ok(None);
                }
                tracing::info!(projections = ?active.iter().map(|p| p.name()).collect::<Vec<_>>(), "running projections");
                let result = async {
                    let mut checkpoints = self.prepare(&active, false).await?;
                    self.session(
                        &active,
                        &mut checkpoints,
                        &mut lease,
                        Mode::Follow,
                        shutdown.as_mut(),
                    )
                    .await
                }
                .await;
                lease.close().await;
                result.map(Some)
            };
            let pause = match attempt.await {
                Ok(Some(SessionEnd::Shutdown)) => return Ok(()),
                Ok(Some(SessionEnd::MoreProjections)) => continue,
                Ok(Some(SessionEnd::Caught)) => {
                    unreachable!("follow sessions do not end caught up")
                }
                Ok(None) => STANDBY_RETRY_INTERVAL,
                Err(error) if is_transient(&error) => {
                    tracing::warn!(%error, "projection runner restarting after a fault");
                    RETRY_AFTER_FAULT
                }
                Err(error) => return Err(error),
            };
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Reads each projection's checkpoint; resets (and zeroes the checkpoint of) a projection
    /// whose stored version differs from its code's, one that has none, or all when `reset`.
    async fn prepare(
        &self,
        active: &[Arc<dyn Projection>],
        reset: bool,
    ) -> Result<HashMap<&'static str, u64>, ProjectionError> {
        let mut checkpoints = HashMap::new();
        for projection in active {
            let stored = self
                .db
                .fetch_optional(
                    "SELECT CAST(version AS BIGINT), position FROM chartlog_projection_checkpoints \
                     WHERE name = $1",
                    vec![SqlArg::Text(projection.name().to_owned())],
                )
                .await?;
            let stored = match stored {
                Some(row) => Some((row.i64(0)?, row.i64(1)?)),
                None => None,
            };
            let position = match stored {
                Some((version, position))
                    if !reset && version == i64::from(projection.version()) =>
                {
                    u64::try_from(position).unwrap_or(0)
                }
                stored => {
                    tracing::info!(
                        projection = projection.name(),
                        stored_version = stored.map(|(v, _)| v),
                        version = projection.version(),
                        "rebuilding projection from position 0"
                    );
                    let mut tx = self.db.begin().await?;
                    projection.reset(&mut tx).await?;
                    tx.execute(
                        "INSERT INTO chartlog_projection_checkpoints \
                         (name, version, position, updated_at_us) VALUES ($1, $2, 0, $3) \
                         ON CONFLICT (name) DO UPDATE SET version = excluded.version, \
                         position = 0, updated_at_us = excluded.updated_at_us",
                        vec![
                            SqlArg::Text(projection.name().to_owned()),
                            SqlArg::I64(i64::from(projection.version())),
                            SqlArg::I64(now_unix_micros()),
                        ],
                    )
                    .await?;
                    tx.commit().await?;
                    0
                }
            };
            checkpoints.insert(projection.name(), position);
        }
        Ok(checkpoints)
    }

    async fn session(
        &self,
        active: &[Arc<dyn Projection>],
        checkpoints: &mut HashMap<&'static str, u64>,
        lease: &mut Lease,
        mode: Mode,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<SessionEnd, ProjectionError> {
        let mut shutdown = std::pin::pin!(shutdown);
        let start = checkpoints.values().copied().min().unwrap_or(0);
        self.applied.send_replace(start);
        // Catch-up reads up to the last event committed when it starts. The global log shows an
        // event once every older transaction has finished, so an empty read alone does not
        // mean the end has been reached.
        let catch_up_target = match mode {
            Mode::CatchUp => self.store.log_head_position().await?,
            Mode::Follow => 0,
        };
        let (chunks, mut ready) = mpsc::channel::<Chunk>(self.options.chunks_in_flight);
        let reader = tokio::spawn(read_and_open(
            self.store.clone(),
            self.keys.clone(),
            self.verifier.clone(),
            Span {
                after: start,
                catch_up_target,
            },
            mode,
            self.options,
            chunks,
        ));
        // Abort the reader however this session ends, so no task outlives it.
        let _reader = AbortOnDrop(reader);
        let mut next_lease_check = Instant::now() + STANDBY_RETRY_INTERVAL;
        loop {
            let chunk = tokio::select! {
                chunk = ready.recv() => chunk,
                () = &mut shutdown => return Ok(SessionEnd::Shutdown),
                () = tokio::time::sleep_until(next_lease_check.into()) => {
                    next_lease_check = Instant::now() + STANDBY_RETRY_INTERVAL;
                    lease.check().await?;
                    if mode == Mode::Follow && lease.is_postgres() {
                        for projection in &self.projections {
                            if !checkpoints.contains_key(projection.name())
                                && lease.try_acquire(projection.name()).await?
                            {
                                tracing::info!(projection = projection.name(), "took over projection");
                                return Ok(SessionEnd::MoreProjections);
                            }
                        }
                    }
                    continue;
                }
            };
            let Some(chunk) = chunk else {
                // The reader finished: the end of the log in catch-up mode.
                return Ok(SessionEnd::Caught);
            };
            let mut events = chunk?.await.map_err(ProjectionError::Worker)??;
            // Gather chunks already queued, up to the batch bound: fewer, larger transactions
            // while catching up; no waiting while following.
            while events.len() < self.options.apply_batch_events {
                match ready.try_recv() {
                    Ok(chunk) => events.extend(chunk?.await.map_err(ProjectionError::Worker)??),
                    Err(_) => break,
                }
            }
            if !events.is_empty() {
                self.apply_batch(active, checkpoints, &events).await?;
            }
        }
    }

    /// Applies one batch to every projection behind it, in one transaction with their
    /// checkpoints.
    async fn apply_batch(
        &self,
        active: &[Arc<dyn Projection>],
        checkpoints: &mut HashMap<&'static str, u64>,
        events: &[ProjectedEvent],
    ) -> Result<(), ProjectionError> {
        let last = events[events.len() - 1].position;
        debug_assert!(events.windows(2).all(|w| w[0].position < w[1].position));
        let mut tx = self.db.begin().await?;
        let mut moved = Vec::new();
        for projection in active {
            let checkpoint = checkpoints[projection.name()];
            if checkpoint >= last {
                continue;
            }
            let from = events.partition_point(|event| event.position <= checkpoint);
            projection.apply(&mut tx, &events[from..]).await?;
            let updated = tx
                .execute(
                    "UPDATE chartlog_projection_checkpoints SET position = $1, updated_at_us = $2 \
                     WHERE name = $3 AND version = $4 AND position = $5",
                    vec![
                        SqlArg::I64(to_i64(last)),
                        SqlArg::I64(now_unix_micros()),
                        SqlArg::Text(projection.name().to_owned()),
                        SqlArg::I64(i64::from(projection.version())),
                        SqlArg::I64(to_i64(checkpoint)),
                    ],
                )
                .await?;
            if updated != 1 {
                return Err(ProjectionError::CheckpointMoved {
                    name: projection.name(),
                    expected: checkpoint,
                });
            }
            moved.push(projection.name());
        }
        tx.commit().await?;
        for name in moved {
            checkpoints.insert(name, last);
        }
        let reached = checkpoints.values().copied().min().unwrap_or(last);
        self.applied.send_replace(reached);
        Ok(())
    }
}

fn is_transient(error: &ProjectionError) -> bool {
    matches!(
        error,
        ProjectionError::Database(_)
            | ProjectionError::Store(_)
            | ProjectionError::LockLost
            | ProjectionError::CheckpointMoved { .. }
            | ProjectionError::Key { .. }
    )
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The reader: pages of the log, keys per patient stream, chunks opened on blocking threads,
/// queued in log order. Ends at the end of the log in catch-up mode; follows it otherwise.
async fn read_and_open<S: EventStore + ?Sized, K: KeyStore + 'static>(
    store: Arc<S>,
    keys: Arc<DataKeys<K>>,
    verifier: Arc<SignatureVerifier>,
    span: Span,
    mode: Mode,
    options: RunnerOptions,
    chunks: mpsc::Sender<Chunk>,
) {
    let Span {
        after: start,
        catch_up_target,
    } = span;
    let mut subscription = (mode == Mode::Follow)
        .then(|| Subscription::new(store.clone(), start, options.read_page_events));
    let mut after = start;
    let mut settle_deadline = None;
    // Chunks queued for the applier may be many (so verification runs ahead while a batch is
    // written), but at most two per core are verified at a time. One per core left cores idle
    // whenever this task was reading the next page or the applier was between chunks: with
    // two, a runner whose projections write nothing went from 0.63x to 0.73x-0.75x of bare
    // open+verify (benches/projection_rebuild.rs; measured CPU use rose from 1.45 to 1.7 cores).
    //
    // Once a whole apply batch is queued, the applier is the bottleneck, not verification, and
    // verifiers running on every core only take the cores from it (the scheduler shares them
    // fairly): it was preempted over a thousand times per rebuild and took 3.6-4.0 s for 1.9
    // CPU-seconds of work. So while a batch waits, chunks are verified one at a time, which
    // leaves a core to the applier and its SQLite thread; the chart + history rebuild went
    // from 0.45x-0.46x to 0.50x-0.56x of bare open+verify, in alternated runs.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let verifying_max = 2 * u32::try_from(cores).unwrap_or(u32::MAX / 2).min(1_024);
    let verifying = Arc::new(tokio::sync::Semaphore::new(verifying_max as usize));
    let batch_chunks = options.apply_batch_events.div_ceil(options.chunk_events);
    loop {
        let page = match &mut subscription {
            Some(subscription) => subscription.next_batch().await,
            None => store.read_all(after, options.read_page_events).await,
        };
        let page = match page {
            Ok(page) => page,
            Err(error) => {
                let _ = chunks.send(Err(error.into())).await;
                return;
            }
        };
        let Some(last) = page.last() else {
            if after >= catch_up_target {
                return;
            }
            let deadline = *settle_deadline
                .get_or_insert_with(|| tokio::time::Instant::now() + CATCH_UP_SETTLE_MAX);
            if tokio::time::Instant::now() > deadline {
                tracing::warn!(
                    reached = after,
                    target = catch_up_target,
                    "catch-up stopped short: an older transaction is still open"
                );
                return;
            }
            tokio::time::sleep(CATCH_UP_SETTLE_POLL).await;
            continue;
        };
        settle_deadline = None;
        after = last.position;
        let page_keys = match keys_for_page(&keys, &page).await {
            Ok(page_keys) => Arc::new(page_keys),
            Err(error) => {
                let _ = chunks.send(Err(error)).await;
                return;
            }
        };
        let mut page = page.into_iter();
        loop {
            let chunk: Vec<RecordedEvent> = page.by_ref().take(options.chunk_events).collect();
            if chunk.is_empty() {
                break;
            }
            let verifier = verifier.clone();
            let page_keys = page_keys.clone();
            let queued = chunks.max_capacity() - chunks.capacity();
            let permits = if queued >= batch_chunks {
                verifying_max
            } else {
                1
            };
            let Ok(running) = verifying.clone().acquire_many_owned(permits).await else {
                return; // Never closed; nothing to do if it were.
            };
            let task = tokio::task::spawn_blocking(move || {
                let opened = open_chunk(&verifier, chunk, &page_keys);
                drop(running);
                opened
            });
            if chunks.send(Ok(task)).await.is_err() {
                return; // The applier is gone.
            }
        }
    }
}

/// The data key of every patient stream in `page`: `None` for a destroyed key.
async fn keys_for_page<K: KeyStore>(
    keys: &DataKeys<K>,
    page: &[RecordedEvent],
) -> Result<KeysByStream, ProjectionError> {
    let mut found = KeysByStream::new();
    for recorded in page {
        let stream = &recorded.event.header.stream_id;
        let opened_here =
            stream.patient_id().is_some() || crate::audit_log::is_audit_stream(stream);
        if !opened_here || found.contains_key(stream) {
            continue;
        }
        let key = match keys.key_for_read(stream).await {
            Ok((_, key)) => Some(key),
            Err(KeyError::Erased { .. }) => None,
            Err(source) => {
                return Err(ProjectionError::Key {
                    stream: stream.clone(),
                    source,
                });
            }
        };
        found.insert(stream.clone(), key);
    }
    Ok(found)
}

/// Verifies, opens and decodes one chunk (CPU only: runs on a blocking thread).
fn open_chunk(
    verifier: &SignatureVerifier,
    chunk: Vec<RecordedEvent>,
    keys: &KeysByStream,
) -> Result<Vec<ProjectedEvent>, ProjectionError> {
    let first_position = chunk.first().map_or(0, |recorded| recorded.position);
    let (positions, sealed): (Vec<u64>, Vec<SealedEvent>) = chunk
        .into_iter()
        .map(|recorded| (recorded.position, recorded.event))
        .unzip();
    verifier
        .verify_batch(&sealed)
        .map_err(|source| ProjectionError::Integrity {
            position: first_position,
            source,
        })?;
    let mut opened = Vec::with_capacity(sealed.len());
    for (position, event) in positions.into_iter().zip(sealed) {
        let body = match event.header.stream_id.patient_id() {
            None if crate::audit_log::is_audit_stream(&event.header.stream_id) => {
                open_audit_event(keys, position, &event)?
            }
            None => EventBody::NotPatient,
            Some(patient_id) => match keys.get(&event.header.stream_id) {
                Some(Some(key)) => {
                    let decoded = open_patient_event(key, &event).map_err(|source| {
                        ProjectionError::Unreadable {
                            position,
                            event_id: event.header.event_id,
                            source,
                        }
                    })?;
                    EventBody::Patient {
                        patient_id,
                        event: decoded,
                        key: key.clone(),
                    }
                }
                // Destroyed (or looked up as destroyed for this page): header only.
                Some(None) | None => EventBody::Erased { patient_id },
            },
        };
        opened.push(ProjectedEvent {
            position,
            header: event.header,
            body,
        });
    }
    Ok(opened)
}

/// The rows of an audit event. Audit keys are never destroyed, so a missing key or a payload
/// that does not decode is a fault to stop at, not something to skip.
fn open_audit_event(
    keys: &KeysByStream,
    position: u64,
    event: &SealedEvent,
) -> Result<EventBody, ProjectionError> {
    let unreadable = |reason| ProjectionError::UnreadableAudit {
        position,
        event_id: event.header.event_id,
        reason,
    };
    let Some(Some(key)) = keys.get(&event.header.stream_id) else {
        return Err(unreadable("the audit stream has no data key"));
    };
    let payload = chartlog_crypto::open(key, &event.header, &event.ciphertext)
        .map_err(|_| unreadable("does not open under its data key"))?;
    let rows = crate::audit_log::decode_audit_rows(event.header.schema_version, &payload)
        .ok_or_else(|| unreadable("does not decode as audit rows"))?;
    Ok(EventBody::Audit { rows })
}

/// The advisory locks of one runner, on one dedicated PostgreSQL connection (its session is
/// the locks' lifetime). SQLite is embedded in one process and needs none.
struct Lease {
    connection: Option<PgConnection>,
}

impl Lease {
    async fn open(db: &ProjectionDb) -> Result<Lease, ProjectionError> {
        Ok(match db {
            ProjectionDb::Sqlite(_) => Lease { connection: None },
            // Detached from the pool: the pool must never hand this session to someone else,
            // nor recycle it (which would release the locks silently).
            ProjectionDb::Postgres(pool) => Lease {
                connection: Some(pool.acquire().await?.detach()),
            },
        })
    }

    fn is_postgres(&self) -> bool {
        self.connection.is_some()
    }

    async fn try_acquire(&mut self, name: &str) -> Result<bool, ProjectionError> {
        let Some(connection) = self.connection.as_mut() else {
            return Ok(true);
        };
        let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(lock_key(name))
            .fetch_one(&mut *connection)
            .await?;
        Ok(held)
    }

    /// Fails with [`ProjectionError::LockLost`] if the lock session is gone.
    async fn check(&mut self) -> Result<(), ProjectionError> {
        let Some(connection) = self.connection.as_mut() else {
            return Ok(());
        };
        sqlx::query("SELECT 1")
            .execute(&mut *connection)
            .await
            .map(drop)
            .map_err(|_| ProjectionError::LockLost)
    }

    async fn close(self) {
        if let Some(connection) = self.connection {
            // Ending the session releases every advisory lock it holds.
            use sqlx::Connection as _;
            let _ = connection.close().await;
        }
    }
}

/// The advisory-lock key of a projection: the first 8 bytes of a tagged SHA-256 of its name.
fn lock_key(name: &str) -> i64 {
    let digest = Sha256::new()
        .chain_update(b"chartlog/projection-lock/v1\0")
        .chain_update(name.as_bytes())
        .finalize();
    let mut bytes = [0; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

/// Waits until projection `name` has applied the global log up to `position` (read-your-writes
/// after a command returned that position), for at most `timeout` (capped at
/// [`WAIT_FOR_POSITION_MAX`]). Returns the position reached. Reads the stored checkpoint, so it
/// works whichever process runs the projection.
pub async fn wait_for_position(
    db: &ProjectionDb,
    name: &str,
    position: u64,
    timeout: Duration,
) -> Result<u64, ProjectionError> {
    let deadline = Instant::now() + timeout.min(WAIT_FOR_POSITION_MAX);
    let mut pause = Duration::from_millis(2);
    loop {
        let reached = checkpoint(db, name).await?.unwrap_or(0);
        if reached >= position {
            return Ok(reached);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(ProjectionError::WaitTimedOut {
                name: name.to_owned(),
                wanted: position,
                reached,
            });
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// The stored checkpoint of projection `name`, if it has one.
pub async fn checkpoint(db: &ProjectionDb, name: &str) -> Result<Option<u64>, ProjectionError> {
    let row = db
        .fetch_optional(
            "SELECT position FROM chartlog_projection_checkpoints WHERE name = $1",
            vec![SqlArg::Text(name.to_owned())],
        )
        .await?;
    Ok(match row {
        Some(row) => Some(u64::try_from(row.i64(0)?).unwrap_or(0)),
        None => None,
    })
}

pub(crate) fn now_unix_micros() -> i64 {
    let micros = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000;
    i64::try_from(micros).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_are_stable_and_distinct() {
        assert_eq!(lock_key("chart"), lock_key("chart"));
        assert_ne!(lock_key("chart"), lock_key("history"));
    }

    #[test]
    fn default_options_are_within_bounds() {
        let options = RunnerOptions::default().checked();
        assert!(options.chunk_events <= VERIFY_BATCH_EVENTS_MAX);
    }
}
