//! The commands that talk to a running gateway over HTTP: `squall fn`, `squall model`,
//! `squall dag`, `squall call` and `squall activation`. Errors from the gateway are shown as its JSON error says
//! (`code: message`), and the exit code is non-zero.
//!
//! An `https://` gateway is reached over TLS (rustls on `ring`, as the gateway serves it),
//! its certificate verified against the system's CA certificates (`rustls-native-certs`
//! reads them where OpenSSL would), or with `--ca-cert FILE` against the CA certificates in
//! that file only, as curl's `--cacert` does (a private CA, a self-signed gateway).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
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
    /// Bearer token the gateway requires.
    #[arg(long, global = true, env = "SQUALL_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// PEM file of the CA certificates that an `https://` gateway's certificate must chain
    /// to, instead of the system's.
    #[arg(long, global = true, env = "SQUALL_CA_CERT")]
    pub(crate) ca_cert: Option<std::path::PathBuf>,
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

fn agent(connection: &Connection) -> ureq::Agent {
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        .timeout(Duration::from_secs(600));
    let https = connection
        .gateway
        .get(..8)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"));
    if https {
        agent.tls_connector(tls(connection.ca_cert.as_deref()))
    } else {
        agent
    }
    .build()
}

/// The TLS setup for `ca`, made once per process (reading the system's CA certificates
/// takes milliseconds, and `logs --follow` asks again and again).
fn tls(ca: Option<&Path>) -> Arc<Tls> {
    static MADE: OnceLock<(Option<PathBuf>, Arc<Tls>)> = OnceLock::new();
    let (made_for, made) = MADE.get_or_init(|| (ca.map(Path::to_path_buf), Arc::new(Tls::new(ca))));
    if made_for.as_deref() == ca {
        made.clone()
    } else {
        Arc::new(Tls::new(ca))
    }
}

/// TLS for ureq with rustls: the client configuration, or why it could not be made (told
/// when a connection is tried, as the reason the gateway cannot be reached).
struct Tls(Result<Arc<rustls::ClientConfig>, String>);

impl Tls {
    /// Trusting the CA certificates in PEM file `ca`, or else the system's.
    fn new(ca: Option<&Path>) -> Self {
        Self(Self::config(ca))
    }

    fn config(ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        match ca {
            Some(ca) => {
                let certs = rustls::pki_types::CertificateDer::pem_file_iter(ca)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("reading the CA certificates {}: {e}", ca.display()))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(format!("{} holds no usable CA certificate", ca.display()));
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                if roots.is_empty() {
                    return Err("no CA certificate found on this system: give --ca-cert".into());
                }
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Arc::new(config))
    }
}

impl ureq::TlsConnector for Tls {
    fn connect(
        &self,
        dns_name: &str,
        mut io: Box<dyn ureq::ReadWrite>,
    ) -> Result<Box<dyn ureq::ReadWrite>, ureq::Error> {
        let other = |e: String| ureq::Error::from(std::io::Error::other(e));
        let config = self.0.clone().map_err(other)?;
        // An IPv6 address comes in brackets, which a server name has not.
        let name = dns_name.trim_start_matches('[').trim_end_matches(']');
        let name = rustls::pki_types::ServerName::try_from(name.to_string())
            .map_err(|e| other(format!("{name} is not a server name: {e}")))?;
        let mut session = rustls::ClientConnection::new(config, name)
            .map_err(|e| other(format!("starting TLS: {e}")))?;
        // The handshake now, so that a certificate that fails verification is the error.
        session
            .complete_io(&mut io)
            .map_err(|e| other(format!("TLS handshake: {e}")))?;
        Ok(Box::new(TlsStream(rustls::StreamOwned::new(session, io))))
    }
}

/// A TLS connection as ureq reads and writes it.
struct TlsStream(rustls::StreamOwned<rustls::ClientConnection, Box<dyn ureq::ReadWrite>>);

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream").finish_non_exhaustive()
    }
}

impl ureq::ReadWrite for TlsStream {
    fn socket(&self) -> Option<&std::net::TcpStream> {
        self.0.get_ref().socket()
    }
}

/// `path` (`/v1/...`) in the namespace this process addresses: unchanged in the default
/// namespace, so a gateway from before namespaces is addressed as it was.
fn in_namespace(path: &str) -> std::borrow::Cow<'_, str> {
    in_namespace_of(crate::namespace::addressed(), path)
}

/// `path` (under `/v1/`) as namespace `namespace` addresses it.
fn in_namespace_of<'a>(namespace: &str, path: &'a str) -> std::borrow::Cow<'a, str> {
    match path.strip_prefix("/v1/") {
        Some(rest) if namespace != squall_proto::keys::DEFAULT_NAMESPACE => {
            format!("/v1/ns/{namespace}/{rest}").into()
        }
        _ => path.into(),
    }
}

pub(crate) fn request(connection: &Connection, method: &str, path: &str) -> ureq::Request {
    request_to(connection, method, &in_namespace(path))
}

/// A request for `path` in namespace `namespace`, whatever `--ns` says.
pub(crate) fn request_in(
    connection: &Connection,
    method: &str,
    namespace: &str,
    path: &str,
) -> ureq::Request {
    request_to(connection, method, &in_namespace_of(namespace, path))
}

fn request_to(connection: &Connection, method: &str, path: &str) -> ureq::Request {
    let url = format!("{}{}", connection.gateway.trim_end_matches('/'), path);
    let request = agent(connection).request(method, &url);
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
