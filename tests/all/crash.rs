//! SIGKILL during a write load loses nothing that was acknowledged.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use squall_kvs::{Client, ClientConfig};
use squall_lattices::LatticeValue;
use squall_proto::poll::Poll;

use crate::support::NodeProcess;

/// What one writer had acknowledged: LWW values and its counter contributions.
#[derive(Default)]
struct Acked {
    values: BTreeMap<String, Bytes>,
    /// Per counter key: acknowledged total, and the total of every attempt (acked or not).
    counters: BTreeMap<String, (i64, i64)>,
}

fn write_until_killed(
    addr: String,
    writer: usize,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Acked>>,
) {
    let config = ClientConfig {
        timeout: Duration::from_millis(500),
        attempts: 1,
        ..ClientConfig::default()
    };
    let mut client = Client::connect(&addr, config).expect("connect");
    let counter_key = format!("counter-{}", writer % 2);
    let mut attempted = 0i64;
    for i in 0.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let key = format!("w{writer}-k{i}");
        let value = Bytes::from(format!("value {writer} {i} {}", "x".repeat(i % 300)));
        if client.put_lww(&key, value.clone()).is_err() {
            break;
        }
        acked.lock().expect("lock").values.insert(key, value);
        attempted += 1;
        let result = client.increment(&counter_key, 1);
        let mut acked = acked.lock().expect("lock");
        let entry = acked.counters.entry(counter_key.clone()).or_default();
        entry.1 = attempted;
        if result.is_err() {
            break;
        }
        entry.0 = attempted;
    }
}

fn crash_and_recover(node_args: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data_arg = data.to_str().expect("utf-8 path");
    let mut args = vec!["--data-dir", data_arg, "--shards", "2"];
    args.extend_from_slice(node_args);
    let mut node = NodeProcess::start(dir.path(), &args);

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<(Arc<Mutex<Acked>>, std::thread::JoinHandle<()>)> = (0..4)
        .map(|w| {
            let acked = Arc::new(Mutex::new(Acked::default()));
            let thread = {
                let (addr, stop, acked) = (node.addr.clone(), stop.clone(), acked.clone());
                std::thread::spawn(move || write_until_killed(addr, w, stop, acked))
            };
            (acked, thread)
        })
        .collect();
    // Let the load run until a good number of writes are acknowledged, then kill mid-stream.
    let acked_count = || -> usize {
        writers
            .iter()
            .map(|(a, _)| a.lock().expect("lock").values.len())
            .sum()
    };
    // Kill after 2,000 acknowledged writes, or after 6 s with however many there are.
    let _ = Poll::within(Duration::from_secs(6))
        .every(Duration::from_millis(10))
        .until(|| (acked_count() >= 2_000).then_some(()));
    node.kill_hard();
    stop.store(true, Ordering::Relaxed);
    let mut all = Acked::default();
    for (acked, thread) in writers {
        thread.join().expect("writer thread");
        let acked = std::mem::take(&mut *acked.lock().expect("lock"));
        all.values.extend(acked.values);
        for (key, (ok, tried)) in acked.counters {
            let entry = all.counters.entry(key).or_default();
            entry.0 += ok;
            entry.1 += tried;
        }
    }
    assert!(
        all.values.len() > 100,
        "the load acknowledged too little to test: {}",
        all.values.len()
    );

    let mut node = NodeProcess::start(dir.path(), &args);
    let mut client = Client::connect(&node.addr, ClientConfig::default()).expect("connect");
    let keys: Vec<String> = all.values.keys().cloned().collect();
    let mut lost = Vec::new();
    for chunk in keys.chunks(500) {
        let values = client.get_many(chunk).expect("read back");
        for (key, value) in chunk.iter().zip(values) {
            match value {
                Some(LatticeValue::Lww(v)) if v.value == all.values[key] => {}
                other => lost.push((key.clone(), other)),
            }
        }
    }
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(3)]
    );
    for (key, (acked, tried)) in &all.counters {
        match client.get(key).expect("read counter") {
            Some(LatticeValue::Counter(counter)) => {
                let value = counter.value() as i64;
                assert!(
                    (*acked..=*tried).contains(&value),
                    "{key}: {value} outside acknowledged {acked} ..= attempted {tried}"
                );
            }
            other => panic!("{key}: {other:?}"),
        }
    }
    assert!(node.stop(), "node did not shut down cleanly on SIGTERM");
}

#[test]
fn sigkill_loses_no_acknowledged_write_with_fsync_always() {
    crash_and_recover(&["--fsync", "always"]);
}

#[test]
fn sigkill_loses_no_acknowledged_write_with_fsync_never_and_constant_compaction() {
    // Without fsync the page cache still holds every acknowledged write when the process dies;
    // a 16 KiB compaction threshold makes the kill land during or between snapshots.
    crash_and_recover(&["--fsync", "never", "--compact-after-bytes", "16384"]);
}
