//! `chartlog verify`: checks every stream's hash chain and signatures, that each stream's
//! events come in the global log in version order, that each stream ends where the stream
//! table says it does, and the global log against its signed checkpoints.
//!
//! It prints the last signed checkpoint as `POSITION:DIGEST`. What the database holds can only
//! vouch for itself: a log cut back together with its stream heads and the checkpoints over
//! the removed events verifies. An operator who records that line elsewhere and passes it back
//! as `--expect-checkpoint` finds such a cut.
//!
//! Needs no data key (nor the KEK file): only public signing keys, from the data directory's
//! signing key file or from a `keys export-public` file. Memory is bounded: streams are listed
//! in pages from the database, each is verified on its own in pages of events
//! (`chartlog_store::verify::verify_stream`), and at most [`BREAKS_LISTED_MAX`] breaks are kept
//! for the JSON report. Exit status: 0 intact, 2 a break was found, 1 verification could not
//! run.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, ensure};
use chartlog_crypto::{IntegrityError, SignatureVerifier};
use chartlog_domain::{PatientId, StreamId};
use chartlog_projections::db::{ProjectionDb, SqlArg};
use chartlog_store::EventStore;
use chartlog_store::checkpoints::{LOG_CHECKPOINT_STREAM, LogDigest, verify_checkpoints_with};
use chartlog_store::verify::{BreakKind, StreamBreak, VerifyReport, verify_stream};
use clap::Args;
use indicatif::ProgressBar;
use serde::Serialize;

use crate::{Database, DatabaseLocation, StorageArgs, keys, open_database, wiring};

/// The exit status when the store is not intact.
const EXIT_BROKEN: i32 = 2;
/// Stream ids read per page.
const STREAMS_PER_PAGE: i64 = 500;
/// Breaks kept for the JSON report; more are counted, not listed.
pub(crate) const BREAKS_LISTED_MAX: usize = 1_000;
/// The progress bar.
const PROGRESS_TEMPLATE: &str =
    "verify [{elapsed_precise}] [{wide_bar}] {pos}/{len} events, {per_sec}, {eta} left";

#[derive(Args)]
pub(crate) struct VerifyArgs {
    #[command(flatten)]
    storage: StorageArgs,

    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    json: bool,

    /// Trust the public keys in this file (written by `chartlog keys export-public`) instead
    /// of reading the data directory's signing key file: verification by someone who holds no
    /// secret key.
    #[arg(long)]
    public_keys: Option<PathBuf>,

    /// Verify this patient's record only (its stream, from the first event to the recorded
    /// head): what a patient or an auditor asks of one record, read without the rest of the
    /// log. The global-order check against signed checkpoints needs the whole log, and is
    /// left out.
    #[arg(long, value_name = "PATIENT_ID")]
    patient: Option<uuid::Uuid>,

    /// Fail unless the log's signed checkpoints still reach this position, and (with the
    /// digest) unless the log through it still hashes to that digest: the `POSITION:DIGEST`
    /// a previous verify printed as its last signed checkpoint. A log cut back together with
    /// its stream heads and the checkpoints over the removed events looks whole from inside
    /// the database; only a point recorded outside it shows the cut.
    #[arg(long, value_name = "POSITION[:DIGEST]", value_parser = parse_expected_checkpoint,
          conflicts_with = "patient")]
    expect_checkpoint: Option<ExpectedCheckpoint>,
}

/// What `--expect-checkpoint` holds the log to.
#[derive(Clone, Copy, Debug)]
struct ExpectedCheckpoint {
    position: u64,
    digest: Option<LogDigest>,
}

fn parse_expected_checkpoint(raw: &str) -> Result<ExpectedCheckpoint, String> {
    let (position, digest) = match raw.split_once(':') {
        Some((position, digest)) => (position, Some(digest)),
        None => (raw, None),
    };
    let position = position
        .parse::<u64>()
        .ok()
        .filter(|&position| position > 0)
        .ok_or_else(|| format!("not a log position: {position:?}"))?;
    let digest = digest
        .map(|digest| {
            LogDigest::from_hex(digest)
                .ok_or_else(|| format!("not a log digest (64 hex digits): {digest:?}"))
        })
        .transpose()?;
    Ok(ExpectedCheckpoint { position, digest })
}

/// What `verify --json` prints.
#[derive(Serialize, Default)]
struct Report {
    intact: bool,
    streams: u64,
    events: u64,
    /// Streams with a break (one break per stream: its first).
    broken_streams: u64,
    /// Signed checkpoints over the global log that were checked.
    checkpoints: u64,
    /// The last signed checkpoint that matched the log (none for `--patient`, or before the
    /// server has written one): what to record outside the database and pass back later as
    /// `--expect-checkpoint POSITION:DIGEST`.
    last_checkpoint: Option<CheckpointAnchor>,
    /// The first [`BREAKS_LISTED_MAX`] breaks found.
    breaks: Vec<BreakReport>,
}

#[derive(Serialize)]
struct CheckpointAnchor {
    /// The last global position the checkpoint covers.
    position: u64,
    /// The rolling digest of the log through that position, in hex.
    digest: String,
}

#[derive(Serialize)]
struct BreakReport {
    stream: String,
    /// The first stream version that does not verify.
    version: u64,
    /// The global position of the event found there (0 when the event is missing).
    position: u64,
    /// A stable code: hash_mismatch, bad_signature, unknown_signer, chain_broken,
    /// version_gap, stream_mismatch, batch_rejected, head_mismatch or malformed_stream_id;
    /// for the global order (stream `log-checkpoints`): checkpoint_mismatch,
    /// checkpoint_position_missing, checkpoint_signature or checkpoint_malformed, and for
    /// `--expect-checkpoint`: checkpoint_anchor_missing or checkpoint_anchor_mismatch. Within
    /// a stream, position_out_of_order.
    problem: &'static str,
    detail: String,
}

pub(crate) async fn run(args: VerifyArgs) -> anyhow::Result<()> {
    let verifier = match &args.public_keys {
        Some(path) => keys::PublicKeys::read(path)?.verifier()?,
        None => keys::load_signing_keys(&args.storage.data_dir)?.verifier(),
    };
    let location = args.storage.database_location();
    // Opening would create an empty database, which verifies, and proves nothing.
    if let DatabaseLocation::SqliteFile(path) = &location {
        ensure!(
            path.exists(),
            "no database at {}: check --data-dir",
            path.display()
        );
    }
    let database = open_database(&location).await?;
    let db = wiring::log_db(&database);
    let mut report = Report::default();
    let patient = args
        .patient
        .map(|id| StreamId::patient(PatientId::from_uuid(id)));
    let verified = match (&database, &patient) {
        (Database::Sqlite(store, _), Some(stream)) => {
            verify_patient(store, &verifier, stream, args.json, &mut report).await
        }
        (Database::Postgres(store), Some(stream)) => {
            verify_patient(store, &verifier, stream, args.json, &mut report).await
        }
        (Database::Sqlite(store, _), None) => {
            verify_all(store, &db, &verifier, args.json, &mut report).await?;
            verify_global_order(
                store,
                &verifier,
                args.expect_checkpoint,
                args.json,
                &mut report,
            )
            .await
        }
        (Database::Postgres(store), None) => {
            verify_all(store, &db, &verifier, args.json, &mut report).await?;
            verify_global_order(
                store,
                &verifier,
                args.expect_checkpoint,
                args.json,
                &mut report,
            )
            .await
        }
    };
    database.close().await;
    verified?;
    report.intact = report.broken_streams == 0;

    let mut stdout = std::io::stdout().lock();
    if args.json {
        let json = serde_json::to_string(&report).context("cannot encode the report")?;
        writeln!(stdout, "{json}")
    } else if let (true, Some(stream)) = (report.intact, &patient) {
        writeln!(
            stdout,
            "intact: {stream}, {} events verified (one record; the global order is checked \
             by a verify of the whole log)",
            report.events
        )
    } else if report.intact {
        writeln!(
            stdout,
            "intact: {} streams, {} events verified, {} signed checkpoints agree",
            report.streams, report.events, report.checkpoints
        )
        .and_then(|()| match &report.last_checkpoint {
            Some(anchor) => writeln!(
                stdout,
                "last signed checkpoint: {}:{} (record it outside the database; \
                 `verify --expect-checkpoint {}:{}` fails on a log cut back before it)",
                anchor.position, anchor.digest, anchor.position, anchor.digest
            ),
            None => writeln!(stdout, "no signed checkpoint yet"),
        })
    } else {
        writeln!(
            stdout,
            "BROKEN: {} of {} streams fail verification ({} events read)",
            report.broken_streams, report.streams, report.events
        )
    }
    .and_then(|()| stdout.flush())
    .context("cannot write the report to stdout")?;
    drop(stdout);
    if !report.intact {
        // After the pool is closed and stdout flushed: nothing is left to clean up.
        std::process::exit(EXIT_BROKEN);
    }
    Ok(())
}

/// Verifies every stream named in the stream table, then every stream that has events but no
/// row there.
async fn verify_all<S: EventStore>(
    store: &S,
    db: &ProjectionDb,
    verifier: &SignatureVerifier,
    json: bool,
    report: &mut Report,
) -> anyhow::Result<()> {
    let total = db
        .fetch_optional("SELECT COUNT(*) FROM chartlog_events", vec![])
        .await
        .context("cannot count the events")?
        .map(|row| row.i64(0))
        .transpose()
        .context("cannot count the events")?
        .unwrap_or(0);
    let bar = keys::progress_bar(u64::try_from(total).unwrap_or(0), PROGRESS_TEMPLATE);
    let listings = [
        "SELECT stream_id FROM chartlog_streams WHERE stream_id > $1 \
         ORDER BY stream_id LIMIT $2",
        // Events whose stream has no recorded head: the stream's row was removed.
        "SELECT DISTINCT e.stream_id FROM chartlog_events e WHERE e.stream_id > $1 \
         AND NOT EXISTS (SELECT 1 FROM chartlog_streams s WHERE s.stream_id = e.stream_id) \
         ORDER BY e.stream_id LIMIT $2",
    ];
    for listing in listings {
        let mut after = String::new();
        loop {
            let rows = db
                .fetch_all(
                    listing,
                    vec![SqlArg::Text(after.clone()), SqlArg::I64(STREAMS_PER_PAGE)],
                )
                .await
                .context("cannot list the streams")?;
            if rows.is_empty() {
                break;
            }
            for row in rows {
                let raw = row.text(0).context("cannot read a stream id")?;
                report.streams += 1;
                match StreamId::parse(&raw) {
                    Ok(stream) => {
                        let verified = verify_one(store, verifier, &stream)
                            .await
                            .with_context(|| format!("cannot read stream {stream}"))?;
                        report.events += verified.events;
                        bar.inc(verified.events);
                        for found in &verified.breaks {
                            record(report, &bar, json, break_report(found));
                        }
                    }
                    Err(_) => record(
                        report,
                        &bar,
                        json,
                        BreakReport {
                            stream: raw.clone(),
                            version: 0,
                            position: 0,
                            problem: "malformed_stream_id",
                            detail: "not a stream id chartlog writes".to_owned(),
                        },
                    ),
                }
                after = raw;
            }
        }
    }
    bar.finish_and_clear();
    Ok(())
}

/// One patient's stream only. A patient with no events is an error, not an intact record:
/// a mistyped id must not read as "verified".
async fn verify_patient<S: EventStore>(
    store: &S,
    verifier: &SignatureVerifier,
    stream: &StreamId,
    json: bool,
    report: &mut Report,
) -> anyhow::Result<()> {
    let verified = verify_one(store, verifier, stream)
        .await
        .with_context(|| format!("cannot read stream {stream}"))?;
    ensure!(
        verified.events > 0 || !verified.breaks.is_empty(),
        "no record for this patient: stream {stream} has no events"
    );
    report.streams = 1;
    report.events = verified.events;
    let bar = ProgressBar::hidden();
    for found in &verified.breaks {
        record(report, &bar, json, break_report(found));
    }
    Ok(())
}

/// [`verify_stream`], read twice when the stream table names a later head than the last event
/// read: a stream appended to while it was read looks truncated once, a truncated one twice.
async fn verify_one<S: EventStore>(
    store: &S,
    verifier: &SignatureVerifier,
    stream: &StreamId,
) -> Result<VerifyReport, chartlog_store::StoreError> {
    let report = verify_stream(store, verifier, stream).await?;
    let grew = report.breaks.iter().any(|found| {
        matches!(
            found.problem,
            BreakKind::TruncatedTail {
                recorded_version,
                found_version,
            } if recorded_version > found_version
        )
    });
    if grew {
        return verify_stream(store, verifier, stream).await;
    }
    Ok(report)
}

/// Checks the global order against the signed checkpoints: what no single stream's chain can
/// see (events of different streams swapped, a stream cut back with its head row); and, with
/// `expected`, that the checkpoints still reach a point recorded outside the database.
async fn verify_global_order<S: EventStore>(
    store: &S,
    verifier: &SignatureVerifier,
    expected: Option<ExpectedCheckpoint>,
    json: bool,
    report: &mut Report,
) -> anyhow::Result<()> {
    let found = verify_checkpoints_with(store, verifier, expected.map(|e| e.position))
        .await
        .context("cannot read the global log")?;
    report.checkpoints = found.checkpoints;
    report.last_checkpoint = found.last_verified.map(|anchor| CheckpointAnchor {
        position: anchor.position,
        digest: anchor.digest.to_hex(),
    });
    let bar = ProgressBar::hidden();
    if let Some(expected) = expected {
        let reached = found
            .last_verified
            .is_some_and(|anchor| anchor.position >= expected.position);
        if !reached {
            record(
                report,
                &bar,
                json,
                BreakReport {
                    stream: LOG_CHECKPOINT_STREAM.to_owned(),
                    version: 0,
                    position: expected.position,
                    problem: "checkpoint_anchor_missing",
                    detail: format!(
                        "no signed checkpoint that agrees with the log reaches position {} \
                         (the last reaches {}): the log was cut back, or the checkpoints over \
                         its end were removed",
                        expected.position,
                        found
                            .last_verified
                            .map_or_else(|| "none".to_owned(), |a| a.position.to_string())
                    ),
                },
            );
        }
        if let Some(digest) = expected.digest
            && found.digest_at != Some(digest)
        {
            record(
                report,
                &bar,
                json,
                BreakReport {
                    stream: LOG_CHECKPOINT_STREAM.to_owned(),
                    version: 0,
                    position: expected.position,
                    problem: "checkpoint_anchor_mismatch",
                    detail: format!(
                        "the log through position {} {}: events up to it were removed, \
                         inserted, changed or moved",
                        expected.position,
                        if found.digest_at.is_some() {
                            "does not hash to the recorded digest"
                        } else {
                            "holds no event at that position"
                        }
                    ),
                },
            );
        }
    }
    if let Some(mismatch) = found.first_mismatch {
        record(
            report,
            &bar,
            json,
            BreakReport {
                stream: LOG_CHECKPOINT_STREAM.to_owned(),
                version: 0,
                position: mismatch.checkpoint_position,
                problem: mismatch.problem,
                detail: format!(
                    "the global log up to position {} does not match the signed checkpoint: \
                     events were removed, inserted or moved across streams",
                    mismatch.covered_position
                ),
            },
        );
    }
    Ok(())
}

/// Counts a break, lists it if there is room, and prints it at once unless the report is JSON.
fn record(report: &mut Report, bar: &ProgressBar, json: bool, found: BreakReport) {
    report.broken_streams += 1;
    if !json {
        let position = match found.position {
            0 => String::new(),
            position => format!(" (position {position})"),
        };
        bar.suspend(|| {
            println!(
                "BROKEN {} at version {}{position}: {}: {}",
                found.stream, found.version, found.problem, found.detail
            );
        });
    }
    if report.breaks.len() < BREAKS_LISTED_MAX {
        report.breaks.push(found);
    }
}

fn break_report(found: &StreamBreak) -> BreakReport {
    let (problem, detail) = match &found.problem {
        BreakKind::Integrity(error) => (integrity_code(error), error.to_string()),
        BreakKind::TruncatedTail {
            recorded_version,
            found_version,
        } if recorded_version > found_version => (
            "head_mismatch",
            format!(
                "the stream table records version {recorded_version}, the events end at \
                 version {found_version}: events are missing from the end"
            ),
        ),
        BreakKind::PositionOutOfOrder { previous_position } => (
            "position_out_of_order",
            format!(
                "the event sits at global position {}, not after the previous version's \
                 {previous_position}: the log's order was rewritten",
                found.position
            ),
        ),
        BreakKind::TruncatedTail {
            recorded_version,
            found_version,
        } => (
            "head_mismatch",
            format!(
                "the stream table records version {recorded_version} and another head hash, \
                 the events end at version {found_version}"
            ),
        ),
    };
    BreakReport {
        stream: found.stream.as_str().to_owned(),
        version: found.version,
        position: found.position,
        problem,
        detail,
    }
}

fn integrity_code(error: &IntegrityError) -> &'static str {
    match error {
        IntegrityError::HashMismatch { .. } => "hash_mismatch",
        IntegrityError::BadSignature { .. } => "bad_signature",
        IntegrityError::UnknownSigner { .. } => "unknown_signer",
        IntegrityError::ChainBroken { .. } => "chain_broken",
        IntegrityError::VersionGap { .. } => "version_gap",
        IntegrityError::StreamMismatch { .. } => "stream_mismatch",
        IntegrityError::BatchRejected { .. } => "batch_rejected",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_template_parses() {
        assert!(indicatif::ProgressStyle::with_template(PROGRESS_TEMPLATE).is_ok());
    }
}
