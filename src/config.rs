//! `squall.toml`: settings for every command, as the long flag names without dashes
//! (`http-port = 9090`, `token = "..."`, `scheduler = ["tcp://10.0.0.5:7300"]`).
//!
//! Precedence: a flag on the command line, then its `SQUALL_*` environment variable, then the
//! file. The file is `--config PATH` (or `SQUALL_CONFIG`) if given, else `./squall.toml` if it
//! exists. Each setting is handed to clap as the environment variable of its flag when that
//! variable is not already set, so one mechanism serves both, and a setting no flag has is an
//! error rather than silently ignored.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::CommandFactory;
use hashbrown::HashSet;

/// Reads the config file named by `args` (or the environment, or `./squall.toml`), and sets
/// the environment variables of the flags it sets. Call before parsing, before any thread
/// starts.
pub fn apply(args: &[OsString]) -> anyhow::Result<()> {
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
    let path = match named {
        Some(path) => path,
        None => {
            let default = PathBuf::from("squall.toml");
            if !default.exists() {
                return Ok(());
            }
            default
        }
    };
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", path.display()))?;
    let known = env_names();
    for (key, value) in table {
        let env = format!("SQUALL_{}", key.to_uppercase().replace('-', "_"));
        if !known.contains(&env) || env == "SQUALL_CONFIG" {
            bail!(
                "{}: unknown setting {key:?} (settings are long flag names, such as http-port)",
                path.display()
            );
        }
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Array(items) => items
                .iter()
                .map(|i| match i {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
            toml::Value::Table(_) => bail!("{}: setting {key:?} cannot be a table", path.display()),
            other => other.to_string(),
        };
        if std::env::var_os(&env).is_none() {
            std::env::set_var(&env, text);
        }
    }
    Ok(())
}

/// The environment variables of every flag of every command.
fn env_names() -> HashSet<String> {
    fn walk(command: &clap::Command, names: &mut HashSet<String>) {
        for arg in command.get_arguments() {
            if let Some(env) = arg.get_env() {
                names.insert(env.to_string_lossy().into_owned());
            }
        }
        for sub in command.get_subcommands() {
            walk(sub, names);
        }
    }
    let mut names = HashSet::new();
    walk(&crate::Cli::command(), &mut names);
    names
}
