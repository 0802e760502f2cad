//! `squall.toml`: settings for every command, as the long flag names without dashes
//! (`http-port = 9090`, `token = "..."`, `scheduler = ["tcp://10.0.0.5:7300"]`; `_` may stand
//! for `-`).
//!
//! Precedence: a flag on the command line, then its `SQUALL_*` environment variable, then the
//! file. The file is `--config PATH` (or `SQUALL_CONFIG`) if given, else `./squall.toml` if it
//! exists. One file serves every command: a top-level setting is taken by every command that
//! has the flag, and a section `[command.NAME]` holds settings for command NAME alone (nested
//! for subcommands: `[command.cluster.up]`), which win over the top level:
//!
//! ```toml
//! token = "..."                 # every command that takes --token
//! scheduler = ["tcp://10.0.0.5:7300"]
//! [command.kvs]
//! port = 7101                   # squall kvs only (the scheduler's --port is another port)
//! [command.cluster.up]
//! kvs = 3                       # a count here, where other roles take an address
//! ```
//!
//! Sections live under `command` because TOML cannot have both a key and a table of one
//! name, and several commands are also flags (`kvs`, `scheduler`, `gateway`).
//!
//! A setting no command (or no command of its section) has, or a section that is not a
//! command, is an error rather than silently ignored; so is a list for a flag that takes one
//! value.
//!
//! Each setting becomes the default value of its flag, so clap itself applies the
//! precedence (command line, then environment, then default) and checks the value as it checks
//! a flag's; nothing is written to the process environment. Defaults taken from the file are
//! not shown by `--help` for flags whose values are secret (the token).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{ArgAction, Command, CommandFactory, FromArgMatches};
use hashbrown::HashMap;

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

/// Settings as clap takes them: flag name -> values as written on the command line.
type Settings = HashMap<String, Vec<String>>;

/// `command` with the settings of the file at `path` as its flags' defaults.
fn with_settings(command: Command, path: &Path) -> anyhow::Result<Command> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", path.display()))?;
    let (settings, sections) = split_top(&table).with_context(|| path.display().to_string())?;
    check(&command, &settings, "").with_context(|| path.display().to_string())?;
    check(&command, &sections, "command.").with_context(|| path.display().to_string())?;
    Ok(apply(command, &Settings::new(), &settings, &sections))
}

/// The top-level table that holds the sections of commands.
const SECTIONS: &str = "command";

/// The file's top level: its settings, and its `[command.*]` sections.
fn split_top(table: &toml::Table) -> anyhow::Result<(toml::Table, toml::Table)> {
    let mut settings = table.clone();
    let sections = match settings.remove(SECTIONS) {
        None => toml::Table::new(),
        Some(toml::Value::Table(sections)) => sections,
        Some(_) => bail!("{SECTIONS} must be a table of sections, such as [{SECTIONS}.kvs]"),
    };
    if let Some(key) = settings.iter().find(|(_, v)| v.is_table()).map(|(k, _)| k) {
        bail!("[{key}] is not a section: sections are [{SECTIONS}.NAME], such as [{SECTIONS}.kvs]");
    }
    Ok((settings, sections))
}

/// A setting's flag name: `_` stands for `-`.
fn flag_name(key: &str) -> String {
    key.replace('_', "-")
}

/// A setting's values as text, as they would be written on the command line.
fn values(value: &toml::Value) -> Vec<String> {
    let text = |value: &toml::Value| match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    match value {
        toml::Value::Array(items) => items.iter().map(text).collect(),
        other => vec![text(other)],
    }
}

/// Checks one level of the file against `command`: settings name its flags (or its
/// subcommands'), sections name its subcommands, lists go to flags that take several values.
fn check(command: &Command, table: &toml::Table, at: &str) -> anyhow::Result<()> {
    let flags = long_flags(command);
    for (key, value) in table {
        if let toml::Value::Table(section) = value {
            let Some(sub) = command.find_subcommand(key) else {
                bail!(
                    "unknown section [{at}{key}] (sections are commands, such as [{SECTIONS}.kvs])"
                );
            };
            check(sub, section, &format!("{at}{key}."))?;
            continue;
        }
        let flag = flag_name(key);
        if flag == "config" {
            bail!("setting \"config\" cannot name another file");
        }
        let Some(multiple) = flags.get(&flag) else {
            bail!(
                "unknown setting {:?} (settings are long flag names, such as http-port)",
                format!("{at}{key}")
            );
        };
        match values(value).len() {
            0 => bail!("setting {at}{key} is an empty list"),
            1 => {}
            _ if !multiple => bail!("setting {at}{key} takes one value, not a list"),
            _ => {}
        }
    }
    Ok(())
}

/// The long flag names of `command` and all its subcommands, each with whether it takes
/// several values.
fn long_flags(command: &Command) -> HashMap<String, bool> {
    fn walk(command: &Command, names: &mut HashMap<String, bool>) {
        for arg in command.get_arguments() {
            if let Some(long) = arg.get_long() {
                let multiple = matches!(arg.get_action(), ArgAction::Append);
                *names.entry(long.to_string()).or_default() |= multiple;
            }
        }
        for sub in command.get_subcommands() {
            walk(sub, names);
        }
    }
    let mut names = HashMap::new();
    walk(command, &mut names);
    names
}

/// `command` with every flag named in `inherited` or in this level's settings (`table`)
/// defaulting to its setting, and each subcommand with its section (a table of `sections`)
/// over these.
fn apply(
    mut command: Command,
    inherited: &Settings,
    table: &toml::Table,
    sections: &toml::Table,
) -> Command {
    let mut settings = inherited.clone();
    for (key, value) in table {
        if !value.is_table() {
            settings.insert(flag_name(key), values(value));
        }
    }
    let matched: Vec<(clap::Id, Vec<String>)> = command
        .get_arguments()
        .filter_map(|arg| {
            let values = settings.get(arg.get_long()?)?;
            Some((arg.get_id().clone(), values.clone()))
        })
        .collect();
    for (id, values) in matched {
        command = command.mut_arg(id, |arg| {
            let secret = arg.is_hide_env_values_set();
            arg.default_values(values.into_iter().map(clap::builder::OsStr::from))
                .hide_default_value(secret)
        });
    }
    let subcommands: Vec<String> = command
        .get_subcommands()
        .map(|sub| sub.get_name().to_string())
        .collect();
    let empty = toml::Table::new();
    for name in subcommands {
        let section = sections
            .get(&name)
            .and_then(toml::Value::as_table)
            .unwrap_or(&empty);
        command = command.mut_subcommand(name, |sub| apply(sub, &settings, section, section));
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
            format!("{unknown:#}").contains("unknown setting \"http-prot\""),
            "{unknown:#}"
        );
        let bad = parse_with("port = \"many\"\n", &["kvs"]).expect_err("refused");
        assert!(bad.to_string().contains("many"), "{bad:#}");
        assert!(parse_with("[command.nowhere]\nport = 1\n", &["kvs"]).is_err());
        assert!(parse_with("[command.kvs]\nhttp-port = 1\n", &["kvs"]).is_err());
        assert!(parse_with("[kvs]\nport = 1\n", &["kvs"]).is_err());
        assert!(parse_with("config = \"other.toml\"\n", &["kvs"]).is_err());
        let list = parse_with("port = [1, 2]\n", &["kvs"]).expect_err("refused");
        assert!(format!("{list:#}").contains("takes one value"), "{list:#}");
        assert!(parse_with("scheduler = []\n", &["gateway"]).is_err());
    }

    #[test]
    fn sections_hold_one_command_s_settings_over_the_top_level() {
        let file = "port = 7000\nkvs = \"tcp://127.0.0.1:7100\"\n\
                    [command.kvs]\nport = 7101\n[command.cluster.up]\nkvs = 3\n";
        let Cmd::Kvs(kvs) = parse_with(file, &["kvs"]).expect("kvs").command else {
            panic!("not kvs")
        };
        assert_eq!(kvs.port, 7101);
        let router = parse_with(file, &["router"]).expect("router");
        assert!(format!("{router:?}").contains("port: 7000"), "{router:?}");
        let up = parse_with(file, &["cluster", "up"]).expect("cluster up");
        assert!(format!("{up:?}").contains("nodes: 3"), "{up:?}");
    }

    #[test]
    fn underscores_stand_for_dashes_and_secrets_stay_out_of_help() {
        let Cmd::Kvs(kvs) = parse_with("max_request_bytes = 4096\n", &["kvs"])
            .expect("parsed")
            .command
        else {
            panic!("not kvs")
        };
        assert_eq!(kvs.max_request_bytes, Some(4096));
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("squall.toml");
        std::fs::write(&path, "token = \"do-not-print-me\"\n").expect("write");
        let mut command = with_settings(Cli::command(), &path).expect("settings");
        let help = command
            .find_subcommand_mut("gateway")
            .expect("gateway")
            .render_long_help()
            .to_string();
        assert!(!help.contains("do-not-print-me"), "{help}");
    }
}
