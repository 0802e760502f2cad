//! `squall key`: make, list and revoke API keys through a gateway (with an `admin` key or
//! the gateway's token). A key is printed once, when made: the store keeps only its hash.
//! `squall audit`: the audit trail of administrative requests, newest first.
//! `squall namespace`: create, list and delete namespaces, and set their quotas (as admin);
//! what a namespace stores (with a `read` key of it).

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::http::{json, print_json, request, request_in, send, Connection};

#[derive(Debug, Args)]
pub struct KeyArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: KeyCommand,
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Make a key; prints it (once: keep it) and its record as JSON on stderr.
    Create {
        /// What the key is for.
        name: String,
        /// What it may do: read, invoke, deploy or admin (each allows what the ones before
        /// it allow).
        #[arg(long)]
        role: String,
        /// Seconds until it stops working (default: never).
        #[arg(long)]
        expires_in_s: Option<u64>,
    },
    /// List keys: id, role, state, name (never their secrets).
    Ls,
    /// Revoke a key: it stops working within a second on every gateway.
    Revoke {
        /// The key's id (`squall key ls`).
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct NamespaceArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: NamespaceCommand,
}

#[derive(Debug, Subcommand)]
enum NamespaceCommand {
    /// Create a namespace.
    Create {
        /// Its name (letters, digits, `-`, `_`, `.`).
        name: String,
    },
    /// List namespaces: name and when each was created.
    Ls,
    /// Delete a namespace and everything it owns: functions, models, DAGs, triggers, calls,
    /// results, records and keys are deleted, its API keys revoked.
    Rm {
        /// The namespace.
        name: String,
    },
    /// Show a namespace's quotas (JSON); with flags, set those (the others stay as they are).
    Quota {
        /// The namespace.
        name: String,
        /// Calls running at once through each gateway (429 past it).
        #[arg(long)]
        max_in_flight: Option<u32>,
        /// Calls started per second through each gateway (429 past it).
        #[arg(long)]
        max_calls_per_s: Option<f64>,
        /// Functions registered (403 past it).
        #[arg(long)]
        max_functions: Option<u32>,
        /// The largest memory a function may ask for, in MiB (403 past it).
        #[arg(long)]
        max_memory_mb: Option<u64>,
        /// The longest deadline a function or call may ask for, in ms (403 past it).
        #[arg(long)]
        max_timeout_ms: Option<u64>,
        /// The bytes the namespace's keys may take in the store, as measured every few
        /// seconds: at or past it, its writes are refused until deletes bring it under.
        #[arg(long)]
        max_stored_bytes: Option<u64>,
        /// Lift every quota first (then set the ones given).
        #[arg(long)]
        clear: bool,
    },
    /// What a namespace stores: its keys and their bytes, measured at most a few seconds
    /// ago, and its `max_stored_bytes` quota.
    Usage {
        /// The namespace (default: the one `--ns` names).
        name: Option<String>,
    },
}

/// `squall namespace create|ls|rm|quota|usage`.
pub fn namespaces(args: NamespaceArgs) -> anyhow::Result<ExitCode> {
    let c = &args.connection;
    match args.command {
        NamespaceCommand::Create { name } => {
            let body = serde_json::to_vec(&serde_json::json!({ "name": name }))?;
            send(
                c,
                request(c, "POST", "/v1/namespaces")
                    .set("Content-Type", "application/json")
                    .send_bytes(&body),
            )?;
            println!("{name}");
        }
        NamespaceCommand::Ls => {
            let listed = json(&send(c, request(c, "GET", "/v1/namespaces").call())?)?;
            let mut out = std::io::stdout().lock();
            for namespace in listed.as_array().into_iter().flatten() {
                writeln!(out, "{}", namespace["name"].as_str().unwrap_or("?"))?;
            }
        }
        NamespaceCommand::Quota {
            name,
            max_in_flight,
            max_calls_per_s,
            max_functions,
            max_memory_mb,
            max_timeout_ms,
            max_stored_bytes,
            clear,
        } => {
            squall_proto::keys::validate_namespace(&name)?;
            let path = format!("/v1/namespaces/{name}/quotas");
            let mut quotas = if clear {
                serde_json::json!({})
            } else {
                json(&send(c, request(c, "GET", &path).call())?)?
            };
            let set = [
                ("max_in_flight", max_in_flight.map(serde_json::Value::from)),
                (
                    "max_calls_per_s",
                    max_calls_per_s.map(serde_json::Value::from),
                ),
                ("max_functions", max_functions.map(serde_json::Value::from)),
                ("max_memory_mb", max_memory_mb.map(serde_json::Value::from)),
                (
                    "max_timeout_ms",
                    max_timeout_ms.map(serde_json::Value::from),
                ),
                (
                    "max_stored_bytes",
                    max_stored_bytes.map(serde_json::Value::from),
                ),
            ];
            if clear || set.iter().any(|(_, value)| value.is_some()) {
                for (field, value) in set {
                    if let (Some(value), Some(fields)) = (value, quotas.as_object_mut()) {
                        fields.insert(field.to_string(), value);
                    }
                }
                let body = serde_json::to_vec(&quotas)?;
                quotas = json(&send(
                    c,
                    request(c, "PUT", &path)
                        .set("Content-Type", "application/json")
                        .send_bytes(&body),
                )?)?;
            }
            println!("{}", serde_json::to_string(&quotas)?);
        }
        NamespaceCommand::Usage { name } => {
            let name = name.unwrap_or_else(|| crate::namespace::addressed().to_string());
            squall_proto::keys::validate_namespace(&name)?;
            let usage = json(&send(c, request_in(c, "GET", &name, "/v1/usage").call())?)?;
            println!("{}", serde_json::to_string(&usage)?);
        }
        NamespaceCommand::Rm { name } => {
            squall_proto::keys::validate_namespace(&name)?;
            let deleted = json(&send(
                c,
                request(c, "DELETE", &format!("/v1/namespaces/{name}")).call(),
            )?)?;
            print_json(&deleted)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(flatten)]
    connection: Connection,
    /// The most entries shown (1 to 500).
    #[arg(long, default_value_t = 50)]
    limit: u32,
    /// Entries older than this one (the id `--json` shows as `next`).
    #[arg(long)]
    after: Option<String>,
    /// Print the page as JSON.
    #[arg(long)]
    json: bool,
}

/// `squall audit`: when, who (key id, `token` or `open`), role, status, method and path, and
/// what the path does not say.
pub fn audit(args: AuditArgs) -> anyhow::Result<ExitCode> {
    let c = &args.connection;
    let mut asked = request(c, "GET", "/v1/audit").query("limit", &args.limit.to_string());
    if let Some(after) = &args.after {
        asked = asked.query("after", after);
    }
    let page = json(&send(c, asked.call())?)?;
    if args.json {
        print_json(&page)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = std::io::stdout().lock();
    for entry in page["entries"].as_array().into_iter().flatten() {
        let at = entry["at_ms"]
            .as_i64()
            .and_then(chrono::DateTime::from_timestamp_millis)
            .map(|at| at.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
            .unwrap_or_else(|| "?".into());
        writeln!(
            out,
            "{at}  {:<16}  {:<6}  {}  {} {}{}",
            entry["by"].as_str().unwrap_or("?"),
            entry["role"].as_str().unwrap_or("?"),
            entry["status"].as_u64().unwrap_or(0),
            entry["method"].as_str().unwrap_or("?"),
            entry["path"].as_str().unwrap_or("?"),
            entry["detail"]
                .as_str()
                .map(|d| format!("  ({d})"))
                .unwrap_or_default(),
        )?;
    }
    if let Some(next) = page["next"].as_str() {
        eprintln!("older entries: squall audit --after {next}");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run(args: KeyArgs) -> anyhow::Result<ExitCode> {
    let c = &args.connection;
    match args.command {
        KeyCommand::Create {
            name,
            role,
            expires_in_s,
        } => {
            let body = serde_json::to_vec(&serde_json::json!({
                "name": name,
                "role": role,
                "expires_in_s": expires_in_s,
            }))?;
            let made = json(&send(
                c,
                request(c, "POST", "/v1/keys")
                    .set("Content-Type", "application/json")
                    .send_bytes(&body),
            )?)?;
            let key = made["key"].as_str().unwrap_or_default().to_string();
            let mut record = made.clone();
            if let Some(fields) = record.as_object_mut() {
                fields.remove("key");
            }
            eprintln!("{}", serde_json::to_string_pretty(&record)?);
            println!("{key}");
        }
        KeyCommand::Ls => {
            let listed = json(&send(c, request(c, "GET", "/v1/keys").call())?)?;
            let now = squall_lattices::entry::now_ms();
            let mut out = std::io::stdout().lock();
            for key in listed["keys"].as_array().into_iter().flatten() {
                let state = if key["revoked_ms"].is_u64() {
                    "revoked"
                } else if key["expires_ms"].as_u64().is_some_and(|at| at <= now) {
                    "expired"
                } else {
                    "active"
                };
                writeln!(
                    out,
                    "{}  {:<6}  {:<7}  {}  {}",
                    key["id"].as_str().unwrap_or("?"),
                    key["role"].as_str().unwrap_or("?"),
                    state,
                    key["name"].as_str().unwrap_or("?"),
                    // Admin keys act in every namespace.
                    if key["role"].as_str() == Some("admin") {
                        "*"
                    } else {
                        key["namespace"].as_str().unwrap_or("?")
                    },
                )?;
            }
        }
        KeyCommand::Revoke { id } => {
            // Never a path of the caller's making, nor a whole key (its secret) in a URL.
            if !squall_state::api_keys::is_id(&id) {
                anyhow::bail!("a key's id is 16 lowercase hex digits (see `squall key ls`)");
            }
            let revoked = json(&send(
                c,
                request(c, "DELETE", &format!("/v1/keys/{id}")).call(),
            )?)?;
            print_json(&revoked)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
