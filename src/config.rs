//! `squall.toml`: settings for every command, as the long flag names without dashes
//! (`http-port = 9090`, `token = "..."`, `scheduler = ["tcp://10.0.0.5:7300"]`).
//!
//! Precedence: a flag on the command line, then its `SQUALL_*` environment variable, then the
//! file. The file is `--config PATH` (or `SQUALL_CONFIG`) if given, else `./squall.toml` if it
//! exists. One file serves every command: each takes the settings its own flags name and
//! leaves the others (a gateway's `http-port` means nothing to `squall fn ls`), and a setting
//! no command has is an error rather than silently ignored.
//!
//! Each setting becomes the default value of its flag, so clap itself applies the
//! precedence (command line, then environment, then default) and checks the value as it checks
//! a flag's; nothing is written to the process environment.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Command, CommandFactory, FromArgMatches};
use hashbrown::{HashMap, HashSet};

use crate::Cli;

/// Parses the command line with the settings of the config file named by `args` (or
/// `SQUALL_CONFIG`, or `./squall.toml`) as the flags' defaults. Parse errors and `--help`
/// exit the process, as clap's own parsing does.
pub fn parse(args: &[OsString]) -> anyhow::Result<Cli> {
    let command = match file_of(args) {
        Some(path) => with_settings(Cli::command(), &path)?,
        None => Cli::command(),
    };
    let matches = command.get_matches_from(args);
    Ok(Cli::from_arg_matches(&matches)?)
}

/// The config file `args` or the environment name, or `./squall.toml` if it exists.
fn file_of(args: &[OsString]) -> Option<PathBuf> {
    let named = args
        .iter()
        .enumerate()
        .find_map(|(i, a)| {
            let a = a.to_str()?;
            if a == "--config" {
                args.get(i + 1).map(PathBuf::from)
            } else {
                a.strip_prefix("--config=").map(PathBuf::from)
            }
        })
        .or_else(|| std::env::var_os("SQUALL_CONFIG").map(PathBuf::from));
    named.or_else(|| {
        let default = PathBuf::from("squall.toml");
        default.exists().then_some(default)
    })
}

/// `command` with the settings of the file at `path` as its flags' defaults.
fn with_settings(command: Command, path: &Path) -> anyhow::Result<Command> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", path.display()))?;
    let settings = settings(&table).with_context(|| path.display().to_string())?;
    let known = long_flags(&command);
    if let Some(unknown) = settings.keys().find(|key| !known.contains(*key)) {
        bail!(
            "{}: unknown setting {unknown:?} (settings are long flag names, such as http-port)",
            path.display()
        );
    }
    Ok(apply(command, &settings))
}

/// Each setting's values as text, as they would be written on the command line.
fn settings(table: &toml::Table) -> anyhow::Result<HashMap<String, Vec<String>>> {
    let text = |value: &toml::Value| match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut settings = HashMap::new();
    for (key, value) in table {
        if key == "config" {
            bail!("setting \"config\" cannot name another file");
        }
        let values = match value {
            toml::Value::Array(items) => items.iter().map(text).collect(),
            toml::Value::Table(_) => bail!("setting {key:?} cannot be a table"),
            other => vec![text(other)],
        };
        settings.insert(key.clone(), values);
    }
    Ok(settings)
}

/// The long flag names of `command` and all its subcommands.
fn long_flags(command: &Command) -> HashSet<String> {
    fn walk(command: &Command, names: &mut HashSet<String>) {
        for arg in command.get_arguments() {
            if let Some(long) = arg.get_long() {
                names.insert(long.to_string());
            }
        }
        for sub in command.get_subcommands() {
            walk(sub, names);
        }
    }
    let mut names = HashSet::new();
    walk(command, &mut names);
    names
}

/// `command` with every flag named in `settings` defaulting to its setting, in every
/// subcommand that has it.
fn apply(mut command: Command, settings: &HashMap<String, Vec<String>>) -> Command {
    let matched: Vec<(clap::Id, Vec<String>)> = command
        .get_arguments()
        .filter_map(|arg| {
            let values = settings.get(arg.get_long()?)?;
            Some((arg.get_id().clone(), values.clone()))
        })
        .collect();
    for (id, values) in matched {
        command = command.mut_arg(id, |arg| {
            arg.default_values(values.into_iter().map(clap::builder::OsStr::from))
        });
    }
    let subcommands: Vec<String> = command
        .get_subcommands()
        .map(|sub| sub.get_name().to_string())
        .collect();
    for name in subcommands {
        command = command.mut_subcommand(name, |sub| apply(sub, settings));
    }
    command
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Command as Cmd;

    fn parse_with(file: &str, args: &[&str]) -> anyhow::Result<Cli> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("squall.toml");
        std::fs::write(&path, file).expect("write");
        let command = with_settings(Cli::command(), &path)?;
        let argv: Vec<OsString> = std::iter::once("squall")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        let matches = command.try_get_matches_from(argv)?;
        Ok(Cli::from_arg_matches(&matches)?)
    }

    #[test]
    fn settings_whose_variables_are_named_otherwise_are_taken() {
        // `port` is SQUALL_KVS_PORT and `fsync` SQUALL_KVS_FSYNC: both were refused once.
        let cli = parse_with("fsync = \"never\"\nport = 17901\n", &["kvs"]).expect("parsed");
        let Cmd::Kvs(kvs) = cli.command else {
            panic!("not kvs")
        };
        assert_eq!(kvs.port, 17901);
        assert_eq!(kvs.fsync, squall_kvs::FsyncPolicy::Never);
    }

    #[test]
    fn the_command_line_beats_the_file() {
        let cli = parse_with("port = 17901\n", &["kvs", "--port", "17950"]).expect("parsed");
        let Cmd::Kvs(kvs) = cli.command else {
            panic!("not kvs")
        };
        assert_eq!(kvs.port, 17950);
    }

    #[test]
    fn lists_and_other_commands_settings_are_taken() {
        let file = "scheduler = [\"tcp://127.0.0.1:7301\", \"tcp://127.0.0.1:7302\"]\nport = 1\n";
        let cli = parse_with(file, &["gateway"]).expect("parsed");
        let Cmd::Gateway(gateway) = cli.command else {
            panic!("not gateway")
        };
        let shown = format!("{gateway:?}");
        assert!(
            shown.contains(r#"schedulers: ["tcp://127.0.0.1:7301", "tcp://127.0.0.1:7302"]"#),
            "{shown}"
        );
    }

    #[test]
    fn unknown_settings_and_bad_values_are_refused() {
        let unknown = parse_with("http-prot = 9090\n", &["kvs"]).expect_err("refused");
        assert!(
            unknown
                .to_string()
                .contains("unknown setting \"http-prot\""),
            "{unknown}"
        );
        let bad = parse_with("port = \"many\"\n", &["kvs"]).expect_err("refused");
        assert!(bad.to_string().contains("many"), "{bad:#}");
        assert!(parse_with("http-port = { a = 1 }\n", &["kvs"]).is_err());
        assert!(parse_with("config = \"other.toml\"\n", &["kvs"]).is_err());
    }
}
