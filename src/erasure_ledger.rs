//! The erasure ledger kept with the key files: `<data-dir>/keys/erasure-ledger.jsonl`, or the
//! file `--erasure-ledger` (`CHARTLOG_ERASURE_LEDGER`) names when the key directory is a
//! read-only mount.
//!
//! A backup carries every data key that was active when it was taken. The database's own
//! tombstones say which patients were erased since, but after the database is lost they are
//! lost with it, and an older backup restored into an empty database would bring an erased
//! patient's key back. This file is the ledger that outlives the database: it lives in the
//! key directory, which a restore needs anyway (the KEK ring, the signing keys) and which
//! operators back up apart from the data, and `chartlog restore` never restores a key it names.
//!
//! One JSON line per erasure, appended, never rewritten:
//! `{"stream_id":"patient-<uuid>","patient_id":"<uuid>","data_key_id":"<uuid>","erased_at":"<RFC 3339>"}`.
//! Ids and a time only, no PHI: patient ids are random UUIDs. The file is 0600, each line is
//! fsynced before the key it names is destroyed ([`LedgeredKeyStore`]), and appenders of
//! several processes (a server, `chartlog erase`) take turns under an exclusive lock.
//!
//! An erasure stores the patient's tombstone event before it destroys the key, so a ledger
//! that cannot be written must refuse the erasure before the tombstone, not at the
//! destruction after it (which would leave the tombstone over a live key):
//! [`LedgeredKeyStore`] checks the file at [`KeyStore::prepare_destroy`], and `serve` refuses
//! to start without a writable ledger.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use async_trait::async_trait;
use chartlog_crypto::{
    DataKeyId, DataKeyRecord, KekId, KeyInsert, KeyStore, KeyStoreError, WrappedDataKey,
};
use chartlog_domain::{StreamId, Timestamp};
use clap::Args;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::Database;

/// The ledger's file name inside the key directory.
pub(crate) const ERASURE_LEDGER_FILE_NAME: &str = "erasure-ledger.jsonl";

/// One erased owner: whose key, which key, and when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Erasure {
    pub(crate) stream_id: String,
    pub(crate) data_key_id: Uuid,
    pub(crate) erased_at: Timestamp,
}

/// A line of the file.
#[derive(Serialize, Deserialize)]
struct Line {
    stream_id: String,
    /// For a person reading the file; the stream id is what counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    patient_id: Option<String>,
    data_key_id: Uuid,
    erased_at: String,
}

impl Line {
    fn of(erasure: &Erasure) -> Line {
        Line {
            stream_id: erasure.stream_id.clone(),
            patient_id: StreamId::parse(&erasure.stream_id)
                .ok()
                .and_then(|stream| stream.patient_id())
                .map(|patient| patient.to_string()),
            data_key_id: erasure.data_key_id,
            erased_at: erasure.erased_at.to_string(),
        }
    }

    fn erasure(self) -> Option<Erasure> {
        let at = OffsetDateTime::parse(&self.erased_at, &Rfc3339).ok()?;
        Some(Erasure {
            stream_id: self.stream_id,
            data_key_id: self.data_key_id,
            erased_at: Timestamp::from_datetime(at).ok()?,
        })
    }
}

/// What a read of the file found.
pub(crate) struct LedgerContents {
    /// By stream id; the first line of an owner wins (later ones are repeats).
    pub(crate) erasures: BTreeMap<String, Erasure>,
    /// The file ended in a line without its newline: an append cut short (a crash, a full
    /// disk). Its key was never destroyed, since destruction waits for the whole line, so it
    /// is left out.
    pub(crate) torn_tail: bool,
}

/// Where the erasure ledger is: `serve`, `erase` and `restore` must agree on it.
#[derive(Args, Clone, Debug)]
pub(crate) struct ErasureLedgerArgs {
    /// The erasure ledger file (one JSON line per erased patient; what keeps them erased when
    /// an older backup is restored). Default: `<data-dir>/keys/erasure-ledger.jsonl`. Give
    /// another path when the key directory is mounted read-only: the file must be writable
    /// (an erasure is refused otherwise, and `serve` does not start), on storage that is kept,
    /// and backed up with the keys. `serve`, `erase` and `restore` must be given the same one.
    #[arg(long, env = "CHARTLOG_ERASURE_LEDGER", value_name = "FILE")]
    erasure_ledger: Option<PathBuf>,
}

impl ErasureLedgerArgs {
    /// The ledger these arguments name, or the key directory's.
    pub(crate) fn ledger(&self, key_dir: &Path) -> ErasureLedger {
        match &self.erasure_ledger {
            Some(path) => ErasureLedger::at(path.clone()),
            None => ErasureLedger::in_key_dir(key_dir),
        }
    }

    /// Whether `--erasure-ledger` (or its variable) moved the ledger out of the key directory.
    pub(crate) fn is_given(&self) -> bool {
        self.erasure_ledger.is_some()
    }
}

/// The ledger file of one key directory.
#[derive(Clone, Debug)]
pub(crate) struct ErasureLedger {
    path: PathBuf,
}

impl ErasureLedger {
    pub(crate) fn in_key_dir(key_dir: &Path) -> ErasureLedger {
        ErasureLedger {
            path: key_dir.join(ERASURE_LEDGER_FILE_NAME),
        }
    }

    pub(crate) fn at(path: PathBuf) -> ErasureLedger {
        ErasureLedger { path }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the file for appending (making it, 0600, if it is missing) and takes its lock,
    /// as [`ErasureLedger::record`] does.
    fn open_for_append(&self) -> io::Result<File> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.path)?;
        // Released when the file is closed.
        file.lock()?;
        Ok(file)
    }

    /// Checks that [`ErasureLedger::record`] can write the file: opens it for appending
    /// (making it if it is missing: a new ledger is an empty one), takes its lock and syncs
    /// it, writing no line. What it cannot foresee is a disk that fills up in between.
    /// Blocking: call it off the async threads.
    pub(crate) fn check_writable(&self) -> io::Result<()> {
        let existed = self.path.exists();
        let file = self.open_for_append()?;
        file.sync_all()?;
        if !existed && let Some(directory) = self.path.parent() {
            File::open(directory)?.sync_all()?;
        }
        Ok(())
    }

    /// [`ErasureLedger::check_writable`] off the async threads, with an error that names the
    /// file and says what to do.
    pub(crate) async fn ensure_writable(&self) -> anyhow::Result<()> {
        let ledger = self.clone();
        tokio::task::spawn_blocking(move || ledger.check_writable())
            .await
            .context("the erasure ledger check failed")?
            .with_context(|| {
                format!(
                    "the erasure ledger {} cannot be written, so no patient could be erased: \
                     make it (and, if it does not exist yet, its directory) writable by this \
                     user, or, if the key directory is mounted read-only, give \
                     --erasure-ledger (CHARTLOG_ERASURE_LEDGER) a file on writable, kept \
                     storage, the same for serve, erase and restore",
                    self.path.display()
                )
            })
    }

    /// Appends the erasures the file does not hold yet, durably; returns how many it added.
    /// Blocking: call it off the async threads.
    pub(crate) fn record(&self, erasures: &[Erasure]) -> io::Result<usize> {
        let mut file = self.open_for_append()?;
        let mut text = Vec::new();
        file.read_to_end(&mut text)?;
        if let Some(last) = text.last()
            && *last != b'\n'
        {
            // A torn append never had its key destroyed (see `LedgerContents::torn_tail`);
            // cutting it off keeps the next line whole. Under the lock no appender is mid-line.
            let whole = text
                .iter()
                .rposition(|&byte| byte == b'\n')
                .map_or(0, |i| i + 1);
            tracing::warn!(
                ledger = %self.path.display(),
                bytes = text.len() - whole,
                "erasure ledger ended in a torn line; it is cut off"
            );
            file.set_len(whole as u64)?;
            text.truncate(whole);
        }
        let held = parse(&text, &self.path).map_or_else(|_| BTreeMap::new(), |c| c.erasures);
        let mut lines = Vec::new();
        let mut added = 0;
        for erasure in erasures {
            if held.contains_key(&erasure.stream_id) {
                continue;
            }
            serde_json::to_writer(&mut lines, &Line::of(erasure)).map_err(io::Error::other)?;
            lines.push(b'\n');
            added += 1;
        }
        if added == 0 {
            return Ok(0);
        }
        file.seek(SeekFrom::End(0))?;
        file.write_all(&lines)?;
        file.sync_all()?;
        // The file may be new: its directory entry must be as durable as its lines.
        if let Some(directory) = self.path.parent() {
            File::open(directory)?.sync_all()?;
        }
        Ok(added)
    }

    /// The file's erasures; `None` when there is no file.
    pub(crate) fn read(&self) -> anyhow::Result<Option<LedgerContents>> {
        let text = match std::fs::read(&self.path) {
            Ok(text) => text,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => {
                return Err(error).with_context(|| {
                    format!("cannot read the erasure ledger {}", self.path.display())
                });
            }
        };
        parse(&text, &self.path).map(Some)
    }
}

/// A line that does not parse is an error, not a line to skip: nobody could say which
/// patient it kept erased. Only a last line without its newline is left out (a torn append).
fn parse(text: &[u8], path: &Path) -> anyhow::Result<LedgerContents> {
    let whole = text
        .iter()
        .rposition(|&byte| byte == b'\n')
        .map_or(0, |i| i + 1);
    let mut erasures = BTreeMap::new();
    for (number, raw) in text[..whole].split(|&byte| byte == b'\n').enumerate() {
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let Some(erasure) = serde_json::from_slice::<Line>(raw)
            .ok()
            .and_then(Line::erasure)
        else {
            bail!(
                "line {} of the erasure ledger {} is not an erasure entry; restore the file \
                 from the key backup, or repair that line (a stream id, data key id and RFC \
                 3339 time)",
                number + 1,
                path.display()
            );
        };
        erasures.entry(erasure.stream_id.clone()).or_insert(erasure);
    }
    Ok(LedgerContents {
        erasures,
        torn_tail: whole < text.len(),
    })
}

/// Adds to the ledger every destroyed key of the database's key table that it does not hold
/// yet: erasures made before the ledger existed, or by a server that keeps its key files or
/// its ledger elsewhere. Returns how many it added.
pub(crate) async fn copy_from_database(
    database: &Database,
    ledger: &ErasureLedger,
) -> anyhow::Result<usize> {
    let rows = crate::wiring::log_db(database)
        .fetch_all(
            "SELECT owner_stream_id, key_id, destroyed_at_us \
             FROM chartlog_data_keys WHERE wrapped_key IS NULL",
            vec![],
        )
        .await
        .context("cannot read the destroyed data keys")?;
    let mut erasures = Vec::with_capacity(rows.len());
    for row in rows {
        erasures.push(Erasure {
            stream_id: row.text(0)?,
            data_key_id: row.uuid(1)?,
            erased_at: Timestamp::from_unix_micros(row.opt_i64(2)?.unwrap_or(0))?,
        });
    }
    let ledger = ledger.clone();
    let path = ledger.path().display().to_string();
    tokio::task::spawn_blocking(move || ledger.record(&erasures))
        .await
        .context("the erasure ledger writer failed")?
        .with_context(|| format!("cannot write the erasure ledger {path}"))
}

/// A key table that writes an owner's erasure to the ledger file before it destroys the key.
///
/// Every destruction goes through [`KeyStore::destroy`], which the ledger of a patient calls
/// only after the tombstone event is stored, whether the erasure came from HTTP or from
/// `chartlog erase`, and again on a later load if a crash came between the two. Before it
/// stores the tombstone, the patient's ledger calls [`KeyStore::prepare_destroy`], where the
/// file is opened for appending and locked: a file that cannot be written (a read-only key
/// mount) refuses the erasure with nothing stored. The line is
/// made durable first: a crash after it leaves a line for a key that still exists, but whose
/// tombstone is already in the log, so the next load of the patient finishes the destruction
/// (and a restore withholding that key withholds what the log already says is erased). The
/// other order could leave a destroyed key with no line, which an older backup would bring
/// back. If the line still cannot be written (a disk that filled up since the check) the key
/// is not destroyed and the erasure fails loudly; the next load of the patient, or running
/// the erasure again, finishes it once the file can be written.
pub(crate) struct LedgeredKeyStore<K> {
    inner: K,
    ledger: ErasureLedger,
}

impl<K: KeyStore> LedgeredKeyStore<K> {
    pub(crate) fn new(inner: K, ledger: ErasureLedger) -> LedgeredKeyStore<K> {
        LedgeredKeyStore { inner, ledger }
    }
}

#[async_trait]
impl<K: KeyStore> KeyStore for LedgeredKeyStore<K> {
    async fn insert(
        &self,
        owner: &StreamId,
        key: &WrappedDataKey,
    ) -> Result<KeyInsert, KeyStoreError> {
        self.inner.insert(owner, key).await
    }

    async fn fetch(&self, owner: &StreamId) -> Result<Option<DataKeyRecord>, KeyStoreError> {
        self.inner.fetch(owner).await
    }

    async fn prepare_destroy(&self, owner: &StreamId) -> Result<(), KeyStoreError> {
        self.inner.prepare_destroy(owner).await?;
        self.ledger.ensure_writable().await.map_err(|error| {
            KeyStoreError::new(format!(
                "{error:#}. The erasure of {owner} was refused; nothing was recorded"
            ))
        })
    }

    async fn destroy(
        &self,
        owner: &StreamId,
        at: Timestamp,
    ) -> Result<Option<DataKeyId>, KeyStoreError> {
        let (key_id, erased_at) = match self.inner.fetch(owner).await? {
            Some(DataKeyRecord::Active(wrapped)) => (wrapped.key_id, at),
            Some(DataKeyRecord::Destroyed {
                key_id,
                destroyed_at,
            }) => (key_id, destroyed_at),
            // No key to destroy, hence none a backup could bring back.
            None => return self.inner.destroy(owner, at).await,
        };
        let erasure = Erasure {
            stream_id: owner.as_str().to_owned(),
            data_key_id: key_id.as_uuid(),
            erased_at,
        };
        let ledger = self.ledger.clone();
        let recorded = tokio::task::spawn_blocking(move || ledger.record(&[erasure]))
            .await
            .map_err(|error| KeyStoreError::new(format!("the erasure ledger writer: {error}")))?;
        if let Err(error) = recorded {
            return Err(KeyStoreError::new(format!(
                "cannot write the erasure ledger {}: {error}; the key of {owner} was not \
                 destroyed (run the erasure again once the file can be written)",
                self.ledger.path().display()
            )));
        }
        self.inner.destroy(owner, at).await
    }

    async fn list_for_rewrap(
        &self,
        active: &KekId,
        limit: u32,
    ) -> Result<Vec<(StreamId, WrappedDataKey)>, KeyStoreError> {
        self.inner.list_for_rewrap(active, limit).await
    }

    async fn replace_wrapping(
        &self,
        owner: &StreamId,
        expected: &WrappedDataKey,
        replacement: &WrappedDataKey,
    ) -> Result<bool, KeyStoreError> {
        self.inner
            .replace_wrapping(owner, expected, replacement)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn erasure(n: u128) -> Erasure {
        Erasure {
            stream_id: format!("patient-{}", Uuid::from_u128(n)),
            data_key_id: Uuid::from_u128(1000 + n),
            erased_at: Timestamp::from_unix_micros(1_763_000_000_000_000 + n as i64)
                .expect("in range"),
        }
    }

    #[test]
    fn erasures_are_appended_once_and_read_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ledger = ErasureLedger::in_key_dir(dir.path());
        assert!(ledger.read().expect("read").is_none(), "no file, no ledger");
        assert_eq!(ledger.record(&[erasure(1)]).expect("record"), 1);
        assert_eq!(ledger.record(&[erasure(1), erasure(2)]).expect("record"), 1);
        let read = ledger.read().expect("read").expect("a file");
        assert_eq!(
            read.erasures.values().cloned().collect::<Vec<_>>(),
            vec![erasure(1), erasure(2)]
        );
        assert!(!read.torn_tail);
        let mode = std::fs::metadata(ledger.path())
            .expect("file")
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let text = std::fs::read_to_string(ledger.path()).expect("text");
        assert!(text.contains(&format!("\"patient_id\":\"{}\"", Uuid::from_u128(1))));
    }

    #[test]
    fn the_writability_check_makes_an_empty_private_ledger_and_refuses_what_cannot_be_written() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ledger = ErasureLedger::in_key_dir(dir.path());
        ledger.check_writable().expect("a new ledger");
        let read = ledger.read().expect("read").expect("a file");
        assert!(read.erasures.is_empty());
        let mode = std::fs::metadata(ledger.path())
            .expect("file")
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        ledger.record(&[erasure(1)]).expect("record");
        ledger.check_writable().expect("an existing ledger");
        assert_eq!(
            ledger.read().expect("read").expect("a file").erasures.len(),
            1
        );

        // A directory in the file's place stops every writer, root included.
        let blocked = ErasureLedger::at(dir.path().join("blocked"));
        std::fs::create_dir(blocked.path()).expect("a directory");
        assert!(blocked.check_writable().is_err());
        let missing_parent = ErasureLedger::at(dir.path().join("no-such-dir").join("ledger"));
        assert!(missing_parent.check_writable().is_err());
        assert!(!missing_parent.path().exists());
    }

    #[test]
    fn a_torn_last_line_is_left_out_and_cut_off_by_the_next_append() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ledger = ErasureLedger::in_key_dir(dir.path());
        ledger.record(&[erasure(1)]).expect("record");
        let mut file = OpenOptions::new()
            .append(true)
            .open(ledger.path())
            .expect("open");
        file.write_all(b"{\"stream_id\":\"patient-").expect("torn");
        drop(file);
        let read = ledger.read().expect("read").expect("a file");
        assert!(read.torn_tail);
        assert_eq!(read.erasures.len(), 1);
        ledger.record(&[erasure(2)]).expect("record");
        let read = ledger.read().expect("read").expect("a file");
        assert!(!read.torn_tail);
        assert_eq!(read.erasures.len(), 2);
    }

    #[test]
    fn a_damaged_line_stops_the_read() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ledger = ErasureLedger::in_key_dir(dir.path());
        ledger.record(&[erasure(1)]).expect("record");
        let mut file = OpenOptions::new()
            .append(true)
            .open(ledger.path())
            .expect("open");
        file.write_all(b"not json\n").expect("damage");
        drop(file);
        let error = ledger.read().err().expect("refused").to_string();
        assert!(error.contains("line 2"), "{error}");
    }
}
