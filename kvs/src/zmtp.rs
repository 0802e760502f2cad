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
//! Only what a DEALER client needs is implemented: the NULL security mechanism, the READY
//! handshake, and single-frame messages (multi-frame replies are an error; commands such as
//! PING are skipped).

use std::io::{self, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

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
    /// Connects to `endpoint` (`tcp://host:port`) and completes the ZMTP handshake, all before
    /// `deadline`.
    pub(crate) fn connect(endpoint: &str, deadline: Instant) -> io::Result<Self> {
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
        connection.handshake(deadline)?;
        Ok(connection)
    }

    fn handshake(&mut self, deadline: Instant) -> io::Result<()> {
        // Greeting: signature, version 3.0, mechanism NULL, as-server 0, filler.
        let mut greeting = [0u8; 64];
        greeting[0] = 0xFF;
        greeting[9] = 0x7F;
        greeting[10] = 3;
        greeting[11] = 0;
        greeting[12..16].copy_from_slice(b"NULL");
        // READY command with the property Socket-Type = DEALER.
        let mut ready = Vec::with_capacity(32);
        ready.push(5);
        ready.extend_from_slice(b"READY");
        ready.push(11);
        ready.extend_from_slice(b"Socket-Type");
        ready.extend_from_slice(&6u32.to_be_bytes());
        ready.extend_from_slice(b"DEALER");
        self.buffer.clear();
        self.buffer.extend_from_slice(&greeting);
        push_frame_header(&mut self.buffer, FLAG_COMMAND, ready.len());
        self.buffer.extend_from_slice(&ready);
        self.write_buffer(deadline)?;

        let mut peer = [0u8; 64];
        self.read_exact(&mut peer, deadline)?;
        if peer[0] != 0xFF || peer[9] != 0x7F {
            return Err(invalid("peer is not a ZeroMQ socket"));
        }
        if peer[10] < 3 {
            return Err(invalid(format!("peer speaks ZMTP {}, not 3", peer[10])));
        }
        if &peer[12..16] != b"NULL" {
            return Err(invalid(
                "peer requires a security mechanism other than NULL",
            ));
        }
        let (flags, body) = self.read_frame(deadline)?;
        if flags & FLAG_COMMAND == 0 || !body.starts_with(b"\x05READY") {
            return Err(invalid("peer did not send READY"));
        }
        Ok(())
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
        let mut connection = Connection::connect(&endpoint, deadline).expect("connect");
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
            Connection::connect(&endpoint, Instant::now() + Duration::from_secs(5))
                .expect("connect");
        let started = Instant::now();
        let error = connection
            .recv(Instant::now() + Duration::from_millis(100))
            .expect_err("nobody answers");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(100));
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
        let result = Connection::connect(&endpoint, Instant::now() + Duration::from_secs(5));
        assert!(result.is_err());
        server.join().expect("server thread");
    }
}
