//! Backups the server writes on a schedule: `serve --backup-dir <dir> --backup-recipient age1...`.
//!
//! Each is what `chartlog backup` writes (encrypted to the recipients, a signed manifest, one
//! read snapshot), named `chartlog-<UTC time>.backup` so that names sort by age. The first is
//! due --backup-every-hours after the newest one already in the directory (at once when there
//! is none), so a server restarted more often than that still backs up. Every attempt is on
//! the audit trail, a failure logged as an error and sent to the notifiers too; the older scheduled backups beyond
//! --backup-keep are deleted only after a new one is written. Stored apart is the operator's
//! part: the directory should be another disk or a mount that is copied off the machine.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use chartlog_api::audit::AuditSink;
use chartlog_api::notify::{BackupFailedNotice, Notifier};
use chartlog_crypto::SigningKeys;
use chartlog_projections::audit::{AuditAction, AuditEntity, AuditOutcome};
use clap::Args;
use time::OffsetDateTime;
use time::macros::format_description;

use crate::Database;
use crate::backup::{partial_file_target, recipients_from, write_backup};

const FILE_PREFIX: &str = "chartlog-";
const FILE_SUFFIX: &str = ".backup";

/// A partial file left this long without a write is an interrupted attempt's, not one being
/// written: a backup streams its output as it reads, so a live one is touched every moment.
/// Another server, or `chartlog backup` run by hand into the same directory, may be writing
/// the others.
const PARTIAL_FILE_STALE_AFTER: Duration = Duration::from_secs(10 * 60);

/// Scheduled backups (all off unless --backup-dir is given).
#[derive(Args)]
pub(crate) struct ScheduleArgs {
    /// A directory the server writes an encrypted backup to every --backup-every-hours, as
    /// `chartlog backup` would (restore one with `chartlog restore`). Needs a recipient.
    #[arg(long, value_name = "DIR")]
    backup_dir: Option<PathBuf>,

    /// An age recipient (`age1...`) scheduled backups are encrypted to. Repeatable.
    #[arg(
        long = "backup-recipient",
        value_name = "AGE_PUBLIC_KEY",
        requires = "backup_dir"
    )]
    backup_recipients: Vec<String>,

    /// A file of age recipients for scheduled backups, one per line. Repeatable.
    #[arg(
        long = "backup-recipient-file",
        value_name = "PATH",
        requires = "backup_dir"
    )]
    backup_recipient_files: Vec<PathBuf>,

    /// Hours between scheduled backups.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=720))]
    backup_every_hours: u64,

    /// Seconds form of --backup-every-hours, for tests; wins when given.
    #[arg(long, hide = true, value_parser = clap::value_parser!(u64).range(1..=86400))]
    backup_every_seconds: Option<u64>,

    /// Scheduled backups kept in --backup-dir; older ones are deleted after each new one.
    /// 0 keeps them all.
    #[arg(long, default_value_t = 14)]
    backup_keep: usize,
}

/// What the schedule needs, checked before the server starts.
pub(crate) struct BackupSchedule {
    directory: PathBuf,
    recipients: Vec<age::x25519::Recipient>,
    every: Duration,
    keep: usize,
}

impl ScheduleArgs {
    /// The schedule the flags describe, or `None` without --backup-dir. The directory is
    /// created (0700) when missing.
    pub(crate) fn schedule(&self) -> anyhow::Result<Option<BackupSchedule>> {
        let Some(directory) = &self.backup_dir else {
            return Ok(None);
        };
        let recipients = recipients_from(&self.backup_recipients, &self.backup_recipient_files)
            .context("--backup-dir needs --backup-recipient or --backup-recipient-file")?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(directory)
            .with_context(|| format!("cannot create --backup-dir {}", directory.display()))?;
        let every = Duration::from_secs(
            self.backup_every_seconds
                .unwrap_or(self.backup_every_hours * 60 * 60),
        );
        Ok(Some(BackupSchedule {
            directory: directory.clone(),
            recipients,
            every,
            keep: self.backup_keep,
        }))
    }
}

/// Where a scheduled backup reports: the audit trail always, the notifiers on a failure.
pub(crate) struct Reporting {
    pub(crate) audit: Arc<dyn AuditSink>,
    pub(crate) notifier: Arc<dyn Notifier>,
}

impl BackupSchedule {
    /// A backup in the data directory is lost with it: allowed (a mount may be copied off),
    /// but said at start.
    pub(crate) fn warn_if_inside(&self, data_dir: &Path) {
        let (Ok(directory), Ok(data_dir)) =
            (self.directory.canonicalize(), data_dir.canonicalize())
        else {
            return;
        };
        if directory.starts_with(&data_dir) {
            tracing::warn!(
                backup_dir = %directory.display(),
                "--backup-dir is inside the data directory: a disk that loses the database loses \
                 its backups too; point it at another disk or a mount copied off the machine"
            );
        }
    }
}

/// Runs `schedule` until the task is aborted.
pub(crate) fn spawn(
    schedule: BackupSchedule,
    database: Database,
    signing: SigningKeys,
    reporting: Reporting,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut due = first_due(&schedule);
        let mut failures_in_a_row = 0;
        let mut last_written_at = None;
        loop {
            if let Ok(wait) = due.duration_since(SystemTime::now()) {
                tokio::time::sleep(wait).await;
            }
            let outcome = back_up_once(&schedule, &database, &signing, &reporting).await;
            let now = chartlog_api::now();
            match outcome {
                AuditOutcome::Success => {
                    failures_in_a_row = 0;
                    last_written_at = Some(now);
                }
                _ => {
                    failures_in_a_row += 1;
                    let notice = BackupFailedNotice::new(now, failures_in_a_row, last_written_at);
                    reporting.notifier.backup_failed(&notice).await;
                }
            }
            due = SystemTime::now() + schedule.every;
        }
    })
}

/// One interval after the newest scheduled backup in the directory; now when there is none.
fn first_due(schedule: &BackupSchedule) -> SystemTime {
    let newest = scheduled_backups(&schedule.directory)
        .ok()
        .and_then(|backups| backups.last().cloned())
        .and_then(|newest| fs::metadata(newest).and_then(|m| m.modified()).ok());
    match newest {
        Some(written) => written + schedule.every,
        None => SystemTime::now(),
    }
}

/// One scheduled backup, audited; how it went.
async fn back_up_once(
    schedule: &BackupSchedule,
    database: &Database,
    signing: &SigningKeys,
    reporting: &Reporting,
) -> AuditOutcome {
    remove_stale_partial_files(&schedule.directory, SystemTime::now());
    let file = schedule
        .directory
        .join(file_name(OffsetDateTime::now_utc()));
    let written = write_backup(database, signing, &schedule.recipients, &file).await;
    let outcome = match &written {
        Ok(written) => {
            tracing::info!(
                file = %file.display(),
                events = written.manifest.events,
                bytes = written.bytes,
                "scheduled backup written"
            );
            AuditOutcome::Success
        }
        Err(error) => {
            tracing::error!(file = %file.display(), error = %format!("{error:#}"), "scheduled backup failed");
            AuditOutcome::Failure
        }
    };
    let row =
        crate::wiring::operator_audit_row(AuditEntity::Backup, None, AuditAction::Export, outcome);
    if let Err(error) = reporting.audit.record(vec![row]).await {
        tracing::error!(%error, "the scheduled backup could not be recorded on the audit trail");
    }
    if written.is_ok() {
        prune(&schedule.directory, schedule.keep);
    }
    outcome
}

/// `chartlog-20261207T154500.123Z.backup`: UTC, to the millisecond, sorting by age.
fn file_name(at: OffsetDateTime) -> String {
    let stamp = at
        .format(format_description!(
            "[year][month][day]T[hour][minute][second].[subsecond digits:3]Z"
        ))
        .unwrap_or_else(|_| at.unix_timestamp().to_string());
    format!("{FILE_PREFIX}{stamp}{FILE_SUFFIX}")
}

/// Whether `name` is one [`file_name`] gives: only such files are ever pruned, so a backup an
/// operator wrote by hand into the directory (`chartlog-before-upgrade.backup`) is kept.
fn is_scheduled_backup_name(name: &str) -> bool {
    let Some(stamp) = name
        .strip_prefix(FILE_PREFIX)
        .and_then(|rest| rest.strip_suffix(FILE_SUFFIX))
    else {
        return false;
    };
    // 20261207T154500.123Z
    let shape = b"ddddddddTdddddd.dddZ";
    stamp.len() == shape.len()
        && stamp
            .bytes()
            .zip(shape)
            .all(|(byte, &expected)| match expected {
                b'd' => byte.is_ascii_digit(),
                other => byte == other,
            })
}

/// The scheduled backups in `directory`, oldest first. Other files are never touched.
fn scheduled_backups(directory: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut backups: Vec<PathBuf> = fs::read_dir(directory)?
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_file()))
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(is_scheduled_backup_name)
        })
        .collect();
    backups.sort();
    Ok(backups)
}

/// Deletes all but the newest `keep` scheduled backups (none with 0).
fn prune(directory: &Path, keep: usize) {
    if keep == 0 {
        return;
    }
    let backups = match scheduled_backups(directory) {
        Ok(backups) => backups,
        Err(error) => {
            tracing::warn!(%error, "cannot list the scheduled backups to prune them");
            return;
        }
    };
    let excess = backups.len().saturating_sub(keep);
    for old in &backups[..excess] {
        match fs::remove_file(old) {
            Ok(()) => tracing::info!(file = %old.display(), "old scheduled backup deleted"),
            Err(error) => {
                tracing::warn!(file = %old.display(), %error, "cannot delete an old scheduled backup")
            }
        }
    }
}

/// A scheduled backup interrupted by a stop leaves its hidden partial file (see
/// [`write_backup`]); a later attempt clears it once it is stale.
fn remove_stale_partial_files(directory: &Path, now: SystemTime) {
    let Ok(entries) = fs::read_dir(directory) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let scheduled = partial_file_target(name).is_some_and(is_scheduled_backup_name);
        let stale = entry
            .metadata()
            .and_then(|metadata| metadata.modified())
            .is_ok_and(|modified| {
                now.duration_since(modified)
                    .is_ok_and(|idle| idle >= PARTIAL_FILE_STALE_AFTER)
            });
        if scheduled && stale {
            match fs::remove_file(entry.path()) {
                Ok(()) => tracing::info!(file = name, "stale partial backup deleted"),
                Err(error) => {
                    tracing::warn!(file = name, %error, "cannot delete a stale partial backup")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn names_sort_by_age_and_only_they_are_scheduled_backups() {
        let earlier = file_name(datetime!(2026-12-07 09:05:00.120 UTC));
        let later = file_name(datetime!(2026-12-07 10:00:00 UTC));
        assert_eq!(earlier, "chartlog-20261207T090500.120Z.backup");
        assert!(earlier < later);

        let dir = tempfile::tempdir().expect("temp dir");
        for name in [
            &later,
            &earlier,
            "notes.txt",
            "chartlog-manual.backup.bak",
            "chartlog-before-upgrade.backup",
            "chartlog-20261207T090500.120Z.backup.old",
            "chartlog-20261207T0905001120Z.backup",
        ] {
            fs::write(dir.path().join(name), b"x").expect("write");
        }
        let found = scheduled_backups(dir.path()).expect("list");
        assert_eq!(
            found,
            vec![dir.path().join(&earlier), dir.path().join(&later)]
        );
        prune(dir.path(), 1);
        assert!(!dir.path().join(&earlier).exists());
        assert!(dir.path().join(&later).exists());
        assert!(dir.path().join("notes.txt").exists(), "not ours, kept");
        assert!(
            dir.path().join("chartlog-before-upgrade.backup").exists(),
            "an operator's own backup is kept"
        );
    }

    #[test]
    fn only_stale_partial_files_of_scheduled_backups_are_cleared() {
        let dir = tempfile::tempdir().expect("temp dir");
        let scheduled = file_name(datetime!(2026-12-07 09:05:00 UTC));
        let interrupted = format!(".{scheduled}.4242.partial");
        let being_written = format!(".{scheduled}.4343.partial");
        let by_hand = ".chartlog-before-upgrade.backup.4444.partial";
        let now = SystemTime::now();
        let long_ago = now - PARTIAL_FILE_STALE_AFTER - Duration::from_secs(1);
        for (name, modified) in [
            (interrupted.as_str(), long_ago),
            (being_written.as_str(), now - Duration::from_secs(5)),
            (by_hand, long_ago),
        ] {
            let file = fs::File::create(dir.path().join(name)).expect("create");
            file.set_modified(modified).expect("set mtime");
        }
        remove_stale_partial_files(dir.path(), now);
        assert!(!dir.path().join(&interrupted).exists(), "stale: cleared");
        assert!(
            dir.path().join(&being_written).exists(),
            "another writer's live file is kept"
        );
        assert!(
            dir.path().join(by_hand).exists(),
            "a partial of a backup the server did not name is kept"
        );
    }
}
