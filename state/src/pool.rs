//! Blocking KVS clients, lent to async code.
//!
//! [`squall_kvs::Client`] is blocking and `Send` but not `Sync` (one per thread). The pool
//! keeps idle clients and runs each use on tokio's blocking threads, so a call waiting for the
//! store never stalls the runtime's workers; a client that failed is dropped (its connections
//! may hold a late answer) and a fresh one is made on the next use.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use squall_kvs::{Client, ClientConfig};

use crate::{Error, Result};

/// Idle clients kept; more may exist while many calls wait on the store.
const MAX_IDLE: usize = 16;

/// A pool of clients of one storage node. Cheap to clone; thread-safe.
#[derive(Clone)]
pub struct ClientPool {
    inner: Arc<Inner>,
}

struct Inner {
    address: String,
    config: ClientConfig,
    idle: Mutex<Vec<Client>>,
}

impl std::fmt::Debug for ClientPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientPool")
            .field("address", &self.inner.address)
            .finish_non_exhaustive()
    }
}

impl ClientPool {
    /// A pool of clients of the node at `address`; connects one client now, so a wrong
    /// address fails here.
    pub fn connect(address: &str, timeout: Duration) -> Result<Self> {
        let config = ClientConfig {
            timeout,
            attempts: 2,
            ..ClientConfig::default()
        };
        let first = Client::connect(address, config.clone())?;
        Ok(Self {
            inner: Arc::new(Inner {
                address: address.to_string(),
                config,
                idle: Mutex::new(vec![first]),
            }),
        })
    }

    /// Runs `f` with a client on the calling thread (which may block).
    pub fn with_blocking<T>(
        &self,
        f: impl FnOnce(&mut Client) -> squall_kvs::Result<T>,
    ) -> Result<T> {
        let taken = self.inner.idle.lock().ok().and_then(|mut idle| idle.pop());
        let mut client = match taken {
            Some(client) => client,
            // A writer id of its own: a counter's entries are per writer, and each client
            // keeps its own running totals, so two clients of one writer would overwrite
            // each other's increments.
            None => Client::connect(
                &self.inner.address,
                ClientConfig {
                    writer: rand::random(),
                    ..self.inner.config.clone()
                },
            )?,
        };
        let result = f(&mut client);
        let healthy = match &result {
            Ok(_) => true,
            // A per-key refusal leaves the connection in a clean state.
            Err(squall_kvs::Error::Key { .. }) => true,
            Err(_) => false,
        };
        if healthy {
            if let Ok(mut idle) = self.inner.idle.lock() {
                if idle.len() < MAX_IDLE {
                    idle.push(client);
                }
            }
        }
        Ok(result?)
    }

    /// Runs `f` with a client on one of tokio's blocking threads.
    pub async fn with<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Client) -> squall_kvs::Result<T> + Send + 'static,
    {
        let pool = self.clone();
        tokio::task::spawn_blocking(move || pool.with_blocking(f))
            .await
            .map_err(|e| Error::Internal(format!("a store request panicked: {e}")))?
    }
}

/// Keys listed per store listing by [`ClientPool::keys_with_prefix`].
const LIST_PAGE: u32 = 1000;

impl ClientPool {
    /// Every live key starting with `prefix`, in order, a listing of 1 000 at a time.
    pub async fn keys_with_prefix(&self, prefix: &str) -> Result<Vec<squall_kvs::Key>> {
        let mut keys = Vec::new();
        let mut after: Option<squall_kvs::Key> = None;
        loop {
            let (page_prefix, page_after) = (prefix.to_string(), after.clone());
            let (page, next) = self
                .with(move |client| client.list(&page_prefix, page_after.as_deref(), LIST_PAGE))
                .await?;
            keys.extend(page);
            match next {
                Some(next) => after = Some(next),
                None => return Ok(keys),
            }
        }
    }

    /// Every live key starting with `prefix` and its value, in key order.
    pub async fn entries_with_prefix(
        &self,
        prefix: &str,
    ) -> Result<Vec<(squall_kvs::Key, squall_lattices::LatticeValue)>> {
        let keys = self.keys_with_prefix(prefix).await?;
        let mut entries = Vec::with_capacity(keys.len());
        // Read in pages: a shard takes a bounded number of keys per request.
        for chunk in keys.chunks(LIST_PAGE as usize) {
            let reads = chunk.to_vec();
            let values = self.with(move |client| client.get_many(&reads)).await?;
            entries.extend(
                chunk
                    .iter()
                    .cloned()
                    .zip(values)
                    .filter_map(|(key, value)| value.map(|v| (key, v))),
            );
        }
        Ok(entries)
    }
}
