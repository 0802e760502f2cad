//! What a store keeps under a key: a value, the deletes that came before it, and its expiry.
//!
//! A lattice only grows, so a delete cannot be a merge of the value itself. An [`Entry`] adds
//! an *epoch*: merging two entries keeps the one with the later epoch whole, and merges the
//! values (and expiries) of entries of the same epoch. A delete is a tombstone, an entry with
//! no value at the delete's timestamp: it wins over everything of an earlier epoch, whichever
//! order replicas, hand-offs, gossip or a log replay bring them in. This is the ordinary
//! lexicographic product of a total order (the epoch) and a lattice (value and expiry), so
//! the laws hold, and the property tests check them.
//!
//! Where a write lands is decided once, by the replica that accepts it ([`Write::lift`]):
//! - a last-writer-wins write lands in the epoch of its own timestamp, so deletes and writes
//!   of a register order by timestamp exactly, on every replica (a write timestamped before a
//!   delete is lost, one after it survives);
//! - any other write lands in the epoch the replica holds: after a delete it is reached,
//!   before it the delete wins; after an expiry it starts the next epoch (so a counter
//!   counts from nothing again). A write that reaches a replica which never saw the key while
//!   a delete of it is still on its way there is lost when the delete arrives.
//!
//! An expiry is a last-writer-wins register of a time (milliseconds since the Unix epoch; 0
//! for none) beside the value, part of its epoch: a new last-writer-wins value starts a new
//! epoch and so clears it, as Redis's `SET` does. An expired entry reads as absent; a store
//! *reaps* it ([`Entry::reap`]) by dropping its value and keeping its epoch and expiry, so the
//! space comes back and a replica that still holds the value cannot bring it back (what it
//! holds is expired too). Dead entries (tombstones, expired entries) are forgotten once dead
//! for longer than a grace period ([`Entry::reclaimable`]); a replica that was away longer
//! than that may bring back a value deleted meanwhile (the same trade-off as Cassandra's
//! `gc_grace_seconds`), and a write near the end of the grace may land in different epochs on
//! replicas whose clocks disagree.

use serde::{Deserialize, Serialize};

use crate::{Lattice, LatticeValue, Lww, Timestamp, TypeMismatch};

/// Milliseconds since the Unix epoch by this machine's clock (0 for a clock set before 1970):
/// the time expiries are set in and compared with.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The expiry register's value for a time to live from now: the time it ends (never 0), or 0
/// for no expiry.
pub fn expires_at(ttl: Option<std::time::Duration>) -> u64 {
    ttl.map_or(0, |ttl| {
        now_ms()
            .saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
            .max(1)
    })
}

/// A key's value with its epoch and expiry (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Writes of earlier epochs were deleted. [`Timestamp::default`] for a key never deleted
    /// (last-writer-wins values: the value's timestamp).
    pub epoch: Timestamp,
    /// `None`: deleted (a tombstone).
    pub value: Option<LatticeValue>,
    /// When the value expires, in milliseconds since the Unix epoch (0: never); the latest
    /// setting wins.
    pub expiry: Option<Lww<u64>>,
}

/// A write as a client sends it, before a replica gives it an epoch ([`Write::lift`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Write {
    /// The value to merge (`None`: only the expiry changes).
    pub value: Option<LatticeValue>,
    /// A new expiry (milliseconds since the Unix epoch, 0 for none), or `None` to leave it.
    pub expiry: Option<Lww<u64>>,
}

impl Write {
    /// A write of `value` that expires `ttl` from now (`None`: never, which also clears an
    /// earlier expiry), the expiry stamped `at`.
    pub fn expiring(value: LatticeValue, at: Timestamp, ttl: Option<std::time::Duration>) -> Self {
        Self {
            value: Some(value),
            expiry: Some(Lww::new(at, expires_at(ttl))),
        }
    }
}

impl Entry {
    /// A value never deleted: in the epoch of its timestamp if it is a last-writer-wins
    /// register, else in the first epoch. This is how values stored before entries existed
    /// are read.
    pub fn of(value: LatticeValue) -> Self {
        let epoch = match &value {
            LatticeValue::Lww(register) => register.timestamp,
            _ => Timestamp::default(),
        };
        Self {
            epoch,
            value: Some(value),
            expiry: None,
        }
    }

    /// A delete at `at`.
    pub fn tombstone(at: Timestamp) -> Self {
        Self {
            epoch: at,
            value: None,
            expiry: None,
        }
    }

    /// When the value expires (milliseconds since the Unix epoch), if it has an expiry.
    pub fn expires_at_ms(&self) -> Option<u64> {
        self.expiry.as_ref().map(|e| e.value).filter(|&at| at != 0)
    }

    /// Whether the entry's expiry has passed at `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms().is_some_and(|at| at <= now_ms)
    }

    /// The value as a reader at `now_ms` sees it: `None` if deleted or expired.
    pub fn live(&self, now_ms: u64) -> Option<&LatticeValue> {
        if self.is_expired(now_ms) {
            None
        } else {
            self.value.as_ref()
        }
    }

    /// The value as a reader at `now_ms` sees it, taken.
    pub fn into_live(self, now_ms: u64) -> Option<LatticeValue> {
        if self.is_expired(now_ms) {
            None
        } else {
            self.value
        }
    }

    /// The value as a reader sees it now, taken; reads the clock only if the value expires.
    pub fn into_live_now(self) -> Option<LatticeValue> {
        if self.expires_at_ms().is_some() {
            self.into_live(now_ms())
        } else {
            self.value
        }
    }

    /// Drops the value of an expired entry, keeping its epoch and expiry, so that the space
    /// comes back while the entry still wins over every copy of its epoch and before (merging
    /// a copy that still holds the value gives back an expired value, which reads as absent);
    /// whether it dropped one. Reaping commutes with merges as long as no replica extends the
    /// expiry after it passed: such a late extension may revive the value only where it was
    /// not yet reaped.
    pub fn reap(&mut self, now_ms: u64) -> bool {
        if self.value.is_some() && self.is_expired(now_ms) {
            self.value = None;
            true
        } else {
            false
        }
    }

    /// When the value stopped being readable (milliseconds since the Unix epoch): the delete's
    /// time, or the expiry's if later; `None` while it is live at `now_ms`.
    pub fn died_at_ms(&self, now_ms: u64) -> Option<u64> {
        if self.live(now_ms).is_some() {
            return None;
        }
        let deleted = self.epoch.time / 1000;
        Some(self.expires_at_ms().map_or(deleted, |at| at.max(deleted)))
    }

    /// Whether a store may forget this entry at `now_ms`: dead for longer than `grace_ms`.
    pub fn reclaimable(&self, now_ms: u64, grace_ms: u64) -> bool {
        self.died_at_ms(now_ms)
            .is_some_and(|died| died.saturating_add(grace_ms) <= now_ms)
    }

    /// The epoch a write other than a last-writer-wins one lands in at `now_ms`, and whether
    /// the entry holds a live value there. Past its grace an entry counts as absent (it may
    /// already be forgotten elsewhere); past its expiry, a write starts the next epoch, so
    /// that nothing expired comes back under it and the old expiry does not apply to it.
    fn write_epoch(&self, now_ms: u64, grace_ms: u64) -> (Timestamp, bool) {
        if self.reclaimable(now_ms, grace_ms) {
            (Timestamp::default(), false)
        } else if self.is_expired(now_ms) {
            (successor(self.epoch), false)
        } else {
            (self.epoch, self.value.is_some())
        }
    }

    /// Checks that `other`'s value could merge into this one's (a tombstone takes any type;
    /// a later epoch replaces whatever it meets).
    pub fn check_mergeable(&self, other: &Self) -> Result<(), TypeMismatch> {
        match (&self.value, &other.value) {
            (Some(mine), Some(theirs)) if self.epoch == other.epoch => mine.check_mergeable(theirs),
            _ => Ok(()),
        }
    }
}

impl Lattice for Entry {
    fn merge(&mut self, other: Self) -> bool {
        match other.epoch.cmp(&self.epoch) {
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Greater => {
                *self = other;
                true
            }
            std::cmp::Ordering::Equal => {
                let mut changed = match (&mut self.value, other.value) {
                    (_, None) => false,
                    (slot @ None, Some(value)) => {
                        *slot = Some(value);
                        true
                    }
                    (Some(mine), Some(theirs)) => mine.merge(theirs),
                };
                changed |= match (&mut self.expiry, other.expiry) {
                    (_, None) => false,
                    (slot @ None, Some(expiry)) => {
                        *slot = Some(expiry);
                        true
                    }
                    (Some(mine), Some(theirs)) => mine.merge(theirs),
                };
                changed
            }
        }
    }
}

impl Write {
    /// A value to merge, the expiry left as it is.
    pub fn value(value: LatticeValue) -> Self {
        Self {
            value: Some(value),
            expiry: None,
        }
    }

    /// The entry this write merges into the key, given what the replica holds (`stored`) at
    /// `now_ms` and how long it keeps dead entries (`grace_ms`); `None` if it changes nothing
    /// (an expiry for a key that is absent, deleted or expired). See the module docs for the
    /// epoch it lands in.
    pub fn lift(self, stored: Option<&Entry>, now_ms: u64, grace_ms: u64) -> Option<Entry> {
        let (current, live) = stored.map_or((Timestamp::default(), false), |stored| {
            stored.write_epoch(now_ms, grace_ms)
        });
        let epoch = match &self.value {
            Some(LatticeValue::Lww(register)) => register.timestamp,
            Some(_) => current,
            None if live => current,
            None => return None,
        };
        Some(Entry {
            epoch,
            value: self.value,
            expiry: self.expiry,
        })
    }
}

/// The smallest timestamp after `t`.
fn successor(t: Timestamp) -> Timestamp {
    match t.writer.checked_add(1) {
        Some(writer) => Timestamp::new(t.time, writer),
        None => Timestamp::new(t.time.saturating_add(1), 0),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::{Counter, Max};

    fn lww(time: u64, value: &'static str) -> LatticeValue {
        LatticeValue::Lww(Lww::new(
            Timestamp::new(time, 1),
            Bytes::from_static(value.as_bytes()),
        ))
    }

    fn lift(write: Write, stored: &Entry) -> Entry {
        write.lift(Some(stored), 0, 3_600_000).expect("a write")
    }

    #[test]
    fn a_delete_wins_over_earlier_writes_in_any_order() {
        let written = Entry::of(lww(10, "a"));
        let deleted = Entry::tombstone(Timestamp::new(20, 2));
        assert_eq!(written.clone().join(deleted.clone()).live(0), None);
        assert_eq!(deleted.join(written).live(0), None);
    }

    #[test]
    fn a_register_write_orders_against_a_delete_by_timestamp() {
        let deleted = Entry::tombstone(Timestamp::new(20, 2));
        let late_but_older = lift(Write::value(lww(15, "old")), &deleted);
        assert_eq!(deleted.clone().join(late_but_older).live(0), None);
        let newer = lift(Write::value(lww(25, "new")), &deleted);
        assert_eq!(deleted.join(newer).live(0), Some(&lww(25, "new")));
    }

    #[test]
    fn other_writes_after_a_delete_start_from_nothing() {
        let mut counter = Counter::new();
        counter.add(1, 5);
        let before = Entry::of(LatticeValue::Counter(counter));
        let deleted = before.join(Entry::tombstone(Timestamp::new(20, 2)));
        let mut one = Counter::new();
        one.add(1, 1);
        let after = lift(Write::value(LatticeValue::Counter(one.clone())), &deleted);
        assert_eq!(
            deleted.join(after).live(0),
            Some(&LatticeValue::Counter(one))
        );
    }

    #[test]
    fn an_expired_value_reads_as_absent_and_reaps_to_what_every_replica_agrees_on() {
        let written = lift(
            Write {
                value: Some(LatticeValue::Max(Max(3))),
                expiry: Some(Lww::new(Timestamp::new(1, 1), 5_000)),
            },
            &Entry::default(),
        );
        assert_eq!(written.live(4_999), Some(&LatticeValue::Max(Max(3))));
        assert_eq!(written.live(5_000), None);
        let mut reaped = written.clone();
        assert!(reaped.reap(6_000));
        assert_eq!(reaped.value, None);
        // A replica that missed the expiry cannot bring the value back.
        assert_eq!(written.clone().join(reaped.clone()).live(6_000), None);
        assert!(!reaped.reclaimable(5_999, 1_000));
        assert!(reaped.reclaimable(6_000, 1_000));
        assert!(!reaped.reclaimable(u64::MAX - 1, u64::MAX), "no overflow");
        // A write after the expiry starts the next epoch: nothing expired comes back.
        let again = Write::value(LatticeValue::Max(Max(1)))
            .lift(Some(&reaped), 6_000, 3_600_000)
            .expect("a write");
        assert!(again.epoch > reaped.epoch);
        let merged = written.join(reaped).join(again);
        assert_eq!(merged.live(6_000), Some(&LatticeValue::Max(Max(1))));
    }

    #[test]
    fn a_newer_write_a_replica_missed_survives_that_replica_reaping() {
        // v1 expires at 1 s; v2, written at 0.5 s without an expiry, reached only some
        // replicas; the others reap v1 at 1 s. Merging them keeps v2.
        let v1 = lift(
            Write {
                value: Some(lww(100_000, "v1")),
                expiry: Some(Lww::new(Timestamp::new(100_000, 1), 1_000)),
            },
            &Entry::default(),
        );
        let v2 = v1.clone().join(lift(Write::value(lww(500_000, "v2")), &v1));
        let mut missed = v1;
        assert!(missed.reap(1_000));
        assert_eq!(
            missed.clone().join(v2.clone()).live(2_000),
            Some(&lww(500_000, "v2"))
        );
        assert_eq!(v2.join(missed).live(2_000), Some(&lww(500_000, "v2")));
    }

    #[test]
    fn past_its_grace_a_dead_entry_counts_as_absent_for_writes() {
        let deleted = Entry::tombstone(Timestamp::new(1_000_000, 1));
        let mut counter = Counter::new();
        counter.add(1, 1);
        let write = Write::value(LatticeValue::Counter(counter));
        let within = write
            .clone()
            .lift(Some(&deleted), 1_500, 1_000)
            .expect("a write");
        assert_eq!(within.epoch, deleted.epoch);
        let after = write.lift(Some(&deleted), 2_000, 1_000).expect("a write");
        assert_eq!(after.epoch, Timestamp::default());
    }

    #[test]
    fn a_new_register_value_clears_the_expiry_and_an_expiry_alone_needs_a_value() {
        let expiring = lift(
            Write {
                value: Some(lww(10, "a")),
                expiry: Some(Lww::new(Timestamp::new(10, 1), 5)),
            },
            &Entry::default(),
        );
        let rewritten = expiring
            .clone()
            .join(lift(Write::value(lww(11, "b")), &expiring));
        assert_eq!(rewritten.expires_at_ms(), None);
        let expiry_only = Write {
            value: None,
            expiry: Some(Lww::new(Timestamp::new(12, 1), 7)),
        };
        assert_eq!(expiry_only.clone().lift(None, 0, 3_600_000), None);
        assert_eq!(
            expiry_only
                .clone()
                .lift(Some(&Entry::tombstone(Timestamp::new(1, 1))), 0, 3_600_000),
            None
        );
        let extended = rewritten.clone().join(lift(expiry_only, &rewritten));
        assert_eq!(extended.expires_at_ms(), Some(7));
    }

    #[test]
    fn types_are_checked_only_within_an_epoch() {
        let max = Entry::of(LatticeValue::Max(Max(1)));
        let register = Entry::of(lww(10, "a"));
        assert!(
            max.check_mergeable(&register).is_ok(),
            "a later epoch replaces"
        );
        let mut counter = Counter::new();
        counter.add(1, 1);
        assert!(max
            .check_mergeable(&Entry::of(LatticeValue::Counter(counter)))
            .is_err());
    }
}
