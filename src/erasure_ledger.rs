//! The erasure ledger kept with the key files: `<data-dir>/keys/erasure-ledger.jsonl`.
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

    /// Appends the erasures the file does not hold yet, durably; returns how many it added.
    /// Blocking: call it off the async threads.
    pub(crate) fn record(&self, erasures: &[Erasure]) -> io::Result<usize> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.path)?;
        // Released when the file is closed.
        file.lock()?;
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

/// Adds to the key directory's ledger every destroyed key of the database's key table that
/// it does not hold yet: erasures made before the ledger existed, or by a server that keeps
/// its key files elsewhere. Returns how many it added.
pub(crate) async fn copy_from_database(
    database: &Database,
    key_dir: &Path,
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
    let ledger = ErasureLedger::in_key_dir(key_dir);
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
/// `chartlog erase`, and again on a later load if a crash came between the two. The line is
/// made durable first: a crash after it leaves a line for a key that still exists, but whose
/// tombstone is already in the log, so the next load of the patient finishes the destruction
/// (and a restore withholding that key withholds what the log already says is erased). The
/// other order could leave a destroyed key with no line, which an older backup would bring
/// back. If the line cannot be written the key is not destroyed and the erasure fails loudly;
/// running it again finishes it.
pub(crate) struct LedgeredKeyStore<K> {
    inner: K,
    ledger: ErasureLedger,
}

impl<K: KeyStore> LedgeredKeyStore<K> {
    pub(crate) fn new(inner: K, key_dir: &Path) -> LedgeredKeyStore<K> {
        LedgeredKeyStore {
            inner,
            ledger: ErasureLedger::in_key_dir(key_dir),
        }
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
