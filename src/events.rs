//! The command line of what happens to calls: their records and logs (`squall activation`,
//! `squall logs`), triggers (`squall trigger`) and dead letters (`squall dead-letters`), all
//! through a gateway's HTTP API (see the README's sections on each).

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::http::{json, print_json, request, send, Connection};

#[derive(Debug, Args)]
pub struct ActivationArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: ActivationCommand,
}

#[derive(Debug, Subcommand)]
enum ActivationCommand {
    /// List call records, newest first: id, status, target, duration, start.
    Ls {
        /// Only calls of this function.
        #[arg(long)]
        function: Option<String>,
        /// Only runs of this DAG.
        #[arg(long)]
        dag: Option<String>,
        /// Only calls in this status: running, succeeded or failed.
        #[arg(long)]
        status: Option<String>,
        /// The most records listed.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Show one record as JSON.
    Get {
        /// The activation id (from `ls`, or an answer's `squall-activation` header).
        id: String,
    },
    /// Print what a call logged and printed, step by step: time, function, stream, line.
    Logs {
        /// The activation id.
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    #[command(flatten)]
    connection: Connection,
    /// The function (or, with --dag, the DAG) whose calls' logs are printed.
    name: String,
    /// NAME is a DAG.
    #[arg(long)]
    dag: bool,
    /// Keep printing the logs of calls as they finish (polls once a second; Ctrl-C stops).
    #[arg(long, short)]
    follow: bool,
    /// How many of the latest calls to print first.
    #[arg(long, default_value_t = 10)]
    limit: u32,
}

pub fn run_activation(args: ActivationArgs) -> anyhow::Result<ExitCode> {
    let c = &args.connection;
    match args.command {
        ActivationCommand::Ls {
            function,
            dag,
            status,
            limit,
        } => {
            let mut listing =
                request(c, "GET", "/v1/activations").query("limit", &limit.to_string());
            for (name, value) in [("function", function), ("dag", dag), ("status", status)] {
                if let Some(value) = value {
                    listing = listing.query(name, &value);
                }
            }
            let page = json(&send(c, listing.call())?)?;
            let mut out = std::io::stdout().lock();
            for record in page["activations"].as_array().into_iter().flatten() {
                let duration = record["duration_us"]
                    .as_u64()
                    .map_or("-".to_string(), |us| format!("{:.3}ms", us as f64 / 1000.0));
                writeln!(
                    out,
                    "{}  {:<9}  {} {:<24}  {:>10}  {}",
                    record["id"].as_str().unwrap_or("?"),
                    record["status"].as_str().unwrap_or("?"),
                    record["kind"].as_str().unwrap_or("?"),
                    record["name"].as_str().unwrap_or("?"),
                    duration,
                    record["start_ms"].as_u64().unwrap_or(0),
                )?;
            }
            out.flush()?;
        }
        ActivationCommand::Get { id } => {
            let body = send(
                c,
                request(c, "GET", &format!("/v1/activations/{}", encoded(&id))).call(),
            )?;
            print_json(&json(&body)?)?;
        }
        ActivationCommand::Logs { id } => {
            let path = format!("/v1/activations/{}/logs", encoded(&id));
            let logs = json(&send(c, request(c, "GET", &path).call())?)?;
            let mut out = std::io::stdout().lock();
            for line in logs["logs"].as_array().into_iter().flatten() {
                print_line(&mut out, None, line)?;
            }
            let dropped = logs["dropped"].as_u64().unwrap_or(0);
            if dropped > 0 {
                writeln!(out, "({dropped} lines or parts of lines were left out)")?;
            }
            out.flush()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Percent-encodes a path segment.
fn encoded(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// Prints one log line: `time  [activation]  function  stream: text`.
fn print_line(out: &mut impl Write, activation: Option<&str>, line: &Value) -> anyhow::Result<()> {
    let ms = line["ms"].as_i64().unwrap_or(0);
    let time = chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|| ms.to_string());
    let activation = activation.map(|a| format!("{a}  ")).unwrap_or_default();
    writeln!(
        out,
        "{time}  {activation}{}  {}: {}",
        line["function"].as_str().unwrap_or("?"),
        line["stream"].as_str().unwrap_or("?"),
        line["text"].as_str().unwrap_or(""),
    )?;
    Ok(())
}

/// How far back `squall logs --follow` looks again for calls that were still running: a
/// call that runs longer than this and was not yet seen finished is not printed.
const FOLLOW_WINDOW_MS: u64 = 15 * 60 * 1000;

/// `squall logs`: the log lines of a function's (or DAG's) latest calls, oldest first, and
/// with `--follow` those of each call that finishes afterwards.
pub fn run_logs(args: LogsArgs) -> anyhow::Result<ExitCode> {
    let c = &args.connection;
    let filter = if args.dag { "dag" } else { "function" };
    // Finished records printed, by id, with their start (to forget them once out of the window).
    let mut printed: HashMap<String, u64> = HashMap::new();
    // The window's end: the newest start seen (the gateway's clock, not this machine's).
    let mut newest: Option<u64> = None;
    let mut first = true;
    loop {
        let since = (!first).then(|| {
            newest
                .unwrap_or_else(squall_lattices::entry::now_ms)
                .saturating_sub(FOLLOW_WINDOW_MS)
        });
        let records = match finished_records(c, filter, &args.name, args.limit, since) {
            Ok(records) => records,
            Err(e) if args.follow && !first => {
                eprintln!("{e:#} (trying again)");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut out = std::io::stdout().lock();
        // Oldest first.
        for record in records.iter().rev() {
            let id = record["id"].as_str().unwrap_or("?");
            let start_ms = record["start_ms"].as_u64().unwrap_or(0);
            newest = newest.max(Some(start_ms));
            if printed.contains_key(id) {
                continue;
            }
            printed.insert(id.to_string(), start_ms);
            let mut steps: Vec<&Value> = record["steps"].as_array().into_iter().flatten().collect();
            steps.sort_by_key(|s| (s["start_us"].as_u64(), s["step"].as_u64()));
            let mut dropped = 0;
            for step in steps {
                dropped += step["logs_dropped"].as_u64().unwrap_or(0);
                for line in step["logs"].as_array().into_iter().flatten() {
                    print_line(&mut out, Some(id), line)?;
                }
            }
            if dropped > 0 {
                writeln!(
                    out,
                    "{id}  ({dropped} lines or parts of lines were left out)"
                )?;
            }
        }
        out.flush()?;
        drop(out);
        if !args.follow {
            return Ok(ExitCode::SUCCESS);
        }
        if first && newest.is_none() {
            // Nothing yet: follow from now.
            newest = Some(squall_lattices::entry::now_ms());
        }
        first = false;
        if let Some(newest) = newest {
            let from = newest.saturating_sub(FOLLOW_WINDOW_MS);
            printed.retain(|_, start| *start >= from);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Pages `squall logs --follow` reads per poll at most (each of up to 200 records).
const FOLLOW_PAGES: usize = 10;

/// The finished records (with their logs) of NAME, newest first: the latest `limit` ones, or,
/// from `since` on, up to [`FOLLOW_PAGES`] pages of them.
fn finished_records(
    c: &Connection,
    filter: &str,
    name: &str,
    limit: u32,
    since: Option<u64>,
) -> anyhow::Result<Vec<Value>> {
    let mut records = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..FOLLOW_PAGES {
        let limit = if since.is_some() { 200 } else { limit };
        let mut listing = request(c, "GET", "/v1/activations")
            .query(filter, name)
            .query("logs", "true")
            .query("limit", &limit.clamp(1, 200).to_string());
        if let Some(since) = since {
            listing = listing.query("since", &since.to_string());
        }
        if let Some(after) = &after {
            listing = listing.query("after", after);
        }
        let mut page = json(&send(c, listing.call())?)?;
        if let Value::Array(found) = page["activations"].take() {
            records.extend(found.into_iter().filter(|r| r["status"] != "running"));
        }
        match (page["next"].as_str(), since) {
            (Some(next), Some(_)) => after = Some(next.to_string()),
            _ => break,
        }
    }
    Ok(records)
}

#[derive(Debug, Args)]
pub struct TriggerArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: TriggerCommand,
}

#[derive(Debug, Subcommand)]
enum TriggerCommand {
    /// Create (or replace) a trigger that calls a function or DAG on a cron schedule (UTC),
    /// or for each write to keys with a prefix.
    Create {
        /// The trigger's name.
        name: String,
        /// The schedule: `sec min hour day month weekday [year]`, or the classic five fields.
        #[arg(long, conflicts_with = "prefix", required_unless_present = "prefix")]
        cron: Option<String>,
        /// A `kv-change` trigger: the key prefix whose writes call the target (each write's
        /// change is the call's input).
        #[arg(long)]
        prefix: Option<String>,
        /// The function it calls.
        #[arg(long, conflicts_with = "dag", required_unless_present = "dag")]
        function: Option<String>,
        /// The DAG it calls.
        #[arg(long)]
        dag: Option<String>,
        /// The input of every call (text).
        #[arg(long, default_value = "")]
        input: String,
    },
    /// List triggers: name, state, target, schedule, next tick.
    Ls,
    /// Show one trigger as JSON.
    Get {
        /// The trigger's name.
        name: String,
    },
    /// Delete a trigger.
    Rm {
        /// The trigger's name.
        name: String,
    },
    /// Stop a trigger from firing.
    Pause {
        /// The trigger's name.
        name: String,
    },
    /// Let a paused trigger fire again (from its next tick).
    Resume {
        /// The trigger's name.
        name: String,
    },
    /// Fire a trigger once now, as an asynchronous call; prints the call's id.
    Fire {
        /// The trigger's name.
        name: String,
    },
}

pub fn run_trigger(args: TriggerArgs) -> anyhow::Result<ExitCode> {
    let c = &args.connection;
    let path = |name: &str, action: &str| format!("/v1/triggers/{}{action}", encoded(name));
    match args.command {
        TriggerCommand::Create {
            name,
            cron,
            prefix,
            function,
            dag,
            input,
        } => {
            let mut spec = match (cron, prefix) {
                (Some(cron), None) => {
                    serde_json::json!({ "kind": "cron", "schedule": cron, "input": input })
                }
                (None, Some(prefix)) => {
                    serde_json::json!({ "kind": "kv-change", "prefix": prefix })
                }
                _ => bail!("give --cron or --prefix"),
            };
            match (function, dag) {
                (Some(function), None) => spec["function"] = Value::String(function),
                (None, Some(dag)) => spec["dag"] = Value::String(dag),
                _ => bail!("give --function or --dag"),
            }
            let body = serde_json::to_vec(&spec)?;
            let created = send(
                c,
                request(c, "PUT", &path(&name, ""))
                    .set("Content-Type", "application/json")
                    .send_bytes(&body),
            )?;
            print_json(&json(&created)?)?;
        }
        TriggerCommand::Ls => {
            let listed = json(&send(c, request(c, "GET", "/v1/triggers").call())?)?;
            let mut out = std::io::stdout().lock();
            for trigger in listed.as_array().into_iter().flatten() {
                let spec = &trigger["spec"];
                let target = match (spec["function"].as_str(), spec["dag"].as_str()) {
                    (Some(function), _) => format!("function {function}"),
                    (_, Some(dag)) => format!("dag {dag}"),
                    _ => "?".to_string(),
                };
                let state = if trigger["paused"] == true {
                    "paused"
                } else {
                    "active"
                };
                let next = utc(trigger["next_ms"].as_i64());
                let when = spec["schedule"]
                    .as_str()
                    .or(spec["prefix"].as_str())
                    .unwrap_or("?");
                writeln!(
                    out,
                    "{:<24}  {state:<6}  {:<9}  {target:<30}  {when:<20}  {next}",
                    trigger["name"].as_str().unwrap_or("?"),
                    spec["kind"].as_str().unwrap_or("?"),
                )?;
            }
            out.flush()?;
        }
        TriggerCommand::Get { name } => {
            let trigger = send(c, request(c, "GET", &path(&name, "")).call())?;
            print_json(&json(&trigger)?)?;
        }
        TriggerCommand::Rm { name } => {
            send(c, request(c, "DELETE", &path(&name, "")).call())?;
        }
        TriggerCommand::Pause { name } => {
            send(c, request(c, "POST", &path(&name, "/pause")).call())?;
        }
        TriggerCommand::Resume { name } => {
            send(c, request(c, "POST", &path(&name, "/resume")).call())?;
        }
        TriggerCommand::Fire { name } => {
            let fired = json(&send(c, request(c, "POST", &path(&name, "/fire")).call())?)?;
            println!("{}", fired["id"].as_str().unwrap_or("?"));
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct DeadLetterArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: DeadLetterCommand,
}

/// Whose dead letters.
#[derive(Debug, Args)]
struct Owner {
    /// The function (or, with --dag, the DAG) whose calls they are.
    name: String,
    /// NAME is a DAG.
    #[arg(long)]
    dag: bool,
}

impl Owner {
    fn path(&self, rest: &str) -> String {
        let kind = if self.dag { "dag" } else { "function" };
        format!("/v1/dead-letters/{kind}/{}{rest}", encoded(&self.name))
    }
}

#[derive(Debug, Subcommand)]
enum DeadLetterCommand {
    /// List the calls that failed every attempt, newest first: id, failed at, attempts, error.
    Ls {
        #[command(flatten)]
        owner: Owner,
    },
    /// Run one dead letter (or, without ID, all of them) again, with fresh retries.
    Redrive {
        #[command(flatten)]
        owner: Owner,
        /// The dead letter's id (the call's); none: every one.
        id: Option<String>,
    },
    /// Delete one dead letter (or, without ID, all of them).
    Rm {
        #[command(flatten)]
        owner: Owner,
        /// The dead letter's id; none: every one.
        id: Option<String>,
    },
}

pub fn run_dead_letters(args: DeadLetterArgs) -> anyhow::Result<ExitCode> {
    let c = &args.connection;
    let one = |id: &Option<String>| {
        id.as_deref()
            .map_or(String::new(), |id| format!("/{}", encoded(id)))
    };
    match args.command {
        DeadLetterCommand::Ls { owner } => {
            let mut after: Option<String> = None;
            let mut out = std::io::stdout().lock();
            loop {
                let mut listing = request(c, "GET", &owner.path(""));
                if let Some(after) = &after {
                    listing = listing.query("after", after);
                }
                let page = json(&send(c, listing.call())?)?;
                for letter in page["dead_letters"].as_array().into_iter().flatten() {
                    let failed = utc(letter["failed_ms"].as_i64());
                    writeln!(
                        out,
                        "{}  {failed}  {} attempts  {}: {}",
                        letter["id"].as_str().unwrap_or("?"),
                        letter["attempts"].as_array().map_or(0, Vec::len),
                        letter["error"]["code"].as_str().unwrap_or("?"),
                        letter["error"]["message"].as_str().unwrap_or(""),
                    )?;
                }
                match page["next"].as_str() {
                    Some(next) => after = Some(next.to_string()),
                    None => break,
                }
            }
            out.flush()?;
        }
        DeadLetterCommand::Redrive { owner, id } => {
            let path = owner.path(&format!("{}/redrive", one(&id)));
            let done = send(c, request(c, "POST", &path).call())?;
            println!("{} redriven", handled(id.is_some(), &done)?);
        }
        DeadLetterCommand::Rm { owner, id } => {
            let done = send(c, request(c, "DELETE", &owner.path(&one(&id))).call())?;
            println!("{} deleted", handled(id.is_some(), &done)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// How many dead letters an answer says were handled: one for a request naming one (its
/// success is the answer), else the answer's `count`.
fn handled(one: bool, body: &[u8]) -> anyhow::Result<u64> {
    if one {
        return Ok(1);
    }
    Ok(json(body)?["count"].as_u64().unwrap_or(0))
}

/// A time in ms since the Unix epoch, as UTC to the second (`-` if there is none).
fn utc(ms: Option<i64>) -> String {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map_or("-".to_string(), |t| {
            t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
        })
}
