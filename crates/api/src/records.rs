//! What the handlers need from the record store, as object-safe traits.
//!
//! The binary picks a backend at start (SQLite or PostgreSQL), and the ledger and read-model
//! functions are generic over it; handlers see only `dyn Records`. [`LedgerRecords`] is the
//! one implementation, over any [`EventStore`] and [`KeyStore`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chartlog_crypto::{DataKeys, KeyStore, MacKey};
use chartlog_domain::phi::{BirthDate, FamilyName, Mrn};
use chartlog_domain::{Actor, PatientCommand, PatientId, Timestamp};
use chartlog_projections::ProjectionError;
use chartlog_projections::chart::{self, ChartAnswer};
use chartlog_projections::db::ProjectionDb;
use chartlog_projections::history::{self, HistoryAnswer};
use chartlog_store::{
    CommandOutcome, EventStore, ExecuteOptions, LedgerError, LoadedPatient, PatientLedger,
    StoreError, StreamHead,
};

/// How long a history read (or a chart read whose read model is rebuilding) waits for the
/// read model to catch up with the version the caller's own record is at, before answering
/// with what the read model has.
pub const READ_YOUR_WRITES_WAIT_MS_MAX: u64 = 2_000;
const _: () = assert!(READ_YOUR_WRITES_WAIT_MS_MAX <= 10_000);

/// The patient record: commands through the ledger, reads through the read models.
#[async_trait]
pub trait Records: Send + Sync + 'static {
    /// The decision state, folded from the verified stream (authoritative, never stale).
    async fn load(&self, patient: PatientId) -> Result<LoadedPatient, LedgerError>;

    /// The decision state as this server last loaded or left it, without reading the store,
    /// so possibly behind the stream. Only for a decision whose append names this state's
    /// version, which the store refuses if the stream has moved on.
    fn last_known(&self, patient: PatientId) -> Option<LoadedPatient>;

    /// Decides and appends a command.
    async fn execute(
        &self,
        patient: PatientId,
        command: PatientCommand,
        actor: Actor,
        now: Timestamp,
        options: ExecuteOptions,
    ) -> Result<CommandOutcome, LedgerError>;

    /// The chart as of `head`, the stream head the caller's access check loaded: what the
    /// read model has not applied yet is folded from the log ([`chart::ChartReader`]). Only a
    /// read model far behind (rebuilding) is waited for, up to
    /// [`READ_YOUR_WRITES_WAIT_MS_MAX`], and then answers as it is.
    async fn chart(
        &self,
        patient: PatientId,
        head: Option<StreamHead>,
    ) -> Result<ChartAnswer, ProjectionError>;

    /// A page of the record history, newest first. The first page waits, as [`Records::chart`]
    /// does, for the read model to reach `at_least_version`.
    async fn history(
        &self,
        patient: PatientId,
        before_version: Option<u64>,
        limit: u32,
        at_least_version: u64,
    ) -> Result<HistoryAnswer, ProjectionError>;

    /// The global position of the log's last event (0 while the log is empty).
    async fn log_head_position(&self) -> Result<u64, StoreError>;

    /// Patients with this MRN, through the blind index.
    async fn find_by_mrn(&self, mrn: &Mrn) -> Result<Vec<PatientId>, ProjectionError>;

    /// Patients with this family name and birth date, through the blind index.
    async fn find_by_family_name_and_birth_date(
        &self,
        family: &FamilyName,
        birth_date: &BirthDate,
    ) -> Result<Vec<PatientId>, ProjectionError>;
}

/// Records whose decision state [`LedgerRecords`] keeps between commands. Beyond it the
/// cache starts over: a miss costs one full load, so a crude bound is enough.
pub const RECORD_CACHE_PATIENTS_MAX: usize = 4_096;

/// [`Records`] over a ledger and the read-model database.
///
/// Decision states are cached per patient and brought up to the stream's head on every load
/// (`PatientLedger::catch_up`): a command verifies and folds only the events it has not seen,
/// instead of the whole stream. The state a command leaves is cached too
/// (`CommandOutcome::record`), so the next command on the record usually finds nothing new to
/// read back. [`Records::load`] always reads the head from the store, so it never answers with
/// a stale record, and a catch-up checks that the new events continue the cached head's hash
/// chain; [`Records::last_known`] answers from the cache alone, for a command that lets its
/// append's version check confirm the state it was decided on.
pub struct LedgerRecords<S: EventStore + ?Sized, K: KeyStore> {
    ledger: PatientLedger<S, K>,
    keys: Arc<DataKeys<K>>,
    db: ProjectionDb,
    index_key: Arc<MacKey>,
    loaded: std::sync::Mutex<RecordCache>,
    charts: chart::ChartReader,
}

/// The decision states [`LedgerRecords`] keeps (they hold PHI in the clear), and a count of
/// forgets: a load or command that began before a forget (an erasure it did not see) does not
/// put its record back afterwards.
#[derive(Default)]
struct RecordCache {
    records: std::collections::HashMap<PatientId, LoadedPatient>,
    forgets: chartlog_projections::forgets::ForgetCounts,
}

impl RecordCache {
    /// Keeps `loaded`, read since the cache counted `began` forgets, unless a forget came in
    /// between or a further state of the record is kept already.
    fn remember(&mut self, patient: PatientId, loaded: &LoadedPatient, began: u64) {
        if self.forgets.of(patient) != began {
            return;
        }
        let version = |loaded: &LoadedPatient| loaded.head.map_or(0, |head| head.version);
        if self
            .records
            .get(&patient)
            .is_some_and(|cached| version(cached) >= version(loaded))
        {
            return;
        }
        if self.records.len() >= RECORD_CACHE_PATIENTS_MAX {
            self.records.clear();
        }
        self.records.insert(patient, loaded.clone());
    }

    fn forget(&mut self, patient: PatientId) {
        self.forgets.bump(patient);
        self.records.remove(&patient);
    }
}

impl<S: EventStore + ?Sized, K: KeyStore> LedgerRecords<S, K> {
    pub fn new(ledger: PatientLedger<S, K>, db: ProjectionDb, index_key: Arc<MacKey>) -> Self {
        let keys = ledger.keys().clone();
        Self {
            ledger,
            keys,
            db,
            charts: chart::ChartReader::new(index_key.clone()),
            index_key,
            loaded: std::sync::Mutex::new(RecordCache::default()),
        }
    }

    fn cached(&self, patient: PatientId) -> Option<LoadedPatient> {
        // A poisoned lock only means another request panicked mid-insert: load afresh.
        self.loaded
            .lock()
            .ok()
            .and_then(|cache| cache.records.get(&patient).cloned())
    }

    /// Forgets of `patient`'s stripe so far: taken before a load or command reads the
    /// store, for `remember`.
    fn forgets(&self, patient: PatientId) -> u64 {
        self.loaded
            .lock()
            .map_or(0, |cache| cache.forgets.of(patient))
    }

    fn remember(&self, patient: PatientId, loaded: &LoadedPatient, began: u64) {
        if let Ok(mut cache) = self.loaded.lock() {
            cache.remember(patient, loaded, began);
        }
    }

    fn forget(&self, patient: PatientId) {
        if let Ok(mut cache) = self.loaded.lock() {
            cache.forget(patient);
        }
        self.charts.forget(patient);
    }
}

#[async_trait]
impl<S: EventStore + ?Sized, K: KeyStore + 'static> Records for LedgerRecords<S, K> {
    async fn load(&self, patient: PatientId) -> Result<LoadedPatient, LedgerError> {
        let began = self.forgets(patient);
        let cached = self.cached(patient);
        match self.ledger.catch_up(patient, cached).await {
            Ok(loaded) => {
                self.remember(patient, &loaded, began);
                Ok(loaded)
            }
            // Only a load with nothing kept finds no record, so there is nothing to drop; and
            // a forget would keep every load in flight from keeping its record (registrations
            // are checked this way).
            Err(error @ LedgerError::NotFound { .. }) => Err(error),
            Err(error) => {
                // An erased record, or a cached head the stream no longer continues: nothing
                // cached about this patient is worth keeping.
                self.forget(patient);
                Err(error)
            }
        }
    }

    fn last_known(&self, patient: PatientId) -> Option<LoadedPatient> {
        self.cached(patient)
    }

    async fn execute(
        &self,
        patient: PatientId,
        command: PatientCommand,
        actor: Actor,
        now: Timestamp,
        options: ExecuteOptions,
    ) -> Result<CommandOutcome, LedgerError> {
        let began = self.forgets(patient);
        let outcome = self
            .ledger
            .execute_with(patient, command, actor, now, options)
            .await?;
        match &outcome.record {
            Some(record) => self.remember(patient, record, began),
            None => self.forget(patient),
        }
        Ok(outcome)
    }

    async fn chart(
        &self,
        patient: PatientId,
        head: Option<StreamHead>,
    ) -> Result<ChartAnswer, ProjectionError> {
        if let Some(head) = head
            && let Some(answer) = self
                .charts
                .read_at(&self.db, &self.ledger, patient, head)
                .await?
        {
            return Ok(answer);
        }
        let at_least_version = head.map_or(0, |head| head.version);
        read_your_writes(
            || chart::read_chart(&self.db, &self.keys, patient),
            |answer| match answer {
                ChartAnswer::Found(chart) => chart.stream_version >= at_least_version,
                ChartAnswer::Erased { .. } => true,
                ChartAnswer::NotFound => at_least_version == 0,
            },
        )
        .await
    }

    async fn history(
        &self,
        patient: PatientId,
        before_version: Option<u64>,
        limit: u32,
        at_least_version: u64,
    ) -> Result<HistoryAnswer, ProjectionError> {
        let read = || history::read_history(&self.db, &self.keys, patient, before_version, limit);
        if before_version.is_some() {
            return read().await;
        }
        read_your_writes(read, |answer| match answer {
            HistoryAnswer::Found(page) => page
                .entries
                .first()
                .map_or(at_least_version == 0, |newest| {
                    newest.stream_version >= at_least_version
                }),
            HistoryAnswer::Erased { .. } => true,
            HistoryAnswer::NotFound => at_least_version == 0,
        })
        .await
    }

    async fn find_by_mrn(&self, mrn: &Mrn) -> Result<Vec<PatientId>, ProjectionError> {
        chart::find_by_mrn(&self.db, &self.index_key, mrn).await
    }

    async fn log_head_position(&self) -> Result<u64, StoreError> {
        self.ledger.store().log_head_position().await
    }

    async fn find_by_family_name_and_birth_date(
        &self,
        family: &FamilyName,
        birth_date: &BirthDate,
    ) -> Result<Vec<PatientId>, ProjectionError> {
        chart::find_by_family_name_and_birth_date(&self.db, &self.index_key, family, birth_date)
            .await
    }
}

/// Reads until `is_current` accepts the answer or [`READ_YOUR_WRITES_WAIT_MS_MAX`] passes: the
/// projection runner follows the log within milliseconds, so a client that just wrote sees
/// its write without having to pass a position.
async fn read_your_writes<T, F, Fut>(
    mut read: F,
    is_current: impl Fn(&T) -> bool,
) -> Result<T, ProjectionError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ProjectionError>>,
{
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(READ_YOUR_WRITES_WAIT_MS_MAX);
    let mut pause = Duration::from_millis(2);
    loop {
        let answer = read().await?;
        if is_current(&answer) || tokio::time::Instant::now() >= deadline {
            return Ok(answer);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Loads the decision state a policy check needs: `None` for a patient with no record.
pub(crate) async fn load_for_policy(
    records: &dyn Records,
    patient: PatientId,
) -> Result<Option<LoadedPatient>, LedgerError> {
    match records.load(patient).await {
        Ok(loaded) => Ok(Some(loaded)),
        Err(LedgerError::NotFound { .. }) => Ok(None),
        Err(other) => Err(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chartlog_crypto::EventHash;
    use chartlog_domain::patient::Patient;

    #[test]
    fn a_record_read_before_a_forget_is_not_kept() {
        let mut cache = RecordCache::default();
        let patient = PatientId::from_uuid(uuid::Uuid::now_v7());
        let loaded = LoadedPatient {
            patient: Patient::default(),
            head: Some(StreamHead {
                version: 4,
                hash: EventHash::GENESIS,
            }),
        };
        // A load begins, the patient is erased (forget), the load finishes.
        let began = cache.forgets.of(patient);
        cache.forget(patient);
        cache.remember(patient, &loaded, began);
        assert!(cache.records.is_empty());
        // A load that began after the forget keeps its record as before.
        let began = cache.forgets.of(patient);
        cache.remember(patient, &loaded, began);
        assert!(cache.records.contains_key(&patient));
        // A forget of a patient of another stripe (say, a read of an erased record) leaves
        // this patient's loads in flight free to keep theirs.
        let other = PatientId::from_uuid(uuid::Uuid::from_u128(patient.as_uuid().as_u128() ^ 1));
        let began = cache.forgets.of(patient);
        cache.forget(other);
        cache.records.clear();
        cache.remember(patient, &loaded, began);
        assert!(cache.records.contains_key(&patient));
    }
}
