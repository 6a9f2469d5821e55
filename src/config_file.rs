//! The configuration file layer: defaults, then a TOML file, then the environment, then the
//! command line, each overriding the one before.
//!
//! The file is named by `--config <file>` or `CHARTLOG_CONFIG`. Its keys are the subcommand's
//! long flag names, at the top level (shared by every subcommand that has the flag) or in a
//! table named after the subcommand:
//!
//! ```toml
//! data-dir = "/var/lib/chartlog"
//! [serve]
//! listen = "0.0.0.0:8443"
//! idle-timeout-minutes = 15
//! ```
//!
//! A key becomes the flag's value only when neither the command line nor the flag's
//! environment variable gives one. Secrets never come from the file (DESIGN.md): a database
//! URL carrying a password, and the webhook URL (which usually carries a token), are refused
//! with an error that says to use the environment instead.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::CommandFactory;

/// The environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "CHARTLOG_CONFIG";
/// Flags whose values are secrets: never read from the file.
const SECRET_FLAGS: [&str; 1] = ["break-glass-webhook"];

/// The command line with the file's values added for flags given neither on the command line
/// nor in the environment. Without a configuration file, `args` unchanged.
pub fn layered_args(args: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    let (args, path) = take_config_flag(args)?;
    let Some(path) = path.or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from)) else {
        return Ok(args);
    };
    let raw = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the configuration file {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&raw).with_context(|| format!("{} is not valid TOML", path.display()))?;
    merge(args, &table, &path)
}

/// Removes `--config <file>` / `--config=<file>` from the arguments: it is this layer's.
fn take_config_flag(args: Vec<OsString>) -> anyhow::Result<(Vec<OsString>, Option<PathBuf>)> {
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

fn merge(
    mut args: Vec<OsString>,
    file: &toml::Table,
    path: &Path,
) -> anyhow::Result<Vec<OsString>> {
    let command = crate::Cli::command();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    fn merged(list: &[&str], toml_text: &str) -> anyhow::Result<Vec<String>> {
        let table: toml::Table = toml::from_str(toml_text).expect("TOML");
        merge(args(list), &table, Path::new("chartlog.toml")).map(|args| {
            args.into_iter()
                .map(|arg| arg.into_string().expect("utf-8"))
                .collect()
        })
    }

    #[test]
    fn the_file_fills_flags_the_command_line_does_not_give() {
        let out = merged(
            &["chartlog", "serve", "--listen", "127.0.0.1:9000"],
            "data-dir = \"/srv/chartlog\"\n[serve]\nlisten = \"0.0.0.0:8443\"\nidle-timeout-minutes = 15\ninsecure-http = false\n",
        )
        .expect("merged");
        assert!(
            out.contains(&"--data-dir=/srv/chartlog".to_owned()),
            "{out:?}"
        );
        assert!(
            out.contains(&"--idle-timeout-minutes=15".to_owned()),
            "{out:?}"
        );
        assert!(
            !out.iter().any(|arg| arg.contains("0.0.0.0")),
            "the command line wins: {out:?}"
        );
        assert!(!out.iter().any(|arg| arg.contains("insecure")), "{out:?}");
    }

    #[test]
    fn secrets_and_unknown_settings_are_refused() {
        let secret = merged(
            &["chartlog", "serve"],
            "[serve]\nbreak-glass-webhook = \"https://hooks.example/T0KEN\"\n",
        );
        assert!(secret.is_err_and(|error| error.to_string().contains("environment")));
        let password = merged(
            &["chartlog", "migrate"],
            "database-url = \"postgres://chartlog:hunter2@db/chartlog\"\n",
        );
        let message = password.expect_err("refused").to_string();
        assert!(message.contains("CHARTLOG_DATABASE_URL"), "{message}");
        assert!(!message.contains("hunter2"), "the secret is not echoed");
        let fine = merged(
            &["chartlog", "migrate"],
            "database-url = \"postgres://chartlog@db/chartlog\"\n",
        )
        .expect("no password, no secret");
        assert!(fine.contains(&"--database-url=postgres://chartlog@db/chartlog".to_owned()));
        let unknown = merged(&["chartlog", "serve"], "[serve]\nlisten-port = 1\n");
        assert!(unknown.is_err_and(|error| error.to_string().contains("listen-port")));
    }

    #[test]
    fn config_flag_is_taken_out_of_the_arguments() {
        let (rest, path) =
            take_config_flag(args(&["chartlog", "--config", "c.toml", "serve"])).expect("parsed");
        assert_eq!(path, Some(PathBuf::from("c.toml")));
        assert_eq!(rest, args(&["chartlog", "serve"]));
        let (_, path) =
            take_config_flag(args(&["chartlog", "serve", "--config=d.toml"])).expect("parsed");
        assert_eq!(path, Some(PathBuf::from("d.toml")));
    }
}
