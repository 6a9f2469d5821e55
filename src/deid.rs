//! `chartlog deid export`: the analysts' de-identified (Safe Harbor) tables for operators,
//! streamed page by page to a file or stdout in constant memory, as `GET /deidentified/{table}`
//! does over HTTP.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use anyhow::{Context, bail};
use chartlog_projections::deid::export::{DeidTable, ExportFormat};
use chartlog_projections::deid::{EXPORT_PAGE_ROWS, export_page};
use clap::{Args, Subcommand, ValueEnum};

use chartlog_projections::audit::{AuditAction, AuditEntity, AuditOutcome};

use crate::{KEY_DIR_NAME, StorageArgs, open_database, wiring};

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
    let mut sink: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("cannot create {} (it must not exist)", path.display()))?,
        ),
        None => Box::new(std::io::stdout().lock()),
    };
    let database = open_database(&args.storage.database_location()).await?;
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
    let outcome = if exported.is_ok() {
        AuditOutcome::Success
    } else {
        AuditOutcome::Failure
    };
    let audited = wiring::audit_operator_action(
        &database,
        &args.storage.data_dir.join(KEY_DIR_NAME),
        AuditEntity::DeidentifiedData,
        AuditAction::Export,
        outcome,
    )
    .await;
    database.close().await;
    exported?;
    audited?;
    tracing::info!(table = table.as_str(), rows, "de-identified export written");
    Ok(())
}
