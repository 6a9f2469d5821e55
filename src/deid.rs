//! `chartlog deid export`: the analysts' de-identified (Safe Harbor) tables for operators,
//! streamed page by page to a file or stdout in constant memory, as `GET /deidentified/{table}`
//! does over HTTP.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use chartlog_projections::deid::export::{DeidTable, ExportFormat};
use chartlog_projections::deid::{EXPORT_PAGE_ROWS, export_page};
use clap::{Args, Subcommand, ValueEnum};

use chartlog_projections::audit::{AuditAction, AuditEntity, AuditOutcome};

use crate::{KEY_DIR_NAME, StorageArgs, wiring};

#[derive(Subcommand)]
pub(crate) enum DeidCommand {
    /// Write one de-identified table as NDJSON or CSV. Run `chartlog rebuild deidentified`
    /// first if the server has not been following the log.
    Export(ExportArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Ndjson,
    Csv,
}

#[derive(Args)]
pub(crate) struct ExportArgs {
    #[command(flatten)]
    storage: StorageArgs,
    /// patients, observations, conditions, medication_orders or allergies.
    table: String,
    #[arg(long, value_enum, default_value = "ndjson")]
    format: Format,
    /// Write here (created with mode 0600, never overwritten) instead of stdout.
    #[arg(long)]
    output: Option<PathBuf>,
}

pub(crate) async fn run(command: DeidCommand) -> anyhow::Result<()> {
    let DeidCommand::Export(args) = command;
    let Some(table) = DeidTable::ALL
        .into_iter()
        .find(|table| table.as_str() == args.table)
    else {
        bail!(
            "unknown table {:?}: expected one of {}",
            args.table,
            DeidTable::ALL.map(DeidTable::as_str).join(", ")
        );
    };
    let format = match args.format {
        Format::Ndjson => ExportFormat::Ndjson,
        Format::Csv => ExportFormat::Csv,
    };
    // Refused before the database opens (a typo should cost nothing), but created only once
    // the database is open and the audit log ready: a file left behind by a failed start
    // would refuse the retry ("it must not exist").
    if let Some(path) = &args.output
        && path.symlink_metadata().is_ok()
    {
        bail!(
            "cannot create {}: it exists, and an export never overwrites a file",
            path.display()
        );
    }
    let database = wiring::open_existing_database(&args.storage.database_location()).await?;
    let key_dir = args.storage.data_dir.join(KEY_DIR_NAME);
    let started = match wiring::OperatorAudit::open(&database, &key_dir).await {
        Ok(audit) => create_sink(args.output.as_deref()).map(|sink| (audit, sink)),
        Err(error) => Err(error),
    };
    let (audit, mut sink) = match started {
        Ok(started) => started,
        Err(error) => {
            database.close().await;
            return Err(error);
        }
    };
    let read_models = wiring::read_models(&database);
    // Ages leave as of this year: someone who turned 90 since their last event is "90+".
    let release_year = chartlog_api::now().to_datetime().year();
    let mut after: Option<String> = None;
    let mut rows = 0;
    // On stderr, and only at a terminal: stdout may be the export itself.
    let progress = indicatif::ProgressBar::new_spinner()
        .with_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg}: {pos} rows, {per_sec}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        )
        .with_message(format!("exporting {}", table.as_str()));
    let exported: anyhow::Result<()> = async {
        loop {
            let chunk = export_page(
                &read_models,
                table,
                format,
                release_year,
                after.as_deref(),
                EXPORT_PAGE_ROWS,
            )
            .await
            .with_context(|| format!("cannot read the de-identified {} table", table.as_str()))?;
            sink.write_all(&chunk.bytes)
                .context("cannot write the export")?;
            rows += chunk.rows;
            progress.set_position(rows);
            match chunk.next_key {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        sink.flush().context("cannot write the export")?;
        progress.finish_and_clear();
        Ok(())
    }
    .await;
    let outcome = AuditOutcome::of(exported.is_ok());
    let audited = audit
        .record(
            AuditEntity::DeidentifiedData,
            None,
            AuditAction::Export,
            outcome,
        )
        .await;
    database.close().await;
    if (exported.is_err() || audited.is_err())
        && let Some(path) = &args.output
    {
        // A partial export is no export, nor one the audit trail does not show, and either
        // would refuse the retry. This run created the file (create_new), so removing it
        // touches nothing of anyone else's.
        drop(sink);
        if let Err(error) = std::fs::remove_file(path) {
            tracing::warn!(
                %error,
                file = %path.display(),
                "the partial export could not be removed"
            );
        }
    }
    exported?;
    audited?;
    tracing::info!(table = table.as_str(), rows, "de-identified export written");
    Ok(())
}

/// Where the export goes: `output`, created with mode 0600 and never overwritten, or stdout.
fn create_sink(output: Option<&Path>) -> anyhow::Result<Box<dyn Write>> {
    match output {
        Some(path) => OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map(|file| Box::new(file) as Box<dyn Write>)
            .with_context(|| format!("cannot create {} (it must not exist)", path.display())),
        None => Ok(Box::new(std::io::stdout().lock())),
    }
}
