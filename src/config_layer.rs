//! The configuration file layer without the binary's command line: how a TOML file's keys
//! become flags. `chartlog`'s `config_file` module reads the file and hands it here with the
//! real command definition; the fuzz target hands arbitrary text.
//!
//! A key becomes the flag's value only when neither the command line nor the flag's
//! environment variable gives one. Secrets never come from the file: a database URL carrying
//! a password, and the webhook URL (which usually carries a token), are refused with an error
//! that says to use the environment instead, and the error never quotes the value.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Command;

/// Flags whose values are secrets: never read from the file.
const SECRET_FLAGS: [&str; 1] = ["break-glass-webhook"];

/// Removes `--config <file>` / `--config=<file>` from the arguments: it is this layer's.
pub fn take_config_flag(args: Vec<OsString>) -> anyhow::Result<(Vec<OsString>, Option<PathBuf>)> {
    let mut kept = Vec::with_capacity(args.len());
    let mut path = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "--config" {
            let Some(value) = args.next() else {
                bail!("--config needs a file");
            };
            path = Some(PathBuf::from(value));
        } else if let Some(value) = arg.to_str().and_then(|a| a.strip_prefix("--config=")) {
            path = Some(PathBuf::from(value));
        } else {
            kept.push(arg);
        }
    }
    Ok((kept, path))
}

/// Parses the file's text and merges it into `args`, for the subcommands of `command` (the
/// binary's whole command line definition). `path` only names the file in errors.
pub fn layer(
    args: Vec<OsString>,
    text: &str,
    path: &Path,
    command: &Command,
) -> anyhow::Result<Vec<OsString>> {
    let table: toml::Table =
        toml::from_str(text).with_context(|| format!("{} is not valid TOML", path.display()))?;
    merge(args, &table, path, command)
}

/// Adds the file's settings to `args` as `--flag=value` right after the subcommand, for every
/// flag neither `args` nor the environment gives.
pub fn merge(
    mut args: Vec<OsString>,
    file: &toml::Table,
    path: &Path,
    command: &Command,
) -> anyhow::Result<Vec<OsString>> {
    // The subcommand is the first argument that names one; flags of the top level come first.
    let Some((position, subcommand)) = args.iter().enumerate().skip(1).find_map(|(at, arg)| {
        let name = arg.to_str()?;
        command.find_subcommand(name).map(|sub| (at, sub.clone()))
    }) else {
        return Ok(args);
    };
    let name = subcommand.get_name().to_owned();
    let section = file.get(&name).and_then(toml::Value::as_table);
    let given: Vec<String> = args[position + 1..]
        .iter()
        .filter_map(|arg| arg.to_str())
        .filter_map(|arg| arg.strip_prefix("--"))
        .map(|flag| flag.split('=').next().unwrap_or(flag).to_owned())
        .collect();

    let mut added: Vec<OsString> = Vec::new();
    let keys = file
        .iter()
        .filter(|(_, value)| !value.is_table())
        .chain(section.into_iter().flat_map(|table| table.iter()));
    for (key, value) in keys {
        let Some(flag) = subcommand
            .get_arguments()
            .find(|arg| arg.get_long() == Some(key.as_str()))
        else {
            // A top-level key another subcommand uses is fine; one in this subcommand's own
            // table must be one of its flags.
            if section.is_some_and(|table| table.contains_key(key)) {
                bail!(
                    "{}: [{name}] has no setting {key:?} (see chartlog {name} --help)",
                    path.display()
                );
            }
            continue;
        };
        if SECRET_FLAGS.contains(&key.as_str())
            || (key == "database-url" && url_has_password(value.as_str().unwrap_or_default()))
        {
            bail!(
                "{}: {key} holds a secret and is not read from the configuration file; set {} in \
                 the environment instead",
                path.display(),
                flag.get_env()
                    .and_then(|env| env.to_str())
                    .unwrap_or("its environment variable")
            );
        }
        let from_environment = flag
            .get_env()
            .is_some_and(|env| std::env::var_os(env).is_some());
        if given.iter().any(|given| given == key) || from_environment {
            continue;
        }
        let value = match value {
            toml::Value::String(text) => text.clone(),
            toml::Value::Integer(number) => number.to_string(),
            toml::Value::Float(number) => number.to_string(),
            toml::Value::Boolean(true) => {
                added.push(format!("--{key}").into());
                continue;
            }
            toml::Value::Boolean(false) => continue,
            _ => bail!(
                "{}: {key} must be a string, a number or a boolean",
                path.display()
            ),
        };
        added.push(format!("--{key}={value}").into());
    }
    // After the subcommand, before anything positional the user gave.
    let insert_at = position + 1;
    args.splice(insert_at..insert_at, added);
    Ok(args)
}

/// Whether a URL's user info carries a password (`scheme://user:password@host`).
fn url_has_password(url: &str) -> bool {
    url.split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .is_some_and(|(user_info, _)| user_info.contains(':'))
}
