//! A shard's change journal: every client's write, kept durably until a consumer (the
//! gateways' `kv-change` triggers) has taken it.
//!
//! # Why in the shard, and how it stays durable
//! A trigger must see every acknowledged write, even if the node is killed the moment after
//! the acknowledgement. So the journal entry of a write is made by the shard that applies it,
//! in the same batch: appended to the shard's write-ahead log before the batch's group commit,
//! so a write is acknowledged only once its journal entry is as durable as the write itself.
//!
//! Journal entries live in the shard's own map, under reserved keys that sort in sequence
//! order (`squall/journal/{seq:020}`), as last-writer-wins registers holding the encoded
//! [`Change`]. The log, snapshots, compaction and recovery therefore keep them without any
//! machinery of their own. They are this shard's alone: hand-off ([`is_journal_key`]) and
//! gossip skip them, and clients cannot route a read to them (they are not where their hash
//! says).
//!
//! # Sequence numbers and positions
//! Sequence numbers increase within a shard: the larger of the clock in microseconds and the
//! last number plus one, so they keep increasing across restarts without being stored apart
//! (a clock set back by more than the time between two restarts would break this). A
//! consumer asks for the changes after its position ([`Request::Changes`]); asking with a
//! position also forgets every change up to it, since the consumer keeps the position
//! durably itself. Forgetting is not logged: after a crash, replaying the log brings back
//! changes already taken, which the consumer skips by its position and which are forgotten
//! again at its next request (and for good at the next compaction).
//!
//! A consumer with nothing to take waits for the next change instead of asking again and
//! again ([`Request::AwaitChange`]): the shard holds the request and answers it with the
//! newest sequence number right after the commit that made a newer change durable (or when
//! its wait ends), forgetting nothing.
//!
//! # Only when asked, and bounded
//! A shard journals only once switched on ([`Request::Journal`], kept durably under
//! [`SWITCH_KEY`]), which creating a `kv-change` trigger does, so a store without such
//! triggers pays nothing. At most [`MAX_CHANGES`] changes and [`MAX_BYTES`] bytes wait per
//! shard: beyond, the oldest are dropped and counted, and the consumer is told
//! ([`Response::Changes`]'s `lost`), so a consumer that falls that far behind records an
//! error instead of missing writes silently.
//!
//! What enters: `PUT`s, writes with expiries and client merges (deletes included) of keys
//! outside `squall/`. What does not: copies between replicas ([`Request::Copy`]: hand-off and
//! gossip), expiry reaping, and Squall's own keys.
//!
//! [`Request::Changes`]: squall_proto::Request::Changes
//! [`Request::Journal`]: squall_proto::Request::Journal
//! [`Request::AwaitChange`]: squall_proto::Request::AwaitChange
//! [`Request::Copy`]: squall_proto::Request::Copy
//! [`Response::Changes`]: squall_proto::Response::Changes

use std::ops::Bound;

use bytes::Bytes;
use squall_lattices::{Entry, Lattice, LatticeValue, Lww, Timestamp};
use squall_proto::{Change, Key};

use crate::log::{ShardLog, Store};
use crate::Result;

/// Where a shard's journal entries are kept in its map.
pub const PREFIX: &str = "squall/journal/";

/// The key whose last-writer-wins value (`[1]` or `[0]`) says whether the shard journals.
pub const SWITCH_KEY: &str = "squall/journal-switch";

/// The most changes a shard keeps waiting for its consumer.
pub const MAX_CHANGES: usize = 1_000_000;

/// The most bytes of changes a shard keeps waiting for its consumer.
pub const MAX_BYTES: usize = 256 << 20;

/// The most changes one [`Journal::take`] answers.
pub const MAX_TAKE: u32 = 4096;

/// About the most bytes of changes one [`Journal::take`] answers (at least one change).
const TAKE_BYTES: usize = 4 << 20;

/// Whether `key` is one of the journal's own keys (never handed off, never journaled).
pub fn is_journal_key(key: &str) -> bool {
    key.starts_with(PREFIX) || key == SWITCH_KEY
}

fn key_of(seq: u64) -> Key {
    format!("{PREFIX}{seq:020}")
}

fn seq_of(key: &str) -> Option<u64> {
    key.strip_prefix(PREFIX)?.parse().ok()
}

/// A shard's journal state: whether it is on, its last sequence number, and what it holds
/// (the changes themselves are in the shard's map). Owned by the shard thread.
#[derive(Debug, Default)]
pub struct Journal {
    on: bool,
    last_seq: u64,
    len: usize,
    bytes: usize,
    lost: u64,
}

impl Journal {
    /// The journal as recovered in `store`.
    pub fn recover(store: &Store) -> Self {
        let on = store
            .get(SWITCH_KEY)
            .and_then(|entry| entry.value.as_ref())
            .is_some_and(
                |value| matches!(value, LatticeValue::Lww(lww) if lww.value.first() == Some(&1)),
            );
        let mut journal = Self {
            on,
            ..Self::default()
        };
        for (key, entry) in store.range::<str, _>((Bound::Included(PREFIX), Bound::Unbounded)) {
            let Some(seq) = seq_of(key) else { break };
            journal.last_seq = journal.last_seq.max(seq);
            journal.len += 1;
            journal.bytes += size_of(entry);
        }
        journal
    }

    /// The newest sequence number given to a change (0: none since the journal began).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Whether the shard journals clients' writes.
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Switches journaling on or off, durably (through `log`).
    pub fn switch(
        &mut self,
        store: &mut Store,
        log: Option<&mut ShardLog>,
        on: bool,
    ) -> Result<()> {
        let at = Timestamp::new(now_us().max(self.last_seq), 0);
        let entry = Entry::of(LatticeValue::Lww(Lww::new(
            at,
            Bytes::from(vec![u8::from(on)]),
        )));
        if let Some(log) = log {
            log.append(SWITCH_KEY, &entry)?;
        }
        match store.get_mut(SWITCH_KEY) {
            Some(stored) => {
                stored.merge(entry);
            }
            None => {
                store.insert(SWITCH_KEY.to_string(), entry);
            }
        }
        self.on = on;
        Ok(())
    }

    /// Journals a client's write (appended to `log` with the write's batch): `change` as the
    /// shard saw it (the key, what was written, the value after it, the write's digest), given
    /// its sequence number and time here. Drops the oldest changes, counted, if the journal is
    /// full.
    pub fn record(
        &mut self,
        store: &mut Store,
        log: Option<&mut ShardLog>,
        mut change: Change,
    ) -> Result<()> {
        let now = now_us();
        let seq = now.max(self.last_seq + 1);
        change.seq = seq;
        change.ms = seq_ms(now);
        let encoded = rmp_serde::to_vec(&change)
            .map_err(|e| squall_proto::Error::Encode(format!("a journal entry: {e}")))?;
        let entry = Entry::of(LatticeValue::Lww(Lww::new(
            Timestamp::new(seq, 0),
            Bytes::from(encoded),
        )));
        let key = key_of(seq);
        if let Some(log) = log {
            log.append(&key, &entry)?;
        }
        self.last_seq = seq;
        self.len += 1;
        self.bytes += size_of(&entry);
        store.insert(key, entry);
        while self.len > MAX_CHANGES || self.bytes > MAX_BYTES {
            let Some(oldest) = self.oldest(store) else {
                break;
            };
            self.forget(store, &oldest);
            self.lost += 1;
        }
        Ok(())
    }

    /// Forgets the changes up to `after`, then answers up to `limit` of those after it,
    /// oldest first, and how many were dropped (journal full) since the last answer.
    pub fn take(&mut self, store: &mut Store, after: u64, limit: u32) -> (Vec<Change>, u64) {
        // New changes number after what the consumer has seen, whatever the clock says.
        self.last_seq = self.last_seq.max(after);
        while let Some(oldest) = self.oldest(store) {
            if seq_of(&oldest).is_some_and(|seq| seq <= after) {
                self.forget(store, &oldest);
            } else {
                break;
            }
        }
        let from = key_of(after.saturating_add(1));
        let mut changes = Vec::new();
        let mut bytes = 0;
        for (key, entry) in
            store.range::<str, _>((Bound::Included(from.as_str()), Bound::Unbounded))
        {
            if seq_of(key).is_none() || changes.len() >= limit.clamp(1, MAX_TAKE) as usize {
                break;
            }
            let size = size_of(entry);
            if !changes.is_empty() && bytes + size > TAKE_BYTES {
                break;
            }
            bytes += size;
            match decode(entry) {
                Some(change) => changes.push(change),
                None => {
                    tracing::error!(key = %key, "a journal entry could not be decoded; skipped")
                }
            }
        }
        (changes, std::mem::take(&mut self.lost))
    }

    fn oldest(&self, store: &Store) -> Option<Key> {
        store
            .range::<str, _>((Bound::Included(PREFIX), Bound::Unbounded))
            .next()
            .filter(|(key, _)| seq_of(key).is_some())
            .map(|(key, _)| key.clone())
    }

    fn forget(&mut self, store: &mut Store, key: &str) {
        if let Some(entry) = store.remove(key) {
            self.len = self.len.saturating_sub(1);
            self.bytes = self.bytes.saturating_sub(size_of(&entry));
        }
    }
}

/// The digest of a client's write of `key` as sent (see [`Change::digest`]).
pub fn write_digest(key: &str, write: &impl serde::Serialize) -> u64 {
    let encoded = rmp_serde::to_vec(write).unwrap_or_default();
    let mut bytes = Vec::with_capacity(key.len() + 1 + encoded.len());
    bytes.extend_from_slice(key.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(&encoded);
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

fn decode(entry: &Entry) -> Option<Change> {
    match entry.value.as_ref()? {
        LatticeValue::Lww(lww) => rmp_serde::from_slice(&lww.value).ok(),
        _ => None,
    }
}

fn size_of(entry: &Entry) -> usize {
    match &entry.value {
        Some(LatticeValue::Lww(lww)) => lww.value.len() + 48,
        _ => 48,
    }
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn seq_ms(us: u64) -> u64 {
    us / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(key: &str, value: LatticeValue) -> Change {
        Change {
            seq: 0,
            ms: 0,
            key: key.to_string(),
            written: Some(value.clone()),
            deleted: false,
            after: Some(value),
            digest: 1,
            chain: 0,
        }
    }

    fn lww(text: &'static str) -> LatticeValue {
        LatticeValue::Lww(Lww::new(
            Timestamp::new(1, 1),
            Bytes::from_static(text.as_bytes()),
        ))
    }

    #[test]
    fn changes_are_taken_in_order_and_forgotten_once_passed() {
        let mut store = Store::new();
        let mut journal = Journal::recover(&store);
        assert!(!journal.is_on());
        journal.switch(&mut store, None, true).expect("switched");
        for (key, value) in [("a", "1"), ("b", "2"), ("a", "3")] {
            journal
                .record(&mut store, None, change(key, lww(value)))
                .expect("recorded");
        }
        let (changes, lost) = journal.take(&mut store, 0, 10);
        assert_eq!(lost, 0);
        let keys: Vec<&str> = changes.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, ["a", "b", "a"]);
        assert!(changes.windows(2).all(|w| w[0].seq < w[1].seq));
        // Taking after the second forgets the first two.
        let (rest, _) = journal.take(&mut store, changes[1].seq, 10);
        assert_eq!(rest, changes[2..]);
        assert_eq!(store.keys().filter(|k| k.starts_with(PREFIX)).count(), 1);
        // Recovery from the map finds the same state, switch included.
        let recovered = Journal::recover(&store);
        assert!(recovered.is_on());
        assert_eq!(recovered.last_seq, changes[2].seq);
        assert_eq!(recovered.len, 1);
    }

    #[test]
    fn a_full_journal_drops_its_oldest_and_says_so() {
        let mut store = Store::new();
        let mut journal = Journal::recover(&store);
        journal.bytes = MAX_BYTES - 100;
        for _ in 0..3 {
            journal
                .record(&mut store, None, change("k", lww("v")))
                .expect("recorded");
        }
        let (changes, lost) = journal.take(&mut store, 0, 10);
        assert!(lost >= 1, "{lost}");
        assert_eq!(changes.len() as u64 + lost, 3);
        assert!(
            journal.take(&mut store, 0, 10).1 == 0,
            "lost is reported once"
        );
    }

    #[test]
    fn journal_keys_are_recognised() {
        assert!(is_journal_key(&key_of(5)));
        assert!(is_journal_key(SWITCH_KEY));
        assert!(!is_journal_key("squall/ns/default/result/x"));
        assert_eq!(seq_of(&key_of(42)), Some(42));
    }
}
