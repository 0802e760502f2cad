//! The commands that talk to a running gateway over HTTP: `squall fn`, `squall model`,
//! `squall dag`, `squall call` and `squall activation`. Errors from the gateway are shown as its JSON error says
//! (`code: message`), and the exit code is non-zero.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::roles::DEFAULT_HTTP_PORT;

#[derive(Debug, Args)]
pub struct Connection {
    /// The gateway's URL.
    #[arg(long, global = true, env = "SQUALL_GATEWAY", default_value_t = format!("http://127.0.0.1:{DEFAULT_HTTP_PORT}"))]
    pub(crate) gateway: String,
    /// Bearer token for mutating requests.
    #[arg(long, global = true, env = "SQUALL_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
}

#[derive(Debug, Args)]
pub struct FnArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: FnCommand,
}

#[derive(Debug, Subcommand)]
enum FnCommand {
    /// Register a component as the next version of NAME.
    Register {
        /// The function's name.
        name: String,
        /// The component (`.wasm`, built for wasm32-wasip2).
        file: std::path::PathBuf,
        /// Deadline of one call, in milliseconds.
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// Memory limit, in MiB.
        #[arg(long)]
        memory_mb: Option<u64>,
    },
    /// List functions (newest versions).
    Ls,
    /// Delete a function.
    Rm {
        /// The function's name.
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct ModelArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: ModelCommand,
}

#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// Register an ONNX model as the next version of NAME (functions load it by this name).
    Register {
        /// The model's name.
        name: String,
        /// The model (`.onnx`).
        file: std::path::PathBuf,
    },
    /// List models (newest versions).
    Ls,
    /// Delete a model.
    Rm {
        /// The model's name.
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct DagArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: DagCommand,
}

#[derive(Debug, Subcommand)]
enum DagCommand {
    /// Create (or replace) a DAG from edges `g:f` (g's output goes to f).
    Create {
        /// The DAG's name.
        name: String,
        /// An edge FROM:TO; repeat for more.
        #[arg(long = "edge", value_name = "FROM:TO")]
        edges: Vec<String>,
        /// A function with no edges (a DAG of one function); repeat for more.
        #[arg(long = "function")]
        functions: Vec<String>,
    },
    /// List DAGs.
    Ls,
    /// Delete a DAG.
    Rm {
        /// The DAG's name.
        name: String,
    },
    /// Call a DAG and print the sink's output.
    Call(CallArgs),
}

#[derive(Debug, Args)]
pub struct CallArgs {
    /// The function's (or DAG's) name.
    name: String,
    /// The input; `-` reads standard input; none: empty.
    input: Option<String>,
    /// The call's deadline in milliseconds.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Consistency mode: lww (merge only), repeatable-read (every read of a key in the run
    /// returns the same version) or causal (the run's reads form a causal cut; writes carry
    /// vector clocks and dependencies).
    #[arg(long, default_value = "lww", env = "SQUALL_CONSISTENCY")]
    consistency: squall_proto::call::Consistency,
    /// Store keys the call reads (comma-separated): placed near, and in causal mode pinned
    /// as one causal cut before the first step.
    #[arg(long, value_delimiter = ',')]
    keys: Vec<String>,
    /// Causal: the client session the call belongs to (its calls never read older versions
    /// than earlier calls of the session read or wrote).
    #[arg(long, env = "SQUALL_SESSION")]
    session: Option<String>,
    /// Run it asynchronously: print the call's id once it is in the store (its result is at
    /// `GET /v1/results/{id}`).
    #[arg(long = "async")]
    asynchronous: bool,
    /// An idempotency key: while the first call's record is kept, a repeat with the same key
    /// answers the first call's output (or id) and runs nothing.
    #[arg(long)]
    idempotency_key: Option<String>,
}

#[derive(Debug, Args)]
pub struct CallCommand {
    #[command(flatten)]
    connection: Connection,
    #[command(flatten)]
    call: CallArgs,
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        .timeout(Duration::from_secs(600))
        .build()
}

pub(crate) fn request(connection: &Connection, method: &str, path: &str) -> ureq::Request {
    let url = format!("{}{path}", connection.gateway.trim_end_matches('/'));
    let request = agent().request(method, &url);
    match &connection.token {
        Some(token) => request.set("Authorization", &format!("Bearer {token}")),
        None => request,
    }
}

/// Sends and returns the body; an error status becomes an error with the gateway's message.
pub(crate) fn send(
    connection: &Connection,
    result: Result<ureq::Response, ureq::Error>,
) -> anyhow::Result<Vec<u8>> {
    let response = match result {
        Ok(response) => response,
        Err(ureq::Error::Status(status, response)) => {
            let text = response.into_string().unwrap_or_default();
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| {
                    let e = v.get("error")?;
                    let step = e
                        .get("step")
                        .and_then(Value::as_str)
                        .map(|s| format!(" (step {s})"))
                        .unwrap_or_default();
                    Some(format!(
                        "{}: {}{step}",
                        e.get("code")?.as_str()?,
                        e.get("message")?.as_str()?
                    ))
                })
                .unwrap_or(text);
            bail!("{message} [HTTP {status}]");
        }
        Err(e) => bail!("cannot reach the gateway at {}: {e}", connection.gateway),
    };
    let mut body = Vec::new();
    response
        .into_reader()
        .read_to_end(&mut body)
        .context("reading the gateway's answer")?;
    Ok(body)
}

pub(crate) fn json(body: &[u8]) -> anyhow::Result<Value> {
    serde_json::from_slice(body).context("the gateway's answer is not JSON")
}

pub(crate) fn print_json(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub(crate) fn read_input(input: Option<&str>) -> anyhow::Result<Vec<u8>> {
    match input {
        Some("-") => {
            let mut buffer = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buffer)
                .context("reading the input from standard input")?;
            Ok(buffer)
        }
        Some(text) => Ok(text.as_bytes().to_vec()),
        None => Ok(Vec::new()),
    }
}

fn call(connection: &Connection, kind: &str, args: &CallArgs) -> anyhow::Result<ExitCode> {
    let input = read_input(args.input.as_deref())?;
    let path = format!("/v1/{kind}/{}/invoke", args.name);
    let mut call = request(connection, "POST", &path);
    if let Some(ms) = args.timeout_ms {
        call = call.query("timeout_ms", &ms.to_string());
    }
    if args.asynchronous {
        call = call.query("async", "true");
    }
    if let Some(key) = &args.idempotency_key {
        call = call.set(squall_gateway::IDEMPOTENCY_HEADER, key);
    }
    let mut call = call.set(
        squall_gateway::CONSISTENCY_HEADER,
        args.consistency.as_str(),
    );
    if !args.keys.is_empty() {
        call = call.set(squall_gateway::KEYS_HEADER, &args.keys.join(","));
    }
    if let Some(session) = &args.session {
        call = call.set(squall_gateway::SESSION_HEADER, session);
    }
    let mut output = send(connection, call.send_bytes(&input))?;
    if args.asynchronous {
        let accepted = json(&output)?;
        output = accepted["id"].as_str().unwrap_or("?").as_bytes().to_vec();
    }
    let mut out = std::io::stdout().lock();
    out.write_all(&output)?;
    if !output.ends_with(b"\n") && !output.is_empty() {
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

pub fn run_call(args: CallCommand) -> anyhow::Result<ExitCode> {
    call(&args.connection, "functions", &args.call)
}

pub fn run_fn(args: FnArgs) -> anyhow::Result<ExitCode> {
    let c = &args.connection;
    match args.command {
        FnCommand::Register {
            name,
            file,
            timeout_ms,
            memory_mb,
        } => {
            let mut query = Vec::new();
            if let Some(ms) = timeout_ms {
                query.push(format!("timeout_ms={ms}"));
            }
            if let Some(mb) = memory_mb {
                query.push(format!("memory_mb={mb}"));
            }
            let query = if query.is_empty() {
                String::new()
            } else {
                format!("?{}", query.join("&"))
            };
            register(c, "functions", &name, &file, "application/wasm", &query)
        }
        FnCommand::Ls => list(c, "functions"),
        FnCommand::Rm { name } => remove(c, "functions", &name),
    }
}

pub fn run_model(args: ModelArgs) -> anyhow::Result<ExitCode> {
    let c = &args.connection;
    match args.command {
        ModelCommand::Register { name, file } => {
            register(c, "models", &name, &file, "application/octet-stream", "")
        }
        ModelCommand::Ls => list(c, "models"),
        ModelCommand::Rm { name } => remove(c, "models", &name),
    }
}

/// `PUT /v1/{kind}/{name}` with the file's bytes.
fn register(
    c: &Connection,
    kind: &str,
    name: &str,
    file: &std::path::Path,
    content_type: &str,
    query: &str,
) -> anyhow::Result<ExitCode> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let body = send(
        c,
        request(c, "PUT", &format!("/v1/{kind}/{name}{query}"))
            .set("Content-Type", content_type)
            .send_bytes(&bytes),
    )?;
    let info = json(&body)?;
    println!(
        "registered {} version {} (sha256 {}, {} bytes)",
        info["name"].as_str().unwrap_or(name),
        info["version"],
        info["sha256"].as_str().unwrap_or("?"),
        info["size"]
    );
    Ok(ExitCode::SUCCESS)
}

/// `GET /v1/{kind}`, a line each.
fn list(c: &Connection, kind: &str) -> anyhow::Result<ExitCode> {
    let body = send(c, request(c, "GET", &format!("/v1/{kind}")).call())?;
    for f in json(&body)?.as_array().into_iter().flatten() {
        println!(
            "{}\tv{}\t{} bytes\t{}",
            f["name"].as_str().unwrap_or("?"),
            f["version"],
            f["size"],
            f["sha256"].as_str().unwrap_or("?")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `DELETE /v1/{kind}/{name}`.
fn remove(c: &Connection, kind: &str, name: &str) -> anyhow::Result<ExitCode> {
    send(
        c,
        request(c, "DELETE", &format!("/v1/{kind}/{name}")).call(),
    )?;
    println!("deleted {name}");
    Ok(ExitCode::SUCCESS)
}

pub fn run_dag(args: DagArgs) -> anyhow::Result<ExitCode> {
    let c = &args.connection;
    match args.command {
        DagCommand::Create {
            name,
            edges,
            functions,
        } => {
            let mut names: Vec<String> = Vec::new();
            let mut pairs = Vec::new();
            for edge in &edges {
                let Some((from, to)) = edge.split_once(':') else {
                    bail!("edge {edge:?} is not FROM:TO");
                };
                for f in [from, to] {
                    if !names.iter().any(|n| n == f) {
                        names.push(f.to_string());
                    }
                }
                pairs.push([from.to_string(), to.to_string()]);
            }
            for f in functions {
                if !names.contains(&f) {
                    names.push(f);
                }
            }
            if names.is_empty() {
                bail!("a DAG needs --edge FROM:TO (or --function NAME)");
            }
            let spec = serde_json::json!({ "functions": names, "edges": pairs });
            let body = send(
                c,
                request(c, "PUT", &format!("/v1/dags/{name}"))
                    .set("Content-Type", "application/json")
                    .send_string(&spec.to_string()),
            )?;
            let info = json(&body)?;
            println!(
                "created DAG {name} version {}: {}",
                info["version"],
                serde_json::to_string(&info["edges"])?
            );
        }
        DagCommand::Ls => {
            let body = send(c, request(c, "GET", "/v1/dags").call())?;
            print_json(&json(&body)?)?;
        }
        DagCommand::Rm { name } => {
            send(c, request(c, "DELETE", &format!("/v1/dags/{name}")).call())?;
            println!("deleted DAG {name}");
        }
        DagCommand::Call(call_args) => return call(c, "dags", &call_args),
    }
    Ok(ExitCode::SUCCESS)
}
