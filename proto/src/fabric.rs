//! The sockets fabric messages travel on: a [`Mailbox`] per component, a [`Fabric`] per process.
//!
//! Every component (scheduler, executor, gateway) owns a mailbox: a ZeroMQ PULL socket bound
//! to a TCP address, read by a thread of its own that decodes frames and hands messages to the
//! component's async code. Components send with [`Fabric::send`], which pushes to the peer's
//! address over a PUSH socket kept per peer, as Anna and Cloudburst do (one-way messages that
//! carry their reply address; no request-reply lockstep, so one slow peer stalls nobody).
//!
//! Components of one process share one fabric, and a message to a mailbox of the same process
//! skips the sockets and the codec: it is moved through the mailbox's channel. `squall up` runs
//! every role in one process, so its calls never touch a socket between gateway and executor,
//! while executors in other processes still reach it through the same addresses.
//!
//! With a cluster secret ([`crate::secret`]), mailboxes take connections only from peers that
//! present it, and the fabric presents it to every peer.
//!
//! A frame that does not decode is logged and dropped; it never stops a mailbox. Sends never
//! block: a peer that is gone or far behind, in another process or this one, makes
//! [`Fabric::send`] fail (`Busy`) once its queue of 10,000 messages is full, and the callers' deadlines cover messages queued to a peer that died.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use hashbrown::HashMap;
use tokio::sync::mpsc;

use crate::call::{decode_message, encode_message, Message};
use crate::secret::{ClusterSecret, Gatekeeper};

/// Largest frame a mailbox accepts (a function's code travels in one).
pub const MAX_FRAME_BYTES: i64 = 256 << 20;

/// Messages queued per peer before sends to it fail.
const SEND_QUEUE: i32 = 10_000;

/// How often a mailbox thread checks whether it should stop.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Why a fabric operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    /// A socket could not be created, bound or connected.
    #[error("fabric socket {what}: {source}")]
    Socket {
        /// What was being done.
        what: String,
        /// The cause.
        source: zmq::Error,
    },
    /// The peer's queue is full (it is gone or far behind).
    #[error("peer {0} is not taking messages (its queue is full)")]
    Busy(String),
    /// The cluster secret's gatekeeper could not start.
    #[error(transparent)]
    Secret(#[from] crate::secret::SecretError),
    /// The message could not be encoded.
    #[error(transparent)]
    Encode(#[from] crate::Error),
}

/// The process's side of the fabric. Cheap to share; thread-safe.
pub struct Fabric {
    /// Answers the mailboxes' authentication while the fabric lives (declared before the
    /// context, so it stops first).
    gatekeeper: Mutex<Option<Gatekeeper>>,
    secret: Option<ClusterSecret>,
    context: zmq::Context,
    local: RwLock<HashMap<String, mpsc::Sender<Message>>>,
    peers: Mutex<HashMap<String, Arc<Mutex<zmq::Socket>>>>,
}

impl std::fmt::Debug for Fabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fabric").finish_non_exhaustive()
    }
}

impl Fabric {
    /// A fabric with no mailboxes yet, using the process's cluster secret if one was
    /// installed ([`ClusterSecret::installed`]).
    pub fn new() -> Arc<Self> {
        Self::with_secret(ClusterSecret::installed())
    }

    /// A fabric with no mailboxes yet whose mailboxes require `secret` and whose sends
    /// present it (none: neither).
    pub fn with_secret(secret: Option<ClusterSecret>) -> Arc<Self> {
        Arc::new(Self {
            gatekeeper: Mutex::new(None),
            secret,
            context: zmq::Context::new(),
            local: RwLock::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
        })
    }

    /// Binds a mailbox on `host:port` (port 0: the OS picks) and starts its reader thread.
    pub fn bind(self: &Arc<Self>, host: &str, port: u16) -> Result<Mailbox, FabricError> {
        let fail = |what: &str| {
            let what = what.to_string();
            move |source| FabricError::Socket { what, source }
        };
        let socket = self.context.socket(zmq::PULL).map_err(fail("create"))?;
        socket.set_linger(0).map_err(fail("linger"))?;
        crate::secret::warn_if_open("mailbox", host, self.secret.as_ref());
        if let Some(secret) = &self.secret {
            self.guard(secret)?;
            secret.secure_server(&socket).map_err(fail("secret"))?;
        }
        socket
            .set_maxmsgsize(MAX_FRAME_BYTES)
            .map_err(fail("maxmsgsize"))?;
        socket.set_rcvhwm(SEND_QUEUE).map_err(fail("rcvhwm"))?;
        socket
            .set_rcvtimeo(POLL_INTERVAL.as_millis() as i32)
            .map_err(fail("rcvtimeo"))?;
        let endpoint = if port == 0 {
            format!("tcp://{host}:*")
        } else {
            format!("tcp://{host}:{port}")
        };
        socket
            .bind(&endpoint)
            .map_err(fail(&format!("bind {endpoint}")))?;
        let addr = socket
            .get_last_endpoint()
            .map_err(fail("endpoint"))?
            .unwrap_or(endpoint);
        let (sender, receiver) = mpsc::channel(SEND_QUEUE as usize);
        self.local
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr.clone(), sender.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            let addr = addr.clone();
            std::thread::Builder::new()
                .name("squall-mailbox".into())
                .spawn(move || read_frames(socket, sender, stop, &addr))
                .map_err(|e| FabricError::Socket {
                    what: format!("mailbox thread: {e}"),
                    source: zmq::Error::EFAULT,
                })?
        };
        Ok(Mailbox {
            addr,
            receiver,
            fabric: self.clone(),
            stop,
            thread: Some(thread),
        })
    }

    /// Sends `message` to the mailbox at `to`: through its channel if it is in this process,
    /// else over a socket. Never blocks.
    pub fn send(&self, to: &str, message: Message) -> Result<(), FabricError> {
        let local = self
            .local
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(to)
            .cloned();
        if let Some(sender) = local {
            return match sender.try_send(message) {
                Ok(()) => Ok(()),
                Err(mpsc::error::TrySendError::Full(_)) => Err(FabricError::Busy(to.to_string())),
                // A closed channel means the mailbox is being dropped: like a dead peer, the
                // message is lost and the sender's deadline covers it.
                Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
            };
        }
        let frame = encode_message(&message)?;
        let socket = self.peer(to)?;
        let socket = socket.lock().unwrap_or_else(|p| p.into_inner());
        match socket.send(frame, zmq::DONTWAIT) {
            Ok(()) => Ok(()),
            Err(zmq::Error::EAGAIN) => Err(FabricError::Busy(to.to_string())),
            Err(source) => Err(FabricError::Socket {
                what: format!("send to {to}"),
                source,
            }),
        }
    }

    /// Starts the context's gatekeeper, once.
    fn guard(&self, secret: &ClusterSecret) -> Result<(), FabricError> {
        let mut gatekeeper = self.gatekeeper.lock().unwrap_or_else(|p| p.into_inner());
        if gatekeeper.is_none() {
            *gatekeeper = Some(Gatekeeper::start(&self.context, secret.clone())?);
        }
        Ok(())
    }

    /// Closes the socket to a peer that is gone (the next send to it connects afresh).
    pub fn forget(&self, to: &str) {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(to);
    }

    fn peer(&self, to: &str) -> Result<Arc<Mutex<zmq::Socket>>, FabricError> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(socket) = peers.get(to) {
            return Ok(socket.clone());
        }
        let fail = |what: &str| {
            let what = format!("{what} {to}");
            move |source| FabricError::Socket { what, source }
        };
        if !to.starts_with("tcp://") {
            return Err(FabricError::Socket {
                what: format!("connect {to} (only tcp:// addresses are accepted)"),
                source: zmq::Error::EINVAL,
            });
        }
        let socket = self.context.socket(zmq::PUSH).map_err(fail("create"))?;
        socket.set_linger(0).map_err(fail("linger"))?;
        if let Some(secret) = &self.secret {
            secret.secure_client(&socket).map_err(fail("secret"))?;
        }
        socket.set_sndhwm(SEND_QUEUE).map_err(fail("sndhwm"))?;
        socket.connect(to).map_err(fail("connect"))?;
        let socket = Arc::new(Mutex::new(socket));
        peers.insert(to.to_string(), socket.clone());
        Ok(socket)
    }
}

/// Reads frames until told to stop or until the mailbox's owner is gone.
fn read_frames(
    socket: zmq::Socket,
    sender: mpsc::Sender<Message>,
    stop: Arc<AtomicBool>,
    addr: &str,
) {
    while !stop.load(Ordering::Relaxed) {
        let frame = match socket.recv_bytes(0) {
            Ok(frame) => frame,
            Err(zmq::Error::EAGAIN) | Err(zmq::Error::EINTR) => continue,
            Err(e) => {
                tracing::error!(mailbox = addr, cause = %e, "mailbox socket failed");
                return;
            }
        };
        match decode_message(&frame) {
            // A full channel holds this thread back, and ZeroMQ's queue then the senders'.
            Ok(message) => {
                if sender.blocking_send(message).is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(mailbox = addr, bytes = frame.len(), cause = %e, "undecodable frame dropped")
            }
        }
    }
}

/// A component's inbox. Dropping it unbinds the address.
pub struct Mailbox {
    addr: String,
    receiver: mpsc::Receiver<Message>,
    fabric: Arc<Fabric>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailbox")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Mailbox {
    /// The address peers send to (`tcp://host:port`).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The fabric it belongs to.
    pub fn fabric(&self) -> &Arc<Fabric> {
        &self.fabric
    }

    /// The next message; `None` once the mailbox is closed.
    pub async fn recv(&mut self) -> Option<Message> {
        self.receiver.recv().await
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        self.fabric
            .local
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.addr);
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::ExecutorStatus;

    fn heartbeat(id: &str) -> Message {
        Message::Heartbeat(ExecutorStatus {
            id: id.into(),
            ..ExecutorStatus::default()
        })
    }

    #[tokio::test]
    async fn local_and_remote_delivery_and_garbage_is_dropped() {
        let here = Fabric::new();
        let there = Fabric::new();
        let mut inbox = here.bind("127.0.0.1", 0).expect("binds");
        // Same process: through the channel.
        here.send(inbox.addr(), heartbeat("local")).expect("sends");
        assert_eq!(inbox.recv().await, Some(heartbeat("local")));
        // Another fabric (as another process would): over the socket.
        there
            .send(inbox.addr(), heartbeat("remote"))
            .expect("sends");
        let got = tokio::time::timeout(Duration::from_secs(5), inbox.recv()).await;
        assert_eq!(got.expect("in time"), Some(heartbeat("remote")));
        // Garbage on a connection is dropped, and the frame after it on the same connection
        // still arrives.
        let raw = there.context.socket(zmq::PUSH).expect("socket");
        raw.connect(inbox.addr()).expect("connects");
        raw.send(&b"not a frame"[..], 0).expect("sends garbage");
        let valid = encode_message(&heartbeat("after garbage")).expect("encodes");
        raw.send(valid, 0).expect("sends");
        let got = tokio::time::timeout(Duration::from_secs(5), inbox.recv()).await;
        assert_eq!(got.expect("in time"), Some(heartbeat("after garbage")));
        assert!(there.send("ipc:///tmp/x", heartbeat("x")).is_err());
    }
}
