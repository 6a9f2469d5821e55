//! The configuration file layer: defaults, then a TOML file, then the environment, then the
//! command line, each overriding the one before.
//!
//! The file is named by `--config <file>` or `CHARTLOG_CONFIG`. Its keys are the commands'
//! long flag names: at the top level (shared by every command that has the flag), in a table
//! named after a command, or, for a command with subcommands (`users`, `keys`, `deid`), in a
//! table of the subcommand, or in the command's table for all its subcommands that have the
//! flag. The more specific table wins:
//!
//! ```toml
//! data-dir = "/var/lib/chartlog"
//! [serve]
//! listen = "0.0.0.0:8443"
//! idle-timeout-minutes = 15
//! [users]                  # every `chartlog users ...`
//! database-url = "postgres://chartlog@db/chartlog"
//! [keys.rotate-kek]        # `chartlog keys rotate-kek` only
//! retire-old = true
//! ```
//!
//! A key or table no command knows is an error that names it (with the closest known name),
//! whichever command runs: a misspelt key must not leave a server on the default data
//! directory. A key becomes the flag's value only when neither the command line nor the flag's
//! environment variable gives one. Secrets never come from the file (DESIGN.md): any URL
//! carrying a password (in its user info or as a `password`/`sslpassword` parameter), whatever
//! the key, and the webhook URL (which usually carries a token), are refused with an error
//! that says to use the environment instead.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context;
use chartlog::config_layer::{layer, take_config_flag};
use clap::CommandFactory;

/// The environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "CHARTLOG_CONFIG";

/// The command line with the file's values added for flags given neither on the command line
/// nor in the environment. Without a configuration file, `args` unchanged.
pub fn layered_args(args: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    let (args, path) = take_config_flag(args)?;
    let Some(path) = path.or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from)) else {
        return Ok(args);
    };
    let raw = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the configuration file {}", path.display()))?;
    layer(args, &raw, &path, &crate::Cli::command())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use chartlog::config_layer::merge;

    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    fn merged(list: &[&str], toml_text: &str) -> anyhow::Result<Vec<String>> {
        let table: toml::Table = toml::from_str(toml_text).expect("TOML");
        merge(
            args(list),
            &table,
            Path::new("chartlog.toml"),
            &crate::Cli::command(),
        )
        .map(|args| {
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
    fn a_list_gives_a_repeatable_flag_once_per_item_and_nothing_else_takes_one() {
        let out = merged(
            &["chartlog", "serve"],
            "[serve]\ntrusted-proxy = [\"10.0.0.0/8\", \"2001:db8::/48\"]\n",
        )
        .expect("merged");
        assert!(
            out.contains(&"--trusted-proxy=10.0.0.0/8".to_owned()),
            "{out:?}"
        );
        assert!(
            out.contains(&"--trusted-proxy=2001:db8::/48".to_owned()),
            "{out:?}"
        );
        let single = merged(
            &["chartlog", "serve"],
            "[serve]\nlisten = [\"0.0.0.0:1\"]\n",
        );
        let message = single.expect_err("refused").to_string();
        assert!(message.contains("listen takes one value"), "{message}");
        let nested = merged(
            &["chartlog", "serve"],
            "[serve]\ntrusted-proxy = [[\"10.0.0.0/8\"]]\n",
        );
        let message = nested.expect_err("refused").to_string();
        assert!(message.contains("strings or numbers"), "{message}");
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
    fn nested_commands_take_top_level_keys_and_their_own_tables() {
        // `users`, `keys` and `deid` have no flags of their own: their subcommands do.
        let out = merged(
            &["chartlog", "users", "add", "--username", "dr.grey"],
            "data-dir = \"/srv/chartlog\"\n",
        )
        .expect("merged");
        assert_eq!(
            out,
            [
                "chartlog",
                "users",
                "add",
                "--data-dir=/srv/chartlog",
                "--username",
                "dr.grey"
            ],
            "the top-level key reaches `users add`"
        );
        let text = "data-dir = \"/srv/top\"\n\
                    [users]\ndata-dir = \"/srv/users\"\n\
                    [users.add]\ndata-dir = \"/srv/users-add\"\nrole = \"nurse\"\n\
                    [keys.rotate-kek]\nretire-old = true\n\
                    [deid.export]\nformat = \"csv\"\n";
        let add = merged(&["chartlog", "users", "add"], text).expect("merged");
        assert!(
            add.contains(&"--data-dir=/srv/users-add".to_owned()),
            "{add:?}"
        );
        assert!(add.contains(&"--role=nurse".to_owned()), "{add:?}");
        assert_eq!(
            add.iter()
                .filter(|arg| arg.starts_with("--data-dir"))
                .count(),
            1,
            "the most specific table wins: {add:?}"
        );
        let list = merged(&["chartlog", "users", "list"], text).expect("merged");
        assert_eq!(list, ["chartlog", "users", "list", "--data-dir=/srv/users"]);
        let rotate = merged(&["chartlog", "keys", "rotate-kek"], text).expect("merged");
        assert!(rotate.contains(&"--retire-old".to_owned()), "{rotate:?}");
        assert!(
            rotate.contains(&"--data-dir=/srv/top".to_owned()),
            "{rotate:?}"
        );
        let export = merged(
            &["chartlog", "--log", "warn", "deid", "export", "patients"],
            text,
        )
        .expect("merged");
        assert_eq!(
            export,
            [
                "chartlog",
                "--log",
                "warn",
                "deid",
                "export",
                "--data-dir=/srv/top",
                "--format=csv",
                "patients"
            ]
        );
        let unknown = merged(&["chartlog", "serve"], "[users.add]\nlisten = \"x\"\n")
            .expect_err("listen is not a setting of users add")
            .to_string();
        assert!(
            unknown.contains("[users.add]") && unknown.contains("listen"),
            "{unknown}"
        );
        let unknown = merged(&["chartlog", "serve"], "[users.ad]\nrole = \"nurse\"\n")
            .expect_err("no such command")
            .to_string();
        assert!(unknown.contains("[users.add]"), "suggested: {unknown}");
    }

    #[test]
    fn keys_and_tables_no_command_knows_are_refused_by_name() {
        for command in [&["chartlog", "serve"][..], &["chartlog", "users", "list"]] {
            let misspelt = merged(command, "data_dir = \"/srv/chartlog\"\n")
                .expect_err("data_dir is no flag")
                .to_string();
            assert!(misspelt.contains("\"data_dir\""), "{misspelt}");
            assert!(misspelt.contains("\"data-dir\""), "suggested: {misspelt}");
        }
        let section = merged(
            &["chartlog", "serve"],
            "[server]\nlisten = \"0.0.0.0:8443\"\n",
        )
        .expect_err("server is no command")
        .to_string();
        assert!(section.contains("[server]"), "{section}");
        assert!(section.contains("[serve]"), "suggested: {section}");
        let nonsense = merged(&["chartlog", "migrate"], "colour = \"blue\"\n")
            .expect_err("no command has --colour")
            .to_string();
        assert!(nonsense.contains("colour"), "{nonsense}");
        // A key another command has is fine where this one lacks it, and the global --log
        // is a setting too.
        let out = merged(
            &["chartlog", "migrate"],
            "listen = \"0.0.0.0:8443\"\nlog = \"warn\"\n",
        )
        .expect("merged");
        assert_eq!(out, ["chartlog", "migrate", "--log=warn"]);
        let given = merged(
            &["chartlog", "--log", "debug", "migrate"],
            "log = \"warn\"\n",
        )
        .expect("merged");
        assert_eq!(
            given,
            ["chartlog", "--log", "debug", "migrate"],
            "the command line wins"
        );
    }

    #[test]
    fn a_password_in_any_url_is_refused_without_being_echoed() {
        for (text, variable) in [
            (
                "database-url = \"postgres://u@db/x?password=s3cret\"\n",
                "CHARTLOG_DATABASE_URL",
            ),
            (
                "[migrate]\ndatabase-url = \"postgres://u@db/x?sslmode=require&sslpassword=s3cret\"\n",
                "CHARTLOG_DATABASE_URL",
            ),
            (
                "[restore]\nerasures-from = \"postgres://u:s3cret@db/live\"\n",
                "CHARTLOG_ERASURES_FROM",
            ),
            (
                "[users.add]\ndatabase-url = \"postgres://u:s3cret@db/x\"\n",
                "CHARTLOG_DATABASE_URL",
            ),
        ] {
            // Refused whichever command runs: the file holds the secret either way.
            let message = merged(&["chartlog", "serve"], text)
                .expect_err("a password is refused")
                .to_string();
            assert!(message.contains(variable), "{message}");
            assert!(
                !message.contains("s3cret"),
                "the secret is not echoed: {message}"
            );
        }
        let fine = merged(
            &["chartlog", "restore", "b.backup"],
            "[restore]\nerasures-from = \"postgres://u@db/live?sslmode=require\"\n",
        )
        .expect("no password");
        assert!(
            fine.contains(&"--erasures-from=postgres://u@db/live?sslmode=require".to_owned()),
            "{fine:?}"
        );
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
