//! The configuration file layer without the binary's command line: how a TOML file's keys
//! become flags. `chartlog`'s `config_file` module reads the file and hands it here with the
//! real command definition; the fuzz target hands arbitrary text.
//!
//! Keys are long flag names. A key at the top level applies to every command that has the
//! flag; a table named after a command (`[serve]`) holds settings of that command; a command
//! with subcommands of its own takes a table for each (`[users.add]`), and its table's plain
//! keys (`[users]`) apply to each of its subcommands that has the flag. The more specific
//! table wins: `[users.add]` over `[users]` over the top level. A key or table no command
//! knows is refused, naming it (a misspelt `data_dir` must not start a server on the default
//! data directory).
//!
//! A key becomes the flag's value only when neither the command line nor the flag's
//! environment variable gives one. Secrets never come from the file: the webhook URL (which
//! usually carries a token) and any URL carrying a password (`user:password@`, or a
//! `password`/`sslpassword` query parameter), whatever the key, are refused with an error that
//! says to use the environment instead, and the error never quotes the value.

use std::ffi::OsString;
use std::path::Path;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Arg, ArgAction, Command};

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

/// Adds the file's settings to `args` as `--flag=value` right after the (innermost)
/// subcommand, for every flag neither `args` nor the environment gives. The whole file is
/// checked first, whichever command runs: an unknown key or table, or a secret, is an error.
pub fn merge(
    mut args: Vec<OsString>,
    file: &toml::Table,
    path: &Path,
    command: &Command,
) -> anyhow::Result<Vec<OsString>> {
    check_table(file, command, command, &[], path)?;

    // The subcommand is the first argument that names one; flags of the level above come
    // first. A command with subcommands of its own is followed down to the one that runs.
    let mut chain: Vec<&Command> = Vec::new();
    let mut position = 0;
    let mut current = command;
    while current.has_subcommands() {
        let found = args
            .iter()
            .enumerate()
            .skip(position + 1)
            .take_while(|(_, arg)| *arg != "--")
            .find_map(|(at, arg)| {
                let name = arg.to_str()?;
                current.find_subcommand(name).map(|sub| (at, sub))
            });
        let Some((at, sub)) = found else {
            // No command to run (or only a parent of some): clap says what is missing.
            return Ok(args);
        };
        chain.push(sub);
        position = at;
        current = sub;
    }
    let Some(&leaf) = chain.last() else {
        return Ok(args);
    };

    // Least specific first, so a later table's value replaces an earlier one.
    let mut layers: Vec<&toml::Table> = vec![file];
    let mut table = Some(file);
    for sub in &chain {
        table = table
            .and_then(|table| table.get(sub.get_name()))
            .and_then(toml::Value::as_table);
        match table {
            Some(table) => layers.push(table),
            None => break,
        }
    }
    let mut chosen: Vec<(&str, &Arg, &toml::Value)> = Vec::new();
    for layer in layers {
        for (key, value) in layer.iter().filter(|(_, value)| !value.is_table()) {
            // Checked above: a key this command lacks belongs to another command.
            let Some(flag) = find_flag(leaf, command, key) else {
                continue;
            };
            match chosen
                .iter_mut()
                .find(|(chosen, _, _)| *chosen == key.as_str())
            {
                Some(entry) => entry.2 = value,
                None => chosen.push((key.as_str(), flag, value)),
            }
        }
    }

    let mut added: Vec<OsString> = Vec::new();
    for (key, flag, value) in chosen {
        let from_environment = flag
            .get_env()
            .is_some_and(|env| std::env::var_os(env).is_some());
        if from_environment || given_on_command_line(&args, flag) {
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
            // A flag given once per value (`--trusted-proxy`): a list gives it once per item.
            toml::Value::Array(items) if matches!(flag.get_action(), ArgAction::Append) => {
                for item in items {
                    let item = match item {
                        toml::Value::String(text) => text.clone(),
                        toml::Value::Integer(number) => number.to_string(),
                        _ => bail!(
                            "{}: the items of {key} must be strings or numbers",
                            path.display()
                        ),
                    };
                    added.push(format!("--{key}={item}").into());
                }
                continue;
            }
            toml::Value::Array(_) => bail!("{}: {key} takes one value, not a list", path.display()),
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

/// Whether the command line (up to `--`) gives `flag`, as `--long`, `--long=...` or `-s...`.
fn given_on_command_line(args: &[OsString], flag: &Arg) -> bool {
    args.iter()
        .skip(1)
        .filter_map(|arg| arg.to_str())
        .take_while(|arg| *arg != "--")
        .any(|arg| match arg.strip_prefix("--") {
            Some(long) => flag.get_long() == Some(long.split('=').next().unwrap_or(long)),
            None => arg
                .strip_prefix('-')
                .and_then(|short| short.chars().next())
                .is_some_and(|short| flag.get_short() == Some(short)),
        })
}

/// The flag `key` of `leaf`, or a global flag of the top level (`log`), that a file may set.
fn find_flag<'a>(leaf: &'a Command, root: &'a Command, key: &str) -> Option<&'a Arg> {
    let settable = |arg: &&Arg| {
        arg.get_long() == Some(key)
            && key != "config"
            && !matches!(
                arg.get_action(),
                ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
            )
    };
    leaf.get_arguments().find(settable).or_else(|| {
        root.get_arguments()
            .filter(|arg| arg.is_global_set())
            .find(settable)
    })
}

/// Every command under `command` (itself included) that runs: those without subcommands.
fn leaves(command: &Command) -> Vec<&Command> {
    if command.has_subcommands() {
        command.get_subcommands().flat_map(leaves).collect()
    } else {
        vec![command]
    }
}

/// The flag `key` of any command under `command` (or a global one).
fn find_flag_under<'a>(command: &'a Command, root: &'a Command, key: &str) -> Option<&'a Arg> {
    leaves(command)
        .into_iter()
        .find_map(|leaf| find_flag(leaf, root, key))
}

/// Checks one table of the file: the top level (`names` empty) or the table of the command
/// `names` leads to (`command`). Each key must be a flag of some command under it, each
/// table a subcommand of it, and no value a secret.
fn check_table(
    table: &toml::Table,
    command: &Command,
    root: &Command,
    names: &[&str],
    path: &Path,
) -> anyhow::Result<()> {
    let here = if names.is_empty() {
        "the top level".to_owned()
    } else {
        format!("[{}]", names.join("."))
    };
    for (key, value) in table {
        if let toml::Value::Table(inner) = value {
            let parent = names.join(".");
            let qualified = |name: &str| match parent.as_str() {
                "" => format!("[{name}]"),
                parent => format!("[{parent}.{name}]"),
            };
            let Some(sub) = command.find_subcommand(key) else {
                let known: Vec<&str> = command.get_subcommands().map(Command::get_name).collect();
                let close = suggestion(key, &known).map_or_else(String::new, |close| {
                    format!(" (did you mean {}?)", qualified(close))
                });
                let usage = if known.is_empty() {
                    format!("chartlog {} has no subcommands", names.join(" "))
                } else {
                    let tables: Vec<String> = known.iter().map(|name| qualified(name)).collect();
                    format!("tables are named after the commands: {}", tables.join(", "))
                };
                bail!(
                    "{}: {} is not a chartlog command{close}; {usage}",
                    path.display(),
                    qualified(key),
                );
            };
            let mut names = names.to_vec();
            names.push(sub.get_name());
            check_table(inner, sub, root, &names, path)?;
            continue;
        }
        if key == "config" {
            bail!(
                "{}: config (in {here}) cannot be set inside the configuration file",
                path.display()
            );
        }
        if find_flag_under(command, root, key).is_none() {
            let mut known: Vec<&str> = leaves(command)
                .into_iter()
                .flat_map(Command::get_arguments)
                .chain(root.get_arguments().filter(|arg| arg.is_global_set()))
                .filter_map(Arg::get_long)
                .filter(|long| *long != "config")
                .collect();
            known.sort_unstable();
            known.dedup();
            let close = suggestion(key, &known)
                .map_or_else(String::new, |close| format!("; did you mean {close:?}?"));
            let help = if names.is_empty() {
                "keys are the long flag names of chartlog's commands".to_owned()
            } else {
                format!("see chartlog {} --help", names.join(" "))
            };
            bail!(
                "{}: {here} has no setting {key:?}{close} ({help})",
                path.display()
            );
        }
        let holds_password = match value {
            toml::Value::String(text) => may_hold_password(text),
            toml::Value::Array(items) => items
                .iter()
                .filter_map(toml::Value::as_str)
                .any(may_hold_password),
            _ => false,
        };
        if SECRET_FLAGS.contains(&key.as_str()) || holds_password {
            let environment = leaves(command)
                .into_iter()
                .filter_map(|leaf| find_flag(leaf, root, key))
                .find_map(|flag| flag.get_env())
                .and_then(|env| env.to_str());
            let instead = match environment {
                Some(env) => format!("set {env} in the environment instead"),
                None => "leave the password out of it".to_owned(),
            };
            let database = if key.contains("database") || key == "erasures-from" {
                " (or leave the password out of the URL and give it to PostgreSQL's client in \
                 PGPASSWORD or a .pgpass file)"
            } else {
                ""
            };
            bail!(
                "{}: {key} (in {here}) holds a secret and is not read from the configuration \
                 file; {instead}{database}",
                path.display()
            );
        }
        if !matches!(
            value,
            toml::Value::String(_)
                | toml::Value::Integer(_)
                | toml::Value::Float(_)
                | toml::Value::Boolean(_)
                | toml::Value::Array(_)
        ) {
            bail!(
                "{}: {key} (in {here}) must be a string, a number, a boolean or a list",
                path.display()
            );
        }
    }
    Ok(())
}

/// The known name closest to `key` (a `_` for a `-`, a letter or two off), if any is close.
fn suggestion<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    let normalized = key.to_ascii_lowercase().replace('_', "-");
    if let Some(exact) = known.iter().find(|name| **name == normalized) {
        return Some(exact);
    }
    let limit = if normalized.chars().count() < 5 { 1 } else { 2 };
    known
        .iter()
        .map(|name| (edit_distance(&normalized, name), *name))
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, name)| name)
}

/// Levenshtein distance (insertions, deletions, substitutions), for suggestions only.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = Vec::with_capacity(b.len() + 1);
        current.push(i + 1);
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

/// Whether `text` is (or holds) a URL that may carry a password: user info with one
/// (`scheme://user:password@host`), or a query parameter naming one (`?password=`,
/// `sslpassword=`, percent-encoded or not). Errs towards yes: a refusal costs a retry, a
/// password in a file or a log costs the password.
pub fn may_hold_password(text: &str) -> bool {
    let Some((_, rest)) = text.split_once("://") else {
        return query_names_password(text);
    };
    let before_query = rest.split(['?', '#']).next().unwrap_or(rest);
    let user_info_has_password = before_query
        .rsplit_once('@')
        .is_some_and(|(user_info, _)| user_info.contains(':'));
    user_info_has_password || query_names_password(rest)
}

/// Whether a `?key=value&...` part of `text` names a password.
fn query_names_password(text: &str) -> bool {
    !password_parameters(text).is_empty()
}

/// The names (decoded, lower case) of the query parameters of `text` that name a password,
/// e.g. `password` and `sslpassword`. Names only: never a value.
pub fn password_parameters(text: &str) -> Vec<String> {
    let Some((_, query)) = text.split_once('?') else {
        return Vec::new();
    };
    query
        .split(['&', ';', '#'])
        .map(|pair| pair.split('=').next().unwrap_or(pair))
        .map(|name| percent_decode(name).to_ascii_lowercase())
        .filter(|name| {
            name.contains("password") || name.contains("passwd") || name == "pwd" || name == "pass"
        })
        .collect()
}

/// `%XX` escapes decoded (an invalid one kept as it is); for matching names only.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let escaped = (bytes[at] == b'%')
            .then(|| bytes.get(at + 1..at + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                at += 3;
            }
            None => {
                out.push(bytes[at]);
                at += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_found_in_user_info_and_in_the_query() {
        for url in [
            "postgres://u:s3cret@db/x",
            "postgresql+ssl://u:s3cret@db/x",
            "postgres://u@db/x?password=s3cret",
            "postgres://u@db/x?sslmode=require&sslpassword=s3cret",
            "postgres://u@db/x?pass%77ord=s3cret",
            "postgres://u@db/x?PASSWORD=s3cret",
            "postgres://u:@db/x",
        ] {
            assert!(may_hold_password(url), "{url}");
        }
        for url in [
            "postgres://u@db/x",
            "postgres://db/x?sslmode=require",
            "postgres://u@db/x?user=a@b",
            "sqlite:/var/lib/chartlog/chartlog.db",
            "/srv/other/keys/erasure-ledger.jsonl",
            "0.0.0.0:8443",
        ] {
            assert!(!may_hold_password(url), "{url}");
        }
    }

    #[test]
    fn suggestions_catch_underscores_and_small_typos() {
        let known = ["data-dir", "database-url", "listen"];
        assert_eq!(suggestion("data_dir", &known), Some("data-dir"));
        assert_eq!(suggestion("databse-url", &known), Some("database-url"));
        assert_eq!(suggestion("colour", &known), None);
        assert_eq!(suggestion("server", &["serve", "users"]), Some("serve"));
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
