//! The cluster secret: Squall's internal ports (storage shards, the router, the call fabric's
//! mailboxes, the executors' caches) take a connection only from a peer that proves it knows
//! the cluster's secret, so a process that can reach the pod network can neither read the
//! store nor inject calls.
//!
//! # Why ZMTP's PLAIN mechanism
//! Every internal port is a ZeroMQ socket, and ZeroMQ's own handshake (ZMTP 3) carries a
//! security mechanism: with PLAIN, the connecting side sends a user name and a password in its
//! `HELLO` command, and the listening side's libzmq asks a handler in its own process (ZAP,
//! ZeroMQ RFC 27, here a [`Gatekeeper`]) whether to let it in, before a single message of the
//! connection is read. A first message of Squall's own would need every socket type (ROUTER,
//! PULL) to hold unauthenticated peers' messages and drop them by hand; PLAIN keeps the check
//! in the handshake, which libzmq, the store's own ZMTP client and any later ZMTP
//! implementation all speak. CURVE would also encrypt, but the vendored libzmq is built without
//! libsodium, so it is not available.
//!
//! # What it protects, and what it does not
//! PLAIN proves knowledge of the secret; it does not encrypt. Anyone who can read the traffic
//! between Squall's processes can read the secret and everything else. The secret keeps out
//! processes that can connect but not listen (another workload in the cluster, a port
//! scanner); on networks where others can capture packets, internal traffic needs a network
//! that encrypts (a service mesh, WireGuard, IPsec). The comparison takes the same time
//! whatever the password (both sides' SHA-256 digests are compared in full).
//!
//! # Process default
//! A process belongs to one cluster: the binary installs the secret once at start
//! ([`ClusterSecret::install`]), and the default configurations of the store's client, the
//! storage node, the router, the fabric and the cache take it from there
//! ([`ClusterSecret::installed`]). Libraries and tests can pass one explicitly.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The user name peers present (PLAIN requires one; only the password is checked).
pub const USER: &str = "squall";

/// The ZAP domain Squall's listening sockets use.
const DOMAIN: &str = "squall";

/// The address libzmq asks for authentication (ZAP) in each context.
const ZAP_ENDPOINT: &str = "inproc://zeromq.zap.01";

/// The fewest bytes a cluster secret may have.
pub const MIN_BYTES: usize = 16;

/// The most bytes a cluster secret may have (PLAIN's password length is one byte).
pub const MAX_BYTES: usize = 255;

/// How often a gatekeeper checks whether it should stop.
const POLL: Duration = Duration::from_millis(100);

/// Why a secret was refused, or a gatekeeper could not start.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Too short, too long or blank.
    #[error(
        "a cluster secret must have between {MIN_BYTES} and {MAX_BYTES} bytes, not all blank \
         (for example `openssl rand -hex 24`)"
    )]
    Length,
    /// Another secret was installed in this process already.
    #[error("this process has a cluster secret already")]
    Installed,
    /// The authentication handler's socket or thread.
    #[error("cluster secret handler: {0}")]
    Handler(String),
}

/// A cluster's shared secret. Cheap to clone; never printed (`Debug` shows only its length).
#[derive(Clone)]
pub struct ClusterSecret {
    value: Arc<str>,
    digest: [u8; 32],
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterSecret({} bytes)", self.value.len())
    }
}

static INSTALLED: OnceLock<ClusterSecret> = OnceLock::new();

impl ClusterSecret {
    /// A secret of [`MIN_BYTES`] to [`MAX_BYTES`] bytes, not all blank.
    pub fn new(value: &str) -> Result<Self, SecretError> {
        if value.trim().is_empty() || !(MIN_BYTES..=MAX_BYTES).contains(&value.len()) {
            return Err(SecretError::Length);
        }
        Ok(Self {
            value: value.into(),
            digest: Sha256::digest(value.as_bytes()).into(),
        })
    }

    /// Makes this the process's secret, which default configurations use. Once per process.
    pub fn install(self) -> Result<(), SecretError> {
        INSTALLED.set(self).map_err(|_| SecretError::Installed)
    }

    /// The process's secret, if one was installed.
    pub fn installed() -> Option<ClusterSecret> {
        INSTALLED.get().cloned()
    }

    /// The password to present.
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// Whether `given` is this secret, in time that does not depend on where they differ.
    pub fn matches(&self, given: &[u8]) -> bool {
        let given: [u8; 32] = Sha256::digest(given).into();
        given
            .iter()
            .zip(&self.digest)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    }

    /// Makes a connecting socket present the secret (before `connect`).
    pub fn secure_client(&self, socket: &zmq::Socket) -> Result<(), zmq::Error> {
        socket.set_plain_username(Some(USER))?;
        socket.set_plain_password(Some(self.expose()))
    }

    /// Makes a listening socket require the secret (before `bind`); its context needs a
    /// running [`Gatekeeper`] (without one, libzmq 4.3 refuses every PLAIN peer).
    pub fn secure_server(&self, socket: &zmq::Socket) -> Result<(), zmq::Error> {
        socket.set_plain_server(true)?;
        socket.set_zap_domain(DOMAIN)
    }
}

/// Whether `host`, an address to bind, is reachable from this machine only.
pub fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Warns when `what` (a listening port) binds `host`, reachable from other machines, with no
/// cluster secret: whoever reaches it can read the store or send calls.
pub fn warn_if_open(what: &str, host: &str, secret: Option<&ClusterSecret>) {
    if secret.is_none() && !is_loopback(host) {
        tracing::warn!(
            port = what,
            host,
            "an internal port listens beyond loopback without a cluster secret: whoever \
             reaches it can read the store or send calls (set --cluster-secret)"
        );
    }
}

/// Makes `socket`, a listening socket of `context` that is its only one, require `secret`
/// (if given): the gatekeeper that answers for it runs until dropped, so keep it as long as
/// the socket. Call before `bind`.
pub fn guard(
    secret: Option<&ClusterSecret>,
    context: &zmq::Context,
    socket: &zmq::Socket,
) -> Result<Option<Gatekeeper>, SecretError> {
    let Some(secret) = secret else {
        return Ok(None);
    };
    secret
        .secure_server(socket)
        .map_err(|e| SecretError::Handler(format!("requiring the secret: {e}")))?;
    Gatekeeper::start(context, secret.clone()).map(Some)
}

/// Answers libzmq's authentication requests (ZAP) for one ZeroMQ context: lets in a PLAIN
/// peer whose password is the cluster secret, and nobody else. One per context that has
/// listening sockets; it runs a thread until dropped (dropping stops and joins it, within
/// 100 ms), and while it runs the context cannot be terminated. Should its socket fail, it
/// logs an error and stops, and libzmq then refuses every new connection: it fails closed.
pub struct Gatekeeper {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Gatekeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gatekeeper").finish_non_exhaustive()
    }
}

impl Gatekeeper {
    /// Binds the context's authentication handler and starts answering it.
    pub fn start(context: &zmq::Context, secret: ClusterSecret) -> Result<Self, SecretError> {
        let fail = |what: &str, e: zmq::Error| SecretError::Handler(format!("{what}: {e}"));
        let socket = context.socket(zmq::REP).map_err(|e| fail("socket", e))?;
        socket.set_linger(0).map_err(|e| fail("linger", e))?;
        socket
            .set_rcvtimeo(POLL.as_millis() as i32)
            .map_err(|e| fail("rcvtimeo", e))?;
        socket.bind(ZAP_ENDPOINT).map_err(|e| fail("bind", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("squall-gatekeeper".into())
                .spawn(move || answer(socket, &secret, &stop))
                .map_err(|e| SecretError::Handler(format!("thread: {e}")))?
        };
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Gatekeeper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Answers authentication requests until `stop`. Refusals are logged at most once a second.
fn answer(socket: zmq::Socket, secret: &ClusterSecret, stop: &AtomicBool) {
    let mut last_warning: Option<Instant> = None;
    let mut refused_since = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let request = match socket.recv_multipart(0) {
            Ok(request) => request,
            Err(zmq::Error::EAGAIN) | Err(zmq::Error::EINTR) => continue,
            Err(e) => {
                tracing::error!(cause = %e, "the cluster secret's handler stopped");
                return;
            }
        };
        let verdict = judge(&request, secret);
        if let Verdict::Refused { address, reason } = &verdict {
            refused_since += 1;
            if last_warning.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                tracing::warn!(peer = %address, reason, refused = refused_since,
                    "refused a connection to an internal port");
                last_warning = Some(Instant::now());
                refused_since = 0;
            }
        }
        if let Err(e) = socket.send_multipart(reply(&request, &verdict), 0) {
            tracing::warn!(cause = %e, "answering an authentication request");
        }
    }
}

/// What the handler says of one request.
#[derive(Debug, PartialEq)]
enum Verdict {
    Admitted,
    Refused {
        address: String,
        reason: &'static str,
    },
}

/// Judges a ZAP request: `1.0`, request id, domain, address, routing id, mechanism,
/// credentials (PLAIN: user name, password).
fn judge(request: &[Vec<u8>], secret: &ClusterSecret) -> Verdict {
    let address = request
        .get(3)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .unwrap_or_default();
    let refused = |reason| Verdict::Refused {
        address: address.clone(),
        reason,
    };
    if request.len() < 6 || request[0] != b"1.0" {
        return refused("not a ZAP 1.0 request");
    }
    if request[5] != b"PLAIN" {
        return refused("no cluster secret presented");
    }
    match request.get(7) {
        Some(password) if request.len() == 8 && secret.matches(password) => Verdict::Admitted,
        _ => refused("wrong cluster secret"),
    }
}

/// The ZAP reply to `request`: `1.0`, its id, status code and text, user id, metadata.
fn reply(request: &[Vec<u8>], verdict: &Verdict) -> Vec<Vec<u8>> {
    let id = request.get(1).cloned().unwrap_or_default();
    let (code, text, user): (&[u8], &[u8], &[u8]) = match verdict {
        Verdict::Admitted => (b"200", b"OK", USER.as_bytes()),
        Verdict::Refused { .. } => (b"400", b"the cluster secret is required", b""),
    };
    vec![
        b"1.0".to_vec(),
        id,
        code.to_vec(),
        text.to_vec(),
        user.to_vec(),
        Vec::new(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> ClusterSecret {
        ClusterSecret::new("a-secret-of-28-bytes-at-last").expect("secret")
    }

    #[test]
    fn loopback_hosts_are_told_apart() {
        for local in ["127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost"] {
            assert!(is_loopback(local), "{local}");
        }
        for open in ["0.0.0.0", "10.0.0.5", "::", "example.com", "*"] {
            assert!(!is_loopback(open), "{open}");
        }
    }

    #[test]
    fn secrets_are_checked_and_never_printed() {
        assert!(ClusterSecret::new("").is_err());
        assert!(ClusterSecret::new("                    ").is_err());
        assert!(ClusterSecret::new("short").is_err());
        assert!(ClusterSecret::new(&"x".repeat(256)).is_err());
        let secret = secret();
        assert!(!format!("{secret:?}").contains("bytes-at-last"));
        assert!(secret.matches(b"a-secret-of-28-bytes-at-last"));
        assert!(!secret.matches(b"a-secret-of-28-bytes-at-lasT"));
        assert!(!secret.matches(b""));
    }

    fn request(mechanism: &[u8], credentials: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut frames: Vec<Vec<u8>> = vec![
            b"1.0".to_vec(),
            b"7".to_vec(),
            DOMAIN.into(),
            b"10.0.0.9".to_vec(),
            Vec::new(),
            mechanism.to_vec(),
        ];
        frames.extend(credentials.iter().map(|c| c.to_vec()));
        frames
    }

    #[test]
    fn only_plain_with_the_secret_is_admitted() {
        let secret = secret();
        let good = request(b"PLAIN", &[b"squall", b"a-secret-of-28-bytes-at-last"]);
        assert_eq!(judge(&good, &secret), Verdict::Admitted);
        let admitted = reply(&good, &Verdict::Admitted);
        assert_eq!(admitted[1], b"7");
        assert_eq!(admitted[2], b"200");
        for bad in [
            request(b"PLAIN", &[b"squall", b"a-secret-of-28-bytes-at-lasT"]),
            request(b"PLAIN", &[b"squall"]),
            request(b"PLAIN", &[]),
            request(b"NULL", &[]),
            request(b"CURVE", &[b"key"]),
            vec![b"1.0".to_vec()],
            vec![b"2.0".to_vec(); 8],
            Vec::new(),
        ] {
            let verdict = judge(&bad, &secret);
            assert!(matches!(verdict, Verdict::Refused { .. }), "{bad:?}");
            assert_eq!(reply(&bad, &verdict)[2], b"400");
        }
    }

    /// A libzmq PULL socket behind a gatekeeper takes messages from a PUSH that presents the
    /// secret, and none from one without it or with another.
    #[test]
    fn a_guarded_socket_takes_messages_only_from_peers_with_the_secret() {
        let context = zmq::Context::new();
        let secret = secret();
        let _gatekeeper = Gatekeeper::start(&context, secret.clone()).expect("gatekeeper");
        let pull = context.socket(zmq::PULL).expect("pull");
        secret.secure_server(&pull).expect("secure");
        pull.set_rcvtimeo(300).expect("timeout");
        pull.bind("tcp://127.0.0.1:*").expect("bind");
        let endpoint = pull.get_last_endpoint().expect("endpoint").expect("utf-8");
        let send = |presented: Option<&str>, body: &str| {
            let peer = zmq::Context::new();
            let push = peer.socket(zmq::PUSH).expect("push");
            push.set_linger(0).expect("linger");
            if let Some(password) = presented {
                push.set_plain_username(Some(USER)).expect("user");
                push.set_plain_password(Some(password)).expect("password");
            }
            push.connect(&endpoint).expect("connect");
            push.send(body, zmq::DONTWAIT).expect("queued");
            // Kept until the pull side had its chance to read.
            (peer, push)
        };
        let _none = send(None, "without");
        let _wrong = send(Some("another-secret-of-28-bytes!!"), "wrong");
        let _right = send(Some(secret.expose()), "right");
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && !got.contains(&b"right".to_vec()) {
            if let Ok(message) = pull.recv_bytes(0) {
                got.push(message);
            }
        }
        // Anything the refused peers could have sent would have arrived by now.
        while let Ok(message) = pull.recv_bytes(0) {
            got.push(message);
        }
        assert_eq!(got, vec![b"right".to_vec()]);
    }
}
