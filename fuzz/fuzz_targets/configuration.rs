//! Configuration text: a TOML settings file layered onto command lines (the `--config` layer),
//! and the same text as a `CHARTLOG_KEK`-style key-ring value. A file that does not fit must be
//! refused with an error; what is layered must be a command line clap can judge.
//!
//! The binary's full command definition lives in its `main.rs`; this one has the same shapes
//! that matter to the layer: subcommands with long flags, flags with environment variables,
//! boolean switches, a secret flag, and a global flag.
#![no_main]

use std::ffi::OsString;
use std::path::Path;
use std::sync::OnceLock;

use chartlog::config_layer::{merge, take_config_flag};
use chartlog_crypto::KeyRing;
use clap::{Arg, ArgAction, Command};
use libfuzzer_sys::fuzz_target;

fn storage(command: Command) -> Command {
    command
        .arg(
            Arg::new("data_dir")
                .long("data-dir")
                .env("CHARTLOG_FUZZ_DATA_DIR"),
        )
        .arg(
            Arg::new("database_url")
                .long("database-url")
                .env("CHARTLOG_FUZZ_DATABASE_URL"),
        )
}

fn command() -> &'static Command {
    static COMMAND: OnceLock<Command> = OnceLock::new();
    COMMAND.get_or_init(|| {
        let serve = storage(Command::new("serve"))
            .arg(
                Arg::new("listen")
                    .long("listen")
                    .default_value("127.0.0.1:8443"),
            )
            .arg(
                Arg::new("insecure_http")
                    .long("insecure-http")
                    .action(ArgAction::SetTrue),
            )
            .arg(
                Arg::new("idle_timeout_minutes")
                    .long("idle-timeout-minutes")
                    .value_parser(clap::value_parser!(u64).range(1..=1440)),
            )
            .arg(Arg::new("public_url").long("public-url"))
            .arg(
                Arg::new("break_glass_webhook")
                    .long("break-glass-webhook")
                    .env("CHARTLOG_FUZZ_BREAK_GLASS_WEBHOOK"),
            );
        let backup = storage(Command::new("backup"))
            .arg(
                Arg::new("recipient")
                    .long("recipient")
                    .action(ArgAction::Append),
            )
            .arg(Arg::new("json").long("json").action(ArgAction::SetTrue))
            .arg(Arg::new("file"));
        Command::new("chartlog")
            .arg(
                Arg::new("log")
                    .long("log")
                    .global(true)
                    .default_value("info"),
            )
            .subcommand(serve)
            .subcommand(storage(Command::new("migrate")))
            .subcommand(backup)
    })
}

fn args(list: &[&str]) -> Vec<OsString> {
    list.iter().map(OsString::from).collect()
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = KeyRing::from_env_value(text);
    // The text's words as a command line, for the layer's own `--config` handling.
    let _ = take_config_flag(text.split_whitespace().map(OsString::from).collect());

    let Ok(file) = text.parse::<toml::Table>() else {
        return;
    };
    let path = Path::new("chartlog.toml");
    for command_line in [
        args(&["chartlog", "serve"]),
        args(&[
            "chartlog",
            "--log",
            "debug",
            "serve",
            "--listen",
            "127.0.0.1:9",
        ]),
        args(&["chartlog", "migrate", "--database-url=sqlite://x"]),
        args(&["chartlog", "backup", "out.age"]),
        args(&["chartlog"]),
    ] {
        let given = command_line.len();
        let Ok(layered) = merge(command_line, &file, path, command()) else {
            continue;
        };
        assert!(layered.len() >= given, "the layer only adds arguments");
        let _ = command().clone().try_get_matches_from(layered);
    }
});
