//! Builds the example guests (`examples/functions`) for tests and benchmarks.
//!
//! They are built from source with the same toolchain, for `wasm32-wasip2`, once per process,
//! into the guests' own target directory, `examples/functions/target`: the one
//! `cargo build --release --target wasm32-wasip2` in `examples/functions` uses (the README's
//! quick start), so that build finds them built, and one apart from the host's, so this
//! never waits on the lock of the build that is running the tests.
//!
//! Also the consistency checker's reading of what the `observe` probe reports
//! ([`observations`], [`repeatable_read_violations`]), shared by the anomaly test and the
//! consistency benchmark.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use hashbrown::HashMap;
use squall_lattices::causal::{raise, raise_all};
use squall_lattices::{Dependencies, VectorClock};

/// The directory of the example functions' workspace.
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("examples")
        .join("functions")
}

fn target_dir() -> PathBuf {
    examples_dir().join("target")
}

/// Builds the example guests (once per process) and returns the directory holding
/// `incr.wasm`, `square.wasm`, and the others.
///
/// # Panics
/// If the build fails: tests cannot run without their guests.
pub fn guests() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let manifest = examples_dir().join("Cargo.toml");
        let status = Command::new(cargo)
            .args([
                "build",
                "--release",
                "--locked",
                "--target",
                "wasm32-wasip2",
            ])
            .arg("--manifest-path")
            .arg(&manifest)
            // Cargo reads `.cargo/config.toml` (the guests' target features) from where it runs.
            .current_dir(examples_dir())
            .arg("--target-dir")
            .arg(target_dir())
            // Flags meant for the host build (coverage, sanitizers) do not apply to guests.
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET")
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("building the example guests failed ({s}); see the output above"),
            Err(e) => panic!("cannot run cargo to build the example guests: {e}"),
        }
        target_dir().join("wasm32-wasip2").join("release")
    })
}

/// The bytes of the example guest `name` (a crate of `examples/functions`).
///
/// # Panics
/// If the guest cannot be built or read.
pub fn guest(name: &str) -> Vec<u8> {
    let path = guests().join(format!("{}.wasm", name.replace('-', "_")));
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The SqueezeNet data, kept outside the repository: the model, its labels, two photos, their
/// preprocessed input tensors and onnxruntime's outputs for them. `SQUALL_MODELS_DIR` if set,
/// else `shared/models` beside the repository's directory.
pub fn squeezenet_dir() -> PathBuf {
    match std::env::var_os("SQUALL_MODELS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("..")
            .join("shared")
            .join("models"),
    }
}

/// The data bytes of a little-endian `f32` NumPy file (`.npy`, format 1.0 or 2.0), checked.
///
/// # Panics
/// If the file cannot be read or is not such an array.
pub fn npy_f32(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert!(
        bytes.starts_with(b"\x93NUMPY"),
        "{} is not .npy",
        path.display()
    );
    let (header_len, start) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        _ => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
    };
    let header = String::from_utf8_lossy(&bytes[start..start + header_len]);
    assert!(
        header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"),
        "{} is not a C-order little-endian f32 array: {header}",
        path.display()
    );
    bytes[start + header_len..].to_vec()
}

/// Little-endian `f32`s from bytes.
pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// One read or write of a run, as the `observe` probe reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// The key.
    pub key: String,
    /// The value read or written (`-`: read as missing).
    pub value: String,
    /// Whether the run wrote it (`key:=value`) rather than read it (`key=value`).
    pub write: bool,
    /// A causal value's clock (empty for other types).
    pub clock: VectorClock,
    /// A causal value's dependencies (empty for other types).
    pub dependencies: Dependencies,
}

fn parse_clock(text: &str) -> Option<VectorClock> {
    text.split('+')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (writer, counter) = pair.split_once('.')?;
            Some((writer.parse().ok()?, counter.parse().ok()?))
        })
        .collect()
}

/// The reads and writes of one run as the `observe` probe reports them (its output: a key
/// line, then a `key=value` line per read and a `key:=value` line per write, in order; a
/// causal value as `value|clock|dependencies`).
pub fn observations(output: &[u8]) -> Vec<Observation> {
    String::from_utf8_lossy(output)
        .lines()
        .skip(1)
        .filter_map(|line| {
            let (key, value, write) = match line.split_once(":=") {
                Some((key, value)) => (key, value, true),
                None => {
                    let (key, value) = line.split_once('=')?;
                    (key, value, false)
                }
            };
            let mut parts = value.split('|');
            let value = parts.next().unwrap_or_default();
            let clock = parse_clock(parts.next().unwrap_or_default())?;
            let dependencies = parts
                .next()
                .unwrap_or_default()
                .split(';')
                .filter(|d| !d.is_empty())
                .map(|d| {
                    let (key, clock) = d.rsplit_once(':')?;
                    Some((key.to_string(), parse_clock(clock)?))
                })
                .collect::<Option<Dependencies>>()?;
            Some(Observation {
                key: key.to_string(),
                value: value.to_string(),
                write,
                clock,
                dependencies,
            })
        })
        .collect()
}

/// The keys a run read in a version other than the one it should see under repeatable read:
/// the version of its first read of the key, or after it wrote the key, what it wrote. Each
/// is a violation.
pub fn repeatable_read_violations(run: &[Observation]) -> Vec<String> {
    let mut seen: HashMap<&str, (&str, &VectorClock)> = HashMap::new();
    let mut violated: Vec<String> = Vec::new();
    for observed in run {
        let version = (observed.value.as_str(), &observed.clock);
        if observed.write {
            seen.insert(&observed.key, version);
            continue;
        }
        let expected = *seen.entry(&observed.key).or_insert(version);
        if expected != version && !violated.contains(&observed.key) {
            violated.push(observed.key.clone());
        }
    }
    violated
}

/// The reads of a run outside a causal cut: a version read (or written) although it depends
/// on a newer version of another key than one the run read of that key (before or after).
/// Each is a violation, described.
pub fn causal_cut_violations(run: &[Observation]) -> Vec<String> {
    let mut violated = Vec::new();
    for dependent in run {
        for (key, needed) in &dependent.dependencies {
            for read in run.iter().filter(|o| !o.write && &o.key == key) {
                if !read.clock.dominates(needed) {
                    violated.push(format!(
                        "{}={} depends on {key} at {needed:?}, but the run read {key}={} at {:?}",
                        dependent.key, dependent.value, read.value, read.clock
                    ));
                }
            }
        }
    }
    violated
}

/// A client session's causal history: what its runs so far read and wrote, and what those
/// versions depend on. A later run of the session that reads an older version of a key than
/// that is a violation (it went back in time).
#[derive(Debug, Default, Clone)]
pub struct SessionHistory {
    floors: Dependencies,
}

impl SessionHistory {
    /// Checks one run of the session against what the session saw before it, then adds what
    /// the run saw; returns the run's reads that went back.
    pub fn run(&mut self, run: &[Observation]) -> Vec<String> {
        let mut violated = Vec::new();
        for read in run.iter().filter(|o| !o.write) {
            if let Some(floor) = self.floors.get(&read.key) {
                if !read.clock.dominates(floor) {
                    violated.push(format!(
                        "{}={} at {:?} is older than the session saw ({floor:?})",
                        read.key, read.value, read.clock
                    ));
                }
            }
        }
        for observed in run {
            raise(&mut self.floors, &observed.key, &observed.clock);
            raise_all(&mut self.floors, &observed.dependencies);
        }
        violated
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checker_sees_a_key_read_in_two_versions() {
        let consistent = observations(b"a b\na=1\nb=-\na=1\nb=-\n");
        assert_eq!(consistent.len(), 4);
        assert!(repeatable_read_violations(&consistent).is_empty());
        let anomaly = observations(b"a b\na=1\nb=2\na=1\nb=3\nb=4\n");
        assert_eq!(repeatable_read_violations(&anomaly), ["b"]);
        // After its own write a run reads what it wrote, not its first version.
        let wrote = observations(b"a a@1=9\na=1\na:=9\na=9\n");
        assert_eq!(wrote.len(), 3);
        assert!(wrote[1].write);
        assert!(repeatable_read_violations(&wrote).is_empty());
        let lost = observations(b"a a@1=9\na=1\na:=9\na=1\n");
        assert_eq!(repeatable_read_violations(&lost), ["a"]);
    }

    #[test]
    fn the_checker_sees_reads_outside_a_causal_cut_and_sessions_going_back() {
        // b (written by 7 at 2) depends on a at 7.3; the run read a at 7.2: outside the cut.
        let outside = observations(b"a b\na=x|7.2|\nb=y|7.2|a:7.3\n");
        assert_eq!(outside[1].dependencies["a"], [(7, 3)].into_iter().collect());
        assert_eq!(causal_cut_violations(&outside).len(), 1);
        let inside = observations(b"a b\na=x|7.3+8.1|\nb=y|7.2|a:7.3\n");
        assert!(causal_cut_violations(&inside).is_empty());
        assert!(repeatable_read_violations(&inside).is_empty());
        // Two versions of a with the same bytes are still two versions.
        let twice = observations(b"a\na=x|7.3|\na=x|7.4|\n");
        assert_eq!(repeatable_read_violations(&twice), ["a"]);
        // A session: the second run reads an older a than the first read, and an older c
        // than the first run's b depends on.
        let mut session = SessionHistory::default();
        assert!(session
            .run(&observations(b"a b\na=x|7.3|\nb=y|7.4|c:9.1\n"))
            .is_empty());
        assert_eq!(session.run(&observations(b"a c\na=w|7.2|\nc=-\n")).len(), 2);
        assert!(session
            .run(&observations(b"a c\na=x|7.3|\nc=z|9.1|\n"))
            .is_empty());
    }
}
