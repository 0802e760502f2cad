//! Triggers: functions and DAGs started by a schedule rather than a caller.
//!
//! A trigger ([`Trigger`]) is kept under [`squall_proto::keys::trigger`]: its kind (`cron`
//! today), its schedule in UTC, its target and the input each firing passes. Every gateway
//! fires the triggers it sees due, as durable asynchronous calls (see [`crate::calls`]), so a
//! firing survives the gateway that made it and is retried by the target's policy.
//!
//! # One firing per tick, without coordination
//! A tick's call has an id computed from the trigger and the tick ([`tick_id`]), the same in
//! every gateway, and a gateway fires a tick only if the tick's result key does not exist
//! yet. One gateway at a time holds a lease on firing first ([`Triggers::lease_cron`], see
//! [`crate::lease`]) and fires each tick as it falls due; the others wait a fallback of two
//! seconds and more (a spread, different for each gateway and tick), look, and fire only
//! the ticks still not taken: those of a holder that died, until one of them takes its lease
//! over. A tick runs twice (one record, one id, the function's effects twice) only when the
//! holder's acceptance of it lands later than the fallback (a store stalled for seconds, or
//! gateways' clocks two seconds or more apart), or when two gateways both believe they hold
//! the lease and look within one store round trip of each other: two that take a free lease
//! within one round trip (both read their own write back, and both lead until the next
//! renewal, three seconds on), or a renewal and a take-over within one round trip of its
//! expiry. Clocks more than the lease (ten seconds) apart make the lease itself unreliable:
//! gateways' clocks must be kept in step (NTP).
//! The ticks fired so far are a max register per trigger ([`Triggers::fired_through`]), so a
//! restarted gateway knows where the schedule stands ([`due`]): up to [`CATCH_UP`] ticks
//! behind (a stalled gateway, a slow store, a short outage), each fires in turn, late ones
//! marked late (cause `cron-late`); further behind (every gateway was down), only the latest
//! fires, late, and the others are counted, not fired.
//!
//! # Why the `cron` crate
//! `cron` (with `chrono` for its times) is the most used cron expression parser for Rust: six-
//! or seven-field expressions with seconds and years, ranges, steps and names, and iteration
//! forwards and backwards from any instant, which is what finding the latest due tick needs.
//! Five-field expressions (the classic crontab) are read with a seconds field of 0.

use std::str::FromStr;

use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use squall_lattices::{Entry, LatticeValue, Max, Timestamp};
use squall_proto::call::Target;
use squall_proto::keys;

use crate::activations::ActivationId;
use crate::pool::ClientPool;
use crate::Result;

/// The largest input a trigger passes.
pub const MAX_INPUT: usize = 1 << 20;

/// Ticks counted at most when working out how many were missed.
const MAX_COUNTED: u64 = 10_000;

/// A tick fired this much after its time is marked late.
pub const LATE_AFTER_MS: u64 = 5_000;

/// A trigger as created: `PUT /v1/triggers/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TriggerSpec {
    /// `cron` or `kv-change`.
    pub kind: String,
    /// `cron`: a cron expression in UTC: `sec min hour day-of-month month day-of-week
    /// [year]`, or the classic five fields (minutes first; seconds are then 0).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub schedule: String,
    /// `kv-change`: the key prefix whose writes fire it (empty: every key outside Squall's
    /// own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// The function it calls (or `dag`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    /// The DAG it calls (or `function`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dag: Option<String>,
    /// `cron`: the input of every call it makes (text). (A `kv-change` call's input is the
    /// change, as JSON.)
    #[serde(default)]
    pub input: String,
}

/// What fires a trigger.
#[derive(Debug, Clone)]
pub enum Firing {
    /// The ticks of a schedule.
    Cron(Box<cron::Schedule>),
    /// Clients' writes to keys with this prefix.
    KvChange(String),
}

/// The longest key prefix a `kv-change` trigger takes.
pub const MAX_PREFIX: usize = 1024;

impl TriggerSpec {
    /// Checks the spec (not whether its target exists); its target and what fires it.
    pub fn check(&self) -> std::result::Result<(Target, Firing), String> {
        let firing = match (self.kind.as_str(), &self.prefix) {
            ("cron", None) => Firing::Cron(Box::new(parse_schedule(&self.schedule)?)),
            ("cron", Some(_)) => return Err("a cron trigger takes a schedule, not a prefix".into()),
            ("kv-change", prefix) => {
                if !self.schedule.is_empty() {
                    return Err("a kv-change trigger takes a prefix, not a schedule".into());
                }
                if !self.input.is_empty() {
                    return Err(
                        "a kv-change trigger's calls take the change as input; give no input"
                            .into(),
                    );
                }
                let prefix = prefix.clone().unwrap_or_default();
                // (A shorter prefix such as `s` matches only users' keys: Squall's own are
                // never journaled.)
                if prefix.starts_with(keys::RESERVED_PREFIX) {
                    return Err(format!(
                        "prefix {prefix:?} reaches Squall's own keys ({}...)",
                        keys::RESERVED_PREFIX
                    ));
                }
                if prefix.len() > MAX_PREFIX {
                    return Err(format!("a prefix is at most {MAX_PREFIX} bytes"));
                }
                Firing::KvChange(prefix)
            }
            (other, _) => {
                return Err(format!(
                    "unknown trigger kind {other:?} (cron or kv-change)"
                ))
            }
        };
        let target = match (&self.function, &self.dag) {
            (Some(f), None) => Target::Function(f.clone()),
            (None, Some(d)) => Target::Dag(d.clone()),
            _ => return Err("a trigger names one function or one DAG".into()),
        };
        keys::validate_name(target.name()).map_err(|e| e.to_string())?;
        if self.input.len() > MAX_INPUT {
            return Err(format!("a trigger's input is at most {MAX_INPUT} bytes"));
        }
        Ok((target, firing))
    }
}

/// A stored trigger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trigger {
    /// Its name.
    pub name: String,
    /// What it does.
    pub spec: TriggerSpec,
    /// Whether it is paused (it fires nothing; ticks passed while paused are not fired).
    pub paused: bool,
    /// Why it was paused, if Squall paused it (its target was deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_reason: Option<String>,
    /// When it was created or last changed (ms since the Unix epoch).
    pub updated_ms: u64,
    /// The same instant in microseconds (0 in triggers stored before it was kept): writes
    /// journaled before it do not fire a `kv-change` trigger ([`Trigger::fires_from_us`]).
    #[serde(default)]
    pub updated_us: u64,
    /// Random bits of its ticks' call ids, chosen when it is created, so that nobody who
    /// knows only its name and schedule can compute them (an id reads its result).
    #[serde(default)]
    pub salt: u64,
}

impl Trigger {
    /// Notes that it was created or changed now.
    pub fn touch(&mut self) {
        let us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        self.updated_us = us;
        self.updated_ms = us / 1000;
    }

    /// The first microsecond whose writes fire it (a `kv-change` trigger compares it with
    /// the change's sequence number, the shard's clock in microseconds).
    pub fn fires_from_us(&self) -> u64 {
        if self.updated_us > 0 {
            self.updated_us
        } else {
            self.updated_ms.saturating_mul(1000)
        }
    }
}

/// A classic crontab day-of-week field (0 to 7, 0 and 7 both Sunday) in the `cron` crate's
/// numbering (1 to 7, 1 Sunday). Names and `*` pass as they are; steps are not days.
fn crontab_weekdays(field: &str) -> std::result::Result<String, String> {
    let day = |text: &str| -> std::result::Result<String, String> {
        match text.parse::<u8>() {
            Ok(n @ 0..=6) => Ok((n + 1).to_string()),
            Ok(7) => Ok("1".into()),
            Ok(n) => Err(format!("day of week {n} is not between 0 and 7")),
            Err(_) => Ok(text.to_string()),
        }
    };
    let parts: std::result::Result<Vec<String>, String> = field
        .split(',')
        .map(|part| {
            let (range, step) = match part.split_once('/') {
                Some((range, step)) => (range, Some(step)),
                None => (part, None),
            };
            let range = match range.split_once('-') {
                Some((from, to)) => format!("{}-{}", day(from)?, day(to)?),
                None => day(range)?,
            };
            Ok(match step {
                Some(step) => format!("{range}/{step}"),
                None => range,
            })
        })
        .collect();
    Ok(parts?.join(","))
}

/// Parses a cron expression (see [`TriggerSpec::schedule`]). Five fields are read as
/// crontab reads them (minute first, days of the week 0 to 7 from Sunday); six or seven as
/// the `cron` crate does (seconds first, days of the week 1 to 7 from Sunday, or names). A
/// day of the month and a day of the week both set must both match (crontab fires when
/// either does): use one of them, or names.
pub fn parse_schedule(text: &str) -> std::result::Result<cron::Schedule, String> {
    let fields: Vec<&str> = text.split_whitespace().collect();
    let expression = match fields.len() {
        5 => format!(
            "0 {} {} {} {} {}",
            fields[0],
            fields[1],
            fields[2],
            fields[3],
            crontab_weekdays(fields[4])?
        ),
        6 | 7 => text.to_string(),
        n => {
            return Err(format!(
                "a cron schedule has 5, 6 or 7 fields, not {n}: {text:?}"
            ))
        }
    };
    cron::Schedule::from_str(&expression).map_err(|e| format!("bad cron schedule {text:?}: {e}"))
}

/// 2101-01-01T00:00:00Z: the `cron` crate's schedules end with the year 2100, and it panics
/// stepping past the latest time `chrono` holds, so a later instant (a corrupt position, a
/// clock far ahead) is read as this one, after every tick.
const END_OF_SCHEDULES_MS: u64 = 4_133_980_800_000;

fn time_of(ms: u64) -> DateTime<Utc> {
    let ms = i64::try_from(ms.min(END_OF_SCHEDULES_MS)).unwrap_or(i64::MAX);
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

fn ms_of(time: DateTime<Utc>) -> u64 {
    u64::try_from(time.timestamp_millis()).unwrap_or(0)
}

/// A tick to fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    /// Its time (ms since the Unix epoch).
    pub tick_ms: u64,
    /// Whether it fires late: more than [`LATE_AFTER_MS`] after its time, or after missed
    /// ticks.
    pub late: bool,
    /// Ticks before it that were missed and are not fired (counted up to 10 000).
    pub missed: u64,
}

/// How many ticks behind a trigger may fall and still fire each of them (a gateway that
/// stalled, a store that was slow); further behind, only the latest fires.
pub const CATCH_UP: usize = 10;

/// The tick to fire at `now_ms`, if any, for a trigger that fired its ticks through
/// `fired_through_ms`: the next tick, if no more than [`CATCH_UP`] are due (late if fired
/// more than [`LATE_AFTER_MS`] after its time); else only the latest, late, the others
/// counted as missed. A trigger never fired (`0`) fires its latest tick.
pub fn due(schedule: &cron::Schedule, fired_through_ms: u64, now_ms: u64) -> Option<Due> {
    let latest = || {
        schedule
            .after(&time_of(now_ms.saturating_add(1)))
            .next_back()
            .map(ms_of)
            .filter(|&t| t > fired_through_ms && t <= now_ms)
    };
    if fired_through_ms == 0 {
        return latest().map(|tick_ms| Due {
            tick_ms,
            late: false,
            missed: 0,
        });
    }
    let pending: Vec<u64> = schedule
        .after(&time_of(fired_through_ms))
        .map(ms_of)
        .take_while(|&t| t <= now_ms)
        .take(CATCH_UP + 1)
        .collect();
    match pending.len() {
        0 => None,
        n if n <= CATCH_UP => Some(Due {
            tick_ms: pending[0],
            late: now_ms - pending[0] > LATE_AFTER_MS,
            missed: 0,
        }),
        _ => {
            let tick_ms = latest()?;
            let missed = schedule
                .after(&time_of(fired_through_ms))
                .map(ms_of)
                .take_while(|&t| t < tick_ms)
                .take(MAX_COUNTED as usize)
                .count() as u64;
            Some(Due {
                tick_ms,
                late: true,
                missed,
            })
        }
    }
}

/// The call id of `trigger`'s tick at `tick_ms`: the same in every gateway, sorted by the
/// tick like any activation id.
pub fn tick_id(trigger: &Trigger, tick_ms: u64) -> ActivationId {
    let hash = Sha256::digest(format!("{}\n{}\n{tick_ms}", trigger.name, trigger.salt).as_bytes());
    let mut suffix = [0u8; 8];
    suffix.copy_from_slice(&hash[..8]);
    ActivationId::with_suffix(tick_ms.saturating_mul(1000), u64::from_be_bytes(suffix))
}

/// The id of the call that delivers change `seq` of the shard at `endpoint` to `trigger`:
/// the same in every gateway, so a change delivered again (after a crash) is recognised.
pub fn change_id(trigger: &Trigger, endpoint: &str, seq: u64) -> ActivationId {
    let hash =
        Sha256::digest(format!("{}\n{}\n{endpoint}\n{seq}", trigger.name, trigger.salt).as_bytes());
    let mut suffix = [0u8; 8];
    suffix.copy_from_slice(&hash[..8]);
    // Sequence numbers are microseconds of the shard's clock.
    ActivationId::with_suffix(seq, u64::from_be_bytes(suffix))
}

/// The triggers of one namespace in the store. Cheap to clone.
#[derive(Clone)]
pub struct Triggers {
    kvs: ClientPool,
    namespace: String,
    writer: u64,
}

impl std::fmt::Debug for Triggers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Triggers")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl Triggers {
    /// Triggers of the default namespace.
    pub fn new(kvs: ClientPool) -> Self {
        Self {
            kvs,
            namespace: keys::DEFAULT_NAMESPACE.to_string(),
            writer: rand::random(),
        }
    }

    /// Writes `trigger`.
    pub async fn put(&self, trigger: &Trigger) -> Result<()> {
        let key = keys::trigger(&self.namespace, &trigger.name);
        crate::register::put(&self.kvs, key, trigger, Timestamp::now(self.writer)).await
    }

    /// The trigger `name`.
    pub async fn get(&self, name: &str) -> Result<Option<Trigger>> {
        crate::register::get(&self.kvs, keys::trigger(&self.namespace, name)).await
    }

    /// Every trigger, by name.
    pub async fn list(&self) -> Result<Vec<Trigger>> {
        crate::register::list(&self.kvs, &keys::trigger(&self.namespace, "")).await
    }

    /// Deletes trigger `name` (and where its schedule stood).
    pub async fn delete(&self, name: &str) -> Result<()> {
        let at = Timestamp::now(self.writer);
        let deletes = vec![
            (keys::trigger(&self.namespace, name), Entry::tombstone(at)),
            (
                keys::trigger_fired(&self.namespace, name),
                Entry::tombstone(at),
            ),
        ];
        self.kvs
            .with(move |client| client.merge_many(deletes))
            .await?;
        Ok(())
    }

    /// Takes or renews the lease on firing cron ticks first for `owner` until `lease_ms`
    /// from now; whether `owner` holds it (see the module docs).
    pub async fn lease_cron(&self, owner: &str, lease_ms: u64) -> Result<bool> {
        let key = keys::lease(&self.namespace, "cron");
        crate::lease::take(&self.kvs, &key, owner, lease_ms).await
    }

    /// The latest tick each trigger fired so far (ms since the Unix epoch), by name, in one
    /// listing and one batched read.
    pub async fn fired_through(&self) -> Result<std::collections::HashMap<String, u64>> {
        let prefix = keys::trigger_fired(&self.namespace, "");
        Ok(self
            .kvs
            .entries_with_prefix(&prefix)
            .await?
            .into_iter()
            .filter_map(|(key, value)| {
                let name = key.strip_prefix(&prefix)?.to_string();
                match value {
                    LatticeValue::Max(max) => Some((name, u64::try_from(max.0).unwrap_or(0))),
                    _ => None,
                }
            })
            .collect())
    }

    /// Records that trigger `name`'s tick `tick_ms` fired (a max register: never goes back).
    pub async fn mark_fired(&self, name: &str, tick_ms: u64) -> Result<()> {
        let key = keys::trigger_fired(&self.namespace, name);
        let value = LatticeValue::Max(Max(i64::try_from(tick_ms).unwrap_or(i64::MAX)));
        self.kvs.with(move |client| client.put(&key, value)).await?;
        Ok(())
    }

    /// The same store's triggers in `namespace`.
    pub fn in_namespace(&self, namespace: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            ..self.clone()
        }
    }

    /// The namespace of its triggers.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Checks `spec` ([`TriggerSpec::check`]) as a trigger of this namespace: its target
    /// named as the fabric knows it ([`keys::qualify`]): a trigger calls only functions and
    /// DAGs of its own namespace.
    pub fn check(&self, spec: &TriggerSpec) -> std::result::Result<(Target, Firing), String> {
        let (target, firing) = spec.check()?;
        let target = match target {
            Target::Function(name) => Target::Function(keys::qualify(&self.namespace, &name)),
            Target::Dag(name) => Target::Dag(keys::qualify(&self.namespace, &name)),
        };
        Ok((target, firing))
    }

    /// Pauses every trigger that calls `target` (qualified), saying why.
    pub async fn pause_calling(&self, target: &Target, reason: &str) -> Result<Vec<String>> {
        let mut paused = Vec::new();
        for mut trigger in self.list().await? {
            let calls = match self.check(&trigger.spec) {
                Ok((t, _)) => &t == target,
                Err(_) => false,
            };
            if calls && !trigger.paused {
                trigger.paused = true;
                trigger.paused_reason = Some(reason.to_string());
                trigger.touch();
                self.put(&trigger).await?;
                paused.push(trigger.name.clone());
            }
        }
        Ok(paused)
    }
}

/// The input of a trigger's calls.
pub fn input_of(trigger: &Trigger) -> Bytes {
    Bytes::copy_from_slice(trigger.spec.input.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: &str, schedule: &str) -> TriggerSpec {
        TriggerSpec {
            kind: kind.into(),
            schedule: schedule.into(),
            prefix: None,
            function: Some("f".into()),
            dag: None,
            input: String::new(),
        }
    }

    #[test]
    fn specs_are_checked() {
        assert!(spec("cron", "*/5 * * * *").check().is_ok());
        assert!(spec("cron", "*/2 * * * * *").check().is_ok());
        for (kind, schedule) in [
            ("kv-change", "* * * * *"),
            ("cron", "every minute"),
            ("cron", "61 * * * *"),
            ("cron", "* * *"),
        ] {
            assert!(spec(kind, schedule).check().is_err(), "{kind} {schedule}");
        }
        let mut both = spec("cron", "* * * * *");
        both.dag = Some("d".into());
        assert!(both.check().is_err());
        let mut neither = spec("cron", "* * * * *");
        neither.function = None;
        assert!(neither.check().is_err());
        let mut bad_name = spec("cron", "* * * * *");
        bad_name.function = Some("a/b".into());
        assert!(bad_name.check().is_err());
        let kv = |prefix: &str| TriggerSpec {
            prefix: Some(prefix.into()),
            ..spec("kv-change", "")
        };
        assert!(matches!(kv("orders/").check(), Ok((_, Firing::KvChange(p))) if p == "orders/"));
        assert!(kv("").check().is_ok());
        assert!(kv("s").check().is_ok());
        for bad in ["squall/", "squall/ns/default/x"] {
            assert!(kv(bad).check().is_err(), "{bad}");
        }
        assert!(kv(&"x".repeat(MAX_PREFIX + 1)).check().is_err());
        let mut scheduled = kv("a/");
        scheduled.schedule = "* * * * *".into();
        assert!(scheduled.check().is_err());
        let mut with_input = kv("a/");
        with_input.input = "x".into();
        assert!(with_input.check().is_err());
        let mut cron_with_prefix = spec("cron", "* * * * *");
        cron_with_prefix.prefix = Some("a/".into());
        assert!(cron_with_prefix.check().is_err());
    }

    #[test]
    fn the_latest_due_tick_fires_and_missed_ones_are_counted() {
        // Every 10 seconds.
        let schedule = parse_schedule("*/10 * * * * *").expect("parses");
        let base = 1_700_000_000_000u64; // a multiple of 10 s
                                         // Nothing new since the last fired tick.
        assert_eq!(due(&schedule, base, base + 9_999), None);
        // The next tick, on time.
        assert_eq!(
            due(&schedule, base, base + 10_200),
            Some(Due {
                tick_ms: base + 10_000,
                late: false,
                missed: 0
            })
        );
        // Three ticks passed (a gateway stalled): each fires in turn, the first one late.
        assert_eq!(
            due(&schedule, base, base + 30_500),
            Some(Due {
                tick_ms: base + 10_000,
                late: true,
                missed: 0
            })
        );
        assert_eq!(
            due(&schedule, base + 10_000, base + 30_500).map(|d| d.tick_ms),
            Some(base + 20_000)
        );
        // Twenty passed (every gateway was down): only the latest fires, late, nineteen
        // missed.
        assert_eq!(
            due(&schedule, base, base + 200_500),
            Some(Due {
                tick_ms: base + 200_000,
                late: true,
                missed: 19
            })
        );
        // A tick fired long after its time is late.
        assert!(due(&schedule, base, base + 19_000).is_some_and(|d| d.late));
        // Never fired: the latest tick, not late, nothing missed.
        assert_eq!(
            due(&schedule, 0, base + 10_200).map(|d| (d.tick_ms, d.missed, d.late)),
            Some((base + 10_000, 0, false))
        );
    }

    fn trigger(name: &str, salt: u64) -> Trigger {
        Trigger {
            name: name.into(),
            spec: spec("cron", "* * * * *"),
            paused: false,
            paused_reason: None,
            updated_ms: 0,
            updated_us: 0,
            salt,
        }
    }

    #[test]
    fn five_fields_read_as_crontab_reads_them() {
        let base = 1_700_000_000_000u64; // Tuesday 2023-11-14 22:13:20 UTC
        let next = |expression: &str| {
            let schedule = parse_schedule(expression).expect("parses");
            schedule
                .after(&time_of(base))
                .next()
                .map(|t| t.format("%a %H:%M:%S").to_string())
        };
        // 1-5 is Monday to Friday, 0 and 7 are Sunday.
        assert_eq!(next("0 9 * * 1-5").as_deref(), Some("Wed 09:00:00"));
        assert_eq!(next("0 9 * * 0").as_deref(), Some("Sun 09:00:00"));
        assert_eq!(next("0 9 * * 7").as_deref(), Some("Sun 09:00:00"));
        assert_eq!(next("0 9 * * SAT").as_deref(), Some("Sat 09:00:00"));
        assert_eq!(next("*/15 * * * 2").as_deref(), Some("Tue 22:15:00"));
        assert!(parse_schedule("0 9 * * 8").is_err());
    }

    #[test]
    fn tick_ids_are_the_same_everywhere_and_differ_per_tick_and_trigger() {
        let nightly = trigger("nightly", 7);
        let id = tick_id(&nightly, 1_000);
        assert_eq!(id, tick_id(&nightly, 1_000));
        assert_ne!(id, tick_id(&nightly, 2_000));
        assert_ne!(id, tick_id(&trigger("hourly", 7), 1_000));
        assert_ne!(id, tick_id(&trigger("nightly", 8), 1_000));
        assert_eq!(id.start_us(), Some(1_000_000));
        assert!(ActivationId::parse(id.as_str()).is_some());
    }

    /// One field of a cron expression: valid forms, edge values, names and junk.
    fn cron_field() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            3 => Just("*".to_string()),
            3 => "[0-9]{1,2}",
            1 => "[0-9]{1,2}-[0-9]{1,3}",
            1 => "\\*/[0-9]{1,3}",
            1 => "[0-9]{1,2}/[0-9]{1,2}",
            1 => "[0-9]{1,2},[0-9]{1,2}",
            1 => "(MON|sun|JAN|dec|L|\\?|#|W|0|7|8|60|99)",
            1 => "[0-9]{8,24}",
            1 => "\\PC{0,5}",
        ]
    }

    proptest::proptest! {
        /// Any schedule text: an error or a schedule, never a panic; a schedule's due tick
        /// lies after what was fired and at or before now, whatever the two instants.
        #[test]
        fn any_schedule_is_an_error_or_ticks_in_range(
            fields in proptest::collection::vec(cron_field(), 0..9),
            fired in proptest::prelude::prop_oneof![
                proptest::prelude::Just(0u64),
                0u64..5_000_000_000_000,
                proptest::prelude::any::<u64>(),
            ],
            now in proptest::prelude::prop_oneof![
                1_700_000_000_000u64..1_800_000_000_000,
                proptest::prelude::any::<u64>(),
            ],
        ) {
            let text = fields.join(" ");
            if let Ok(schedule) = parse_schedule(&text) {
                if let Some(tick) = due(&schedule, fired, now) {
                    proptest::prop_assert!(tick.tick_ms > fired && tick.tick_ms <= now, "{tick:?}");
                }
            }
        }

        /// Any body sent as a trigger: an error or a checked trigger, never a panic.
        #[test]
        fn any_trigger_body_is_an_error_or_checked(
            kind in proptest::prelude::prop_oneof![
                proptest::prelude::Just("cron"),
                proptest::prelude::Just("kv-change"),
                proptest::prelude::Just("webhook"),
            ],
            fields in proptest::collection::vec(cron_field(), 0..8),
            function in proptest::option::of("[a-z./]{0,6}"),
            dag in proptest::option::of("[a-z]{0,3}"),
            prefix in proptest::option::of("\\PC{0,6}"),
            edits in proptest::option::of(squall_lattices::testing::edits(3)),
        ) {
            let body = serde_json::to_vec(&serde_json::json!({
                "kind": kind,
                "schedule": fields.join(" "),
                "function": function,
                "dag": dag,
                "prefix": prefix,
            }))
            .expect("JSON");
            let body = match &edits {
                Some(edits) => squall_lattices::testing::mutated(&body, edits),
                None => body,
            };
            if let Ok(spec) = serde_json::from_slice::<TriggerSpec>(&body) {
                let _ = spec.check();
            }
        }
    }
}
