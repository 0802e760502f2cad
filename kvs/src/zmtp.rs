//! A blocking ZeroMQ (ZMTP 3.0) DEALER connection that needs no I/O thread.
//!
//! libzmq moves every message through a background I/O thread: for a client that sends one
//! request and waits for its answer, that is two extra thread wake-ups and about six extra
//! system calls per request. Measured here under a 64-client load, the client process's libzmq
//! I/O thread used 30% of the machine's CPU, more than the store itself. A connection that
//! speaks the wire protocol itself costs one `write` and one `read` per request, like a Redis
//! client: in the same benchmark (`bench/kvs-vs-redis.sh`) the switch took GET throughput at 64
//! clients from 0.51x to 0.62x Redis's, and one client's median GET from 102 µs to 51 µs.
//! Nodes keep libzmq's ROUTER sockets, which accept these connections as DEALER peers.
//!
//! Only what a DEALER client needs is implemented: the NULL security mechanism and PLAIN
//! (which presents the cluster secret, see [`squall_proto::secret`]), the READY handshake,
//! and single-frame messages (multi-frame replies are an error; commands such as PING are
//! skipped).

use std::io::{self, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use squall_proto::secret::{ClusterSecret, USER};

const FLAG_MORE: u8 = 0x01;
const FLAG_LONG: u8 = 0x02;
const FLAG_COMMAND: u8 = 0x04;
/// Largest reply accepted (a corrupt length must not allocate gigabytes).
const MAX_FRAME: u64 = 1 << 30;

/// Socket timeouts are set in steps of this much, so that consecutive requests with similar
/// deadlines do not each pay a `setsockopt`.
const TIMEOUT_STEP: Duration = Duration::from_millis(10);

/// One TCP connection to a ROUTER socket. Not thread-safe; one outstanding request at a time.
pub(crate) struct Connection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    buffer: Vec<u8>,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "deadline passed")
}

/// The remaining time before `deadline`, or a timeout error.
fn remaining(deadline: Instant) -> io::Result<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or_else(timed_out)
}

/// A socket timeout that never outlasts `deadline`: the remaining time rounded down to a
/// [`TIMEOUT_STEP`] (or the exact remaining time, when less than a step is left).
fn socket_timeout(deadline: Instant) -> io::Result<Duration> {
    let left = remaining(deadline)?;
    let steps = (left.as_nanos() / TIMEOUT_STEP.as_nanos()).min(u32::MAX as u128) as u32;
    Ok(if steps == 0 {
        left
    } else {
        TIMEOUT_STEP * steps
    })
}

/// Sets a socket timeout through `set` unless `current` already holds it.
fn update_timeout(
    current: &mut Option<Duration>,
    deadline: Instant,
    set: impl FnOnce(Option<Duration>) -> io::Result<()>,
) -> io::Result<()> {
    let wanted = socket_timeout(deadline)?;
    if *current != Some(wanted) {
        set(Some(wanted))?;
        *current = Some(wanted);
    }
    Ok(())
}

impl Connection {
    /// Connects to `endpoint` (`tcp://host:port`) and completes the ZMTP handshake, presenting
    /// `secret` if given, all before `deadline`.
    pub(crate) fn connect(
        endpoint: &str,
        deadline: Instant,
        secret: Option<&ClusterSecret>,
    ) -> io::Result<Self> {
        let address = endpoint
            .strip_prefix("tcp://")
            .ok_or_else(|| invalid(format!("{endpoint:?} is not a tcp:// endpoint")))?;
        let socket_address = address
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| invalid(format!("{address:?} resolves to no address")))?;
        let stream = TcpStream::connect_timeout(&socket_address, remaining(deadline)?)?;
        stream.set_nodelay(true)?;
        let mut connection = Self {
            reader: BufReader::with_capacity(16 << 10, stream.try_clone()?),
            writer: stream,
            buffer: Vec::with_capacity(1024),
            read_timeout: None,
            write_timeout: None,
        };
        connection.handshake(deadline, secret)?;
        Ok(connection)
    }

    /// ZMTP 3.0's handshake: greetings, then with NULL a READY each way; with PLAIN (RFC 24)
    /// HELLO (the secret), WELCOME, INITIATE and READY, or the server's ERROR.
    fn handshake(&mut self, deadline: Instant, secret: Option<&ClusterSecret>) -> io::Result<()> {
        let mechanism: &[u8] = if secret.is_some() { b"PLAIN" } else { b"NULL" };
        // Greeting: signature, version 3.0, mechanism, as-server 0, filler.
        let mut greeting = [0u8; 64];
        greeting[0] = 0xFF;
        greeting[9] = 0x7F;
        greeting[10] = 3;
        greeting[11] = 0;
        greeting[12..12 + mechanism.len()].copy_from_slice(mechanism);
        // The metadata both READY and INITIATE carry: Socket-Type = DEALER.
        let mut metadata = Vec::with_capacity(24);
        metadata.push(11);
        metadata.extend_from_slice(b"Socket-Type");
        metadata.extend_from_slice(&6u32.to_be_bytes());
        metadata.extend_from_slice(b"DEALER");
        // The greeting alone first. libzmq closes a connection whose mechanism is not its own
        // as soon as it has read the greeting, often before its own greeting went out: a close
        // here is that refusal.
        self.buffer.clear();
        self.buffer.extend_from_slice(&greeting);
        self.write_buffer(deadline)?;
        let closed = if secret.is_some() {
            "the peer closed the connection during the handshake (it may take no cluster \
             secret, or have refused this one)"
        } else {
            "the peer closed the connection during the handshake (it may require the cluster \
             secret: --cluster-secret or SQUALL_CLUSTER_SECRET)"
        };
        let mut peer = [0u8; 64];
        self.read_exact(&mut peer, deadline)
            .map_err(|e| if_closed(e, closed))?;
        if peer[0] != 0xFF || peer[9] != 0x7F {
            return Err(invalid("peer is not a ZeroMQ socket"));
        }
        if peer[10] < 3 {
            return Err(invalid(format!("peer speaks ZMTP {}, not 3", peer[10])));
        }
        let theirs = &peer[12..32];
        let theirs = &theirs[..theirs.iter().position(|&b| b == 0).unwrap_or(theirs.len())];
        if theirs != mechanism {
            return Err(refused(if secret.is_some() {
                "the peer takes no cluster secret, and this process presents one"
            } else {
                "the peer requires the cluster secret (--cluster-secret or SQUALL_CLUSTER_SECRET)"
            }));
        }
        self.buffer.clear();
        match secret {
            None => push_command(&mut self.buffer, b"READY", &metadata),
            Some(secret) => {
                let password = secret.expose().as_bytes();
                let mut hello = Vec::with_capacity(2 + USER.len() + password.len());
                push_short(&mut hello, USER.as_bytes())?;
                push_short(&mut hello, password)?;
                push_command(&mut self.buffer, b"HELLO", &hello);
            }
        }
        self.write_buffer(deadline)?;
        if secret.is_some() {
            self.expect_command(b"WELCOME", deadline)?;
            self.buffer.clear();
            push_command(&mut self.buffer, b"INITIATE", &metadata);
            self.write_buffer(deadline)?;
        }
        self.expect_command(b"READY", deadline)
    }

    /// Reads the handshake command `name`; the peer's ERROR is a refusal.
    fn expect_command(&mut self, name: &[u8], deadline: Instant) -> io::Result<()> {
        // libzmq closes the connection after refusing it, sometimes before its ERROR.
        let (flags, body) = self.read_frame(deadline).map_err(|e| {
            if_closed(
                e,
                "the peer closed the connection during the handshake: it refused this cluster \
                 secret",
            )
        })?;
        let (got, data) = match body.split_first() {
            Some((&len, rest)) if flags & FLAG_COMMAND != 0 && rest.len() >= usize::from(len) => {
                rest.split_at(usize::from(len))
            }
            // libzmq 4.3 writes its PLAIN ERROR's name as "\x05ERROR" in C, where the hex
            // escape takes the `E` too: 0x5E, then "RROR".
            _ if flags & FLAG_COMMAND != 0 && body.starts_with(b"\x5eRROR") => {
                (&b"ERROR"[..], &body[5..])
            }
            _ => return Err(invalid("peer sent a malformed handshake command")),
        };
        if got == name {
            return Ok(());
        }
        if got == b"ERROR" {
            let reason = data
                .split_first()
                .map(|(&len, rest)| &rest[..usize::from(len).min(rest.len())])
                .unwrap_or_default();
            return Err(refused(&format!(
                "the peer refused the connection: {} (a wrong cluster secret?)",
                String::from_utf8_lossy(reason)
            )));
        }
        Err(invalid(format!(
            "peer sent {} where {} was due",
            String::from_utf8_lossy(got),
            String::from_utf8_lossy(name)
        )))
    }

    /// Sends one single-frame message.
    pub(crate) fn send(&mut self, payload: &[u8], deadline: Instant) -> io::Result<()> {
        self.buffer.clear();
        push_frame_header(&mut self.buffer, 0, payload.len());
        self.buffer.extend_from_slice(payload);
        self.write_buffer(deadline)
    }

    /// Writes `self.buffer` before `deadline`. The kernel restarts a socket timeout on every
    /// partial write, so the timeout is re-armed with what is left before each one.
    fn write_buffer(&mut self, deadline: Instant) -> io::Result<()> {
        let mut written = 0;
        while written < self.buffer.len() {
            let writer = &self.writer;
            update_timeout(&mut self.write_timeout, deadline, |t| {
                writer.set_write_timeout(t)
            })?;
            let result = (&self.writer).write(&self.buffer[written..]);
            if let Some(n) = progress(result, deadline, io::ErrorKind::WriteZero)? {
                written += n;
            }
        }
        Ok(())
    }

    /// Receives one single-frame message, skipping commands, before `deadline`.
    pub(crate) fn recv(&mut self, deadline: Instant) -> io::Result<Vec<u8>> {
        loop {
            let (flags, body) = self.read_frame(deadline)?;
            if flags & FLAG_COMMAND != 0 {
                continue;
            }
            if flags & FLAG_MORE != 0 {
                return Err(invalid("unexpected multi-frame message"));
            }
            return Ok(body);
        }
    }

    fn read_frame(&mut self, deadline: Instant) -> io::Result<(u8, Vec<u8>)> {
        let mut flags = [0u8; 1];
        self.read_exact(&mut flags, deadline)?;
        let flags = flags[0];
        let size = if flags & FLAG_LONG != 0 {
            let mut size = [0u8; 8];
            self.read_exact(&mut size, deadline)?;
            u64::from_be_bytes(size)
        } else {
            let mut size = [0u8; 1];
            self.read_exact(&mut size, deadline)?;
            u64::from(size[0])
        };
        if size > MAX_FRAME {
            return Err(invalid(format!("frame of {size} bytes is too large")));
        }
        // Grow the buffer as bytes arrive rather than trusting the declared size up front.
        let size = size as usize;
        let mut body = Vec::with_capacity(size.min(64 << 10));
        while body.len() < size {
            let start = body.len();
            let chunk = (size - start).min(1 << 20);
            body.resize(start + chunk, 0);
            self.read_exact(&mut body[start..], deadline)?;
        }
        Ok((flags, body))
    }

    /// `read_exact` bounded by `deadline`. A timeout leaves the stream mid-message, so the
    /// caller must drop the connection after any error.
    fn read_exact(&mut self, mut out: &mut [u8], deadline: Instant) -> io::Result<()> {
        while !out.is_empty() {
            if self.reader.buffer().is_empty() {
                let stream = self.reader.get_ref();
                update_timeout(&mut self.read_timeout, deadline, |t| {
                    stream.set_read_timeout(t)
                })?;
            }
            let result = self.reader.read(out);
            if let Some(n) = progress(result, deadline, io::ErrorKind::UnexpectedEof)? {
                out = &mut out[n..];
            }
        }
        Ok(())
    }
}

/// Interprets one `read` or `write` on a socket whose timeout is rounded down: `Some(n)` bytes
/// moved, `None` to try again (interrupted, or the timeout fired before the deadline), or an
/// error (`closed` when the peer closed the connection, or the deadline passed).
fn progress(
    result: io::Result<usize>,
    deadline: Instant,
    closed: io::ErrorKind,
) -> io::Result<Option<usize>> {
    match result {
        Ok(0) => Err(closed.into()),
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            remaining(deadline).map(|_| None)
        }
        Err(e) => Err(e),
    }
}

/// `e`, or the refusal `message` if `e` is the peer closing the connection.
fn if_closed(e: io::Error, message: &str) -> io::Error {
    match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => refused(message),
        _ => e,
    }
}

/// A handshake's refusal, told apart from a broken connection.
fn refused(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, message.to_string())
}

/// Appends a command frame: `name` (length-prefixed) and its `data`.
fn push_command(buffer: &mut Vec<u8>, name: &[u8], data: &[u8]) {
    push_frame_header(buffer, FLAG_COMMAND, 1 + name.len() + data.len());
    buffer.push(name.len() as u8);
    buffer.extend_from_slice(name);
    buffer.extend_from_slice(data);
}

/// Appends a string of at most 255 bytes with its one-byte length.
fn push_short(buffer: &mut Vec<u8>, value: &[u8]) -> io::Result<()> {
    let len = u8::try_from(value.len()).map_err(|_| invalid("a handshake field over 255 bytes"))?;
    buffer.push(len);
    buffer.extend_from_slice(value);
    Ok(())
}

fn push_frame_header(buffer: &mut Vec<u8>, flags: u8, size: usize) {
    match u8::try_from(size) {
        Ok(short) => {
            buffer.push(flags);
            buffer.push(short);
        }
        Err(_) => {
            buffer.push(flags | FLAG_LONG);
            buffer.extend_from_slice(&(size as u64).to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> (zmq::Socket, String) {
        let socket = zmq::Context::new().socket(zmq::ROUTER).expect("socket");
        socket.bind("tcp://127.0.0.1:*").expect("bind");
        let endpoint = socket
            .get_last_endpoint()
            .expect("endpoint")
            .expect("utf-8");
        (socket, endpoint)
    }

    #[test]
    fn talks_to_a_libzmq_router_with_short_and_long_frames() {
        let (router, endpoint) = router();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut connection = Connection::connect(&endpoint, deadline, None).expect("connect");
        for size in [0usize, 1, 255, 256, 70_000] {
            let payload: Vec<u8> = (0..size).map(|i| i as u8).collect();
            connection.send(&payload, deadline).expect("send");
            let frames = router.recv_multipart(0).expect("router receives");
            assert_eq!(frames.len(), 2, "identity and payload");
            assert_eq!(frames[1], payload);
            let reply: Vec<u8> = payload.iter().rev().copied().collect();
            router.send(&frames[0], zmq::SNDMORE).expect("identity");
            router.send(&reply, 0).expect("reply");
            assert_eq!(connection.recv(deadline).expect("recv"), reply);
        }
    }

    #[test]
    fn a_silent_peer_times_out_at_the_deadline() {
        let (_router, endpoint) = router();
        let mut connection =
            Connection::connect(&endpoint, Instant::now() + Duration::from_secs(5), None)
                .expect("connect");
        let started = Instant::now();
        let error = connection
            .recv(Instant::now() + Duration::from_millis(100))
            .expect_err("nobody answers");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[test]
    fn presents_the_cluster_secret_and_is_refused_without_it() {
        use squall_proto::secret::Gatekeeper;
        let secret = ClusterSecret::new("the-cluster-secret-of-30-bytes").expect("secret");
        let context = zmq::Context::new();
        let _gatekeeper = Gatekeeper::start(&context, secret.clone()).expect("gatekeeper");
        let router = context.socket(zmq::ROUTER).expect("socket");
        secret.secure_server(&router).expect("secure");
        router.bind("tcp://127.0.0.1:*").expect("bind");
        let endpoint = router
            .get_last_endpoint()
            .expect("endpoint")
            .expect("utf-8");
        let deadline = || Instant::now() + Duration::from_secs(5);
        let mut connection =
            Connection::connect(&endpoint, deadline(), Some(&secret)).expect("connect");
        connection.send(b"ping", deadline()).expect("send");
        let frames = router.recv_multipart(0).expect("router receives");
        assert_eq!(frames[1], b"ping");
        router.send(&frames[0], zmq::SNDMORE).expect("identity");
        router.send(&b"pong"[..], 0).expect("reply");
        assert_eq!(connection.recv(deadline()).expect("recv"), b"pong");
        let wrong = ClusterSecret::new("another-secret-of-30-bytes!!!!").expect("secret");
        for presented in [None, Some(&wrong)] {
            let error = Connection::connect(&endpoint, deadline(), presented)
                .err()
                .expect("refused");
            assert_eq!(error.kind(), io::ErrorKind::PermissionDenied, "{error}");
        }
        // An open router refuses a client that presents a secret, clearly.
        let (_open, open_endpoint) = super::tests::router();
        let error = Connection::connect(&open_endpoint, deadline(), Some(&secret))
            .err()
            .expect("refused");
        assert_eq!(error.kind(), io::ErrorKind::PermissionDenied, "{error}");
    }

    /// What a listening ZMTP 3.0 peer sends a DEALER: its greeting (`mechanism`, as server),
    /// then `commands` and one message frame.
    fn server_transcript(mechanism: &[u8], commands: &[(&[u8], &[u8])], message: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; 64];
        out[0] = 0xFF;
        out[9] = 0x7F;
        out[10] = 3;
        out[12..12 + mechanism.len()].copy_from_slice(mechanism);
        out[32] = 1;
        for (name, data) in commands {
            push_command(&mut out, name, data);
        }
        push_frame_header(&mut out, 0, message.len());
        out.extend_from_slice(message);
        out
    }

    /// Connects (presenting `secret`, if given) to a peer that answers with `bytes` and then
    /// closes, and reads one message: whatever the bytes, an answer or an error, in time.
    fn against(bytes: Vec<u8>, secret: Option<&ClusterSecret>) -> io::Result<Vec<u8>> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let endpoint = format!("tcp://{}", listener.local_addr().expect("addr"));
        let server = std::thread::spawn(move || {
            if let Ok((mut stream, _)) = listener.accept() {
                let _ = stream.write_all(&bytes);
                // Done sending: the client reads the end at once. What it sends is read until
                // it closes, so its writes never fail early.
                let _ = stream.shutdown(std::net::Shutdown::Write);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let mut sink = [0u8; 1024];
                while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
            }
        });
        let started = Instant::now();
        let deadline = started + Duration::from_secs(2);
        let outcome = Connection::connect(&endpoint, deadline, secret)
            .and_then(|mut connection| connection.recv(deadline));
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "past the deadline"
        );
        server.join().expect("server thread");
        outcome
    }

    /// The valid transcripts the property below mutates, unmutated: each gives the message.
    #[test]
    fn valid_null_and_plain_transcripts_give_the_message() {
        let ready: &[u8] = b"\x0bSocket-Type\x00\x00\x00\x06ROUTER";
        let null = server_transcript(b"NULL", &[(b"READY", ready)], b"answer");
        assert_eq!(against(null, None).expect("NULL"), b"answer");
        let secret = ClusterSecret::new("the-cluster-secret-of-30-bytes").expect("secret");
        let plain = server_transcript(b"PLAIN", &[(b"WELCOME", b""), (b"READY", ready)], b"answer");
        assert_eq!(against(plain, Some(&secret)).expect("PLAIN"), b"answer");
    }

    /// A peer that accepts and then says nothing holds the connection no longer than the
    /// deadline.
    #[test]
    fn a_silent_peer_is_given_up_on_at_the_deadline() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let endpoint = format!("tcp://{}", listener.local_addr().expect("addr"));
        let started = Instant::now();
        let error = Connection::connect(&endpoint, started + Duration::from_millis(200), None)
            .err()
            .expect("nothing was said");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut, "{error}");
        assert!(started.elapsed() >= Duration::from_millis(200));
        drop(listener);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// A peer that sends arbitrary bytes gets an error (or, by chance, a message), never
        /// a panic, a hang past the deadline or an allocation its bytes did not pay for.
        #[test]
        fn arbitrary_bytes_from_a_peer_are_an_error_not_a_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            plain in proptest::prelude::any::<bool>(),
        ) {
            let secret = ClusterSecret::new("the-cluster-secret-of-30-bytes").expect("secret");
            let _ = against(bytes, plain.then_some(&secret));
        }

        /// Valid handshakes, mutated: the same, for bytes that get further into the parser.
        #[test]
        fn mutated_handshakes_are_an_error_not_a_panic(
            edits in squall_lattices::testing::edits(6),
            plain in proptest::prelude::any::<bool>(),
        ) {
            let secret = ClusterSecret::new("the-cluster-secret-of-30-bytes").expect("secret");
            let valid = if plain {
                server_transcript(
                    b"PLAIN",
                    &[(b"WELCOME", b""), (b"READY", b"\x0bSocket-Type\x00\x00\x00\x06ROUTER")],
                    b"answer",
                )
            } else {
                server_transcript(
                    b"NULL",
                    &[(b"READY", b"\x0bSocket-Type\x00\x00\x00\x06ROUTER")],
                    b"answer",
                )
            };
            let bytes = squall_lattices::testing::mutated(&valid, &edits);
            let unchanged = bytes == valid;
            let outcome = against(bytes, plain.then_some(&secret));
            if unchanged {
                proptest::prop_assert_eq!(outcome.expect("a valid transcript"), b"answer".to_vec());
            }
        }
    }

    #[test]
    fn a_peer_that_is_not_zeromq_is_refused() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let endpoint = format!("tcp://{}", listener.local_addr().expect("addr"));
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
            let mut sink = [0u8; 128];
            let _ = stream.read(&mut sink);
        });
        let result = Connection::connect(&endpoint, Instant::now() + Duration::from_secs(5), None);
        assert!(result.is_err());
        server.join().expect("server thread");
    }
}
