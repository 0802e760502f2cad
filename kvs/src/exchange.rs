//! The request exchange under every client of storage nodes (the [`crate::Client`], the
//! cluster agent's hand-offs, the router's questions): requests sent at once on one
//! connection per endpoint, answers matched by request id, retries on fresh connections.
//!
//! It knows nothing of keys or views; it is the transport that the client's routing and the
//! agent's hand-off build on, so neither depends on the other for it.

use std::time::{Duration, Instant};

use squall_proto::secret::ClusterSecret;
use squall_proto::{decode_response, encode_request, Request, RequestId, Response};

use crate::zmtp::Connection;
use crate::{Error, Result};

/// Pause between attempts when a node refused or dropped the connection.
pub(crate) const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// The longest timeout honoured (longer ones are cut to this).
pub(crate) const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);
/// How an exchange connects (the cluster secret it presents), how long it waits, and how
/// often it tries.
#[derive(Debug, Clone)]
pub(crate) struct Retry {
    /// How long one attempt waits for its answers (at most [`MAX_TIMEOUT`]).
    pub(crate) timeout: Duration,
    /// How many times a request is sent before giving up.
    pub(crate) attempts: u32,
    /// What new connections present to the nodes (see [`squall_proto::secret`]).
    pub(crate) secret: Option<ClusterSecret>,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(2),
            attempts: 3,
            secret: ClusterSecret::installed(),
        }
    }
}

/// Sends `requests` (each on the connection of its target index, opened on demand) all at
/// once and waits for every answer; fails unless every request was answered.
pub(crate) fn round_trip(
    retry: &Retry,
    next_id: &mut RequestId,
    endpoints: &[String],
    connections: &mut [Option<Connection>],
    requests: &[(usize, Request)],
) -> Result<Vec<Response>> {
    exchange(retry, next_id, endpoints, connections, requests).and_then(Exchanged::into_all)
}

/// What [`exchange`] got: an answer per request, or `None` where none came.
pub(crate) struct Exchanged {
    pub(crate) responses: Vec<Option<Response>>,
    pub(crate) last_error: String,
    started: Instant,
    attempts: u32,
    pub(crate) missing: Option<String>,
}

impl Exchanged {
    /// Every answer, or a timeout naming an endpoint that did not answer.
    pub(crate) fn into_all(self) -> Result<Vec<Response>> {
        let exchanged = self.complete()?;
        Ok(exchanged.responses.into_iter().flatten().collect())
    }

    /// `self` if every request was answered, else a timeout.
    pub(crate) fn complete(self) -> Result<Self> {
        match &self.missing {
            None => Ok(self),
            Some(endpoint) => Err(Error::Timeout {
                endpoint: endpoint.clone(),
                attempts: self.attempts,
                waited: self.started.elapsed(),
                last_error: self.last_error,
            }),
        }
    }
}

/// Sends `requests` (each on the connection of its target index, opened on demand) all at
/// once and waits for the answers. Unanswered requests are resent on fresh connections, up to
/// `retry.attempts` times, each attempt bounded by `retry.timeout`. Fails only on answers
/// that cannot be read; unanswered requests are `None` in the result.
pub(crate) fn exchange(
    retry: &Retry,
    next_id: &mut RequestId,
    endpoints: &[String],
    connections: &mut [Option<Connection>],
    requests: &[(usize, Request)],
) -> Result<Exchanged> {
    let started = Instant::now();
    let mut responses: Vec<Option<Response>> = requests.iter().map(|_| None).collect();
    let attempts = retry.attempts.max(1);
    let mut last_error = String::new();
    let timeout = retry.timeout.min(MAX_TIMEOUT);
    for attempt in 1..=attempts {
        let deadline = Instant::now() + timeout;
        // Encode everything first, so that no error can interrupt the exchange once a request
        // is on the wire.
        let mut frames = Vec::with_capacity(requests.len());
        for (slot, (_, request)) in requests.iter().enumerate() {
            if responses[slot].is_none() {
                *next_id = next_id.wrapping_add(1);
                frames.push((slot, *next_id, encode_request(*next_id, request)?));
            }
        }
        let mut sent: Vec<(usize, RequestId)> = Vec::with_capacity(frames.len());
        for (slot, id, frame) in frames {
            let target = &requests[slot].0;
            let endpoint = &endpoints[*target];
            let outcome = match connections[*target].take() {
                Some(connection) => Ok(connection),
                None => Connection::connect(endpoint, deadline, retry.secret.as_ref()),
            }
            .and_then(|mut connection| connection.send(&frame, deadline).map(|()| connection));
            match outcome {
                Ok(connection) => {
                    connections[*target] = Some(connection);
                    sent.push((slot, id));
                }
                Err(e) => last_error = format!("{endpoint}: {e}"),
            }
        }
        // One request is outstanding per connection, so the next message is its answer. After
        // any error the connection is dropped (lazy pirate), so a late answer to a lost attempt
        // can never be read as the answer to another request; every sent request is read (or
        // its connection dropped) before an error is returned.
        let mut fatal = None;
        for (slot, id) in sent {
            let target = requests[slot].0;
            let Some(connection) = connections[target].as_mut() else {
                continue;
            };
            let decoded = match connection.recv(deadline) {
                Ok(reply) => decode_response(&reply).map_err(Error::from),
                Err(e) => {
                    last_error = format!("{}: {e}", endpoints[target]);
                    connections[target] = None;
                    continue;
                }
            };
            match decoded {
                Ok((reply_id, response)) if reply_id == id => responses[slot] = Some(response),
                Ok((reply_id, _)) => {
                    connections[target] = None;
                    fatal = Some(Error::UnexpectedResponse(format!(
                        "answer to request {reply_id} while waiting for {id}"
                    )));
                }
                Err(e) => {
                    connections[target] = None;
                    fatal = Some(e);
                }
            }
        }
        if let Some(error) = fatal {
            return Err(error);
        }
        if responses.iter().all(Option::is_some) {
            return Ok(Exchanged {
                responses,
                last_error,
                started,
                attempts,
                missing: None,
            });
        }
        tracing::debug!(attempt, error = %last_error, "request attempt failed");
        if attempt < attempts {
            // A node that refuses connections is likely restarting: give it a moment, within
            // the attempt's own budget.
            if let Some(rest) = deadline.checked_duration_since(Instant::now()) {
                std::thread::sleep(rest.min(RETRY_PAUSE));
            }
        }
    }
    let missing = requests
        .iter()
        .zip(&responses)
        .find(|(_, r)| r.is_none())
        .map(|((t, _), _)| endpoints[*t].clone());
    Ok(Exchanged {
        responses,
        last_error,
        started,
        attempts,
        missing,
    })
}
