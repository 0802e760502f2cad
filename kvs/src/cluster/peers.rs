//! The agent's connections to other nodes' shards and to the router.
//!
//! One [`Peers`] per agent thread (and one for the heartbeat thread): a connection per
//! endpoint, opened on first use and kept while it answers. Every call is bounded by
//! [`PEER_TIMEOUT`] and tried once: the agent's loops retry on their own schedule.

use std::time::Duration;

use hashbrown::HashMap;
use squall_proto::{Request, Response};

use crate::client::ClientConfig;
use crate::exchange::{exchange, Exchanged};
use crate::zmtp::Connection;
use crate::{Error, Result};

/// Connections to other nodes' shards, by endpoint, for the agent's hand-offs.
pub(super) struct Peers {
    config: ClientConfig,
    next_id: u64,
    connections: HashMap<String, Connection>,
}

impl Peers {
    /// Connections that present `secret` (see [`squall_proto::secret`]).
    pub(super) fn new(secret: Option<squall_proto::secret::ClusterSecret>) -> Self {
        Self {
            // Well under the router's `dead_after`: an unreachable peer delays a page by this
            // much, and the router hears from the heartbeat thread meanwhile anyway.
            config: ClientConfig {
                timeout: PEER_TIMEOUT,
                attempts: 1,
                secret,
                ..ClientConfig::default()
            },
            next_id: rand::random::<u32>() as u64,
            connections: HashMap::new(),
        }
    }

    /// Sends every request to its endpoint at once; fails unless every one was answered.
    pub(super) fn call(&mut self, requests: Vec<(String, Request)>) -> Result<Vec<Response>> {
        let endpoints: Vec<String> = requests.iter().map(|(e, _)| e.clone()).collect();
        let mut connections: Vec<Option<Connection>> = endpoints
            .iter()
            .map(|e| self.connections.remove(e))
            .collect();
        let indexed: Vec<(usize, Request)> = requests
            .into_iter()
            .enumerate()
            .map(|(i, (_, r))| (i, r))
            .collect();
        let outcome = exchange(
            &self.config.retry(),
            &mut self.next_id,
            &endpoints,
            &mut connections,
            &indexed,
        )
        .and_then(Exchanged::into_all);
        for (endpoint, connection) in endpoints.into_iter().zip(connections) {
            if let Some(connection) = connection {
                self.connections.insert(endpoint, connection);
            }
        }
        outcome
    }

    pub(super) fn call_one(&mut self, endpoint: &str, request: Request) -> Result<Response> {
        self.call(vec![(endpoint.to_string(), request)])?
            .pop()
            .ok_or_else(|| Error::UnexpectedResponse("no answer".into()))
    }
}

/// How long the agent waits for another node's answer.
pub(super) const PEER_TIMEOUT: Duration = Duration::from_millis(1000);

/// `request` as sent under view `generation`.
pub(super) fn routed(generation: u64, request: Request) -> Request {
    Request::Routed {
        generation,
        request: Box::new(request),
    }
}
