//! `squall kv get|put|del|ls`: reading, writing, deleting and listing keys from the shell.
//! Keys are a namespace's (`--ns`, default `default`), as its functions and `/v1/kv` name
//! them, mapped by `squall_proto::keys::user`; `--raw` names the store's own keys.
//!
//! Values are given and shown as text, by lattice type: `lww` (the bytes; `-` reads standard
//! input), `set`/`ordered-set` (adds one element), `max`/`min` (an integer), `bool`,
//! `counter` (adds an integer, 1 by default), `priority` (a value with `--priority`), `map`
//! (`FIELD=VALUE`, a last-writer-wins field), `single-causal` and `multi-causal` (a new version
//! that supersedes every version read, with `--dep KEY` naming keys it depends on).

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Args, Subcommand};
use squall_kvs::{Client, ClientConfig};
use squall_lattices::{
    BoolLattice, CausalVersion, Counter, Dependencies, LatticeType, LatticeValue, Lww, MapLattice,
    Max, Min, MultiKeyCausal, OrderedSetLattice, Priority, SetLattice, SingleKeyCausal, Timestamp,
};
use squall_proto::keys;

/// The port a storage node listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 7100;

#[derive(Debug, Args)]
pub struct KvArgs {
    /// The storage node to talk to.
    #[arg(long, global = true, env = "SQUALL_KVS_ADDR", default_value_t = format!("tcp://127.0.0.1:{DEFAULT_PORT}"))]
    addr: String,
    /// Seconds to wait for each attempt's answer.
    #[arg(long, global = true, env = "SQUALL_TIMEOUT", default_value_t = 2.0)]
    timeout: f64,
    /// Name the store's own keys, as they are, instead of the keys of a namespace (`--ns`,
    /// default `default`) that functions and `/v1/kv` see (`squall/ns/{ns}/kv/{key}`).
    #[arg(long, global = true)]
    raw: bool,
    #[command(subcommand)]
    command: KvCommand,
}

#[derive(Debug, Subcommand)]
enum KvCommand {
    /// Print a key's value (exit code 1 if the key does not exist).
    Get {
        /// The key.
        key: String,
    },
    /// Merge a value into a key.
    #[command(allow_negative_numbers = true)]
    Put {
        /// The key.
        key: String,
        /// The value, read as the lattice type says; `-` reads standard input.
        value: Option<String>,
        /// The lattice type: lww, set, ordered-set, max, min, bool, counter, priority, map,
        /// single-causal, multi-causal.
        #[arg(long = "type", short = 't', default_value = "lww")]
        lattice: LatticeType,
        /// The priority of a `priority` value (lower wins).
        #[arg(long)]
        priority: Option<f64>,
        /// For multi-causal writes: keys the new version depends on.
        #[arg(long = "dep")]
        deps: Vec<String>,
        /// Seconds until the key expires (it then reads as absent and leaves the store); a
        /// new last-writer-wins value without it never expires.
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<Duration>,
    },
    /// Delete a key (later writes start it again).
    Del {
        /// The keys.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// List the keys that start with a prefix, in order.
    Ls {
        /// The prefix (none: every key).
        #[arg(default_value = "")]
        prefix: String,
        /// The most keys listed.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        /// List the keys after this one (to page through a long listing).
        #[arg(long)]
        after: Option<String>,
    },
}

/// A time to live in seconds (fractions allowed), from a day's thousandth to ten years.
fn parse_ttl(text: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .filter(|d| *d >= Duration::from_millis(1) && *d <= Duration::from_secs(10 * 365 * 86_400))
        .ok_or_else(|| format!("{text:?} is not a number of seconds between 0.001 and 10 years"))
}

pub fn run(args: KvArgs) -> anyhow::Result<ExitCode> {
    let timeout = Duration::try_from_secs_f64(args.timeout)
        .ok()
        .filter(|t| !t.is_zero() && *t <= Duration::from_secs(86_400))
        .context("--timeout must be a number of seconds between 0 and 86400")?;
    let config = ClientConfig {
        timeout,
        ..ClientConfig::default()
    };
    let mut client = Client::connect(&args.addr, config)
        .with_context(|| format!("connecting to {}", args.addr))?;
    let namespace = crate::namespace::addressed();
    let raw = args.raw;
    // A key as the store holds it: in the namespace, unless --raw.
    let stored = |key: &str| {
        if raw {
            key.to_string()
        } else {
            keys::user(namespace, key)
        }
    };
    match args.command {
        KvCommand::Get { key } => match client.get(&stored(&key))? {
            Some(value) => {
                let mut out = std::io::stdout().lock();
                print_value(&mut out, &value, "")?;
                out.flush()?;
                Ok(ExitCode::SUCCESS)
            }
            None => {
                eprintln!("{key}: not found");
                Ok(ExitCode::from(1))
            }
        },
        KvCommand::Put {
            key,
            value,
            lattice,
            priority,
            deps,
            ttl,
        } => {
            let value = match value.as_deref() {
                Some("-") => {
                    let mut buffer = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut buffer)
                        .context("reading the value from standard input")?;
                    Some(buffer)
                }
                Some(text) => Some(text.as_bytes().to_vec()),
                None => None,
            };
            let key = stored(&key);
            let deps: Vec<String> = deps.iter().map(|d| stored(d)).collect();
            let lattice_value = build_value(&mut client, &key, lattice, value, priority, &deps)?;
            match ttl {
                Some(ttl) => client.put_expiring(&key, lattice_value, Some(ttl))?,
                None => client.put(&key, lattice_value)?,
            }
            Ok(ExitCode::SUCCESS)
        }
        KvCommand::Del { keys } => {
            for key in keys {
                client.delete(&stored(&key))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        KvCommand::Ls {
            prefix,
            limit,
            after,
        } => {
            let after = after.as_deref().map(stored);
            let (listed, next) = client.list(&stored(&prefix), after.as_deref(), limit)?;
            // Shown as the namespace names them.
            let shown = |key: &str| -> String {
                if raw {
                    return key.to_string();
                }
                keys::tenant_key(key)
                    .map_or(key, |(_, key)| key)
                    .to_string()
            };
            let mut out = std::io::stdout().lock();
            for key in &listed {
                writeln!(out, "{}", shown(key))?;
            }
            out.flush()?;
            if let Some(next) = next {
                eprintln!("(more: --after {:?})", shown(&next));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn text(value: &[u8], what: &str) -> anyhow::Result<String> {
    String::from_utf8(value.to_vec()).with_context(|| format!("{what} is not UTF-8 text"))
}

fn integer(value: Option<&[u8]>, what: &str) -> anyhow::Result<i64> {
    let Some(value) = value else {
        bail!("{what} needs a value");
    };
    let text = text(value, what)?;
    text.trim()
        .parse()
        .with_context(|| format!("{what} value {text:?} is not an integer"))
}

fn build_value(
    client: &mut Client,
    key: &str,
    lattice: LatticeType,
    value: Option<Vec<u8>>,
    priority: Option<f64>,
    deps: &[String],
) -> anyhow::Result<LatticeValue> {
    let writer = client.writer();
    let needs_value = |value: Option<Vec<u8>>| {
        value
            .map(Bytes::from)
            .with_context(|| format!("a {lattice} write needs a VALUE"))
    };
    if priority.is_some() && lattice != LatticeType::Priority {
        bail!("--priority only applies to --type priority");
    }
    if !deps.is_empty() && lattice != LatticeType::MultiCausal {
        bail!("--dep only applies to --type multi-causal");
    }
    Ok(match lattice {
        LatticeType::Lww => {
            LatticeValue::Lww(Lww::new(Timestamp::now(writer), needs_value(value)?))
        }
        LatticeType::Set => LatticeValue::Set(SetLattice::from_iter([needs_value(value)?])),
        LatticeType::OrderedSet => {
            LatticeValue::OrderedSet(OrderedSetLattice::from_iter([needs_value(value)?]))
        }
        LatticeType::Max => LatticeValue::Max(Max(integer(value.as_deref(), "max")?)),
        LatticeType::Min => LatticeValue::Min(Min(integer(value.as_deref(), "min")?)),
        LatticeType::Bool => {
            let text = text(&needs_value(value)?, "bool")?;
            match text.trim() {
                "true" | "1" => LatticeValue::Bool(BoolLattice(true)),
                "false" | "0" => LatticeValue::Bool(BoolLattice(false)),
                other => bail!("bool value {other:?} is not true or false"),
            }
        }
        LatticeType::Counter => {
            let delta = match value {
                Some(v) => integer(Some(&v), "counter")?,
                None => 1,
            };
            LatticeValue::Counter(Counter::of(writer, delta))
        }
        LatticeType::Priority => {
            let Some(priority) = priority else {
                bail!("a priority write needs --priority");
            };
            LatticeValue::Priority(Priority::new(priority.into(), needs_value(value)?))
        }
        LatticeType::Map => {
            let pair = needs_value(value)?;
            let Some(split) = pair.iter().position(|&b| b == b'=') else {
                bail!("a map write is FIELD=VALUE");
            };
            let field = pair.slice(..split);
            let field_value = pair.slice(split + 1..);
            LatticeValue::Map(MapLattice::from_iter([(
                field,
                LatticeValue::Lww(Lww::new(Timestamp::now(writer), field_value)),
            )]))
        }
        LatticeType::SingleCausal => {
            let mut clock = match client.get(key)? {
                Some(LatticeValue::SingleCausal(current)) => current.clock(),
                _ => Default::default(),
            };
            clock.increment(writer);
            LatticeValue::SingleCausal(SingleKeyCausal::with_version(
                clock,
                (),
                needs_value(value)?,
            ))
        }
        LatticeType::MultiCausal => {
            let mut clock = match client.get(key)? {
                Some(LatticeValue::MultiCausal(current)) => current.clock(),
                _ => Default::default(),
            };
            clock.increment(writer);
            let mut dependencies = Dependencies::new();
            for dep in deps {
                let dep_clock = match client.get(dep)? {
                    Some(LatticeValue::MultiCausal(v)) => v.clock(),
                    Some(LatticeValue::SingleCausal(v)) => v.clock(),
                    Some(other) => bail!(
                        "dependency {dep:?} is a {} value, not a causal one",
                        other.lattice_type()
                    ),
                    None => bail!("dependency {dep:?} does not exist"),
                };
                dependencies.insert(dep.clone(), dep_clock);
            }
            LatticeValue::MultiCausal(MultiKeyCausal::from_versions([CausalVersion {
                clock,
                dependencies,
                value: needs_value(value)?,
            }]))
        }
    })
}

/// Prints a value for a person: payloads as text (raw bytes for `lww`, so binary values can be
/// redirected to a file), collections one element per line.
fn print_value(out: &mut impl Write, value: &LatticeValue, indent: &str) -> std::io::Result<()> {
    let lossy = |b: &Bytes| String::from_utf8_lossy(b).into_owned();
    match value {
        LatticeValue::Lww(v) if indent.is_empty() => out.write_all(&v.value),
        LatticeValue::Lww(v) => writeln!(out, "{}", lossy(&v.value)),
        LatticeValue::Set(v) => {
            let mut elements: Vec<_> = v.0.iter().collect();
            elements.sort();
            elements
                .into_iter()
                .try_for_each(|e| writeln!(out, "{indent}{}", lossy(e)))
        }
        LatticeValue::OrderedSet(v) => {
            v.0.iter()
                .try_for_each(|e| writeln!(out, "{indent}{}", lossy(e)))
        }
        LatticeValue::Max(v) => writeln!(out, "{}", v.0),
        LatticeValue::Min(v) => writeln!(out, "{}", v.0),
        LatticeValue::Bool(v) => writeln!(out, "{}", v.0),
        LatticeValue::Counter(v) => writeln!(out, "{}", v.value()),
        LatticeValue::Priority(v) => writeln!(out, "{} {}", v.priority, lossy(&v.value)),
        LatticeValue::Map(v) => {
            let mut fields: Vec<_> = v.0.iter().collect();
            fields.sort_by(|a, b| a.0.cmp(b.0));
            for (field, value) in fields {
                write!(out, "{indent}{}=", lossy(field))?;
                if matches!(
                    value,
                    LatticeValue::Map(_) | LatticeValue::Set(_) | LatticeValue::OrderedSet(_)
                ) {
                    writeln!(out)?;
                }
                print_value(out, value, &format!("{indent}  "))?;
            }
            Ok(())
        }
        LatticeValue::SingleCausal(v) => v
            .values()
            .try_for_each(|e| writeln!(out, "{indent}{}", lossy(e))),
        LatticeValue::MultiCausal(v) => v
            .values()
            .try_for_each(|e| writeln!(out, "{indent}{}", lossy(e))),
    }
}
