//! A storage node's settings.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use squall_proto::secret::ClusterSecret;

use crate::cluster::ClusterConfig;
use crate::{Error, Result};

/// When the write-ahead log is forced to disk. Every acknowledged write has always been
/// *written* to the log file first, so a killed process (SIGKILL, panic, OOM) loses nothing
/// under any policy; the policy decides what a power loss or kernel crash can take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FsyncPolicy {
    /// `fdatasync` before acknowledging each batch (group commit). Nothing acknowledged is lost
    /// even on power loss. The default.
    #[default]
    Always,
    /// `fdatasync` at most this often; a power loss can take the last interval's writes
    /// (Redis's `appendfsync everysec` with 1 s).
    Interval(Duration),
    /// Leave flushing to the operating system.
    Never,
}

impl FromStr for FsyncPolicy {
    type Err = Error;

    /// `always`, `never`, or an interval in milliseconds such as `1000ms` or `interval:1000`.
    fn from_str(s: &str) -> Result<Self> {
        let millis = |v: &str| {
            v.parse::<u64>()
                .map(|ms| FsyncPolicy::Interval(Duration::from_millis(ms)))
                .map_err(|_| Error::Config(format!("bad fsync interval {v:?}")))
        };
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            _ => match (s.strip_prefix("interval:"), s.strip_suffix("ms")) {
                (Some(v), _) | (None, Some(v)) => millis(v),
                _ => Err(Error::Config(format!(
                    "bad fsync policy {s:?} (expected always, never, or an interval like 1000ms)"
                ))),
            },
        }
    }
}

/// A storage node's configuration. Every field has a default suited to one machine.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Host to bind (default `127.0.0.1`).
    pub host: String,
    /// First port: shard `i` listens on `port + i`. 0 (the default) lets the OS pick a free
    /// port for every shard, which tests and `squall up` use.
    pub port: u16,
    /// Shard threads (default: the number of cores). More shards than cores only adds
    /// context switches.
    pub shards: usize,
    /// Where the write-ahead log and snapshots live. `None` (the default) keeps data in memory
    /// only: fast, and lost on exit.
    pub data_dir: Option<PathBuf>,
    /// When the log is forced to disk (default [`FsyncPolicy::Always`]).
    pub fsync: FsyncPolicy,
    /// A shard snapshots its state and truncates its log once the log exceeds both this many
    /// bytes and the size of the previous snapshot (default 64 MiB), which bounds both
    /// recovery time and write amplification (at most about 2x).
    pub compact_after_bytes: u64,
    /// Largest request frame answered; larger ones get a `TooLarge` error (default 16 MiB).
    /// Frames more than 1 MiB over it are dropped by ZeroMQ before they are read, closing the
    /// sender's connection, so a flood of huge frames cannot exhaust memory.
    pub max_request_bytes: usize,
    /// Most keys in one request (default 10 000).
    pub max_keys_per_request: usize,
    /// Virtual nodes per shard on the ring (default 512): more gives a more even spread.
    pub virtual_nodes: u32,
    /// Requests a shard takes from its socket before committing the batch and replying
    /// (default 256): a larger batch amortises the fsync, a smaller one cuts latency.
    pub max_batch: usize,
    /// The cluster to join (default: none; the node runs alone).
    pub cluster: Option<ClusterConfig>,
    /// How long a delete's tombstone (or an expired key's) is kept before the store forgets it
    /// (default one hour). A replica away for longer than this may bring back a value
    /// deleted meanwhile when it returns; see [`squall_lattices::entry`].
    pub tombstone_grace_ms: u64,
    /// The cluster secret its shards require of every connection, and present to the
    /// subscribers they push to (default: the process's, if one was installed; see
    /// [`squall_proto::secret`]). Never read from a settings file.
    #[serde(skip, default = "ClusterSecret::installed")]
    pub secret: Option<ClusterSecret>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".to_string(),
            port: 0,
            shards: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            data_dir: None,
            fsync: FsyncPolicy::default(),
            compact_after_bytes: 64 << 20,
            max_request_bytes: 16 << 20,
            max_keys_per_request: 10_000,
            virtual_nodes: 512,
            max_batch: 256,
            cluster: None,
            tombstone_grace_ms: 3_600_000,
            secret: ClusterSecret::installed(),
        }
    }
}

impl Config {
    /// Checks the settings that would otherwise fail later, less clearly.
    pub fn validate(&self) -> Result<()> {
        if self.shards == 0 || self.shards > 1024 {
            return Err(Error::Config(format!(
                "shards must be between 1 and 1024, not {}",
                self.shards
            )));
        }
        if self.port != 0 && usize::from(self.port) + self.shards > 65_536 {
            return Err(Error::Config(format!(
                "ports {}..{} run past 65535",
                self.port,
                usize::from(self.port) + self.shards
            )));
        }
        if self.virtual_nodes == 0 {
            return Err(Error::Config("virtual_nodes must be at least 1".into()));
        }
        if let Some(cluster) = &self.cluster {
            if cluster.router.is_empty() {
                return Err(Error::Config("a cluster needs its router's address".into()));
            }
            if self.port == 0 && self.host == "0.0.0.0" {
                return Err(Error::Config(
                    "a cluster member must bind a reachable host, not 0.0.0.0".into(),
                ));
            }
        }
        if self.max_batch == 0 || self.max_keys_per_request == 0 || self.max_request_bytes == 0 {
            return Err(Error::Config(
                "max_batch, max_keys_per_request and max_request_bytes must be positive".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_policies_parse() {
        assert_eq!(
            "always".parse::<FsyncPolicy>().unwrap(),
            FsyncPolicy::Always
        );
        assert_eq!("never".parse::<FsyncPolicy>().unwrap(), FsyncPolicy::Never);
        assert_eq!(
            "1000ms".parse::<FsyncPolicy>().unwrap(),
            FsyncPolicy::Interval(Duration::from_secs(1))
        );
        assert_eq!(
            "interval:5".parse::<FsyncPolicy>().unwrap(),
            FsyncPolicy::Interval(Duration::from_millis(5))
        );
        assert!("sometimes".parse::<FsyncPolicy>().is_err());
    }

    #[test]
    fn zero_shards_is_rejected() {
        let config = Config {
            shards: 0,
            ..Config::default()
        };
        assert!(config.validate().is_err());
    }
}
