//! Heartbeats: the node tells the router it lives (and how loaded it is) and takes back the
//! router's newest view.
//!
//! The heartbeat runs on a thread of its own (`beat_until_stopped`), so that a slow hand-off
//! never looks like a dead node; it hands views to the agent through [`Beat`], which lives as
//! long as the agent and costs a few atomics and one mutex taken once per beat.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use squall_proto::{ClusterView, Member, MemberStats, Request, Response};

use super::peers::Peers;
use super::shared::Shared;

/// What the agent and its heartbeat thread share.
#[derive(Debug, Default)]
pub(super) struct Beat {
    /// The newest view the router answered, not yet taken by the agent.
    incoming: std::sync::Mutex<Option<ClusterView>>,
    /// The generation whose hand-off this node finished.
    pub(super) synced: AtomicU64,
    /// Estimated bytes held, from the last load report.
    pub(super) bytes: AtomicU64,
    /// The busiest shard's busy share in the last load window, in thousandths.
    pub(super) occupancy_permille: AtomicU64,
    /// The node left the view and hands its keys off.
    pub(super) leaving: AtomicBool,
}

/// What a heartbeat reports. `synced` is read before the key counts: a report never pairs a
/// finished hand-off with counts from before it.
impl Beat {
    /// The newest view the heartbeats brought back since the last call, if any.
    pub(super) fn take_view(&self) -> Option<ClusterView> {
        self.incoming
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }
}

pub(super) fn member_stats(beat: &Beat, shared: &Shared) -> MemberStats {
    let synced = beat.synced.load(Ordering::Acquire);
    MemberStats {
        keys: shared.held(),
        synced,
        requests: shared.requests.load(Ordering::Relaxed),
        bytes: beat.bytes.load(Ordering::Relaxed),
        occupancy_permille: u32::try_from(beat.occupancy_permille.load(Ordering::Relaxed))
            .unwrap_or(u32::MAX),
        leaving: beat.leaving.load(Ordering::Relaxed),
    }
}

/// The heartbeat thread: tells the router every `period` that the node lives (and how it is
/// loaded), and leaves the router's newest view for the agent. On its own thread, so that a
/// slow hand-off never looks like a dead node.
pub(super) fn beat_until_stopped(
    router: &str,
    period: Duration,
    beat: &Beat,
    shared: &Shared,
    member: &Member,
    stop: &AtomicBool,
    mut peers: Peers,
) {
    let mut down_since: Option<Instant> = None;
    let mut newest = 0;
    while !stop.load(Ordering::Relaxed) {
        let next = Instant::now() + period;
        let request = Request::Join {
            member: member.clone(),
            stats: member_stats(beat, shared),
        };
        match peers.call_one(router, request) {
            Ok(Response::View(view)) => {
                if let Some(since) = down_since.take() {
                    tracing::info!(after = ?since.elapsed(), "the router answers again");
                }
                if view.generation > newest {
                    newest = view.generation;
                    *beat
                        .incoming
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(view);
                }
            }
            Ok(Response::Error(e)) => tracing::debug!(cause = %e, "the router refused a heartbeat"),
            Ok(other) => tracing::warn!(answer = other.kind(), "unexpected answer to a heartbeat"),
            Err(e) => {
                if down_since.is_none() {
                    tracing::warn!(%router, cause = %e, "the router does not answer; keeping the last view");
                    down_since = Some(Instant::now());
                }
            }
        }
        while Instant::now() < next && !stop.load(Ordering::Relaxed) {
            std::thread::sleep((next - Instant::now()).min(Duration::from_millis(20)));
        }
    }
}

/// Reports to the router once more, out of turn: a leaving node's last report makes the
/// router count its hand-off as finished at once rather than after the node's silence.
pub(super) fn final_beat(
    router: &str,
    peers: &mut Peers,
    beat: &Beat,
    shared: &Shared,
    member: &Member,
) {
    let request = Request::Join {
        member: member.clone(),
        stats: member_stats(beat, shared),
    };
    if let Err(e) = peers.call_one(router, request) {
        tracing::debug!(cause = %e, "the last report did not reach the router");
    }
}
