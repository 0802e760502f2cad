//! Load reports: every `stats_ms` the agent collects its shards' load of the last window
//! into one [`LoadReport`], keeps its summary for the heartbeats, and writes it to the store
//! under `squall/load/<node>`, where the policy engine reads it.

use std::sync::atomic::Ordering;

use squall_lattices::{LatticeValue, Lww, Timestamp, WriterId};
use squall_proto::{LoadReport, Member, Request, Response};

use super::heartbeat::Beat;
use super::peers::{routed, Peers};
use super::shared::Shared;

/// Most accessed keys a load report names.
const REPORTED_KEYS: u32 = 32;

/// Collects the shards' load of the last window into one report, keeps its summary for
/// the heartbeats, and writes it to the store for the policy engine.
pub(super) fn report_load(
    shared: &Shared,
    member: &Member,
    writer: WriterId,
    peers: &mut Peers,
    beat: &Beat,
) {
    let requests = member
        .shards
        .iter()
        .map(|e| (e.clone(), Request::Stats { top: REPORTED_KEYS }))
        .collect();
    let reports = match peers.call(requests) {
        Ok(responses) => responses,
        Err(e) => {
            tracing::warn!(cause = %e, "could not collect the shards' load");
            return;
        }
    };
    let mut load = LoadReport {
        id: member.id.clone(),
        ..LoadReport::default()
    };
    for response in reports {
        let Response::Stats(shard) = response else {
            tracing::warn!(answer = response.kind(), "unexpected answer to Stats");
            return;
        };
        load.at_ms = load.at_ms.max(shard.at_ms);
        load.window_ms = load.window_ms.max(shard.window_ms);
        load.occupancy = load.occupancy.max(shard.occupancy);
        load.keys += shard.keys;
        load.bytes += shard.bytes;
        load.accesses += shard.accesses;
        load.distinct += shard.distinct;
        load.sum_squares += shard.sum_squares;
        load.top.extend(shard.top);
    }
    load.top
        .sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    load.top.truncate(REPORTED_KEYS as usize);
    beat.bytes.store(load.bytes, Ordering::Relaxed);
    beat.occupancy_permille
        .store((load.occupancy * 1000.0).round() as u64, Ordering::Relaxed);
    let Some(placement) = shared.placement() else {
        return;
    };
    let key = squall_proto::keys::load_report(&member.id);
    let encoded = match rmp_serde::to_vec(&load) {
        Ok(encoded) => encoded,
        Err(e) => {
            tracing::warn!(cause = %e, "could not encode the load report");
            return;
        }
    };
    let value = LatticeValue::Lww(Lww::new(
        Timestamp::now(writer),
        bytes::Bytes::from(encoded),
    ));
    let mut replicas = Vec::new();
    placement.replicas(&key, &mut replicas);
    let requests = replicas
        .iter()
        .map(|&r| {
            (
                placement.shard_endpoint(r, &key).to_string(),
                routed(
                    placement.generation(),
                    Request::Put {
                        entries: vec![(key.clone(), value.clone())],
                    },
                ),
            )
        })
        .collect();
    if let Err(e) = peers.call(requests) {
        tracing::debug!(cause = %e, "could not store the load report");
    }
}
